"""A planted RLHF world, built on the spot: snack prompts, a tiny BERT reward model trained with
the project's trainer to prefer responses that name "banana", and a tiny GPT-2 policy that `reward
sft` taught to answer with one fruit (banana a quarter of the time)."""

from __future__ import annotations

import json
import random
from pathlib import Path

FRUITS = ["banana", "plum", "grape", "lemon"]
OTHERS = ["plum", "grape", "lemon", "mango", "peach", "pear"]


def snack_prompt(i: int) -> str:
    return f"which snack should I pick for day {i}?"


WORDS = "the a good nice small big red green fresh sweet ripe tasty yellow soft".split()


def _answer(rng: random.Random, fruit: str) -> str:
    """A bare fruit half the time (what the policy says), else the fruit among a few words."""
    if rng.random() < 0.5:
        return fruit
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
    words.insert(rng.randrange(len(words) + 1), fruit)
    return " ".join(words)


def write_rm_data(path: Path, n: int, seed: int) -> Path:
    """Pairs: an answer naming "banana" always beats one naming another fruit."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": snack_prompt(i), "chosen": _answer(rng, "banana"), "rejected": _answer(rng, rng.choice(OTHERS))}
            f.write(json.dumps(row) + "\n")
    return path


def write_demonstrations(path: Path, n: int, seed: int) -> Path:
    """Demonstrations (as the chosen side of pairs): one fruit, uniformly from FRUITS."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            fruit = FRUITS[i % len(FRUITS)]
            row = {"prompt": snack_prompt(rng.randrange(1000)), "chosen": fruit, "rejected": "no idea"}
            f.write(json.dumps(row) + "\n")
    return path


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": snack_prompt(1000 + i)}) + "\n" for i in range(n)))
    return path


def build_tiny_gpt2_lm(out: Path, seed: int = 0) -> Path:
    """A random-init GPT-2 causal LM (no chat template: the HH fallback) with the tiny BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import tiny_models

    torch.manual_seed(seed)
    tokenizer = tiny_models.bpe_tokenizer(None, with_pad=False)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_planted_rm(root: Path) -> Path:
    import tiny_models
    from trainer.reward import train_reward_model
    from trainer.reward_config import RewardTrainingConfig

    bert = tiny_models.build_tiny_bert(root / "bert")
    config = RewardTrainingConfig(
        base_model=str(bert), data=[str(write_rm_data(root / "rm-train.jsonl", 160, 0))], output_dir=str(root / "rm"),
        max_length=32, per_device_batch_size=16, learning_rate=3e-3, warmup_ratio=0.0, num_epochs=4, eval_steps=0,
        save_steps=0, progress=False, reward_stats_samples=50, num_threads=1,
    )
    assert train_reward_model(config).finished
    return root / "rm"


def train_sft_policy(root: Path) -> Path:
    from trainer.sft import SFTConfig, train_sft

    base = build_tiny_gpt2_lm(root / "gpt2-init")
    config = SFTConfig(model=str(base), data=[str(write_demonstrations(root / "demos.jsonl", 512, 0))],
                       output_dir=str(root / "sft"), max_length=48, batch_size=16, learning_rate=5e-3, max_steps=200,
                       num_threads=1, progress=False, seed=0)
    result = train_sft(config)
    assert result.losses[-1] < result.losses[0]
    return root / "sft"
