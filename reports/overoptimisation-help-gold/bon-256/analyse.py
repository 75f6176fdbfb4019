"""Answers QUESTION.txt from each draw's best-of-256 samples (``reward eval best-of-n`` with
``--proxy-rules``, so every sample carries each member's reward and the gold's): per draw, the
gold of each rule's pick and of the average member's (a member picked at random: the five
members' gold averaged prompt by prompt), at each n; where each curve peaks and how far it falls
after, paired by prompt; and each rule minus the average member, paired by prompt, at the
average member's peak and beyond.

    python reports/overoptimisation-help-gold/bon-256/analyse.py RUNS_DIR OUT_DIR

RUNS_DIR holds d0 ... d4, each with best-of-n/samples.jsonl; a draw without one is reported as
not run. Writes OUT_DIR/bon256.json and OUT_DIR/bon256.png. A third argument, another run's
samples.jsonl of the same samples, supplies the gold's scores (for a proxy rescored without
--gold-model, so the gold is not run over the same samples twice).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from overoptimisation import peak_and_end  # noqa: E402
from reward_core.ensemble import parse_reward_rule, rule_rewards  # noqa: E402
from trainer.evaluate.metrics import CONFIDENCE, analytic_bon_kl, best_of_n_per_prompt, standard_error  # noqa: E402
from trainer.evaluate.report import save_figure  # noqa: E402

NS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
RULES = ["mean", "min", "mean_minus_var"]
PENALTY = 1.0  # lambda of mean_minus_var, as the samples were scored
Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)  # the 95% interval, normal


def read_samples(path: Path, gold_from: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """members [prompts, N, K] and gold [prompts, N], in the file's prompt and sample order; the gold
    from ``gold_from`` when given (the same samples, matched by prompt, sample and text)."""
    gold_of = None
    if gold_from is not None:
        with gold_from.open() as f:
            gold_of = {(r["prompt_index"], r["sample_index"], r["response"]): r["gold_score"] for r in map(json.loads, f)}
    by_prompt: dict[int, list[tuple[int, list[float], float]]] = {}
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            key = (row["prompt_index"], row["sample_index"], row["response"])
            by_prompt.setdefault(row["prompt_index"], []).append(
                (row["sample_index"], row["proxy_members"], row["gold_score"] if gold_of is None else gold_of[key]))
    prompts = [sorted(by_prompt[p]) for p in sorted(by_prompt)]
    members = np.array([[s[1] for s in rows] for rows in prompts], dtype=np.float64)
    gold = np.array([[s[2] for s in rows] for rows in prompts], dtype=np.float64)
    return members, gold


def paired(difference: np.ndarray) -> dict:
    """Mean over prompts of a per-prompt difference, its standard error and 95% interval."""
    mean, se = float(difference.mean()), standard_error(difference)
    return {"diff": round(mean, 4), "se": round(se, 4), "ci": [round(mean - Z * se, 4), round(mean + Z * se, 4)]}


def curve_summary(gold: np.ndarray, proxy: np.ndarray) -> dict:
    """Where the mean gold peaks and its fall from there to n = 256, paired by prompt; whether that is
    over-optimisation is judged by the experiment's own rule (``peak_and_end`` of
    scripts/overoptimisation.py: a fall of more than twice its standard error while the proxy rose)."""
    means = gold.mean(axis=1)
    peak = int(np.argmax(means))
    fall_per_prompt = gold[peak] - gold[-1]
    points = [{"n": n, "kl": analytic_bon_kl(n), "gold": float(g), "proxy": float(p)}
              for n, g, p in zip(NS, means, proxy.mean(axis=1))]
    points[-1]["gold_minus_peak_sem"] = standard_error(fall_per_prompt) if peak < len(NS) - 1 else 0.0
    verdict = peak_and_end(points, "gold", "proxy", "kl")
    return {"gold": [round(float(m), 4) for m in means], "peak_n": NS[peak], "peak_kl": round(analytic_bon_kl(NS[peak]), 3),
            "gold_peak": round(float(means[peak]), 4), "gold_256": round(float(means[-1]), 4),
            "fall_from_peak": paired(fall_per_prompt), "over_optimised": verdict["gold_fell_while_proxy_rose"]}


def analyse_draw(samples: Path, gold_from: Path | None = None) -> dict:
    members, gold_scores = read_samples(samples, gold_from)
    n_members = members.shape[-1]
    gold, proxy, out = {}, {}, {"prompts": members.shape[0], "samples_per_prompt": members.shape[1], "curves": {}}
    for name in [f"member:{m}" for m in range(n_members)] + RULES:
        scores = rule_rewards(members, parse_reward_rule(name), PENALTY)
        gold[name] = best_of_n_per_prompt(scores, NS, gold_scores)
        proxy[name] = best_of_n_per_prompt(scores, NS)
        out["curves"][name] = curve_summary(gold[name], proxy[name])
    member_names = [f"member:{m}" for m in range(n_members)]
    average = np.mean([gold[m] for m in member_names], axis=0)
    average_proxy = np.mean([proxy[m] for m in member_names], axis=0)
    out["curves"]["average member"] = curve_summary(average, average_proxy)
    out["members_over_optimised"] = [m for m in member_names if out["curves"][m]["over_optimised"]]
    peak = NS.index(out["curves"]["average member"]["peak_n"])
    # Each rule against a member picked at random, paired by prompt: at the average member's
    # peak and every larger n (question 2), and at n = 64 and 256 for every draw (question 3).
    out["rule_minus_average_member"] = {
        rule: {str(n): paired(gold[rule][i] - average[i]) for i, n in enumerate(NS) if i >= peak or n in (64, 256)}
        for rule in RULES}
    # Added after draw 0's result (not in QUESTION.txt): the issue's own comparison, each rule
    # against a member that was gamed, at that member's peak and every larger n.
    out["rule_minus_gamed_member"] = {
        m: {rule: {str(n): paired(gold[rule][i] - gold[m][i]) for i, n in enumerate(NS)
                   if i >= NS.index(out["curves"][m]["peak_n"])} for rule in RULES}
        for m in out["members_over_optimised"]}
    out["rule_minus_member_0"] = {rule: {str(n): paired(gold[rule][i] - gold["member:0"][i]) for i, n in enumerate(NS)
                                         if n in (64, 256)} for rule in RULES}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draws = [d for d, r in results["draws"].items() if r is not None]
    fig, axes = plt.subplots(1, len(draws), figsize=(3.6 * len(draws), 3.4), sharey=False, squeeze=False)
    kl = [analytic_bon_kl(n) for n in NS]
    colours = {"average member": "black", "mean": "tab:blue", "min": "tab:red", "mean_minus_var": "tab:green"}
    for ax, draw in zip(axes[0], draws):
        curves = results["draws"][draw]["curves"]
        for name, c in curves.items():
            if name.startswith("member:"):
                ax.plot(kl, c["gold"], color="grey", lw=0.7, alpha=0.6)
        for name, colour in colours.items():
            ax.plot(kl, curves[name]["gold"], color=colour, lw=1.6, label=name)
        ax.set_title(f"draw {draw[1:]}")
        ax.set_xlabel("KL (nats), best-of-n")
    axes[0][0].set_ylabel("gold reward of the pick")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Best-of-256: gold against KL (grey: the five members)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def main() -> None:
    runs, out = Path(sys.argv[1]), Path(sys.argv[2])
    gold_from = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    results = {"ns": NS, "kl": [round(analytic_bon_kl(n), 3) for n in NS], "uncertainty_penalty": PENALTY, "draws": {}}
    for d in range(5):
        samples = runs / f"d{d}" / "best-of-n" / "samples.jsonl"
        results["draws"][f"d{d}"] = analyse_draw(samples, gold_from) if samples.is_file() else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "bon256.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "bon256.png")


if __name__ == "__main__":
    main()
