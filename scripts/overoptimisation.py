"""Ensembles against over-optimisation (issue 20), measured with the gold-vs-proxy harness: the
proxy reward is an ensemble's, read by each rule (one member alone, the mean, the worst case, the
uncertainty-weighted mean); a held-out gold RM judges what each rule's optimisation bought.

    python scripts/overoptimisation.py PROXY_ENSEMBLE_DIR GOLD_DIR [OUT_DIR]
    (or: bash scripts/overoptimisation.sh ...)

PROXY_ENSEMBLE_DIR is an ensemble model directory (`reward train-rm --ensemble K`); GOLD_DIR any
model directory `reward serve` loads, which neither best-of-N nor PPO optimises. One service
serves both (proxy, gold). Then:

1. best-of-N from the starting policy on held-out prompts, every rule from the same samples
   (`reward eval best-of-n --proxy-rules`): gold and proxy against the analytic KL
   log n - (n-1)/n for n = 1, 2, 4, ..., BON_N;
2. PPO from the same policy for every rule and seed (`reward ppo --reward-aggregate RULE
   --gold-reward-model gold`): each rollout's proxy score, gold score and members' spread
   against its measured KL. The KL penalty is fixed and small, so the policy keeps drifting
   until the single proxy is gamed (the gold score falls while the proxy's rises);
3. the numbers and plots into REPORT_DIR: summary.json, README.md, overoptimisation.png,
   best_of_n.csv, ppo_curves.csv, the best-of-N report and each PPO run's metrics.jsonl.

The SFT policy, the best-of-N report and each PPO run that finished (its policy/ exists) are
kept and not made again, and a PPO run that was stopped resumes from its checkpoint, so the same
command picks up where a stopped experiment left off (delete OUT_DIR/best-of-n, or a run's folder,
to redo it with other sizes).

Sizes and paths from the environment: DATA (../shared/data), RULES
(member:0,mean,min,mean_minus_var), UNCERTAINTY_PENALTY (1.0: the lambda of mean_minus_var),
SEEDS (1,2,3: PPO seeds), BON_N (64), BON_PROMPTS (200, of HH-harmless dev), BON_BATCH (16:
sequences per generate call; 64 on a GPU), PPO_STEPS (200),
ROLLOUT (64), MAX_NEW_TOKENS (32), KL_COEF (0.005, fixed), PPO_LR (5e-5), PPO_ARGS (more `reward ppo`
flags, e.g. "--missing-eos-penalty 0 --normalize-reward"; recorded in the report), WINDOW (10: PPO steps
averaged into one point of a curve), SFT (the starting policy: a causal-LM directory, e.g. the
PPO demo's runs/ppo-demo/sft; else a tiny GPT-2 is SFT'd as the demo does, SFT_STEPS (600) and
DEMOS (2000)), PROMPTS (PPO's prompt file; default HH-harmless train), HELD_OUT (best-of-N's
prompt file; default HH-harmless dev), REPORT_DIR (reports/overoptimisation), DEVICE (auto: the
policy's), SERVE_DEVICE (cpu: the reward service's; cuda on a GPU machine), THREADS (torch threads of
PPO; default torch's choice), PARALLEL (1: PPO runs at a time; on a GPU several share it, and
best-of-N runs beside them), DEADLINE_S (none: wall-clock seconds for all PPO runs; runs still
going then are stopped and reported as far as they got, each cut run marked in summary.json and
OUT_DIR/cut.json, so a fixed time budget yields a report), RUN_NOTE (a sentence for the report on
how the run was made: the machine, anything unusual), MATCHED_KL_STEP (5: the KL grid, in nats,
at which each rule's PPO gold is compared with the first rule's, paired by seed) and REPORT_ONLY
(1: write the report again from what OUT_DIR holds, e.g. logs brought back from a GPU machine,
sampling and training nothing).

The first rule is the reference: the best-of-N table gives each other rule's gold at N minus the
reference's, paired prompt by prompt, and the PPO section each rule's gold minus the reference's
at matched KL, paired by seed, both with 95% intervals.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(SCRIPTS))

from ppo_demo import MAX_PROMPT_LENGTH, env, reward, tiny_policy  # noqa: E402
from trainer.data import load_preferences  # noqa: E402
from trainer.evaluate.report import save_figure  # noqa: E402
from trainer.loop import local_server  # noqa: E402


def rule_slug(rule: str) -> str:
    return rule.replace(":", "-")


def sem(values: list[float]) -> float | None:
    """Standard error of the mean; None for fewer than two values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def starting_policy(out: Path, data: Path, device: str) -> Path:
    """SFT when given; else the PPO demo's tiny GPT-2, SFT'd on HH-harmless demonstrations."""
    if env("SFT", ""):
        return Path(env("SFT", "")).resolve()
    sft = out / "sft"
    if not (sft / "config.json").is_file():
        demos = f"{data / 'hh-harmless' / 'train.jsonl.gz'}:1:{env('DEMOS', '2000')}"
        records = load_preferences([demos]).records
        texts = [m["content"] for r in records for m in r.prompt] + [r.best for r in records]
        init = tiny_policy(out / "policy-init", texts)
        reward("sft", "--model", str(init), "--data", demos, "--output-dir", str(sft), "--max-length", "256",
               "--batch-size", "16", "--learning-rate", "1e-3", "--max-steps", env("SFT_STEPS", "600"), "--device", device)
    return sft


def prompt_files(out: Path, data: Path) -> tuple[Path, Path]:
    """PPO's prompts (HH-harmless train) and best-of-N's held-out ones (HH-harmless dev), unless given."""
    files = []
    for variable, split in (("PROMPTS", "train"), ("HELD_OUT", "dev")):
        if env(variable, ""):
            files.append(Path(env(variable, "")).resolve())
            continue
        path = out / f"{split}_prompts.jsonl"
        records = load_preferences([str(data / "hh-harmless" / f"{split}.jsonl.gz")]).records
        path.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in records))
        files.append(path)
    return files[0], files[1]


def run_best_of_n(url: str, policy: Path, held_out: Path, rules: list[str], out: Path, device: str) -> dict:
    report = out / "best-of-n"
    if (report / "report.json").is_file():
        print(f"+ {report} done before; not run again (delete it to sample again)", flush=True)
        return json.loads((report / "report.json").read_text())
    reward("eval", "best-of-n", "--url", url, "--model", "proxy", "--gold-model", "gold", "--policy", str(policy),
           "--prompts", str(held_out), "--max-prompts", env("BON_PROMPTS", "200"), "--n", env("BON_N", "64"),
           "--max-new-tokens", env("MAX_NEW_TOKENS", "32"), "--max-prompt-length", MAX_PROMPT_LENGTH,
           "--proxy-rules", ",".join(rules), *penalty_flag(rules, "--uncertainty-penalty"),
           "--batch-size", env("BON_BATCH", "16"), "--device", device, "--report", str(report))
    return json.loads((report / "report.json").read_text())


def penalty_flag(rules: list[str], flag: str) -> list[str]:
    return [flag, env("UNCERTAINTY_PENALTY", "1.0")] if "mean_minus_var" in rules else []


def ppo_command(url: str, policy: Path, prompts: Path, rule: str, seed: str, run_dir: Path, device: str) -> list[str]:
    rollout = env("ROLLOUT", "64")
    # A fixed, small beta (no adaptive controller holding the KL at a target): the policy keeps
    # drifting from the reference, far enough for a single proxy to be gamed. The PPO demo's
    # adaptive 6-nat target showed no over-optimisation yet.
    threads = ["--num-threads", env("THREADS", "")] if env("THREADS", "") else []
    return [sys.executable, "-m", "reward_cli", "ppo", "--policy", str(policy), "--prompts", str(prompts), "--output-dir", str(run_dir),
            "--reward-url", url, "--reward-model", "proxy", "--reward-aggregate", rule,
            *penalty_flag([rule], "--reward-uncertainty-penalty"), "--gold-reward-model", "gold",
            "--total-steps", env("PPO_STEPS", "200"), "--rollout-batch-size", rollout,
            "--minibatch-size", str(min(16, int(rollout))), "--max-new-tokens", env("MAX_NEW_TOKENS", "32"),
            "--learning-rate", env("PPO_LR", "5e-5"), "--no-adaptive-kl", "--kl-coef", env("KL_COEF", "0.005"),
            "--max-prompt-length", MAX_PROMPT_LENGTH, "--save-steps", "20", "--seed", seed, "--device", device,
            "--no-progress", *threads, *shlex.split(env("PPO_ARGS", ""))]


def run_all_ppo(url: str, policy: Path, prompts: Path, rules: list[str], seeds: list[str], out: Path, device: str) -> dict[str, str]:
    """Every (rule, seed) PPO run, PARALLEL at a time, until done or DEADLINE_S; returns the runs
    stopped at the deadline ("rule/seed" -> the step their log reached is in their metrics)."""
    pending = []
    for rule in rules:
        for seed in seeds:
            run_dir = out / "ppo" / rule_slug(rule) / f"seed{seed}"
            if (run_dir / "policy" / "config.json").is_file():
                print(f"+ {run_dir} finished before; not run again", flush=True)
            else:
                pending.append((rule, seed, run_dir))
    parallel = max(1, int(env("PARALLEL", "1")))
    deadline = time.monotonic() + float(env("DEADLINE_S", "inf"))
    running: list[tuple[str, str, subprocess.Popen]] = []
    cut: dict[str, str] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel and time.monotonic() < deadline:
                rule, seed, run_dir = pending.pop(0)
                run_dir.mkdir(parents=True, exist_ok=True)
                args = ppo_command(url, policy, prompts, rule, seed, run_dir, device)
                print("+", " ".join(args), flush=True)
                log = open(run_dir / "ppo.log", "wb")
                running.append((rule, seed, subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)))
                log.close()
            for item in list(running):
                rule, seed, process = item
                if process.poll() is not None:
                    running.remove(item)
                    if process.returncode != 0:
                        raise RuntimeError(f"PPO {rule} seed {seed} failed (exit {process.returncode}); see its ppo.log")
            if time.monotonic() >= deadline:
                for rule, seed, process in running:
                    process.terminate()
                    process.wait()
                    cut[f"{rule}/{seed}"] = "stopped at DEADLINE_S"
                for rule, seed, _ in pending:
                    cut[f"{rule}/{seed}"] = "not started before DEADLINE_S"
                running, pending = [], []
            time.sleep(1.0)
    finally:
        for _, _, process in running:
            process.terminate()
    return cut


# --------------------------------------------------------------------------- collecting


WINDOW_KEYS = ("kl", "score", "gold_score", "ensemble_std")


def ppo_windows(rows: list[dict], window: int, keys: tuple[str, ...] = WINDOW_KEYS) -> list[dict]:
    """One run's log in windows of ``window`` steps: the means of ``keys`` (by default KL, proxy
    score (the run's own rule), gold score and the members' spread)."""
    out = []
    for start in range(0, len(rows) - window + 1, window):
        part = rows[start:start + window]
        point = {"steps": [part[0]["step"], part[-1]["step"]]}
        for key in keys:
            values = [r[key] for r in part if r.get(key) is not None]
            point[key] = sum(values) / len(values) if values else None
        out.append(point)
    return out


def across_seeds(runs: dict[str, list[dict]], keys: tuple[str, ...] = WINDOW_KEYS) -> list[dict]:
    """Window i of every seed (as far as all seeds got): the mean over seeds of ``keys`` and its
    standard error."""
    length = min(len(points) for points in runs.values())
    curve = []
    for i in range(length):
        points = [runs[seed][i] for seed in runs]
        row = {"steps": points[0]["steps"], "seeds": len(points)}
        for key in keys:
            values = [p[key] for p in points if p[key] is not None]
            row[key] = sum(values) / len(values) if values else None
            row[f"{key}_sem"] = sem(values)
        curve.append(row)
    return curve


def peak_and_end(points: list[dict], gold: str, proxy: str, kl: str) -> dict:
    """Where the gold reward peaked and where it ended, with the proxy and KL there, and whether
    that is over-optimisation: the proxy rose past its value at the gold peak while the gold fell
    by more than twice the standard error of the fall. Best-of-N's points share their prompts, so
    its fall is paired by prompt (``gold_minus_peak_sem`` of the end point, from best-of-n; a report
    without it falls back to the end point's own error, which is conservative); PPO's error is the
    end point's over seeds. With one seed there is no error to judge a fall by, so the verdict is
    None (the report says n/a and gives the fall)."""
    if not points or points[0].get(gold) is None:
        return {}
    peak = max(range(len(points)), key=lambda i: points[i][gold])
    end = points[-1]
    drop = points[peak][gold] - end[gold]
    paired = end.get("gold_minus_peak_sem")
    error = paired if paired is not None else end.get(f"{gold}_sem")
    return {
        "gold_start": points[0][gold], "gold_peak": points[peak][gold], "kl_at_gold_peak": points[peak][kl],
        "proxy_at_gold_peak": points[peak][proxy], "gold_end": end[gold], "gold_end_sem": end.get(f"{gold}_sem"),
        "kl_end": end[kl], "proxy_end": end[proxy], "gold_drop_from_peak": drop,
        "gold_drop_from_peak_sem": error, "gold_drop_paired": paired is not None,
        "gold_fell_while_proxy_rose": None if error is None else
        bool(drop > 2 * error and drop > 0 and end[proxy] > points[peak][proxy]),
    }


def matched_kl(seed_windows: dict[str, dict[str, list[dict]]], reference: str, step: float) -> dict[str, list[dict]]:
    """Each rule's PPO gold against the reference rule's (the single proxy) at the same KL: within
    each seed, both runs' windows are read at KL = step, 2 step, ... (linear between windows, sorted
    by KL) as far as both reached, and the difference is paired by seed (the same seed starts both
    runs alike). Per KL: the mean difference over seeds, its standard error and a 95% t interval
    (seeds - 1 degrees of freedom); points with fewer than two seeds are left out."""
    from scipy import stats

    def gold_by_kl(windows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        points = sorted((w["kl"], w["gold_score"]) for w in windows if w["kl"] is not None and w["gold_score"] is not None)
        return np.array([p[0] for p in points]), np.array([p[1] for p in points])

    out: dict[str, list[dict]] = {}
    for rule, by_seed in seed_windows.items():
        if rule == reference:
            continue
        differences: dict[float, list[float]] = {}
        for seed, windows in by_seed.items():
            base = seed_windows.get(reference, {}).get(seed)
            if not base:
                continue
            (kl_a, gold_a), (kl_b, gold_b) = gold_by_kl(windows), gold_by_kl(base)
            if not kl_a.size or not kl_b.size:
                continue
            low, high = max(kl_a[0], kl_b[0]), min(kl_a[-1], kl_b[-1])
            for k in range(max(1, math.ceil(low / step)), math.floor(high / step) + 1):
                kl = k * step
                differences.setdefault(kl, []).append(float(np.interp(kl, kl_a, gold_a) - np.interp(kl, kl_b, gold_b)))
        rows = []
        for kl, values in sorted(differences.items()):
            if len(values) < 2:
                continue
            mean, error = float(np.mean(values)), sem(values)
            half = float(stats.t.ppf(0.975, len(values) - 1)) * error
            rows.append({"kl": kl, "seeds": len(values), "gold_minus_reference": mean, "sem": error,
                         "ci95": [mean - half, mean + half]})
        out[rule] = rows
    return out


PPO_SIZES = ("PPO_STEPS", "ROLLOUT", "KL_COEF", "PPO_LR", "PPO_ARGS")  # the sizes a best-of-N-only run (no SEEDS) leaves out


def collect(out: Path, report_dir: Path, rules: list[str], seeds: list[str], bon: dict, cut: dict[str, str] | None = None) -> dict:
    window = int(env("WINDOW", "10"))
    b = bon["best_of_n"]
    summary: dict = {
        "proxy": b["proxy"], "gold": b["gold"], "members": b["members"], "rules": rules,
        "uncertainty_penalty": b["uncertainty_penalty"], "seeds": seeds, "window_steps": window,
        "sizes": {name: env(name, default) for name, default in (
            ("BON_N", "64"), ("BON_PROMPTS", "200"), ("PPO_STEPS", "200"), ("ROLLOUT", "64"), ("MAX_NEW_TOKENS", "32"),
            ("KL_COEF", "0.005"), ("PPO_LR", "5e-5"), ("PPO_ARGS", "")) if (seeds or name not in PPO_SIZES) and env(name, default)},
        "run": {"device": env("DEVICE", "auto"), "serve_device": env("SERVE_DEVICE", "cpu"),
                "parallel": int(env("PARALLEL", "1")), "deadline_s": env("DEADLINE_S", "") or None,
                "note": env("RUN_NOTE", "") or None},
        "best_of_n": {"n_prompts": b["n_prompts"], "n_samples": b["n_samples"], "by_rule_check": b["by_rule_check"],
                      "curves": b["by_rule"],
                      "summary": {rule: peak_and_end(curve, "gold_reward", "proxy_reward", "kl") for rule, curve in b["by_rule"].items()}},
        "ppo": {"curves": {}, "summary": {}, "cut": cut or {}},
    }
    bon_dir = report_dir / "best-of-n"
    shutil.rmtree(bon_dir, ignore_errors=True)
    bon_dir.mkdir(parents=True)
    for name in ("report.json", "report.md", "best-of-n.png", "best-of-n-rules.png"):
        if (out / "best-of-n" / name).is_file():
            shutil.copy(out / "best-of-n" / name, bon_dir / name)
    with open(report_dir / "best_of_n.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rule", "n", "kl", "proxy_reward", "proxy_reward_sem", "gold_reward", "gold_reward_sem",
                         "ensemble_std", "ensemble_std_sem"])
        for rule, curve in b["by_rule"].items():
            for r in curve:
                writer.writerow([rule, r["n"], r["kl"], r["proxy_reward"], r["proxy_reward_sem"], r["gold_reward"],
                                 r["gold_reward_sem"], r["ensemble_std"], r["ensemble_std_sem"]])

    ppo_rows = []
    seed_windows: dict[str, dict[str, list[dict]]] = {}
    for rule in rules:
        runs = {}
        for seed in seeds:
            metrics = out / "ppo" / rule_slug(rule) / f"seed{seed}" / "metrics.jsonl"
            if not metrics.is_file():
                continue  # never started before the deadline (summary.json's ppo.cut says so)
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            kept = report_dir / "ppo" / rule_slug(rule) / f"seed{seed}"
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copy(metrics, kept / "metrics.jsonl")
            runs[seed] = ppo_windows(rows, window)
            ppo_rows += [[rule, seed, *p["steps"], p["kl"], p["score"], p["gold_score"], p["ensemble_std"]] for p in runs[seed]]
        if not runs:
            continue
        seed_windows[rule] = runs
        curve = across_seeds(runs)
        summary["ppo"]["curves"][rule] = curve
        summary["ppo"]["summary"][rule] = peak_and_end(curve, "gold_score", "score", "kl")
    summary["ppo"]["reference_rule"] = rules[0]
    summary["ppo"]["matched_kl"] = matched_kl(seed_windows, rules[0], float(env("MATCHED_KL_STEP", "5")))
    with open(report_dir / "ppo_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rule", "seed", "first_step", "last_step", "kl", "proxy_score", "gold_score", "ensemble_std"])
        writer.writerows(ppo_rows)
    return summary


# --------------------------------------------------------------------------- the report


def plot(summary: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_ppo = bool(summary["seeds"])
    fig, axes = plt.subplots(2 if with_ppo else 1, 3, figsize=(16, 9 if with_ppo else 4.8), squeeze=False)
    bon = summary["best_of_n"]["curves"]
    ppo = summary["ppo"]["curves"]
    panels = [
        (axes[0], bon, "kl", ("proxy_reward", "gold_reward", "ensemble_std"), "best-of-N", "KL = log n - (n-1)/n [nats]"),
        *([(axes[1], ppo, "kl", ("score", "gold_score", "ensemble_std"), "PPO", "measured KL(policy || SFT) [nats]")]
          if with_ppo else []),
    ]
    titles = ("proxy reward under the rule, minus the start", "gold reward", "members' std")
    for row, curves, kl, keys, name, xlabel in panels:
        for ax, key, title in zip(row, keys, titles):
            for rule, curve in curves.items():
                points = [p for p in curve if p[key] is not None]
                if not points:
                    continue
                base = points[0][key] if key in ("proxy_reward", "score") else 0.0
                ax.errorbar([p[kl] for p in points], [p[key] - base for p in points],
                            yerr=[p[f"{key}_sem"] or 0.0 for p in points], marker="o", markersize=3, capsize=2, label=rule)
            ax.set_title(f"{name}: {title}")
            ax.set_xlabel(xlabel)
            ax.legend(fontsize=8)
    fig.suptitle(f"Proxy: ensemble of {summary['members']} ({summary['proxy']}), gold: {summary['gold']}; "
                 "bars: ± standard error (best-of-N over prompts"
                 + (f", PPO over seeds: {len(summary['seeds'])})" if with_ppo else ")"))
    fig.tight_layout()
    save_figure(fig, png, dpi=100)
    plt.close(fig)


def fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def run_line(run: dict, with_ppo: bool = True) -> str:
    """Where and how the run was made (devices, PPO runs at a time, the time budget) and RUN_NOTE."""
    line = (f"policy on {run['device']}, reward service on {run['serve_device']}"
            + (f", {run['parallel']} PPO run(s) at a time" if with_ppo else ", best-of-N only (no PPO seeds)")
            + (f", PPO stopped after {run['deadline_s']} s" if with_ppo and run.get("deadline_s") else ""))
    return line + (f". {run['note']}" if run.get("note") else ".")


FELL_DEFINITION = (
    "Gold fell while proxy rose: the proxy (the rule's own reward) ended above its value at the gold peak while the "
    "gold fell from its peak by more than twice the standard error of the fall (best-of-N: the fall paired by prompt, "
    "shown as fell ± SE; PPO: the end point's error over seeds).\n")


def fell_verdict(s: dict) -> str:
    """The "gold fell while proxy rose" cell: yes/no with the fall and its error, or n/a where
    there is no error to judge it by (one PPO seed)."""
    fell = s["gold_fell_while_proxy_rose"]
    drop, error = s["gold_drop_from_peak"], s["gold_drop_from_peak_sem"]
    if fell is None:
        return f"n/a, one seed (fell {fmt(drop)} from its peak)" if drop > 0 else "n/a, one seed (no fall)"
    return ("yes" if fell else "no") + (f" (fell {fmt(drop)} ± {fmt(error)})" if drop > 0 else "")


def markdown(summary: dict) -> str:
    reference = summary["rules"][0]
    lines = [
        "# Ensembles against over-optimisation\n",
        f"Proxy: an ensemble of {summary['members']} members (`{summary['proxy']}`), read by each rule; gold: "
        f"`{summary['gold']}`, held out (never optimised). Made by `scripts/overoptimisation.py` "
        f"(sizes: {', '.join(f'{k} {v}' for k, v in summary['sizes'].items())}; "
        + (f"PPO seeds {', '.join(summary['seeds'])}" if summary["seeds"] else "no PPO: SEEDS was empty")
        + (f"; λ of mean_minus_var {summary['uncertainty_penalty']}" if summary["uncertainty_penalty"] is not None else "")
        + ").\n",
        *([f"Run: {run_line(summary['run'], bool(summary['seeds']))}\n"] if summary.get("run") else []),
        "![gold and proxy against KL per rule](overoptimisation.png)\n",
        f"## Best-of-N ({summary['best_of_n']['n_prompts']} prompts, N = {summary['best_of_n']['n_samples']})\n",
        f"| rule | gold, n=1 | gold peak (KL) | gold at N ± SE (KL) | gold at N − {reference}'s, paired [95% CI] "
        "| proxy gain at N | gold fell while proxy rose |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule, s in summary["best_of_n"]["summary"].items():
        if s:
            last = summary["best_of_n"]["curves"][rule][-1]
            paired = "n/a"
            if last.get("gold_minus_first") is not None and last.get("gold_minus_first_sem") is not None:
                d, e = last["gold_minus_first"], last["gold_minus_first_sem"]
                paired = f"{d:+.3f} [{d - 1.96 * e:+.3f}, {d + 1.96 * e:+.3f}]"
            lines.append(f"| {rule} | {fmt(s['gold_start'])} | {fmt(s['gold_peak'])} ({fmt(s['kl_at_gold_peak'], 2)}) | "
                         f"{fmt(s['gold_end'])} ± {fmt(s['gold_end_sem'])} ({fmt(s['kl_end'], 2)}) | {paired} | "
                         f"{fmt(s['proxy_end'] - summary['best_of_n']['curves'][rule][0]['proxy_reward'])} | "
                         f"{fell_verdict(s)} |")
    if not summary["seeds"]:
        lines += ["", "## PPO\n", "Not run: SEEDS was empty, so this report is best-of-N's alone.\n", FELL_DEFINITION,
                  "Numbers: `summary.json` (every curve), `best_of_n.csv`, `best-of-n/` (the best-of-N report).\n"]
        return "\n".join(lines)
    lines += [
        "",
        f"## PPO (windows of {summary['window_steps']} steps, mean over seeds)\n",
        "| rule | gold, first window | gold peak (KL) | gold at end ± SE (KL) | proxy gain, first to last window | members' std, first → last | gold fell while proxy rose |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule, s in summary["ppo"]["summary"].items():
        curve = summary["ppo"]["curves"][rule]
        if s:
            lines.append(f"| {rule} | {fmt(s['gold_start'])} | {fmt(s['gold_peak'])} ({fmt(s['kl_at_gold_peak'], 2)}) | "
                         f"{fmt(s['gold_end'])} ± {fmt(s['gold_end_sem'])} ({fmt(s['kl_end'], 2)}) | "
                         f"{fmt(s['proxy_end'] - curve[0]['score'])} | {fmt(curve[0]['ensemble_std'])} → {fmt(curve[-1]['ensemble_std'])} | "
                         f"{fell_verdict(s)} |")
    matched = summary["ppo"].get("matched_kl") or {}
    if any(matched.values()):
        lines += [
            "",
            f"### PPO at matched KL: each rule's gold minus {reference}'s\n",
            "Within each seed both runs read at the same KL (linear between windows), paired by seed; mean over seeds, "
            "95% t interval (seeds − 1 degrees of freedom).\n",
            "| rule | " + " | ".join(f"KL {p['kl']:g}" for p in max(matched.values(), key=len)) + " |",
            "|---|" + "---|" * len(max(matched.values(), key=len)),
        ]
        columns = [p["kl"] for p in max(matched.values(), key=len)]
        for rule, points in matched.items():
            at = {p["kl"]: p for p in points}
            cells = [f"{at[k]['gold_minus_reference']:+.3f} [{at[k]['ci95'][0]:+.3f}, {at[k]['ci95'][1]:+.3f}]"
                     if k in at else "n/a" for k in columns]
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    if summary["ppo"].get("cut"):
        lines += ["", "Runs cut by the time budget (DEADLINE_S), reported as far as they got: "
                  + "; ".join(f"{run} ({why})" for run, why in summary["ppo"]["cut"].items()) + "."]
    lines += [
        "",
        FELL_DEFINITION,
        "Numbers: `summary.json` (every curve), `best_of_n.csv`, `ppo_curves.csv` (each seed's windows), "
        "`best-of-n/` (the best-of-N report), `ppo/RULE/seedS/metrics.jsonl` (each PPO run's log).\n",
    ]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    proxy_dir, gold_dir = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    out = Path(sys.argv[3] if len(sys.argv) > 3 else "runs/overoptimisation").resolve()
    report_dir = Path(env("REPORT_DIR", str(REPO / "reports" / "overoptimisation"))).resolve()
    data = Path(env("DATA", str(REPO.parent / "shared" / "data")))
    device = env("DEVICE", "auto")
    rules = [r.strip() for r in env("RULES", "member:0,mean,min,mean_minus_var").split(",") if r.strip()]
    seeds = [s.strip() for s in env("SEEDS", "1,2,3").split(",") if s.strip()]
    out.mkdir(parents=True, exist_ok=True)
    if env("REPORT_ONLY", "0") == "1":  # the report again from what OUT_DIR holds: nothing sampled or trained
        bon = json.loads((out / "best-of-n" / "report.json").read_text())
        cut = json.loads((out / "cut.json").read_text()) if (out / "cut.json").is_file() else {}
        return write_report(out, report_dir, rules, seeds, bon, cut)
    policy = starting_policy(out, data, device)
    prompts, held_out = prompt_files(out, data)

    with local_server({"proxy": proxy_dir, "gold": gold_dir}, out / "server.log", 300,
                      ["--device", env("SERVE_DEVICE", "cpu")]) as url:
        if int(env("PARALLEL", "1")) > 1:  # best-of-N beside the PPO runs: on a GPU it is one more user of it
            with ThreadPoolExecutor(1) as pool:
                best_of_n = pool.submit(run_best_of_n, url, policy, held_out, rules, out, device)
                cut = run_all_ppo(url, policy, prompts, rules, seeds, out, device)
                bon = best_of_n.result()
        else:
            bon = run_best_of_n(url, policy, held_out, rules, out, device)
            cut = run_all_ppo(url, policy, prompts, rules, seeds, out, device)
    (out / "cut.json").write_text(json.dumps(cut, indent=2) + "\n")
    return write_report(out, report_dir, rules, seeds, bon, cut)


def write_report(out: Path, report_dir: Path, rules: list[str], seeds: list[str], bon: dict, cut: dict[str, str]) -> int:
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = collect(out, report_dir, rules, seeds, bon, cut)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, report_dir / "overoptimisation.png")
    (report_dir / "README.md").write_text(markdown(summary))
    print(f"report: {report_dir / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
