"""A proxy reward model trained on the gold RM's labels of the starting policy's own samples, as
Coste et al. (2023) and Gao et al. (2022) make theirs, for the over-optimisation experiment
(scripts/overoptimisation.py):

    python scripts/gold_labelled_proxy.py GOLD_DIR POLICY_DIR TRAIN_PROMPTS DEV_PROMPTS OUT_DIR
    python scripts/gold_labelled_proxy.py --proxy-only OUT_DIR   (step 3 alone, from OUT_DIR's pairs)

1. **Samples**: ``reward eval best-of-n`` draws SAMPLES (4) responses per prompt of TRAIN_PROMPTS
   and 2 per prompt of DEV_PROMPTS from the policy, and the gold RM (served by a local ``reward
   serve``) scores each; the samples are kept in OUT_DIR/samples-{train,dev}/samples.jsonl.
2. **Labels**: each prompt's samples in disjoint pairs (0 v 1, 2 v 3, ...); the gold's higher score
   is chosen, then a share LABEL_NOISE (0.25 for train, none for dev) of the train labels is
   flipped at random (LABEL_SEED), the way Coste et al. model labellers who disagree. Pairs whose
   responses are the same text or score the same, or with an empty response, are left out.
3. **Proxy**: ``reward train-rm --ensemble K`` (ENSEMBLE 5) on the train pairs, MiniLM's top block
   per member, evaluated on the noiseless dev pairs: its accuracy there is its agreement with
   the gold on the policy's own samples.

Writes OUT_DIR/{pairs-train.jsonl, pairs-dev.jsonl, proxy/, summary.json}; a step whose output
exists is not run again. The proxy is what overoptimisation.py takes as PROXY_ENSEMBLE_DIR, the
gold its GOLD_DIR. Sizes from the environment: SAMPLES (4), LABEL_NOISE (0.25), LABEL_SEED (0),
ENSEMBLE (5), TOP_LAYERS (1: MiniLM blocks each member owns), EPOCHS (4), LR (2e-4), MAX_NEW_TOKENS (32, as the experiment's PPO), SERVE_DEVICE
(cpu), DEVICE (the policy's; auto), BON_BATCH (16: sequences per generate call), TRAIN_PROMPTS_MAX /
DEV_PROMPTS_MAX (all), TRAIN_PAIRS (all: the proxy learns from the first TRAIN_PAIRS labelled pairs
only, for a weaker proxy from the same samples).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(SCRIPTS))

from ppo_demo import MAX_PROMPT_LENGTH, env, reward  # noqa: E402
from trainer.loop import local_server  # noqa: E402


def gold_labelled_pairs(samples: list[dict], label_noise: float, seed: int) -> tuple[list[dict], dict]:
    """Disjoint pairs of each prompt's samples (``reward eval best-of-n``'s samples.jsonl rows:
    prompt_index, sample_index, prompt, response, gold_score), labelled by the higher gold score;
    a share ``label_noise`` of them flipped (chosen at random with ``seed``). Returns the rows
    (prompt, chosen, rejected, gold_margin, flipped) and counts."""
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label noise {label_noise} must be in [0, 0.5): at 0.5 the labels carry nothing")
    by_prompt: dict[int, list[dict]] = {}
    for row in samples:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    rng = random.Random(seed)
    pairs, skipped, empty = [], 0, 0
    for index in sorted(by_prompt):
        rows = sorted(by_prompt[index], key=lambda r: r["sample_index"])
        for a, b in zip(rows[0::2], rows[1::2]):
            if not a["response"].strip() or not b["response"].strip():
                empty += 1  # a labeller is not asked about an empty answer (and train-rm refuses one)
                continue
            if a["response"].strip() == b["response"].strip() or a["gold_score"] == b["gold_score"]:
                skipped += 1
                continue
            chosen, rejected = (a, b) if a["gold_score"] > b["gold_score"] else (b, a)
            flipped = rng.random() < label_noise
            if flipped:
                chosen, rejected = rejected, chosen
            pairs.append({"prompt": a["prompt"], "chosen": chosen["response"], "rejected": rejected["response"],
                          "gold_margin": abs(a["gold_score"] - b["gold_score"]), "flipped": flipped})
    counts = {"pairs": len(pairs), "flipped": sum(p["flipped"] for p in pairs), "skipped_ties": skipped, "skipped_empty": empty,
              "prompts": len(by_prompt)}
    return pairs, counts


def sample(url: str, policy: Path, prompts: Path, n: int, limit: str, seed: str, out: Path) -> list[dict]:
    if not (out / "samples.jsonl").is_file():
        reward("eval", "best-of-n", "--url", url, "--model", "gold", "--policy", str(policy), "--prompts", str(prompts),
               *(["--max-prompts", limit] if limit else []), "--n", str(n), "--seed", seed,
               "--max-new-tokens", env("MAX_NEW_TOKENS", "32"), "--max-prompt-length", MAX_PROMPT_LENGTH,
               "--batch-size", env("BON_BATCH", "16"), "--device", env("DEVICE", "auto"), "--report", str(out))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # the gold is best-of-n's --model here, so its reward is the rows' proxy_score
    return [{**row, "gold_score": row["proxy_score"]} for row in rows]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def train_proxy(out: Path) -> Path:
    """Step 3: the proxy ensemble from OUT_DIR's pairs-train.jsonl and pairs-dev.jsonl, into
    OUT_DIR/proxy (kept if it exists)."""
    proxy = out / "proxy"
    if not (proxy / "reward_model.json").is_file():
        reward("train-rm", "--train-mode", "top", "--top-layers", env("TOP_LAYERS", "1"), "--cache-frozen", "--max-length", "320",
               "--ensemble", env("ENSEMBLE", "5"), "--ensemble-sample", "bootstrap",
               "--data", str(out / "pairs-train.jsonl"), "--eval-data", f"gold-dev={out / 'pairs-dev.jsonl'}",
               "--num-epochs", env("EPOCHS", "4"), "--per-device-batch-size", "32", "--learning-rate", env("LR", "2e-4"),
               "--lr-scheduler", "cosine", "--warmup-ratio", "0.05", "--eval-steps", "0", "--seed", "42",
               "--output-dir", str(proxy))
    return proxy


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--proxy-only":  # the pairs were labelled elsewhere (e.g. on the CPU)
        out = Path(argv[1]).resolve()
        for name in ("pairs-train.jsonl", "pairs-dev.jsonl"):
            if not (out / name).is_file():
                print(f"--proxy-only: {out / name} is missing; it is what the full run writes", file=sys.stderr)
                return 2
        print(train_proxy(out))
        return 0
    if len(argv) != 5:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    gold, policy, train_prompts, dev_prompts, out = (Path(a).resolve() for a in argv)
    out.mkdir(parents=True, exist_ok=True)
    noise, label_seed = float(env("LABEL_NOISE", "0.25")), int(env("LABEL_SEED", "0"))
    with local_server({"gold": gold}, out / "server.log", timeout=300, extra_args=["--device", env("SERVE_DEVICE", "cpu")]) as url:
        train_samples = sample(url, policy, train_prompts, int(env("SAMPLES", "4")), env("TRAIN_PROMPTS_MAX", ""), "1",
                               out / "samples-train")
        dev_samples = sample(url, policy, dev_prompts, 2, env("DEV_PROMPTS_MAX", ""), "2", out / "samples-dev")
    train, train_counts = gold_labelled_pairs(train_samples, noise, label_seed)
    if env("TRAIN_PAIRS", ""):  # a smaller proxy's data: the first labelled pairs, in prompt order
        train = train[: int(env("TRAIN_PAIRS", ""))]
        train_counts = {**train_counts, "pairs": len(train), "flipped": sum(p["flipped"] for p in train)}
    dev, dev_counts = gold_labelled_pairs(dev_samples, 0.0, label_seed)
    write_jsonl(train, out / "pairs-train.jsonl")
    write_jsonl(dev, out / "pairs-dev.jsonl")
    proxy = train_proxy(out)
    metrics = json.loads((proxy / "metrics.jsonl").read_text().splitlines()[-1])
    summary = {
        "gold": str(gold), "policy": str(policy), "label_noise": noise, "label_seed": label_seed,
        "samples_per_prompt": int(env("SAMPLES", "4")), "train": train_counts, "dev": dev_counts,
        "proxy": str(proxy), "proxy_final_metrics": metrics,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
