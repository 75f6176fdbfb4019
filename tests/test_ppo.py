"""`reward ppo` (trainer/ppo.py): the PPO math on hand-computed examples, then whole runs against
the real service on loopback. The world is planted (tests/rlhf_fixtures.py): a tiny BERT reward
model prefers responses naming "banana", and the tiny GPT-2 policy was taught by `reward sft` to
name one of four fruits. PPO must raise the reward, survive a service restart, and resume after
being killed without losing or repeating a step."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

import rlhf_fixtures
from server import ServerProcess, running_server
from trainer.ppo import (
    KLController,
    PPOConfig,
    PPOTrainer,
    RunningMoments,
    compute_gae,
    eos_penalty_warning,
    kl_penalized_rewards,
    masked_whiten,
    ppo_losses,
    response_mask,
    shape_scores,
    train_ppo,
)

torch.set_num_threads(1)

# --------------------------------------------------------------------------- the math, by hand


def test_gae_matches_a_hand_computed_example():
    # gamma 1, lambda 0.5, reward 1 at the end, values 0.5 0.2 0.4:
    #   t=2: delta = 1 + 0 - 0.4 = 0.6                      A = 0.6
    #   t=1: delta = 0 + 0.4 - 0.2 = 0.2                    A = 0.2 + 0.5 * 0.6 = 0.5
    #   t=0: delta = 0 + 0.2 - 0.5 = -0.3                   A = -0.3 + 0.5 * 0.5 = -0.05
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert advantages.tolist() == [pytest.approx([-0.05, 0.5, 0.6])]
    assert returns.tolist() == [pytest.approx([0.45, 0.7, 1.0])]

    # The episode ends at the mask: the value (9.0) after it is never bootstrapped from.
    #   t=1: delta = 2 + 0.9 * 0 - 0.3 = 1.7                A = 1.7
    #   t=0: delta = 0 + 0.9 * 0.3 - 0.1 = 0.17             A = 0.17 + 0.9 * 0.5 * 1.7 = 0.935
    advantages, returns = compute_gae(torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[0.1, 0.3, 9.0]]),
                                      torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=0.5)
    assert advantages.tolist() == [pytest.approx([0.935, 1.7, 0.0])]
    assert returns.tolist() == [pytest.approx([1.035, 2.0, 0.0])]


def test_kl_penalty_is_zero_when_policy_equals_reference_and_the_score_sits_on_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.1, -0.2, -0.3, -0.4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = kl_penalized_rewards(scores, logprobs, logprobs.clone(), mask, kl_coef=0.5)
    assert kl.abs().sum() == 0
    assert rewards.tolist() == [[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -1.0]]

    # log pi - log ref = 0.4 on every token: each pays 0.5 * 0.4, the last also gets the score
    rewards, kl = kl_penalized_rewards(scores, logprobs, logprobs - 0.4, mask, kl_coef=0.5)
    assert rewards.tolist()[0] == pytest.approx([-0.2, -0.2, 2.0 - 0.2, 0.0])
    assert kl.sum(dim=1).tolist() == pytest.approx([1.2, 1.6])


def test_response_mask_keeps_the_first_eos_and_drops_what_follows():
    eos = 7
    ids = torch.tensor([[3, 4, 7, 5, 7], [3, 3, 3, 3, 3], [7, 1, 1, 1, 1]])
    mask, has_eos = response_mask(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]
    unmasked, _ = response_mask(ids, [eos], mask_after_eos=False)
    assert unmasked.sum() == ids.numel()


def test_adaptive_kl_controller_follows_ziegler_et_al():
    controller = KLController(0.1, adaptive=True, target=6.0, horizon=1000)
    controller.update(current_kl=9.0, n_responses=100)  # error 9/6 - 1 = 0.5, clipped to 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    controller.update(current_kl=5.4, n_responses=100)  # error -0.1
    assert controller.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
    fixed = KLController(0.1, adaptive=False, target=6.0, horizon=1000)
    fixed.update(100.0, 100)
    assert fixed.value == 0.1


def test_kl_controller_can_hold_beta_until_the_kl_first_reaches_the_target():
    controller = KLController(0.1, adaptive=True, target=6.0, horizon=1000, hold_until_target=True)
    controller.update(current_kl=0.5, n_responses=100)  # the policy is still next to the reference
    assert controller.value == 0.1
    controller.update(current_kl=6.6, n_responses=100)  # target reached: adapts from now on
    assert controller.value == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    controller.update(current_kl=3.0, n_responses=100)  # below the target again: beta now falls
    assert controller.value == pytest.approx(0.1 * 1.01 * (1 - 0.2 * 0.1))
    resumed = KLController(0.5, adaptive=True, target=6.0, horizon=1000, hold_until_target=True)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.target_reached and resumed.value == controller.value


def test_clipped_losses_stop_the_gradient_outside_the_trust_region():
    old = torch.zeros(1, 3)
    # ratios e^0.5, e^0.1, e^-0.5 with advantage +1: the first is clipped at 1.2 (no gradient),
    # the others count in full.
    new = torch.tensor([[0.5, 0.1, -0.5]], requires_grad=True)
    advantages = torch.ones(1, 3)
    values = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    old_values = torch.zeros(1, 3)
    returns = torch.tensor([[2.0, 0.1, 0.0]])
    policy_loss, value_loss, stats = ppo_losses(new, old, advantages, values, old_values, returns, torch.ones(1, 3), 0.2, 0.2)
    assert policy_loss.item() == pytest.approx(-(1.2 + torch.exp(torch.tensor(0.1)).item() + torch.exp(torch.tensor(-0.5)).item()) / 3)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    policy_loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0 and new.grad[0, 2] != 0
    # value 1.0 moved 1.0 from 0: clipped to 0.2; max((1-2)^2, (0.2-2)^2) = 3.24 (the pessimistic one)
    assert value_loss.item() == pytest.approx(0.5 * (3.24 + 0.01 + 0.0) / 3)
    ratio = torch.exp(torch.tensor([0.5, 0.1, -0.5]))
    assert stats["approx_kl"] == pytest.approx(((ratio - 1) - torch.tensor([0.5, 0.1, -0.5])).mean().item())


def test_whitening_and_running_moments_and_score_shaping():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = masked_whiten(x, mask)
    assert white[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4) and white[0, 3] == 0

    moments = RunningMoments()
    batches = [[1.0, 2.0, 3.0], [10.0], [4.0, -2.0]]
    for b in batches:
        moments.update(b)
    everything = torch.tensor([v for b in batches for v in b])
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std(unbiased=False).item())

    shaped = shape_scores([1.0, 1.0], torch.tensor([True, False]), shift=0.25, missing_eos_penalty=2.0, moments=None)
    assert shaped.tolist() == [0.75, -1.25]


def test_a_missing_eos_penalty_that_dwarfs_the_rms_scores_is_warned_about():
    # an RM whose scores on the SFT answers spread 0.29 (std): a penalty of 1.0 would dominate the reward
    small_rm = [0.1, 0.5, -0.1, 0.3, 0.0, 0.6, -0.2, 0.4]
    warning = eos_penalty_warning(1.0, small_rm)
    assert warning and "--missing-eos-penalty 1 is" in warning and "3.4x the spread (std 0.293)" in warning and "near 0.29, or 0" in warning
    assert eos_penalty_warning(0.5, small_rm) is None  # within twice the spread
    assert eos_penalty_warning(0.0, small_rm) is None  # no penalty
    assert eos_penalty_warning(1.0, [0.2]) is None  # no spread to compare with
    assert eos_penalty_warning(1.0, [2.0, -1.0, 0.5, 3.0]) is None  # a default-scale RM


def test_a_config_with_no_possible_minibatch_is_refused():
    from trainer.ppo import PPOConfigError

    with pytest.raises(PPOConfigError, match="does not divide"):
        PPOConfig(policy="p", prompts="q", rollout_batch_size=10, minibatch_size=4).validate()


# --------------------------------------------------------------------------- against the real service


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlhf")
    return {"rm": rlhf_fixtures.train_planted_rm(root), "sft": rlhf_fixtures.train_sft_policy(root),
            "prompts": rlhf_fixtures.write_prompts(root / "prompts.jsonl", 64), "root": root}


SERVE_ARGS = ["--max-wait-ms", "2", "--torch-threads", "1"]


@pytest.fixture(scope="module")
def server(world):
    with running_server([f"--model=rm={world['rm']}", *SERVE_ARGS], world["root"] / "server.log") as s:
        yield s


def small_config(world, url: str, output_dir: Path, **overrides) -> PPOConfig:
    values = dict(
        policy=str(world["sft"]), prompts=str(world["prompts"]), output_dir=str(output_dir), reward_url=url,
        total_steps=6, rollout_batch_size=16, minibatch_size=8, ppo_epochs=4, max_new_tokens=8, learning_rate=3e-4,
        num_threads=1, progress=False, save_steps=0, seed=1,
    )
    values.update(overrides)
    return PPOConfig(**values)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_policy_equal_to_reference_has_zero_kl(world, server, tmp_path):
    trainer = PPOTrainer(small_config(world, server.url, tmp_path))
    try:
        rollout = trainer.generate_rollout(1)
    finally:
        trainer.scorer.close()
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    assert rollout.mask.sum() > 0 and (rollout.logprobs * rollout.mask).sum() < 0  # real log-probs, not zeros
    rewards, kl = kl_penalized_rewards(torch.ones(16), rollout.logprobs, rollout.ref_logprobs, rollout.mask, 0.02)
    assert kl.abs().sum() == 0 and rewards.sum().item() == pytest.approx(16.0)


def test_ppo_raises_the_mean_reward_of_the_planted_preference(world, server, tmp_path):
    result = train_ppo(small_config(world, server.url, tmp_path, total_steps=12))
    assert result.finished and result.step == 12
    history = read_metrics(tmp_path)
    assert [h["step"] for h in history] == list(range(1, 13)) == [h["rollout"] for h in history]
    # rollouts 1 and 2 are sampled before the first update (2 while 1 is scored): the policy is
    # still the reference, so their KL is exactly 0.
    assert history[0]["kl"] == 0.0 and history[1]["kl"] == 0.0
    # reward = RM score - the SFT policy's mean RM score - the penalty for responses without EOS
    # (1.0 by default); rollouts 1 and 2 come from the SFT policy, so they average about 0
    for h in history:
        assert h["reward"] == pytest.approx(h["score"] - result.reward_shift - 1.0 * h["no_eos_fraction"], abs=1e-5)
    assert abs((history[0]["score"] + history[1]["score"]) / 2 - result.reward_shift) < 1.0
    # the planted RM gives about +1.9 to "banana" and -1.9 to any other fruit; the SFT policy
    # names banana a quarter of the time, the trained one most of the time
    mean_first = sum(h["score"] for h in history[:3]) / 3
    mean_last = sum(h["score"] for h in history[-3:]) / 3
    assert mean_first < 0 < mean_last and mean_last > mean_first + 1.0, (mean_first, mean_last)
    assert history[-1]["kl"] > 0
    for key in ("entropy", "clip_fraction", "value_loss", "approx_kl", "response_length", "rm_wait_s", "rm_wait_fraction"):
        assert all(isinstance(h[key], float) for h in history), key
    assert 0 <= history[-1]["rm_wait_fraction"] < 1
    # the trained policy is a loadable causal LM
    assert (tmp_path / "policy" / "config.json").is_file() and (tmp_path / "value_head.pt").is_file()
    assert not (tmp_path / "checkpoints").exists()
    if importlib.util.find_spec("tensorboard"):
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow  # two server start-ups: ~25 s on a loaded 2-core machine
def test_a_service_restart_mid_run_stalls_the_trainer_but_loses_no_step(world, tmp_path):
    args = [f"--model=rm={world['rm']}", *SERVE_ARGS]
    first = ServerProcess(args, tmp_path / "server-1.log")
    first.wait_ready()
    restarted: list[ServerProcess] = []

    def restart_later():
        time.sleep(1.5)  # the trainer is now retrying against a closed port
        second = ServerProcess(args, tmp_path / "server-2.log", port=first.port)
        restarted.append(second)
        second.wait_ready()

    class KilledServiceTrainer(PPOTrainer):
        def update(self, rollout, raw_scores):
            stats = super().update(rollout, raw_scores)
            if rollout.index == 2:  # kill the service between step 2 and step 3's scoring
                first.process.kill()
                first.process.wait()
                threading.Thread(target=restart_later, daemon=True).start()
            return stats

    config = small_config(world, first.url, tmp_path / "run", reward_max_retries=60, reward_backoff=0.2, reward_backoff_max=1.0)
    try:
        result = KilledServiceTrainer(config).run()
        scored_by_second = httpx.get(f"{first.url}/metrics").text
    finally:
        first.stop()
        for s in restarted:
            s.stop()
    assert result.finished and result.step == 6
    history = read_metrics(tmp_path / "run")
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6] == [h["rollout"] for h in history]
    assert history[2]["rm_wait_s"] > 1.0  # step 3 waited through the outage
    # rollouts 3-6 were scored by the restarted service, each exactly once: 4 x 16 responses
    assert 'reward_items_scored_total{model="rm"} 64.0' in scored_by_second


def test_a_killed_run_resumes_where_it_stopped_and_matches_an_uninterrupted_run(world, server, tmp_path):
    # adaptive KL and running reward normalisation on: their state must survive the kill too
    config = small_config(world, server.url, tmp_path / "resumed", total_steps=6, save_steps=2,
                          adaptive_kl=True, target_kl=1.0, kl_horizon=100, normalize_reward=True)
    killed = train_ppo(replace(config, stop_after_steps=3))  # dies after step 3; the checkpoint is at 2
    assert not killed.finished and killed.step == 3
    assert (tmp_path / "resumed" / "checkpoints" / "last" / "state.pt").is_file()
    resumed = train_ppo(config)
    assert resumed.finished and resumed.step == 6

    uninterrupted = train_ppo(replace(config, output_dir=str(tmp_path / "straight")))
    a, b = read_metrics(tmp_path / "resumed"), read_metrics(tmp_path / "straight")
    assert [h["step"] for h in a] == list(range(1, 7)) == [h["rollout"] for h in a]
    assert resumed.reward_shift == uninterrupted.reward_shift
    for x, y in zip(a, b):
        assert x["samples"] == y["samples"], x["step"]
        assert x["score"] == pytest.approx(y["score"], abs=1e-5) and x["kl"] == pytest.approx(y["kl"], abs=1e-4)
        assert x["kl_coef"] == pytest.approx(y["kl_coef"]) and x["reward"] == pytest.approx(y["reward"], abs=1e-4)
    # beta moved by Ziegler's rule: step 1 had KL 0, 100% under target -> error clipped to -0.2
    assert a[1]["kl_coef"] == pytest.approx(0.02 * (1 - 0.2 * 16 / 100))
    assert len({round(h["kl_coef"], 8) for h in a}) > 2


@pytest.mark.slow
def test_sigkill_of_the_trainer_process_then_the_same_command_finishes_every_step_once(world, server, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "reward_cli", "ppo", "--policy", str(world["sft"]), "--prompts", str(world["prompts"]),
               "--output-dir", str(out), "--reward-url", server.url, "--total-steps", "40", "--rollout-batch-size", "16",
               "--minibatch-size", "8", "--max-new-tokens", "8", "--learning-rate", "3e-4", "--save-steps", "1",
               "--num-threads", "1", "--no-progress", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps_before = len(metrics.read_text().splitlines())
    assert 3 <= steps_before < 40, "the run must be killed mid-way"

    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr
    assert json.loads(done.stdout)["step"] == 40
    history = read_metrics(out)
    assert [h["step"] for h in history] == list(range(1, 41)) == [h["rollout"] for h in history]


# --------------------------------------------------------------------------- bad input, through the CLI


def reward_ppo(*args: str) -> int:
    from reward_cli import main

    return main(["ppo", "--num-threads", "1", "--no-progress", *args])


def test_an_unreachable_service_is_a_clear_error_before_any_training(world, tmp_path, capsys):
    from server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    code = reward_ppo("--policy", str(world["sft"]), "--prompts", str(world["prompts"]), "--output-dir", str(tmp_path / "out"),
                      "--reward-url", url, "--startup-max-retries", "1", "--reward-backoff", "0.01")
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot reach the reward service" in err and url in err and "reward serve" in err
    assert not (tmp_path / "out").exists()


def test_bad_inputs_exit_2_with_the_reason(world, server, tmp_path, capsys):
    common = ["--reward-url", server.url, "--output-dir", str(tmp_path / "out")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert reward_ppo("--policy", str(world["sft"]), "--prompts", str(empty), *common) == 2
    assert "no prompts" in capsys.readouterr().err

    assert reward_ppo("--policy", str(world["sft"]), "--prompts", str(world["prompts"]), "--rollout-batch-size", "10",
                      "--minibatch-size", "4", *common) == 2
    assert "does not divide" in capsys.readouterr().err

    # the policy has 128 positions: 128 new tokens leave no room for a prompt
    assert reward_ppo("--policy", str(world["sft"]), "--prompts", str(world["prompts"]), "--max-new-tokens", "128",
                      *common) == 2
    assert "leaves no room for a prompt in the model's context of 128 tokens" in capsys.readouterr().err

    # a tokenizer of 30k tokens in front of a 400-row embedding
    import tiny_models
    from transformers import AutoTokenizer

    mismatched = tmp_path / "mismatched"
    shutil.copytree(world["sft"], mismatched)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (mismatched / name).unlink(missing_ok=True)
    AutoTokenizer.from_pretrained(tiny_models.minilm_path()).save_pretrained(mismatched)
    assert reward_ppo("--policy", str(mismatched), "--prompts", str(world["prompts"]), *common) == 2
    err = capsys.readouterr().err
    assert "tokenizer has" in err and "embedding has" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_chat_template_policy_with_its_own_pad_token_runs_unchanged(world, server, tmp_path):
    """The Qwen-like path: a Llama causal LM whose tokenizer has a chat template and a pad token
    that is not EOS; SFT then PPO with the same commands."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import tiny_models
    from trainer.sft import SFTConfig, train_sft

    torch.manual_seed(0)
    tokenizer = tiny_models.bpe_tokenizer(tiny_models.CHATML_TEMPLATE, with_pad=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    demos = rlhf_fixtures.write_demonstrations(tmp_path / "demos.jsonl", 32, 0)
    train_sft(SFTConfig(model=str(tmp_path / "llama"), data=[str(demos)], output_dir=str(tmp_path / "sft"), max_length=48,
                        batch_size=16, learning_rate=5e-3, max_steps=60, num_threads=1, progress=False))

    # Like Qwen's, this checkpoint asks for top-k and a repetition penalty: PPO must sample from
    # softmax(logits / temperature) all the same, or its log-probs would describe another policy.
    from transformers import GenerationConfig

    GenerationConfig(do_sample=True, top_k=2, repetition_penalty=1.3, eos_token_id=tokenizer.eos_token_id).save_pretrained(tmp_path / "sft")
    trainer = PPOTrainer(small_config({**world, "sft": tmp_path / "sft"}, server.url, tmp_path / "ppo", total_steps=2))
    assert trainer.pad_id != tokenizer.eos_token_id and trainer.eos_token_ids == [tokenizer.eos_token_id]
    rollout = trainer.generate_rollout(0)
    with torch.no_grad():
        input_ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)
        attention = torch.cat([rollout.query_mask, rollout.mask.long()], dim=1)
        logits = trainer.policy.lm(input_ids=input_ids, attention_mask=attention,
                                   position_ids=(attention.cumsum(1) - 1).clamp(min=0)).logits
    ranks = (logits[:, rollout.query_ids.size(1) - 1 : -1] > logits[:, rollout.query_ids.size(1) - 1 : -1]
             .gather(2, rollout.response_ids.unsqueeze(-1))).sum(-1)
    assert (ranks[rollout.mask.bool()] >= 2).any(), "every sampled token was in the top 2: the checkpoint's top_k leaked in"
    result = trainer.run()
    assert result.finished
    history = read_metrics(tmp_path / "ppo")
    assert [h["step"] for h in history] == [1, 2]
    # prompts are rendered with the template, responses decoded without special tokens
    query, _ = PPOTrainer.encode_prompts(trainer, [[{"role": "user", "content": "hi"}]])
    assert tokenizer.decode(query[0]) == "<|user|>hi</s><|assistant|>"
    assert all("</s>" not in s["response"] and "<pad>" not in s["response"] for h in history for s in h["samples"])
