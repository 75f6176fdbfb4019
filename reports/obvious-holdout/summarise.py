"""Print report.md's table from the comparison JSONs beside this file: each model's accuracy on
the fresh obvious pairs per category and overall (95% Wilson interval), and on sanity/dev.

    python reports/obvious-holdout/summarise.py > reports/obvious-holdout/report.md
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from trainer.evaluate.metrics import wilson_interval  # noqa: E402

# (comparison file, served name, what it is), in the order of the table
MODELS = [
    ("warm-compare.json", "default", "shipped default (WARM of seeds 42, 43; T = 0.5)"),
    ("warm-compare.json", "gpw", "pair-consistency WARM of seeds 42, 43 (T = 0.5)"),
    ("recipes-compare.json", "s42", "shipped recipe, seed 42"),
    ("recipes-compare.json", "s43", "shipped recipe, seed 43"),
    ("recipes-compare.json", "gp42", "pair-consistency, seed 42"),
    ("recipes-compare.json", "gp43", "pair-consistency, seed 43"),
    ("recipes-compare.json", "gp44", "pair-consistency, seed 44"),
    ("gate0-compare.json", "g0", "gate on the token embeddings, seed 42"),
    ("augment-gpair-compare.json", "augp", "augment pairs + pair-consistency, seed 42"),
    ("length-balanced-compare.json", "auglb", "length-balanced augment pairs + pair-consistency, seed 42"),
    ("related-answer-compare.json", "relans", "related-prompt answers (related_answer), seed 42"),
]
CATEGORIES = ["truthful", "harmless", "helpful"]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main() -> None:
    print("| model | truthful (20) | harmless (20) | helpful (20) | obvious, all 60 [95% Wilson] | sanity/dev (36) |")
    print("|---|---|---|---|---|---|")
    for file, name, what in MODELS:
        path = HERE / file
        if not path.exists():
            continue
        sets = json.loads(path.read_text())["sets"]
        obvious = sets["obvious"]
        if name not in obvious["accuracy"]:
            continue
        cats = [pct(obvious["per_category"][c]["accuracy"][name]) for c in CATEGORIES]
        acc = obvious["accuracy"][name]
        low, high = wilson_interval(acc * obvious["n_pairs"], obvious["n_pairs"])
        sanity = pct(sets["sanity"]["accuracy"][name])
        print(f"| {what} | {' | '.join(cats)} | **{pct(acc)}** [{pct(low)}, {pct(high)}] | {sanity} |")
    print("| longer wins / shorter wins | 50.0 | 50.0 | 50.0 | 50.0 | 47.2 / 52.8 |")


if __name__ == "__main__":
    main()
