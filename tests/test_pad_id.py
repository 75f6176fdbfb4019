"""One padding rule for every caller (the service's batches, the RM trainer, SFT, PPO, best-of-N):
the tokenizer's pad token, else EOS, else 0. The service and the RM trainer used to pad with 0 and
the policy trainers with EOS; a reward must not depend on which, since the mask hides the padding."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from reward_core.backends import TorchBackend
from reward_core.formatting import encode_conversations
from reward_core.forward import pad_batch, pad_token_id
from reward_core.loading import open_model_dir
from tiny_models import build_tiny_hf_decoder


@pytest.mark.parametrize(
    "pad, eos, expected",
    [(3, 7, 3), (None, 7, 7), (None, [9, 7], 9), (None, None, 0), (0, 7, 0)],
)
def test_pad_id_is_the_pad_token_else_eos_else_zero(pad, eos, expected):
    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == expected


def test_a_decoders_rewards_do_not_depend_on_the_pad_id(tmp_path):
    model_dir = build_tiny_hf_decoder(tmp_path / "qwen2", "qwen2", with_pad=False)
    files = open_model_dir(model_dir)
    backend = TorchBackend(model_dir, files.spec)
    conversations = [
        ([{"role": "user", "content": "Say hi"}], "Hi!"),
        ([{"role": "user", "content": "What is the capital of France? Answer in a sentence."}], "Paris is the capital."),
    ]
    encoded = encode_conversations(conversations, files.tokenizer, files.spec)
    assert len(encoded[0]) != len(encoded[1])  # so one row is padded

    with_rule = backend.score_batch(pad_batch(encoded, pad_token_id(files.tokenizer)))
    with_zero = backend.score_batch(pad_batch(encoded, 0))
    alone = np.array([backend.score_batch(pad_batch([e], 0))[0] for e in encoded])

    np.testing.assert_allclose(with_rule, with_zero, atol=1e-5)
    np.testing.assert_allclose(with_rule, alone, atol=1e-5)
