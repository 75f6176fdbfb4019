"""Our own scoring routes: ``POST /v1/score`` (one reward per item) and ``POST /v1/compare``
(both responses of each pair, and the probability that the first is better)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from client.protocol import (
    CompareRequest,
    CompareResponse,
    CompareResult,
    ScoreRequest,
    ScoreResponse,
)
from reward_core.formatting import Conversation, item_to_conversation

from ..errors import SCORING_ERRORS, APIError
from ..inference import Inference, sigmoid

router = APIRouter(tags=["scoring"])


@router.post("/v1/score", response_model=ScoreResponse, responses=SCORING_ERRORS)
async def score(request: ScoreRequest, http: Request) -> ScoreResponse:
    """Score each item: one reward per item, in item order."""
    inference: Inference = http.app.state.inference
    model = inference.pick_model(request.model)
    inference.admit(request, len(request.items), "items")
    if request.normalize and not model.spec.normalize_available:
        raise APIError(
            400, "normalize_unavailable",
            f"model {model.name!r} has no reward_mean/reward_std in its reward_model.json, so "
            "normalize is not possible; send normalize=false or serve a model trained by `reward train-rm`",
        )
    scores, usage = await inference.score_conversations(http, model, [item_to_conversation(i) for i in request.items])
    if request.normalize:
        mean, std = model.spec.reward_mean, model.spec.reward_std
        scores = [(s - mean) / std for s in scores]
    return ScoreResponse(model=model.display_name, scores=scores, usage=usage)


@router.post("/v1/compare", response_model=CompareResponse, responses=SCORING_ERRORS)
async def compare(request: CompareRequest, http: Request) -> CompareResponse:
    """Score both responses of each pair; p_a_better = sigmoid(reward_a - reward_b)."""
    inference: Inference = http.app.state.inference
    model = inference.pick_model(request.model)
    inference.admit(request, 2 * len(request.pairs), "responses (2 per pair)")
    conversations: list[Conversation] = []
    for pair in request.pairs:
        messages, _ = item_to_conversation({**pair.model_dump(include={"prompt"}), "response": ""})
        conversations += [(messages, pair.a), (messages, pair.b)]
    scores, usage = await inference.score_conversations(http, model, conversations)
    results = []
    for a, b in zip(scores[0::2], scores[1::2]):
        results.append(CompareResult(reward_a=a, reward_b=b, p_a_better=sigmoid(a - b)))
    return CompareResponse(model=model.display_name, results=results, usage=usage)
