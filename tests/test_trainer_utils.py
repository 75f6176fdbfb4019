"""The utilities the trainers share (`trainer/utils.py`): dropout off, device, progress bar and the
atomic directory swap of checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trainer.utils import DROPOUT_ATTRIBUTES, disable_dropout, progress_bar, replace_dir, resolve_device


def _dropout_left(model) -> list[str]:
    left = [f"{name} (p={m.p})" for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p != 0]
    for name, m in model.named_modules():
        for attr in DROPOUT_ATTRIBUTES:
            value = getattr(m, attr, None)
            if isinstance(value, float) and value != 0:
                left.append(f"{name}.{attr}={value}")
    return left


def test_disable_dropout_zeroes_dropout_modules_and_attention_dropout_attributes():
    # GPT-2 applies dropout through nn.Dropout modules; Llama's attention applies its
    # `attention_dropout` float (copied from the config) inside the attention function, with no
    # nn.Dropout at all. Zeroing only nn.Dropout (what `reward sft` and `reward ppo` did) would
    # leave Llama's attention dropping out and PPO's log-probs noisy.
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32,
                                      attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1, bos_token_id=1, eos_token_id=2))
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                                         intermediate_size=32, vocab_size=64, attention_dropout=0.1,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0))
    assert _dropout_left(gpt2) and _dropout_left(llama)
    for model in (gpt2, llama):
        disable_dropout(model)
        assert _dropout_left(model) == []
    assert llama.model.layers[0].self_attn.attention_dropout == 0.0
    # the config is left as it is: a saved config.json keeps the architecture's values
    assert llama.config.attention_dropout == 0.1 and gpt2.config.attn_pdrop == 0.1


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto", local_rank=0) == torch.device("cuda:0")
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda:0")
    else:
        assert resolve_device("auto") == torch.device("cpu")

        class ConfigError(ValueError):
            pass

        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda", error=ConfigError)


def test_replace_dir_swaps_in_a_complete_directory_only(tmp_path):
    target = tmp_path / "checkpoints" / "last"
    with replace_dir(target) as tmp:
        (tmp / "state").write_text("1")
    assert (target / "state").read_text() == "1"
    with replace_dir(target) as tmp:
        (tmp / "state").write_text("2")
    assert (target / "state").read_text() == "2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]  # no tmp, no .old left
    with pytest.raises(RuntimeError):
        with replace_dir(target) as tmp:
            (tmp / "state").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "state").read_text() == "2"  # the previous one is intact
    with replace_dir(target) as tmp:  # and the next save clears the leftover
        (tmp / "state").write_text("3")
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]


def test_progress_bar_is_off_unless_enabled_on_a_terminal_or_kept():
    import io

    from rich.console import Console

    log = Console(file=io.StringIO(), force_terminal=False)
    assert progress_bar(console=log).disable
    assert not progress_bar(console=log, keep=True).disable
    assert progress_bar(False, console=log, keep=True).disable
    with progress_bar(console=log, stats=True, keep=True) as bar:
        bar.add_task("[bold]train-rm", total=4, completed=4, stats="loss 0.5")
    assert "train-rm" in log.file.getvalue() and "loss 0.5" in log.file.getvalue()
