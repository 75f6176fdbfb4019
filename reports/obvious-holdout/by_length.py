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
from trainer.evaluate.metrics import pair_outcomes  # noqa: E402


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
            results = client.compare(pairs, model=model).results
            p = [res.p_a_better for res in results]
            outcomes = pair_outcomes([res.reward_a for res in results], [res.reward_b for res in results])
            split = {}
            for category in ("truthful", "harmless", "helpful", "all"):
                for longer in (True, False):
                    idx = [i for i, r in enumerate(rows) if category in ("all", r["category"])
                           and (len(r["chosen"]) > len(r["rejected"])) == longer]
                    split[f"{category}, better {'longer' if longer else 'shorter'}"] = round(100 * float(outcomes[idx].mean()), 1)
            out[model] = {"accuracy_by_length": split, "p_chosen_better": [round(x, 4) for x in p]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
