"""The whole RLHF loop in one command, small enough for a CPU: SFT a tiny random-init policy on the
chosen answers of HH-harmless, serve a reward model, run PPO against it, plot reward and KL.

    python scripts/ppo_demo.py RM_DIR [OUT_DIR]        (or: bash scripts/ppo_demo.sh RM_DIR [OUT_DIR])

RM_DIR is any model directory `reward serve` loads (the default RM: models/default-rm). Sizes come
from the environment: DATA (../shared/data), DEMOS (2000), SFT_STEPS (300), PPO_STEPS (30),
ROLLOUT (32), MAX_NEW_TOKENS (32), POLICY (a causal-LM directory to use instead of the tiny
random-init GPT-2), DEVICE (auto). Writes OUT_DIR/{policy-init,sft,ppo,ppo_demo.png}.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.data import load_preferences  # noqa: E402


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def reward(*args: str) -> None:
    print("+ reward", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, check=True)


def tiny_policy(out: Path, texts: list[str]) -> Path:
    """A random-init 4-layer GPT-2 with a byte-level BPE trained on the demonstrations (nothing
    pretrained can be downloaded here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=4, n_head=4, n_positions=512,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)  # config only: `reward sft` initialises it at random
    tokenizer.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
    ax_reward.plot(steps, [r["score"] for r in rows], label="RM score")
    ax_reward.plot(steps, [r["reward"] for r in rows], label="reward (shifted, EOS penalty)")
    ax_reward.set_xlabel("PPO step")
    ax_reward.set_title("mean reward per rollout")
    ax_reward.legend()
    ax_kl.plot(steps, [r["kl"] for r in rows])
    ax_kl.set_xlabel("PPO step")
    ax_kl.set_title("KL(policy || SFT reference), nats per response")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    rm_dir = Path(sys.argv[1]).resolve()
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/ppo-demo").resolve()
    data = Path(env("DATA", str(REPO.parent / "shared" / "data")))
    device = env("DEVICE", "auto")
    demos = f"{data / 'hh-harmless' / 'train.jsonl.gz'}:1:{env('DEMOS', '2000')}"

    policy_init = Path(env("POLICY", "")) if env("POLICY", "") else None
    if policy_init is None:
        records = load_preferences([demos]).records
        texts = [m["content"] for r in records for m in r.prompt] + [r.best for r in records]
        policy_init = tiny_policy(out / "policy-init", texts)
    reward("sft", "--model", str(policy_init), "--data", demos, "--output-dir", str(out / "sft"),
           "--max-length", "256", "--batch-size", "16", "--learning-rate", "1e-3", "--max-steps", env("SFT_STEPS", "300"),
           "--device", device)

    prompts = out / "prompts.jsonl"
    dev = load_preferences([f"{data / 'hh-harmless' / 'dev.jsonl.gz'}::500"]).records
    prompts.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in dev))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(out / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--model", f"rm={rm_dir}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"reward serve exited; see {out / 'server.log'}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("reward serve not ready after 300 s")
            time.sleep(0.5)
        reward("ppo", "--policy", str(out / "sft"), "--prompts", str(prompts), "--output-dir", str(out / "ppo"),
               "--reward-url", url, "--total-steps", env("PPO_STEPS", "30"), "--rollout-batch-size", env("ROLLOUT", "32"),
               "--minibatch-size", "8", "--max-new-tokens", env("MAX_NEW_TOKENS", "32"), "--learning-rate", "1e-4",
               "--max-prompt-length", "256", "--save-steps", "10", "--device", device, "--no-resume")
    finally:
        server.terminate()
        server.wait()
        log.close()
    plot(out / "ppo" / "metrics.jsonl", out / "ppo_demo.png")
    print(f"plot: {out / 'ppo_demo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
