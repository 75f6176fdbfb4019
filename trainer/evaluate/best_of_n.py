"""``reward eval best-of-n``: N samples per prompt from a causal LM (in-process, transformers
``generate``), scored by the service; the exact best-of-n curve (:func:`.metrics.best_of_n_curve`)
with the proxy and, given one, the gold reward model.

With ``--proxy-rules`` the proxy is an ensemble picked by several rules from the same samples
(:func:`proxy_rule_curves`). The samples are scored once, with each member's reward
(``return_members``), and each rule's reward is derived here from the members with
:func:`reward_core.ensemble.rule_rewards`, the function the service aggregates with: one
scoring pass instead of one per rule, every rule ranks exactly the same samples, and ``member:M``
(which the service has no rule for) comes from the same answer: the members are those of the
proxy's :class:`.uncertainty.EnsembleScores`, which :func:`.scoring.score_items` returns for every
ensemble target. The report checks the derivation against the service on every sample: the served
default rule, computed here from the members, against the reward the service returned with them
(``by_rule_check``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from reward_core.ensemble import EnsembleError, RewardRule, check_aggregate, parse_reward_rule, rule_rewards
from reward_core.formatting import parse_prompt, render_policy_prompt
from reward_core.forward import pad_token_id

from ..data import DataError, iter_rows, load_file
from ..sft import SFTConfigError, fit_to_context
from ..utils import progress_bar, resolve_device
from .config import EvalConfig
from .datasets import ItemPool
from .metrics import best_of_n_curve, best_of_n_per_prompt, standard_error
from .report import EXIT_INPUT, EXIT_SERVICE, SCHEMA_VERSION, fail, finish_report, utc_now
from .scoring import (
    Target, card_ensemble, make_targets, resolve_targets, score_through_service, service_error_message, with_clients,
)


def read_prompt_file(path: str | Path) -> list[list[dict]]:
    """Prompts as chat messages: a ``.txt`` file (one prompt per non-blank line) or JSONL
    (``.jsonl``/``.jsonl.gz``; per line a JSON string, ``{"prompt": str | messages}`` or
    ``{"messages": [...]}``). Each prompt is read by :func:`reward_core.formatting.parse_prompt`
    (an HH transcript is split into its turns), for a policy to answer. DataError lists the bad lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    prompts, problems = [], []
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    plain = not any(path.name.endswith(s) for s in (".jsonl", ".jsonl.gz", ".json", ".json.gz"))
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = line.strip() if plain else _prompt_value(json.loads(line))
            prompts.append(parse_prompt(value, for_generation=True))
        except ValueError as exc:
            problems.append(f"{path}:{number}: {exc}")
    if problems:
        raise DataError("bad prompt lines:\n" + "\n".join(problems[:20]))
    if not prompts:
        raise DataError(f"no prompts in {path}")
    return prompts


def _prompt_value(obj: Any) -> Any:
    """The prompt of one JSONL line of a prompt file."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and "prompt" in obj:
        return obj["prompt"]
    if isinstance(obj, dict) and "messages" in obj:
        return obj["messages"]
    raise ValueError('expected a JSON string, {"prompt": ...} or {"messages": [...]}')


def load_bon_prompts(config: EvalConfig) -> tuple[list[list[dict]], str]:
    """The prompts for best-of-N and where they came from."""
    if config.prompts:
        prompts, source = read_prompt_file(config.prompts), str(config.prompts)
    else:
        result = load_file(config.bon_data, max_bad_fraction=config.max_bad_fraction)
        seen: dict[str, list[dict]] = {}
        for r in result.records:
            seen.setdefault(json.dumps(r.prompt, sort_keys=True, ensure_ascii=False), r.prompt)
        prompts, source = list(seen.values()), str(config.bon_data)
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    return prompts, source


def read_samples_file(path: str | Path, max_prompts: int | None = None) -> tuple[list[list[dict]], list[list[str]]]:
    """The prompts and responses of an earlier run's ``samples.jsonl`` (rows of ``prompt_index``,
    ``sample_index``, ``prompt``, ``response``; any scores on them are ignored), to be scored
    again, e.g. by a retrained proxy or another gold, without sampling again. Every prompt must
    have the same N samples, numbered 0 .. N-1. DataError names the first problems."""
    by_prompt: dict[int, dict[int, tuple[Any, str]]] = {}
    problems: list[str] = []
    for number, row, error in iter_rows(Path(path)):
        if error is None:
            try:
                p, s, response = row["prompt_index"], row["sample_index"], row["response"]
                if not (isinstance(p, int) and isinstance(s, int) and p >= 0 and s >= 0 and isinstance(response, str)):
                    raise TypeError("prompt_index and sample_index must be integers >= 0, response a string")
                messages = parse_prompt(row["prompt"])
            except (ValueError, KeyError, TypeError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            problems.append(f"line {number}: {error}")
        elif s in by_prompt.setdefault(p, {}):
            problems.append(f"line {number}: prompt {p} has sample {s} twice")
        else:
            by_prompt[p][s] = (messages, response)
    if not by_prompt and not problems:
        problems.append("no samples (the file is empty)")
    counts = {len(rows) for rows in by_prompt.values()}
    if len(counts) > 1:
        problems.append(f"prompts have different numbers of samples ({sorted(counts)}); best-of-n needs the same N for each")
    for p, rows in by_prompt.items():
        if sorted(rows) != list(range(len(rows))):
            problems.append(f"prompt {p}: sample_index must run 0 .. {len(rows) - 1}")
            break
    if problems:
        raise DataError(f"--samples {path}: " + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    order = sorted(by_prompt)[: max_prompts or None]
    prompts = [by_prompt[p][0][0] for p in order]
    responses = [[by_prompt[p][s][1] for s in range(len(by_prompt[p]))] for p in order]
    return prompts, responses


def generate_samples(
    policy: str | Path,
    prompts: Sequence[Sequence[dict]],
    n_samples: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 128,
    max_prompt_length: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    on_prompt_done: Callable[[int], None] | None = None,
    truncated_prompts: list[int] | None = None,
) -> list[list[str]]:
    """N sampled completions per prompt from a causal LM (``generate`` with do_sample). Prompt i
    is sampled with seed ``seed + i``, so its samples do not depend on the other prompts. A prompt
    longer than ``max_prompt_length`` or than the policy's context leaves after ``max_new_tokens``
    keeps its most recent tokens (as ``reward ppo`` does); the indices of those prompts are
    appended to ``truncated_prompts`` when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar shows the sampling progress

    device = resolve_device(device, error=SFTConfigError)
    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    limit = fit_to_context(model.config, max_prompt_length, "--max-prompt-length", max_new_tokens, "--max-new-tokens")
    model.to(device).eval()
    pad_id = pad_token_id(tokenizer)
    out: list[list[str]] = []
    for i, messages in enumerate(prompts):
        text, specials = render_policy_prompt(messages, tokenizer)
        ids = tokenizer(text, add_special_tokens=specials, return_tensors="pt")["input_ids"].to(device)
        if ids.shape[1] > limit:
            ids = ids[:, -limit:]
            if truncated_prompts is not None:
                truncated_prompts.append(i)
        set_seed(seed + i)
        samples: list[str] = []
        while len(samples) < n_samples:
            k = min(batch_size, n_samples - len(samples))
            with torch.inference_mode():
                generated = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                    top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, num_return_sequences=k,
                    pad_token_id=pad_id,
                )
            new = generated[:, ids.shape[1]:]
            samples += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        out.append(samples)
        if on_prompt_done:
            on_prompt_done(i + 1)
    return out


# Largest |served reward - the served default rule computed here from the members| that still
# counts as the same formula: the members travel as JSON floats of float32 rewards.
RULE_CHECK_TOLERANCE = 1e-4


def parse_proxy_rules(config: EvalConfig) -> list[RewardRule]:
    """The rules of ``--proxy-rules`` (each once, in order), refused with what to fix: an unknown
    rule, ``--uncertainty-penalty`` without mean_minus_var or not a finite number >= 0, and
    ``--normalize`` (the reward statistics are the members' mean's, not any rule's)."""
    if not config.proxy_rules:
        if config.uncertainty_penalty is not None:
            raise EnsembleError("--uncertainty-penalty is the lambda of mean_minus_var in --proxy-rules; give "
                                "--proxy-rules with mean_minus_var, or leave it out")
        return []
    rules = list(dict.fromkeys(parse_reward_rule(text) for text in config.proxy_rules))
    if config.uncertainty_penalty is not None:
        if not any(r.aggregate == "mean_minus_var" for r in rules):
            raise EnsembleError(f"--uncertainty-penalty is the lambda of mean_minus_var, which --proxy-rules "
                                f"({', '.join(map(str, rules))}) does not name; add it, or leave the penalty out")
        check_aggregate("mean_minus_var", config.uncertainty_penalty)
    if config.normalize:
        raise EnsembleError("--normalize is not for --proxy-rules: the model's reward statistics are those of its "
                            "members' mean, not of each rule; leave --normalize out")
    return rules


def proxy_rule_curves(
    rules: Sequence[RewardRule], members: np.ndarray, uncertainty_penalty: float, gold_scores: np.ndarray | None,
) -> dict[str, list[dict[str, Any]]]:
    """Per rule, the best-of-n curve of the proxy picked by that rule. ``members``: each member's
    reward [prompts, N, K]. Each row: n, kl, the rule's proxy reward, the gold reward of its pick
    and the members' standard deviation at its pick (how much they disagree about what the rule
    picks), each a mean over prompts with its standard error. With gold scores, each rule after the
    first also gets ``gold_minus_first`` (and its ``_sem``): the gold of its pick minus the gold of
    the first rule's pick, paired prompt by prompt (every rule ranks the same samples), so two
    rules are compared without the prompts' own spread. Every rule's rows also get
    ``gold_minus_peak`` (and its ``_sem``): the gold at that n minus the gold at the n where the
    rule's mean gold peaks, paired by prompt, so a fall after the peak (over-optimisation) is
    measured without the prompts' spread as well."""
    spread = members.std(axis=-1)
    curves = {}
    first_gold = None
    for rule in rules:
        scores = rule_rewards(members, rule, uncertainty_penalty)
        curve = best_of_n_curve(scores, spread)  # the proxy's curve, and the members' spread at each pick
        gold = None if gold_scores is None else best_of_n_per_prompt(scores, curve["n"], gold_scores)  # [n, prompts]
        rows = [
            {"n": n, "kl": curve["kl"][i], "proxy_reward": curve["proxy"][i], "proxy_reward_sem": curve["proxy_sem"][i],
             "gold_reward": None if gold is None else float(gold[i].mean()),
             "gold_reward_sem": None if gold is None else standard_error(gold[i]),
             "ensemble_std": curve["gold"][i], "ensemble_std_sem": curve["gold_sem"][i]}
            for i, n in enumerate(curve["n"])
        ]
        curves[str(rule)] = rows
        if gold is None:
            continue
        _add_paired(rows, "gold_minus_peak", gold - gold[int(np.argmax(gold.mean(axis=1)))])
        if first_gold is None:
            first_gold = gold
        else:
            _add_paired(rows, "gold_minus_first", gold - first_gold)
    return curves


def _add_paired(rows: list[dict[str, Any]], key: str, differences: np.ndarray) -> None:
    """Each row (one n) gets ``key``, the mean over prompts of its ``differences`` [n, prompts],
    and ``key_sem``, its standard error (None for one prompt: JSON has no NaN)."""
    for row, difference in zip(rows, differences):
        row[key] = float(difference.mean())
        row[f"{key}_sem"] = standard_error(difference) if difference.size > 1 else None


def run_best_of_n(config: EvalConfig) -> int:
    from client import RewardServiceError

    urls, models = list(config.urls or []), list(config.models or [])
    if len(urls) > 1 or len(models) > 1:
        return fail("best-of-n takes one proxy reward model (one --url, one --model); the gold one is --gold-model/--gold-url", EXIT_INPUT)
    try:
        rules = parse_proxy_rules(config)
    except EnsembleError as exc:
        return fail(str(exc), EXIT_INPUT)
    if config.aggregate is not None:  # `reward eval --aggregate R best-of-n`: the preference mode's flag
        return fail("--aggregate is for the preference mode: best-of-n draws the proxy's curve under its served rule; "
                    "for a curve under each rule give --proxy-rules (e.g. --proxy-rules mean,min,mean_minus_var)", EXIT_INPUT)
    proxy = make_targets(urls, models)[0]
    proxy.members = bool(rules)
    gold = None
    if config.gold_model or config.gold_url:
        gold = Target(config.gold_url or proxy.url, config.gold_model)
    targets = [proxy] + ([gold] if gold else [])
    if config.temperature <= 0:
        return fail("--temperature must be > 0 (best-of-N needs sampling)", EXIT_INPUT)
    policy = Path(config.policy) if config.policy else None
    if config.samples:  # an earlier run's samples, scored again: nothing is sampled
        if policy is not None:
            return fail("--samples scores an earlier run's samples again: leave out --policy (and the sampling flags)", EXIT_INPUT)
        try:
            prompts, samples = read_samples_file(config.samples, config.max_prompts)
        except DataError as exc:
            return fail(f"{exc}; nothing to evaluate", EXIT_INPUT)
        source = str(config.samples)
    else:
        if policy is None:
            return fail("give --policy DIR to sample from (with --prompts or --data), or --samples FILE to score an "
                        "earlier run's samples again", EXIT_INPUT)
        if not (policy / "config.json").is_file():
            return fail(f"--policy {policy} is not a Hugging Face model directory (no config.json)", EXIT_INPUT)
        try:
            prompts, source = load_bon_prompts(config)
        except DataError as exc:
            return fail(f"{exc}; nothing to evaluate", EXIT_INPUT)

    async def check(clients):
        await resolve_targets(clients, targets)

    try:  # before generating: a wrong URL or model name should not cost a generation run
        asyncio.run(with_clients([t.url for t in targets], config, check))
    except RewardServiceError as exc:
        return fail(service_error_message(exc), EXIT_SERVICE)
    ensemble = card_ensemble(proxy.card)
    if rules:
        if not ensemble:
            return fail(f"--proxy-rules needs an ensemble proxy; {proxy.served_model} at {proxy.url} is a single model "
                        "(its model card has no 'ensemble')", EXIT_INPUT)
        try:
            for rule in rules:
                rule.check_members(ensemble["members"])
        except EnsembleError as exc:
            return fail(f"--proxy-rules: {exc}", EXIT_INPUT)
    penalty = config.uncertainty_penalty if config.uncertainty_penalty is not None else (ensemble or {}).get("uncertainty_penalty")

    truncated: list[int] = []
    if config.samples:
        N = len(samples[0])
        print(f"reward eval: best-of-{N}: {len(prompts)} prompts, their samples from {source}", file=sys.stderr)
    else:
        N = config.n_samples
        print(f"reward eval: best-of-{N}: {len(prompts)} prompts from {source}, policy {policy}", file=sys.stderr)
        try:
            with progress_bar() as progress:
                task = progress.add_task("sampling", total=len(prompts))
                samples = generate_samples(
                    policy, prompts, N, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                    max_new_tokens=config.max_new_tokens, max_prompt_length=config.max_prompt_length,
                    batch_size=config.batch_size, seed=config.seed, device=config.device, dtype=config.dtype,
                    trust_remote_code=config.trust_remote_code, truncated_prompts=truncated,
                    on_prompt_done=lambda done: progress.update(task, completed=done),
                )
        except SFTConfigError as exc:  # the flags leave no room for a prompt in the policy's context
            return fail(str(exc), EXIT_INPUT)
    if truncated:
        print(f"reward eval: {len(truncated)} of {len(prompts)} prompts were longer than the policy takes; "
              "their most recent tokens were kept (--max-prompt-length)", file=sys.stderr)
    pool = ItemPool()
    index = np.array([[pool.add(p, s) for s in row] for p, row in zip(prompts, samples)], dtype=np.int64)

    try:
        # --uncertainty-penalty here is the λ of mean_minus_var in --proxy-rules, applied below to
        # the members, not sent: the proxy's reward stays the served default rule's (--aggregate
        # was refused above)
        scores, timing, _, ensembles = score_through_service(
            dataclasses.replace(config, uncertainty_penalty=None), targets, pool, resolve=False)
    except RewardServiceError as exc:
        return fail(service_error_message(exc), EXIT_SERVICE)

    proxy_scores = scores[proxy.label][index]
    gold_scores = scores[gold.label][index] if gold else None
    by_rule, check, member_scores = None, None, None
    if rules:
        # the proxy's card (resolved above) has `ensemble`, so its members came with its rewards
        # (score_items checks there are as many per item as the card says)
        member_scores = ensembles[proxy.label].members[index]  # [prompts, N, K]
        by_rule = proxy_rule_curves(rules, member_scores, penalty, gold_scores)
        served = RewardRule(aggregate=ensemble["aggregate"])
        difference = float(np.abs(rule_rewards(member_scores, served, ensemble["uncertainty_penalty"]) - proxy_scores).max())
        check = {"served_rule": str(served), "served_uncertainty_penalty": ensemble["uncertainty_penalty"],
                 "max_abs_diff": difference, "tolerance": RULE_CHECK_TOLERANCE, "ok": difference <= RULE_CHECK_TOLERANCE}
        if not check["ok"]:
            print(f"reward eval: warning: the served default rule {served} computed from the members differs from the "
                  f"service's reward by up to {difference:.2g}: the rules derived here may not be the service's",
                  file=sys.stderr)
    curve = best_of_n_curve(proxy_scores, gold_scores)
    rows = [
        {"n": n, "kl": curve["kl"][i], "proxy_reward": curve["proxy"][i], "proxy_reward_sem": curve["proxy_sem"][i],
         "gold_reward": curve["gold"][i] if gold else None, "gold_reward_sem": curve["gold_sem"][i] if gold else None}
        for i, n in enumerate(curve["n"])
    ]
    generation = None if config.samples else {
        "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
        "max_new_tokens": config.max_new_tokens, "max_prompt_length": config.max_prompt_length, "seed": config.seed}
    report = {
        "schema_version": SCHEMA_VERSION, "kind": "best_of_n", "created": utc_now(),
        "config": {"seed": config.seed, "normalize": config.normalize, "chunk_size": config.chunk_size,
                   "concurrency": config.concurrency, **(generation or {"samples": str(config.samples)})},
        "models": [t.describe() for t in targets], "scoring": timing, "plots": {},
        "best_of_n": {
            "policy": str(policy) if policy else None, "n_prompts": len(prompts), "n_samples": N, "prompts_source": source,
            "samples_source": str(config.samples) if config.samples else None,
            "generation": {**generation, "prompts_truncated": len(truncated)} if generation else None,
            "proxy": proxy.label, "gold": gold.label if gold else None,
            "curve": rows, "samples_file": "samples.jsonl" if config.report else None,
            "proxy_rules": [str(r) for r in rules] or None,
            "members": ensemble["members"] if rules else None,
            "uncertainty_penalty": penalty if any(r.aggregate == "mean_minus_var" for r in rules) else None,
            "by_rule": by_rule, "by_rule_check": check,
        },
    }
    if config.report:
        out = Path(config.report)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            for p, (messages, row) in enumerate(zip(prompts, samples)):
                for s, text in enumerate(row):
                    line = {"prompt_index": p, "sample_index": s, "prompt": messages, "response": text,
                            "proxy_score": float(proxy_scores[p, s]),
                            "gold_score": float(gold_scores[p, s]) if gold_scores is not None else None}
                    if member_scores is not None:
                        line["proxy_members"] = member_scores[p, s].tolist()
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return finish_report(report, config)
