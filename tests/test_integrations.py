"""Reward functions for TRL and other trainers, called the way those trainers call them
(keyword arguments, extra dataset columns, async on another event loop), against the real
server. Their rewards must equal /v1/score's for the same conversations."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest
from transformers import AutoTokenizer

from client import RewardClient, RewardServiceError
from client.integrations import text_reward_fn, trl_async_reward_func, trl_reward_func
from server import free_port, running_server

PROMPTS = ["What is the capital of France?", "Say hi"]
COMPLETIONS = ["Paris.", "Go away."]
CONVERSATIONAL_PROMPTS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Say hi"}],
]
CONVERSATIONAL_COMPLETIONS = [[{"role": "assistant", "content": "Paris."}], [{"role": "assistant", "content": "Go away."}]]


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    args = [f"--model=llama={model_dirs['llama']}", f"--model=bert={model_dirs['bert']}", "--max-wait-ms", "5"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


def trl_kwargs(prompts, completions) -> dict:
    """Everything GRPOTrainer passes: completion token ids, dataset columns, its state and loggers."""
    return dict(
        prompts=prompts, completions=completions, completion_ids=[[1, 2, 3]] * len(completions),
        ground_truth=["Paris", "Hello"], trainer_state=object(), log_extra=lambda *a: None, log_metric=lambda *a: None,
    )


def v1(server, items, model="llama") -> list[float]:
    with RewardClient(server.url) as client:
        return client.score(items, model=model).scores


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_trl_standard_format(server, model):
    reward_func = trl_reward_func(server.url, model=model)

    rewards = reward_func(**trl_kwargs(PROMPTS, COMPLETIONS))

    expected = v1(server, [{"prompt": p, "response": c} for p, c in zip(PROMPTS, COMPLETIONS)], model)
    assert rewards == pytest.approx(expected, abs=1e-4)
    assert reward_func.__name__ == "reward_model"


def test_trl_conversational_format(server):
    reward_func = trl_reward_func(server.url, model="llama", name="rm_llama")

    rewards = reward_func(**trl_kwargs(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS))

    expected = v1(server, [{"messages": p + c} for p, c in zip(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS)])
    assert rewards == pytest.approx(expected, abs=1e-4)
    assert reward_func.__name__ == "rm_llama"


def test_trl_async_flavour_runs_concurrently_on_a_loop_of_its_own(server):
    reward_func = trl_async_reward_func(server.url, model="llama")
    assert inspect.iscoroutinefunction(reward_func), "TRL picks the async path with inspect.iscoroutinefunction"

    # TRL runs async reward functions on an event loop in a separate thread and gathers them.
    results = {}

    def trl_loop_thread():
        async def gather():
            return await asyncio.gather(
                reward_func(**trl_kwargs(PROMPTS, COMPLETIONS)),
                reward_func(**trl_kwargs(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS)),
            )
        results["rewards"] = asyncio.run(gather())

    thread = threading.Thread(target=trl_loop_thread)
    thread.start()
    thread.join(timeout=120)

    standard, conversational = results["rewards"]
    assert standard == pytest.approx(v1(server, [{"prompt": p, "response": c} for p, c in zip(PROMPTS, COMPLETIONS)]), abs=1e-4)
    assert conversational == pytest.approx(
        v1(server, [{"messages": p + c} for p, c in zip(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS)]), abs=1e-4
    )


def test_an_unreachable_service_raises_or_gives_none_as_asked():
    url = f"http://127.0.0.1:{free_port()}"
    strict = trl_reward_func(url, max_retries=0, timeout=5)
    lenient = trl_reward_func(url, on_error="none", max_retries=0, timeout=5)

    with pytest.raises(RewardServiceError, match="cannot reach"):
        strict(**trl_kwargs(PROMPTS, COMPLETIONS))
    # TRL turns None into NaN and leaves those completions out of the reward.
    assert lenient(**trl_kwargs(PROMPTS, COMPLETIONS)) == [None, None]


def test_text_reward_fn_scores_formatted_texts_like_v1_score(server, model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    conversations = [p + c for p, c in zip(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS)]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    reward_fn = text_reward_fn(server.url, model="llama", chunk_size=1)  # one request per text, merged in order

    assert reward_fn(texts) == pytest.approx(v1(server, [{"messages": c} for c in conversations]), abs=1e-4)
    assert reward_fn([]) == []
