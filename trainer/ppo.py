"""RLHF with PPO against the reward service: ``reward ppo`` and :func:`train_ppo`.

The policy starts from an SFT model (``reward sft``), a frozen copy of that model is the
reference, and rewards come from a running ``reward serve`` over HTTP (``AsyncRewardClient``).
Every PPO detail is named here, in the order one step runs it (Ziegler et al. 2019, InstructGPT,
"The N Implementation Details of RLHF with PPO"):

1. **Rollout** (:meth:`PPOTrainer.generate_rollout`): ``rollout_batch_size`` prompts, rendered as
   SFT saw them (chat template or HH fallback), left-padded; one sampled response each
   (``temperature``; no top-k/top-p so the sampling distribution is exactly the one whose
   log-probs PPO uses). Response tokens after the first EOS are masked out of everything.
   The same forward pass records the behaviour log-probs (logits divided by ``temperature``),
   the values and the per-token entropy; the reference gives its log-probs.
2. **Score** (:class:`RewardScorer`): the (prompt, response text) pairs go to the service while
   the next rollout is being generated (``overlap_scoring``): start scoring k, generate k+1,
   then wait for k. Batch k+1 is thus sampled by the policy before update k; PPO's ratio is taken
   against the behaviour log-probs recorded at sampling time, so this one-step lag is importance
   weighted (and clipped) rather than ignored. ``rm_wait_fraction`` in the log is the share of a
   step spent waiting on the service. An ensemble RM's reward follows ``reward_aggregate`` (a
   rule the service applies, or ``member:M``, one member alone); the log records the rule and
   the members' spread per batch (``ensemble_std``). ``gold_reward_model`` scores the same
   responses for the log only (``gold_score``).
3. **Reward** (:func:`shape_scores`, :func:`kl_penalized_rewards`): RM score minus the mean RM
   score of SFT samples measured before training (``shift_reward_to_reference``, so the reference
   earns 0 on average), minus ``missing_eos_penalty`` for a response that never ended, optionally
   normalised by running mean/std; it is added at the last response token, and every token pays
   ``kl_coef * (log pi - log pi_ref)``.
4. **KL controller** (:class:`KLController`): fixed ``kl_coef``, or adaptive (Ziegler et al.):
   ``beta *= 1 + clip(KL / target_kl - 1, -0.2, 0.2) * n / kl_horizon`` after each rollout;
   ``kl_hold_until_target`` starts adapting only once the KL first reaches the target.
5. **Advantages** (:func:`compute_gae`): GAE(``gamma``, ``lam``) over response tokens, value
   after the last token 0; whitened over the batch's valid tokens (``whiten_advantages``).
6. **Update** (:func:`ppo_losses`): ``ppo_epochs`` passes of shuffled minibatches of
   ``minibatch_size`` sequences; clipped policy loss (``clip_range``) + ``vf_coef`` * clipped
   value loss (``value_clip_range``); gradient clipping.

The value head is a linear layer on the policy's last hidden state (shared trunk), initialised
to zero (``value_head_init``) so the first advantages are the rewards themselves and the policy
is not pushed by a random critic. Dropout is off in policy and reference (``disable_dropout``):
with dropout the log-probs of the same tokens would differ between sampling and update, and
policy = reference would not give zero KL.

Resilience: the client retries connection failures, 429 and 503 with backoff, so a service
restart only stalls a step. ``checkpoints/last`` (policy, value head, optimiser, KL controller,
reward statistics, RNG states, prompt order, step, and the rollout already generated for the
next step) is written atomically every ``save_steps``; a killed run started again with the same
command resumes there, and each rollout goes into exactly one update (``rollout`` in the log
equals ``step``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from client import AsyncRewardClient, RewardServiceError, ServiceUnavailable, served_card
from reward_core.ensemble import EnsembleError, RewardRule, check_aggregate, parse_reward_rule
from reward_core.formatting import render_policy_prompt
from reward_core.forward import pad_token_id

from .config_flags import add_config_subcommand, config_from_namespace, flag_help
from .data import DataError
from .evaluate.best_of_n import read_prompt_file
from .sft import SFTConfigError, check_vocab, fit_to_context
from .utils import disable_dropout, progress_bar, replace_dir, resolve_device

try:  # optional: metrics go to tensorboard too when it is installed (--tensorboard)
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last"
STATE_FILE = "state.pt"


class PPOConfigError(ValueError):
    """A configuration that cannot run, with what to do about it."""


@dataclass
class PPOConfig:
    """Everything a PPO run needs; each field is one ``reward ppo`` flag."""

    # -- policy, prompts, output
    policy: str = field(default="", metadata=flag_help(
        "SFT model directory: the initial policy and the frozen reference."))
    prompts: str = field(default="", metadata=flag_help(
        "Prompts: .txt (one per line) or JSONL ({\"prompt\": str | messages}, {\"messages\": [...]} or a JSON "
        "string per line; preference data in TRL format works as is)."))
    output_dir: str = field(default="runs/ppo", metadata=flag_help(
        "Where the trained policy (policy/), value head, metrics.jsonl and checkpoints go."))
    # -- reward service
    reward_url: str = field(default="http://127.0.0.1:8000", metadata=flag_help("URL of `reward serve`."))
    reward_model: str | None = field(default=None, metadata=flag_help("Served model to score with (default: the service's default)."))
    reward_aggregate: str | None = field(default=None, metadata=flag_help(
        "An ensemble RM: the rule of the reward asked for: mean, min (worst case over members), mean_minus_var "
        "(mean - reward_uncertainty_penalty x the members' variance) or member:M (member M's reward alone, read from "
        "the members the service returns). Default: the served default rule."))
    reward_uncertainty_penalty: float | None = field(default=None, metadata=flag_help(
        "With --reward-aggregate mean_minus_var: its lambda (default: the served one)."))
    reward_objective: str | None = field(default=None, metadata=flag_help(
        "A model with several reward heads: optimise this objective's head (e.g. helpfulness) instead of their "
        "combination. For prompts that all ask for one objective: a gate that also reads the response lets the "
        "policy pick its judge (docs/default-model.md)."))
    gold_reward_model: str | None = field(default=None, metadata=flag_help(
        "A held-out judge: every rollout is also scored by this served model, for the log only (gold_score); PPO "
        "never optimises it, so a proxy score that rises while gold_score falls is over-optimisation."))
    gold_reward_url: str | None = field(default=None, metadata=flag_help(
        "Service of --gold-reward-model (default: --reward-url)."))
    reward_timeout: float = field(default=120.0, metadata=flag_help("Seconds per scoring request."))
    reward_max_retries: int = field(default=12, metadata=flag_help(
        "Retries of a scoring request on connection errors / 429 / 503 (a service restart)."))
    reward_backoff: float = field(default=0.5, metadata=flag_help("Base of the exponential backoff between retries (s)."))
    reward_backoff_max: float = field(default=10.0, metadata=flag_help("Longest wait between retries (s)."))
    startup_max_retries: int = field(default=2, metadata=flag_help(
        "Retries of the start-up check that the service answers (fail fast before any training)."))
    overlap_scoring: bool = field(default=True, metadata=flag_help(
        "Generate rollout k+1 while rollout k is being scored (k+1 then comes from the policy before update k)."))
    # -- rollouts
    total_steps: int = field(default=100, metadata=flag_help("PPO steps; one rollout batch each."))
    rollout_batch_size: int = field(default=64, metadata=flag_help("Prompts (= sampled responses) per rollout."))
    max_new_tokens: int = field(default=64, metadata=flag_help("Longest response, in tokens."))
    max_prompt_length: int = field(default=512, metadata=flag_help(
        "Prompt tokens kept (the most recent ones); capped to what the policy's context leaves after max_new_tokens."))
    temperature: float = field(default=1.0, metadata=flag_help(
        "Sampling temperature; the policy's and the reference's logits are divided by it when computing "
        "log-probs too, so PPO's probabilities are those the samples were drawn from."))
    mask_after_eos: bool = field(default=True, metadata=flag_help(
        "Tokens after the first EOS get no log-prob, KL, value or loss (off: the whole max_new_tokens window counts)."))
    # -- reward shaping
    kl_coef: float = field(default=0.02, metadata=flag_help("beta: per-token KL penalty coefficient (initial value when adaptive)."))
    adaptive_kl: bool = field(default=False, metadata=flag_help("Adapt beta towards target_kl (Ziegler et al. 2019)."))
    target_kl: float = field(default=6.0, metadata=flag_help("Adaptive KL: target KL(pi || ref) per response, nats."))
    kl_horizon: int = field(default=10000, metadata=flag_help("Adaptive KL: horizon, in responses."))
    kl_hold_until_target: bool = field(default=False, metadata=flag_help(
        "Adaptive KL: keep beta at kl_coef until the KL first reaches target_kl (no wind-down while the policy "
        "is still next to the reference)."))
    missing_eos_penalty: float = field(default=1.0, metadata=flag_help(
        "Subtracted from the RM score of a response that hit max_new_tokens without EOS (0: no penalty)."))
    shift_reward_to_reference: bool = field(default=True, metadata=flag_help(
        "Before training, score reward_shift_batches rollouts of the SFT policy and subtract their mean RM "
        "score from every score, so the reference earns 0 on average."))
    reward_shift_batches: int = field(default=2, metadata=flag_help("Rollout batches measured for the reward shift."))
    normalize_reward: bool = field(default=False, metadata=flag_help(
        "Normalise scores with the running mean/std of all scores so far (subsumes the shift)."))
    # -- advantages and losses
    gamma: float = field(default=1.0, metadata=flag_help("Discount; 1 because the reward arrives at the end of a short episode."))
    lam: float = field(default=0.95, metadata=flag_help("GAE lambda."))
    whiten_advantages: bool = field(default=True, metadata=flag_help("Whiten advantages over the batch's response tokens."))
    clip_range: float = field(default=0.2, metadata=flag_help("PPO ratio clip epsilon."))
    value_clip_range: float = field(default=0.2, metadata=flag_help("Value clip: new values stay within this of the rollout's values."))
    vf_coef: float = field(default=0.1, metadata=flag_help("Value loss weight."))
    value_head_init: str = field(default="zero", metadata=flag_help(
        "Value head weights: zero (first advantages = rewards) or normal (std 1/sqrt(hidden+1)).", choices=("zero", "normal")))
    # -- optimisation
    ppo_epochs: int = field(default=4, metadata=flag_help("Passes over each rollout."))
    minibatch_size: int = field(default=16, metadata=flag_help("Sequences per optimizer step; must divide rollout_batch_size."))
    learning_rate: float = field(default=1e-6, metadata=flag_help("AdamW learning rate (policy and value head)."))
    max_grad_norm: float = field(default=1.0, metadata=flag_help("Gradient clipping (0: off)."))
    disable_dropout: bool = field(default=True, metadata=flag_help("Dropout off in policy and reference."))
    # -- checkpoints, logging, runtime
    save_steps: int = field(default=10, metadata=flag_help("Write checkpoints/last every N steps (0: only at the end)."))
    resume: bool | None = field(default=None, metadata=flag_help(
        "Resume from output_dir/checkpoints/last (default: when it exists; --no-resume starts afresh)."))
    log_samples: int = field(default=2, metadata=flag_help("Sample responses written to metrics.jsonl per step."))
    tensorboard: bool = field(default=True, metadata=flag_help("Also log to output_dir/tensorboard when tensorboard is installed."))
    seed: int = field(default=42, metadata=flag_help("Seed for prompt order and sampling."))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N."))
    dtype: str = field(default="float32", metadata=flag_help(
        "Policy and reference weights dtype (float32: AdamW updates of a small learning rate vanish in bfloat16).",
        choices=("float32", "bfloat16")))
    num_threads: int | None = field(default=None, metadata=flag_help("torch CPU threads (default: torch's choice)."))
    progress: bool = field(default=True, metadata=flag_help("Show a progress bar."))
    stop_after_steps: int | None = field(default=None, metadata=flag_help(
        "Testing aid: stop right after this step without a final save, as if the run were killed."))

    def validate(self) -> None:
        if not self.policy:
            raise PPOConfigError("give the SFT policy with --policy DIR")
        if not self.prompts:
            raise PPOConfigError("give prompts with --prompts FILE")
        for name in ("total_steps", "rollout_batch_size", "max_new_tokens", "max_prompt_length", "ppo_epochs", "minibatch_size"):
            if getattr(self, name) < 1:
                raise PPOConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_batch_size % self.minibatch_size:
            raise PPOConfigError(
                f"minibatch_size {self.minibatch_size} does not divide rollout_batch_size {self.rollout_batch_size}: "
                "no way to split each rollout into equal minibatches"
            )
        if self.temperature <= 0:
            raise PPOConfigError("temperature must be > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise PPOConfigError("gamma and lam must be in [0, 1]")
        if self.clip_range <= 0 or self.value_clip_range <= 0:
            raise PPOConfigError("clip_range and value_clip_range must be > 0")
        if self.adaptive_kl and (self.target_kl <= 0 or self.kl_horizon < 1):
            raise PPOConfigError("adaptive KL needs target_kl > 0 and kl_horizon >= 1")
        if self.kl_coef < 0:
            raise PPOConfigError("kl_coef must be >= 0")
        if self.shift_reward_to_reference and self.reward_shift_batches < 1:
            raise PPOConfigError("reward_shift_batches must be >= 1")
        if self.gold_reward_url is not None and self.gold_reward_model is None:
            raise PPOConfigError("--gold-reward-url is where --gold-reward-model is served; give the model too")
        self.reward_rule()
        if self.reward_objective is not None and self.reward_aggregate is not None:
            raise PPOConfigError("--reward-objective names a head of a model with objectives and --reward-aggregate a "
                                 "rule of an ensemble; give one of them")

    def reward_rule(self) -> RewardRule | None:
        """The rule of --reward-aggregate (None: the served default), refused with what to fix."""
        try:
            rule = parse_reward_rule(self.reward_aggregate) if self.reward_aggregate is not None else None
            if self.reward_uncertainty_penalty is not None:
                if rule is None or rule.aggregate != "mean_minus_var":
                    raise EnsembleError("--reward-uncertainty-penalty is the lambda of mean_minus_var; give it with "
                                        "--reward-aggregate mean_minus_var, or leave it out")
                check_aggregate("mean_minus_var", self.reward_uncertainty_penalty)
        except EnsembleError as exc:
            raise PPOConfigError(f"--reward-aggregate: {exc}") from None
        return rule


# =========================================================================== the PPO math


def masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the positions where mask is 1 (unbiased variance); 0 elsewhere."""
    mean = masked_mean(x, mask)
    centred = (x - mean) * mask
    n = mask.sum()
    var = (centred**2).sum() / (n - 1).clamp(min=1)
    return centred * (var + eps).rsqrt()


def response_mask(response_ids, eos_token_ids: Sequence[int], mask_after_eos: bool = True):
    """(mask, has_eos): mask is 1 up to and including the first EOS of each row (the EOS is an
    action the policy took), 0 after it; has_eos says whether the row produced one."""
    is_eos = torch.isin(response_ids, torch.tensor(list(eos_token_ids), device=response_ids.device))
    has_eos = is_eos.any(dim=1)
    if not mask_after_eos:
        return torch.ones_like(response_ids, dtype=torch.float), has_eos
    # eos seen strictly before position t -> masked
    seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~seen_before).float(), has_eos


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float):
    """Per-token rewards: ``-kl_coef * (logprobs - ref_logprobs)`` on every response token, plus the
    sequence's score on its last token. Returns (rewards, per-token KL estimate), both masked."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
    return rewards * mask, kl


def compute_gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over the response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V`` and ``A`` zero after the last valid token (the episode ends there). Returns (advantages,
    returns = advantages + values), both masked."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # A masked position passes nothing back: it is after the episode's end.
        advantages[:, t] = advantage * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip_range: float, value_clip_range: float):
    """Clipped surrogate policy loss and clipped value loss (token means over the mask), with
    the statistics that say how far the update moved."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = masked_mean(torch.max(unclipped, clipped), mask)

    values_clipped = old_values + torch.clamp(values - old_values, -value_clip_range, value_clip_range)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask).item(),
            # k3 estimator of KL(old || new): unbiased and never negative (Schulman's note).
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
            "value_clip_fraction": masked_mean(((values - returns) ** 2 < (values_clipped - returns) ** 2).float(), mask).item(),
        }
    return policy_loss, value_loss, stats


class KLController:
    """beta of the KL penalty: fixed, or adapted towards ``target`` (Ziegler et al. 2019, eq. 2).

    With ``hold_until_target`` the adaptive beta stays at its initial value until the KL first
    reaches the target. Why: the policy starts equal to the reference, so for the first steps the
    KL is near 0 whatever beta is, the error sits at its -0.2 clip, and plain Ziegler winds beta
    down before the KL has had time to respond (in the CPU demo, 0.05 -> 0.015 in 33 steps, after
    which the KL overshot the target of 3 to 5.2 nats and beta could not catch up)."""

    def __init__(self, init_kl_coef: float, adaptive: bool, target: float, horizon: int,
                 hold_until_target: bool = False) -> None:
        self.value = init_kl_coef
        self.adaptive = adaptive
        self.target = target
        self.horizon = horizon
        self.hold_until_target = hold_until_target
        self.target_reached = False

    def update(self, current_kl: float, n_responses: int) -> None:
        if not self.adaptive:
            return
        self.target_reached = self.target_reached or current_kl >= self.target
        if self.hold_until_target and not self.target_reached:
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_responses / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target_reached": self.target_reached}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target_reached = bool(state.get("target_reached", False))


class RunningMoments:
    """Running mean and standard deviation of every score seen (Chan et al. parallel update)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, values: Sequence[float]) -> None:
        n = len(values)
        if not n:
            return
        batch_mean = sum(values) / n
        batch_var = sum((v - batch_mean) ** 2 for v in values) / n
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.var > 0 else 1.0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def eos_penalty_warning(missing_eos_penalty: float, reference_scores: list[float]) -> str | None:
    """A warning when the missing-EOS penalty is more than twice the spread of the RM's scores on
    the reference policy's answers: the penalty is in the RM's units, so against an RM whose scores
    differ little, PPO's first goal becomes ending answers, not the RM (seen on a small proxy:
    answers shrank and both the proxy and the gold fell before either rose)."""
    if not missing_eos_penalty or len(reference_scores) < 2:
        return None
    spread = statistics.stdev(reference_scores)
    if spread <= 0 or missing_eos_penalty <= 2 * spread:
        return None
    return (f"--missing-eos-penalty {missing_eos_penalty:g} is {missing_eos_penalty / spread:.1f}x the spread (std {spread:.3g}) "
            "of the RM's scores on the SFT policy's answers, so ending answers will outweigh the RM in the reward; "
            f"consider --missing-eos-penalty near {spread:.2g}, or 0")


def shape_scores(raw_scores, has_eos, *, shift: float, missing_eos_penalty: float | None, moments: RunningMoments | None):
    """The scalar reward of each response from its RM score: minus the reference shift, minus
    the missing-EOS penalty, then (optionally) normalised by the running moments."""
    scores = torch.as_tensor(raw_scores, dtype=torch.float32) - shift
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~has_eos.cpu()).float()
    if moments is not None:
        moments.update(scores.tolist())
        scores = (scores - moments.mean) / moments.std
    return scores


# =========================================================================== models


class PolicyWithValueHead(nn.Module):
    """The causal LM plus a scalar value of each state, read off its last hidden state."""

    def __init__(self, lm, init: str) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        if init == "zero":
            nn.init.zeros_(self.value_head.weight)
        else:
            nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(lm.parameters()).dtype)

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True)
        values = self.value_head(out.hidden_states[-1]).squeeze(-1)
        return out.logits, values

def response_logprobs(logits, response_ids, prompt_length: int, temperature: float):
    """log pi(token) of each response token and the entropy of each of those distributions.

    ``logits[:, t]`` predicts token t+1, so the response's distributions are the positions from
    ``prompt_length - 1`` up to the second-to-last."""
    logits = logits[:, prompt_length - 1 : -1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = torch.gather(logp_all, 2, response_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


# =========================================================================== scoring over HTTP


@dataclass
class Scored:
    """The rewards of one rollout as the service gave them: ``rewards`` (the rule's), and when the
    RM is an ensemble its members' mean and standard deviation per response; ``gold`` the
    held-out judge's scores when one is set."""

    rewards: list[float]
    ensemble_mean: list[float] | None = None
    ensemble_std: list[float] | None = None
    gold: list[float] | None = None


class RewardScorer:
    """An ``AsyncRewardClient`` on its own event-loop thread, so the trainer's thread can run torch
    while requests are in flight: :meth:`submit` returns a future of the scores.

    ``rule`` (an ensemble's): an aggregate is sent as the request's ``aggregate`` (with
    ``uncertainty_penalty``); ``member:M`` asks for each member's reward (``return_members``) and
    takes column M. ``objective`` (a model with objectives): that head's reward is asked for. For
    an ensemble every request also asks for the members' mean and spread (``return_uncertainty``).
    ``gold_model`` (at ``gold_url``) scores the same responses for the log."""

    def __init__(self, url: str, model: str | None, client_options: dict[str, Any], *, rule: RewardRule | None = None,
                 uncertainty_penalty: float | None = None, gold_model: str | None = None, gold_url: str | None = None,
                 objective: str | None = None) -> None:
        self.url = url
        self.model = model
        self.rule = rule
        self.objective = objective
        self.uncertainty_penalty = uncertainty_penalty
        self.gold_model = gold_model
        self.gold_url = gold_url or url
        self.ensemble = None  # the served model's EnsembleCard, known after check()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-scorer", daemon=True)
        self._thread.start()
        self._client_options = client_options

        async def make():
            return AsyncRewardClient(url, **client_options)

        async def make_gold():
            return AsyncRewardClient(self.gold_url, **client_options) if gold_model and self.gold_url != url else None

        self.client = self._call(make())
        self.gold_client = self._call(make_gold())

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def check(self, max_retries: int) -> str:
        """``name@version`` of the model that will score; RewardServiceError when the service cannot
        be reached (after ``max_retries``) or does not serve the model (or the gold one), and
        PPOConfigError when ``rule`` cannot apply to it (not an ensemble; no such member)."""
        async def card_of(url: str, model: str | None):
            options = {**self._client_options, "max_retries": max_retries}
            async with AsyncRewardClient(url, **options) as probe:
                listing = await probe.models()
            return served_card(listing, model, url)

        card = self._call(card_of(self.url, self.model))
        served = f"{card.name}@{card.version}"
        self.ensemble = card.ensemble
        if self.rule is not None:
            if card.ensemble is None:
                raise PPOConfigError(f"--reward-aggregate {self.rule}: {served} at {self.url} is not an ensemble (its "
                                     "model card has no 'ensemble'); leave --reward-aggregate out")
            try:
                self.rule.check_members(card.ensemble.members)
            except EnsembleError as exc:
                raise PPOConfigError(f"--reward-aggregate: {exc}") from None
        if self.objective is not None:
            if not card.objectives:
                raise PPOConfigError(f"--reward-objective {self.objective}: {served} at {self.url} has one reward head "
                                     "(its model card lists no objectives); leave --reward-objective out")
            if self.objective not in card.objectives:
                raise PPOConfigError(f"--reward-objective {self.objective}: {served} has the objectives "
                                     f"{', '.join(card.objectives)}")
        if self.gold_model is not None:
            self._call(card_of(self.gold_url, self.gold_model))
        return served

    def describe_rule(self) -> dict[str, Any]:
        """The rule the rewards follow, as the log records it: ``reward_rule`` (a rule, "objective:NAME", or "single
        model") and ``reward_uncertainty_penalty`` (the lambda, for mean_minus_var only)."""
        if self.objective is not None:
            return {"reward_rule": f"objective:{self.objective}", "reward_uncertainty_penalty": None}
        if self.ensemble is None:
            return {"reward_rule": "single model", "reward_uncertainty_penalty": None}
        rule = str(self.rule) if self.rule is not None else self.ensemble.aggregate
        penalty = None
        if rule == "mean_minus_var":
            penalty = self.uncertainty_penalty if self.uncertainty_penalty is not None else self.ensemble.uncertainty_penalty
        return {"reward_rule": rule, "reward_uncertainty_penalty": penalty}

    def _request(self) -> dict[str, Any]:
        """The objective or ensemble fields of a score request."""
        if self.objective is not None:
            return {"objective": self.objective}
        if self.ensemble is None:
            return {}
        if self.rule is not None and self.rule.member is not None:
            return {"return_members": True, "return_uncertainty": True}
        fields: dict[str, Any] = {"return_uncertainty": True}
        if self.rule is not None:
            fields["aggregate"] = self.rule.aggregate
            fields["uncertainty_penalty"] = self.uncertainty_penalty
        return fields

    def submit(self, items: list[dict]) -> Future:
        """A future of the rollout's :class:`Scored`."""
        async def score():
            fields = self._request()
            requests = [self.client.score(items, model=self.model, **fields)]
            if self.gold_model is not None:
                requests.append((self.gold_client or self.client).score(items, model=self.gold_model))
            response, *gold = await asyncio.gather(*requests)
            for answer in (response, *gold):
                if len(answer.scores) != len(items):
                    raise RewardServiceError(None, "invalid_response", f"{len(answer.scores)} scores for {len(items)} items")
            rewards = list(response.scores)
            if fields.get("return_members"):
                if response.members is None or len(response.members) != len(items):
                    raise RewardServiceError(None, "invalid_response", f"no members' rewards for {self.rule}")
                rewards = [row[self.rule.member] for row in response.members]
            return Scored(rewards, response.ensemble_mean, response.ensemble_std, list(gold[0].scores) if gold else None)

        return asyncio.run_coroutine_threadsafe(score(), self._loop)

    def close(self) -> None:
        try:
            self._call(self.client.aclose())
            if self.gold_client is not None:
                self._call(self.gold_client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


# =========================================================================== the trainer


@dataclass
class Rollout:
    """One batch of sampled responses and what the policy, critic and reference said about them."""

    index: int  # the step whose update it feeds
    prompts: list[list[dict]]
    query_ids: Any  # (B, P) left-padded prompts
    query_mask: Any  # (B, P)
    response_ids: Any  # (B, T)
    mask: Any  # (B, T) 1 on response tokens up to and including the first EOS
    has_eos: Any  # (B,)
    logprobs: Any  # (B, T) behaviour policy
    ref_logprobs: Any  # (B, T)
    values: Any  # (B, T)
    entropy: Any  # (B, T)
    texts: list[str]

    def items(self) -> list[dict]:
        return [{"prompt": p, "response": t} for p, t in zip(self.prompts, self.texts)]

    def to_state(self) -> dict:
        return {k: (v.cpu() if hasattr(v, "cpu") else v) for k, v in asdict(self).items()}


def batch_means(scored: Scored) -> dict[str, float]:
    """What the log records of a rollout's scores beyond the reward: the batch means of the
    ensemble's members' mean (``ensemble_mean``) and spread (``ensemble_std``, which rises as the
    policy drifts where the members disagree) and of the gold judge's score (``gold_score``), each
    when there is one."""
    values = {"ensemble_mean": scored.ensemble_mean, "ensemble_std": scored.ensemble_std, "gold_score": scored.gold}
    return {key: float(sum(v) / len(v)) for key, v in values.items() if v}


@dataclass
class PPOResult:
    output_dir: Path
    step: int
    finished: bool
    reward_shift: float
    history: list[dict]


class PPOTrainer:
    def __init__(self, config: PPOConfig) -> None:
        config.validate()
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device, error=PPOConfigError)
        self.output_dir = Path(config.output_dir)
        self.prompts = read_prompt_file(config.prompts)  # DataError when missing or empty

        # The service first: a run that cannot be scored must not start training.
        self.scorer = RewardScorer(config.reward_url, config.reward_model, dict(
            timeout=config.reward_timeout, max_retries=config.reward_max_retries,
            backoff=config.reward_backoff, backoff_max=config.reward_backoff_max,
        ), rule=config.reward_rule(), uncertainty_penalty=config.reward_uncertainty_penalty,
            gold_model=config.gold_reward_model, gold_url=config.gold_reward_url, objective=config.reward_objective)
        try:
            self.served_model = self.scorer.check(config.startup_max_retries)
            self.rule_log = self.scorer.describe_rule()
            log.info("scoring with %s at %s, rule %s%s", self.served_model, config.reward_url, self.rule_log["reward_rule"],
                     "" if self.rule_log["reward_uncertainty_penalty"] is None
                     else f" (lambda {self.rule_log['reward_uncertainty_penalty']:g})")
            self._build_models()
        except BaseException:
            self.scorer.close()
            raise

        self.kl_controller = KLController(config.kl_coef, config.adaptive_kl, config.target_kl, config.kl_horizon,
                                          config.kl_hold_until_target)
        self.moments = RunningMoments() if config.normalize_reward else None
        self.reward_shift = 0.0
        self.step = 0
        self.prompt_rng = random.Random(config.seed)
        self.prompt_order: list[int] = []
        self.pending: Rollout | None = None
        self.history: list[dict] = []

    # -- setup -----------------------------------------------------------------------------

    def _build_models(self) -> None:
        path = Path(self.config.policy)
        if not (path / "config.json").is_file():
            raise SFTConfigError(f"{path} is not a model directory (no config.json); give the output of `reward sft`")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(self.config.seed)
        dtype = getattr(torch, self.config.dtype)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        check_vocab(lm, self.tokenizer, path)
        self.max_prompt_tokens = fit_to_context(lm.config, self.config.max_prompt_length, "--max-prompt-length",
                                                self.config.max_new_tokens, "--max-new-tokens")
        self.reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.policy = PolicyWithValueHead(lm, self.config.value_head_init).to(self.device)
        if self.config.disable_dropout:
            disable_dropout(self.policy)
            disable_dropout(self.reference)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.config.learning_rate)
        eos = {self.tokenizer.eos_token_id}
        generation_eos = getattr(lm.generation_config, "eos_token_id", None)
        eos.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.eos_token_ids = sorted(e for e in eos if e is not None)
        if not self.eos_token_ids:
            raise SFTConfigError(f"{path}: the tokenizer has no EOS token, so responses could never end")
        self.pad_id = pad_token_id(self.tokenizer)
        # A fresh generation config, not the checkpoint's: Qwen's generation_config.json sets
        # top_k, top_p and repetition_penalty, any of which would make the sampling distribution
        # differ from softmax(logits / temperature), the one PPO's log-probs describe.
        self.sampling = GenerationConfig(
            do_sample=True, temperature=self.config.temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
            max_new_tokens=self.config.max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_token_ids,
            bos_token_id=self.tokenizer.bos_token_id,
        )

    # -- rollouts --------------------------------------------------------------------------

    def next_prompt_indices(self) -> list[int]:
        """The next rollout_batch_size prompts of a seeded shuffle, reshuffled each epoch."""
        n = self.config.rollout_batch_size
        while len(self.prompt_order) < n:
            order = list(range(len(self.prompts)))
            self.prompt_rng.shuffle(order)
            self.prompt_order += order
        chosen, self.prompt_order = self.prompt_order[:n], self.prompt_order[n:]
        return chosen

    def encode_prompts(self, prompts: list[list[dict]]):
        rows = []
        for messages in prompts:
            text, specials = render_policy_prompt(messages, self.tokenizer)
            ids = self.tokenizer(text, add_special_tokens=specials)["input_ids"]
            rows.append(ids[-self.max_prompt_tokens:])
        width = max(len(r) for r in rows)
        query_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        query_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):  # left padding: every response starts at column `width`
            query_ids[i, width - len(ids):] = torch.tensor(ids)
            query_mask[i, width - len(ids):] = 1
        return query_ids.to(self.device), query_mask.to(self.device)

    def forward(self, model, query_ids, query_mask, response_ids, mask, with_values: bool):
        """(logprobs, entropy, values or None) of the response tokens under ``model``."""
        input_ids = torch.cat([query_ids, response_ids], dim=1)
        attention_mask = torch.cat([query_mask, mask.long()], dim=1)
        # Left padding: positions count real tokens only, as they did during generation.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        prompt_length = query_ids.size(1)
        if with_values:
            logits, values = model(input_ids, attention_mask, position_ids)
            values = values[:, prompt_length - 1 : -1].float()  # V(state before each response token)
        else:
            logits, values = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits, None
        logprobs, entropy = response_logprobs(logits, response_ids, prompt_length, self.config.temperature)
        return logprobs, entropy, values

    def generate_rollout(self, index: int) -> Rollout:
        config = self.config
        prompts = [self.prompts[i] for i in self.next_prompt_indices()]
        query_ids, query_mask = self.encode_prompts(prompts)
        self.policy.eval()
        chunks = []
        with torch.no_grad():
            for start in range(0, len(prompts), config.minibatch_size):
                q, qm = query_ids[start : start + config.minibatch_size], query_mask[start : start + config.minibatch_size]
                generated = self.policy.lm.generate(input_ids=q, attention_mask=qm, generation_config=self.sampling)
                response_ids = generated[:, q.size(1):]
                if response_ids.size(1) < config.max_new_tokens:  # all rows stopped early: pad to one width
                    pad = torch.full((response_ids.size(0), config.max_new_tokens - response_ids.size(1)), self.pad_id,
                                     dtype=response_ids.dtype, device=response_ids.device)
                    response_ids = torch.cat([response_ids, pad], dim=1)
                mask, has_eos = response_mask(response_ids, self.eos_token_ids, config.mask_after_eos)
                logprobs, entropy, values = self.forward(self.policy, q, qm, response_ids, mask, with_values=True)
                ref_logprobs, _, _ = self.forward(self.reference, q, qm, response_ids, mask, with_values=False)
                chunks.append((response_ids, mask, has_eos, logprobs * mask, ref_logprobs * mask, values * mask, entropy))
        response_ids, mask, has_eos, logprobs, ref_logprobs, values, entropy = (torch.cat(parts) for parts in zip(*chunks))
        texts = []
        for row, row_mask in zip(response_ids, mask):
            kept = row[: int(row_mask.sum().item())].tolist()
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True).strip())
        return Rollout(index, prompts, query_ids, query_mask, response_ids, mask, has_eos, logprobs, ref_logprobs, values, entropy, texts)

    # -- update ----------------------------------------------------------------------------

    def update(self, rollout: Rollout, raw_scores: list[float]) -> dict[str, Any]:
        config = self.config
        scores = shape_scores(raw_scores, rollout.has_eos, shift=self.reward_shift,
                              missing_eos_penalty=config.missing_eos_penalty, moments=self.moments).to(self.device)
        mask = rollout.mask
        kl_coef = self.kl_controller.value
        rewards, kl = kl_penalized_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef)
        advantages, returns = compute_gae(rewards, rollout.values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        self.policy.train()
        batch = mask.size(0)
        collected: dict[str, list[float]] = {}
        for _ in range(config.ppo_epochs):
            order = torch.randperm(batch, device=self.device)
            for start in range(0, batch, config.minibatch_size):
                idx = order[start : start + config.minibatch_size]
                logprobs, _, values = self.forward(self.policy, rollout.query_ids[idx], rollout.query_mask[idx],
                                                   rollout.response_ids[idx], mask[idx], with_values=True)
                policy_loss, value_loss, stats = ppo_losses(
                    logprobs, rollout.logprobs[idx], advantages[idx], values, rollout.values[idx], returns[idx], mask[idx],
                    config.clip_range, config.value_clip_range,
                )
                loss = policy_loss + config.vf_coef * value_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), config.max_grad_norm)
                self.optimizer.step()
                for key, value in {**stats, "policy_loss": policy_loss.item(), "value_loss": value_loss.item()}.items():
                    collected.setdefault(key, []).append(value)

        sequence_kl = kl.sum(dim=1)
        mean_kl = sequence_kl.mean().item()
        self.kl_controller.update(mean_kl, batch)
        lengths = mask.sum(dim=1)
        return {
            "rollout": rollout.index,
            "score": float(sum(raw_scores) / len(raw_scores)),  # raw RM score
            "reward": scores.mean().item(),  # after shift, EOS penalty, normalisation
            "reward_with_kl": rewards.sum(dim=1).mean().item(),
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "entropy": masked_mean(rollout.entropy, mask).item(),
            "response_length": lengths.float().mean().item(),
            "no_eos_fraction": (~rollout.has_eos).float().mean().item(),
            **{key: sum(v) / len(v) for key, v in collected.items()},
        }

    # -- the loop --------------------------------------------------------------------------

    def measure_reward_shift(self) -> float:
        """Mean RM score of responses sampled from the initial (SFT = reference) policy; warns when
        the missing-EOS penalty dwarfs how much those scores differ."""
        scores: list[float] = []
        for _ in range(self.config.reward_shift_batches):
            rollout = self.generate_rollout(0)
            scores += self.scorer.submit(rollout.items()).result().rewards
        warning = eos_penalty_warning(self.config.missing_eos_penalty, scores)
        if warning:
            log.warning(warning)
        return sum(scores) / len(scores)

    def run(self) -> PPOResult:
        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resumed = self._maybe_resume()
        if not resumed:
            torch.manual_seed(config.seed)
            if config.shift_reward_to_reference:
                self.reward_shift = self.measure_reward_shift()
                log.info("reward shift (mean RM score of SFT samples): %.4f", self.reward_shift)
            (self.output_dir / "ppo_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        metrics = open(self.output_dir / "metrics.jsonl", "a")
        writer = self._tensorboard()
        progress = progress_bar(config.progress)
        finished = False
        try:
            with progress:
                task = progress.add_task("ppo", total=config.total_steps, completed=self.step)
                for step in range(self.step + 1, config.total_steps + 1):
                    step_started = time.perf_counter()
                    rollout, self.pending = (self.pending or self.generate_rollout(step)), None
                    scores_future = self.scorer.submit(rollout.items())
                    if config.overlap_scoring and step < config.total_steps:
                        self.pending = self.generate_rollout(step + 1)  # while rollout `step` is being scored
                    wait_started = time.perf_counter()
                    scored = scores_future.result()
                    waited = time.perf_counter() - wait_started
                    assert rollout.index == step, "a rollout must feed exactly the update it was generated for"
                    stats = self.update(rollout, scored.rewards)
                    self.step = step
                    step_seconds = time.perf_counter() - step_started
                    entry = {"step": step, **stats, **self.rule_log, **batch_means(scored),
                             "rm_wait_s": waited, "rm_wait_fraction": waited / step_seconds,
                             "generate_s": wait_started - step_started, "step_s": step_seconds,
                             "samples": [{"prompt": p[-1]["content"], "response": t}
                                         for p, t in zip(rollout.prompts[: config.log_samples], rollout.texts)]}
                    self.history.append(entry)
                    metrics.write(json.dumps(entry) + "\n")
                    metrics.flush()
                    if writer is not None:
                        for key, value in entry.items():
                            if isinstance(value, (int, float)) and key != "step":
                                writer.add_scalar(f"ppo/{key}", value, step)
                    progress.update(task, completed=step,
                                    description=f"ppo reward {stats['reward']:+.3f} kl {stats['kl']:.3f} wait {entry['rm_wait_fraction']:.0%}")
                    if config.save_steps and step % config.save_steps == 0 and step < config.total_steps:
                        self.save_checkpoint()
                    if config.stop_after_steps is not None and step >= config.stop_after_steps:
                        return PPOResult(self.output_dir, step, False, self.reward_shift, self.history)
            self.save_final()
            finished = True
        finally:
            metrics.close()
            if writer is not None:
                writer.close()
            self.scorer.close()
        return PPOResult(self.output_dir, self.step, finished, self.reward_shift, self.history)

    def _tensorboard(self):
        if not self.config.tensorboard or SummaryWriter is None:
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))

    # -- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "moments": self.moments.state_dict() if self.moments else None,
            "reward_shift": self.reward_shift,
            "prompt_rng": self.prompt_rng.getstate(),
            "prompt_order": self.prompt_order,
            "pending": self.pending.to_state() if self.pending is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": asdict(self.config),
        }
        # Swapped in only once completely written: a kill during the save leaves the previous one.
        with replace_dir(self.output_dir / CHECKPOINT) as tmp:
            torch.save(state, tmp / STATE_FILE)

    def _maybe_resume(self) -> bool:
        path = self.output_dir / CHECKPOINT / STATE_FILE
        previous = self.output_dir / (CHECKPOINT + ".old") / STATE_FILE
        if not path.is_file() and previous.is_file():  # killed between the two renames of save_checkpoint
            path = previous
        if self.config.resume is False or not path.is_file():
            if self.config.resume and not path.is_file():
                raise PPOConfigError(f"--resume given but there is no checkpoint at {path.parent}")
            if self.config.resume is False:
                shutil.rmtree(self.output_dir / "checkpoints", ignore_errors=True)
            (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.moments is not None and state["moments"]:
            self.moments.load_state_dict(state["moments"])
        self.reward_shift = state["reward_shift"]
        self.step = state["step"]
        self.prompt_rng.setstate(state["prompt_rng"])
        self.prompt_order = list(state["prompt_order"])
        if state["pending"] is not None:
            pending = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in state["pending"].items()}
            self.pending = Rollout(**pending)
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        # Steps logged after the checkpoint are redone; keep each step once in the log.
        metrics_path = self.output_dir / "metrics.jsonl"
        if metrics_path.is_file():
            kept = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
            self.history = [json.loads(line) for line in kept]
        log.info("resumed from %s at step %d", path.parent, self.step)
        return True

    def save_final(self) -> None:
        policy_dir = self.output_dir / "policy"
        self.policy.lm.save_pretrained(policy_dir)
        self.tokenizer.save_pretrained(policy_dir)
        torch.save(self.policy.value_head.state_dict(), self.output_dir / "value_head.pt")
        shutil.rmtree(self.output_dir / "checkpoints", ignore_errors=True)


def train_ppo(config: PPOConfig) -> PPOResult:
    return PPOTrainer(config).run()


# =========================================================================== CLI


def add_ppo_parser(subparsers) -> argparse.ArgumentParser:
    return add_config_subcommand(
        subparsers, "ppo", PPOConfig, run_ppo,
        help="RLHF: PPO on a policy from `reward sft`, rewards from a running `reward serve`",
        description="PPO with a KL penalty to the SFT reference; rewards are scored by the reward service over HTTP.",
    )


def run_ppo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scoring request drowns the log
    try:
        result = train_ppo(config_from_namespace(PPOConfig, args))
    except (DataError, PPOConfigError, SFTConfigError) as exc:
        print(f"reward ppo: {exc}", file=sys.stderr)
        return 2
    except RewardServiceError as exc:
        hint = "; is `reward serve` running there? (--reward-url)" if isinstance(exc, ServiceUnavailable) else ""
        print(f"reward ppo: reward service: {exc}{hint}", file=sys.stderr)
        return 1
    last = result.history[-1] if result.history else {}
    print(json.dumps({"output_dir": str(result.output_dir), "step": result.step, "finished": result.finished,
                      "reward_shift": result.reward_shift, "last_reward": last.get("reward"), "last_kl": last.get("kl")}, indent=2))
    return 0
