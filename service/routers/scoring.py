"""Our own scoring routes: ``POST /v1/score`` (one reward per item) and ``POST /v1/compare``
(both responses of each pair, and the probability that the first is better).

For a model with several reward heads (objectives), the reward is their combination unless the
request names a head (``objective``); ``return_objectives`` adds every head's beside it. The
answers carry the new fields only when asked, so a request without them is answered as before.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from client.protocol import (
    CompareRequest,
    CompareResponse,
    CompareResult,
    ObjectiveComparison,
    ScoreRequest,
    ScoreResponse,
)
from reward_core.formatting import Conversation, item_to_conversation

from ..errors import SCORING_ERRORS, APIError
from ..inference import Inference, sigmoid

router = APIRouter(tags=["scoring"])


@router.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, responses=SCORING_ERRORS)
async def score(request: ScoreRequest, http: Request) -> ScoreResponse:
    """Score each item: one reward per item, in item order (and each objective's, when asked)."""
    inference: Inference = http.app.state.inference
    model = inference.pick_model(request.model)
    inference.admit(request, len(request.items), "items")
    inference.check_objective(model, request.objective, request.return_objectives)
    if request.normalize and request.objective is not None:
        raise APIError(
            422, "normalize_with_objective",
            f"normalize uses the statistics of model {model.name!r}'s combined reward (reward_mean/reward_std), "
            f"not of the head {request.objective!r}; send normalize=false with objective, or leave objective out "
            "to normalize the combined reward",
        )
    if request.normalize and not model.spec.normalize_available:
        raise APIError(
            400, "normalize_unavailable",
            f"model {model.name!r} has no reward_mean/reward_std in its reward_model.json, so "
            "normalize is not possible; send normalize=false or serve a model trained by `reward train-rm`",
        )
    rewards, usage = await inference.score_conversations(http, model, [item_to_conversation(i) for i in request.items])
    scores = rewards.column(request.objective)
    if request.normalize:
        mean, std = model.spec.reward_mean, model.spec.reward_std
        scores = [(s - mean) / std for s in scores]
    objectives = rewards.by_objective() if request.return_objectives else None
    return ScoreResponse(model=model.display_name, scores=scores, objectives=objectives, usage=usage)


def _compared(a: float, b: float) -> dict[str, float]:
    return {"reward_a": a, "reward_b": b, "p_a_better": sigmoid(a - b)}


@router.post("/v1/compare", response_model=CompareResponse, response_model_exclude_none=True, responses=SCORING_ERRORS)
async def compare(request: CompareRequest, http: Request) -> CompareResponse:
    """Score both responses of each pair; p_a_better = sigmoid(reward_a - reward_b) (and the same
    by each objective, when asked)."""
    inference: Inference = http.app.state.inference
    model = inference.pick_model(request.model)
    inference.admit(request, 2 * len(request.pairs), "responses (2 per pair)")
    inference.check_objective(model, request.objective, request.return_objectives)
    conversations: list[Conversation] = []
    for pair in request.pairs:
        messages, _ = item_to_conversation({**pair.model_dump(include={"prompt"}), "response": ""})
        conversations += [(messages, pair.a), (messages, pair.b)]
    rewards, usage = await inference.score_conversations(http, model, conversations)
    scores = rewards.column(request.objective)
    heads = rewards.by_objective() if request.return_objectives else {}
    results = []
    for i, (a, b) in enumerate(zip(scores[0::2], scores[1::2])):
        by_objective = None
        if request.return_objectives:
            by_objective = {
                name: ObjectiveComparison(**_compared(values[2 * i], values[2 * i + 1])) for name, values in heads.items()
            }
        results.append(CompareResult(**_compared(a, b), objectives=by_objective))
    return CompareResponse(model=model.display_name, results=results, usage=usage)
