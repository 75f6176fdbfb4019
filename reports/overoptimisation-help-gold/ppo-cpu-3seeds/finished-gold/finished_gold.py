"""The 3-seed CPU PPO runs re-read under a gold that asks for finished answers (QUESTION.txt):
per logged step, gold_finished = gold_score - P * no_eos_fraction (the step's mean of the gold less
P for each rollout that never ended), then scripts/overoptimisation.py's own windows, peak/fall
rule and matched-KL comparison.

    python reports/overoptimisation-help-gold/ppo-cpu-3seeds/finished-gold/finished_gold.py runs/ppo-cpu3/ppo \
        reports/overoptimisation-help-gold/ppo-cpu-3seeds/finished-gold
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "scripts"))

from overoptimisation import across_seeds, matched_kl, peak_and_end, ppo_windows  # noqa: E402

RULES = {"member:0": "member-0", "mean_minus_var": "mean_minus_var"}
SEEDS = ("1", "2", "3")
PENALTY = 1.0  # the reading's P (QUESTION.txt)
SENSITIVITY = (0.0, 0.5, 1.0, 2.0)  # 0: the gold as the report one folder up read it
WINDOW = 10


def logs(ppo_dir: Path, penalty: float) -> dict[str, dict[str, list[dict]]]:
    """Each rule's and seed's logged steps, the gold replaced by the finished-answer gold."""
    out: dict[str, dict[str, list[dict]]] = {}
    for rule, folder in RULES.items():
        for seed in SEEDS:
            rows = [json.loads(line) for line in (ppo_dir / folder / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            out.setdefault(rule, {})[seed] = [
                {**r, "gold_score": r["gold_score"] - penalty * r["no_eos_fraction"]} for r in rows
            ]
    return out


def read(ppo_dir: Path, penalty: float) -> dict:
    runs = logs(ppo_dir, penalty)
    windows = {rule: {seed: ppo_windows(rows, WINDOW) for seed, rows in by_seed.items()} for rule, by_seed in runs.items()}
    curves = {rule: across_seeds(by_seed) for rule, by_seed in windows.items()}
    share = ("no_eos_fraction",)
    no_eos = {rule: [round(p["no_eos_fraction"], 3) for p in across_seeds(
                  {seed: ppo_windows(rows, WINDOW, share) for seed, rows in by_seed.items()}, share)]
              for rule, by_seed in runs.items()}
    return {
        "penalty": penalty,
        "curves": curves,
        "no_eos_share_by_window": no_eos,
        "peak_and_end": {rule: peak_and_end(curve, "gold_score", "score", "kl") for rule, curve in curves.items()},
        "mean_minus_var_minus_member0_at_matched_kl": matched_kl(windows, "member:0", 1.0)["mean_minus_var"],
    }


def plot(results: dict[float, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, penalty in zip(axes, (0.0, PENALTY)):
        for rule, curve in results[penalty]["curves"].items():
            kl = [p["kl"] for p in curve]
            gold = [p["gold_score"] for p in curve]
            err = [p["gold_score_sem"] or 0 for p in curve]
            ax.errorbar(kl, gold, yerr=err, marker="o", capsize=3, label=rule)
        ax.set_xlabel("KL to the SFT policy (nats; 10-step windows, 3 seeds)")
        ax.set_ylabel("gold reward" if penalty == 0 else f"gold - {penalty:g} x (no EOS)")
        ax.set_title("gold as read before" if penalty == 0 else "gold that asks for finished answers")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ppo_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    results = {p: read(ppo_dir, p) for p in SENSITIVITY}
    summary = {"question": "QUESTION.txt", "reading_penalty": PENALTY, "window_steps": WINDOW, "seeds": list(SEEDS),
               "by_penalty": {f"{p:g}": r for p, r in results.items()}}
    (out / "finished_gold.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, out / "finished_gold.png")
    for p, r in results.items():
        print(f"P={p:g}")
        for rule, pe in r["peak_and_end"].items():
            print(f"  {rule}: start {pe['gold_start']:.3f} peak {pe['gold_peak']:.3f} at {pe['kl_at_gold_peak']:.1f} nats, "
                  f"end {pe['gold_end']:.3f}±{pe['gold_end_sem']:.3f} at {pe['kl_end']:.1f}; drop {pe['gold_drop_from_peak']:.3f} "
                  f"(sem {pe['gold_drop_from_peak_sem']:.3f}); fell while proxy rose: {pe['gold_fell_while_proxy_rose']}")
        for row in r["mean_minus_var_minus_member0_at_matched_kl"]:
            if row["kl"] in (1.0, 2.0, 3.0, 5.0, 10.0, 15.0):
                print(f"    KL {row['kl']:g}: {row['gold_minus_reference']:+.3f} [{row['ci95'][0]:+.3f}, {row['ci95'][1]:+.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
