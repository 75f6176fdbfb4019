"""The naive peer: a reward server with no cross-request batching, as OpenRLHF's
``serve_rm.py`` is built (written here from that description, not copied): each request's
items are padded into one batch and run through the model by the request handler itself, one
forward per request, while the event loop waits. Concurrent requests therefore queue up one
behind another and never share a forward.

It speaks our ``/v1/score`` protocol and formats items with the service's own
``encode_items``, so the benchmark sends it the same requests and the model reads the same
tokens: the only difference from ``reward serve`` is the batching. Used by
bench/bench_serving.py (``--naive-peer``); not part of the product.

    python bench/naive_peer.py serve --port 8800 --model models/default-rm
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# At module level: FastAPI resolves the route's (string) annotations in the module's namespace.
from client.protocol import ScoreRequest, ScoreResponse, Usage  # noqa: E402


def build_app(model_dir: Path, backend: str, threads: int):
    import torch
    from fastapi import FastAPI

    from reward_core.backends import served_rewards
    from reward_core.forward import pad_batch
    from reward_core.formatting import encode_items
    from service.registry import load_model
    from service.settings import ServiceSettings

    torch.set_num_threads(threads)
    model = load_model("naive", model_dir, ServiceSettings(models=[str(model_dir)], backend=backend, torch_threads=threads))
    model.warm_up()
    app = FastAPI(title="naive reward peer")

    @app.post("/v1/score")
    async def score(request: ScoreRequest) -> ScoreResponse:
        # Tokenise, pad and run the forward right here, blocking the loop: the naive design.
        encoded = encode_items(request.items, model.tokenizer, model.spec)
        rewards = served_rewards(model.backend.score_batch(pad_batch(encoded, model.pad_token_id))).tolist()
        if request.normalize:
            rewards = [(r - model.spec.reward_mean) / model.spec.reward_std for r in rewards]
        usage = Usage(items=len(encoded), tokens=sum(len(e) for e in encoded), truncated=sum(e.truncated for e in encoded))
        return ScoreResponse(model=model.display_name, scores=rewards, usage=usage)

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()

    import uvicorn

    uvicorn.run(build_app(args.model, args.backend, args.threads), host=args.host, port=args.port,
                log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
