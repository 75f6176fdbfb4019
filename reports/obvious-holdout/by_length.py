"""Each served model's verdicts on pairs.jsonl, split by whether the better answer is the longer
one: a model that reads length scores high on one half and low on the other.

    python reports/obvious-holdout/by_length.py --url URL MODEL [MODEL ...] > by-length.json
"""

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from client import RewardClient  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (HERE / "pairs.jsonl").open()]
    pairs = [{"prompt": r["prompt"], "a": r["chosen"], "b": r["rejected"]} for r in rows]
    out = {}
    with RewardClient(args.url) as client:
        for model in args.models:
            p = [res.p_a_better for res in client.compare(pairs, model=model).results]
            split = {}
            for category in ("truthful", "harmless", "helpful", "all"):
                for longer in (True, False):
                    idx = [i for i, r in enumerate(rows) if category in ("all", r["category"])
                           and (len(r["chosen"]) > len(r["rejected"])) == longer]
                    right = sum(1.0 if p[i] > 0.5 else 0.5 if p[i] == 0.5 else 0.0 for i in idx)
                    split[f"{category}, better {'longer' if longer else 'shorter'}"] = round(100 * right / len(idx), 1)
            out[model] = {"accuracy_by_length": split, "p_chosen_better": [round(x, 4) for x in p]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
