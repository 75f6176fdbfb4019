"""Our own scoring routes: ``POST /v1/score`` (one reward per item) and ``POST /v1/compare``
(both responses of each pair, and the probability that the first is better).

For a model with several reward heads (objectives), the reward is their combination unless the
request names a head (``objective``); ``return_objectives`` adds every head's beside it. For an
ensemble, the reward is its members' rewards aggregated by the request's rule (``aggregate``,
``uncertainty_penalty``) or the served default; ``return_uncertainty`` adds the members' mean
and spread (and, per pair, how many of them agree), ``return_members`` each member's reward. The
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
from reward_core.ensemble import member_agreement
from reward_core.formatting import Conversation, item_to_conversation

from ..errors import SCORING_ERRORS, APIError
from ..inference import Inference, Rewards, sigmoid, usage_of
from . import OffLoopBodyRoute

router = APIRouter(tags=["scoring"], route_class=OffLoopBodyRoute)


@router.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, responses=SCORING_ERRORS)
async def score(request: ScoreRequest, http: Request) -> ScoreResponse:
    """Score each item: one reward per item, in item order (and each objective's, or an
    ensemble's spread and members', when asked)."""
    inference: Inference = http.app.state.inference
    model = inference.pick_model(request.model)
    inference.admit(request, len(request.items), "items")
    inference.check_objective(model, request.objective, request.return_objectives)
    aggregation = inference.check_ensemble(
        model, request.aggregate, request.uncertainty_penalty, return_uncertainty=request.return_uncertainty,
        return_members=request.return_members, normalize=request.normalize,
    )
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
    rewards, encoded = await inference.score_conversations(http, model, [item_to_conversation(i) for i in request.items])
    scores = rewards.column(request.objective, aggregation)
    if request.normalize:
        mean, std = model.spec.reward_mean, model.spec.reward_std
        scores = [(s - mean) / std for s in scores]
    objectives = rewards.by_objective() if request.return_objectives else None
    ensemble_mean, ensemble_std = rewards.uncertainty() if request.return_uncertainty else (None, None)
    members = rewards.member_rewards().tolist() if request.return_members else None
    return ScoreResponse(
        model=model.display_name, scores=scores, objectives=objectives, ensemble_mean=ensemble_mean,
        ensemble_std=ensemble_std, members=members, usage=usage_of(encoded),
    )


def _compared(a: float, b: float) -> dict[str, float]:
    return {"reward_a": a, "reward_b": b, "p_a_better": sigmoid(a - b)}


@router.post("/v1/compare", response_model=CompareResponse, response_model_exclude_none=True, responses=SCORING_ERRORS)
async def compare(request: CompareRequest, http: Request) -> CompareResponse:
    """Score both responses of each pair; p_a_better = sigmoid(reward_a - reward_b) (and the same
    by each objective, when asked; for an ensemble, by the aggregated rewards, and how many of
    its members agree, when asked)."""
    inference: Inference = http.app.state.inference
    model = inference.pick_model(request.model)
    inference.admit(request, 2 * len(request.pairs), "responses (2 per pair)")
    inference.check_objective(model, request.objective, request.return_objectives)
    aggregation = inference.check_ensemble(
        model, request.aggregate, request.uncertainty_penalty, return_uncertainty=request.return_uncertainty,
        return_members=request.return_members,
    )
    conversations: list[Conversation] = []
    for pair in request.pairs:
        messages, _ = item_to_conversation({**pair.model_dump(include={"prompt"}), "response": ""})
        conversations += [(messages, pair.a), (messages, pair.b)]
    rewards, encoded = await inference.score_conversations(http, model, conversations)
    scores = rewards.column(request.objective, aggregation)
    heads = rewards.by_objective() if request.return_objectives else {}
    ensemble = _ensemble_comparisons(rewards, request.return_uncertainty, request.return_members)
    results = []
    for i, (a, b) in enumerate(zip(scores[0::2], scores[1::2])):
        by_objective = None
        if request.return_objectives:
            by_objective = {
                name: ObjectiveComparison(**_compared(values[2 * i], values[2 * i + 1])) for name, values in heads.items()
            }
        results.append(CompareResult(**_compared(a, b), objectives=by_objective, **ensemble[i]))
    return CompareResponse(model=model.display_name, results=results, usage=usage_of(encoded))


def _ensemble_comparisons(rewards: Rewards, uncertainty: bool, members: bool) -> list[dict]:
    """Per pair (items 2i and 2i + 1), the ensemble fields a compare request asked for: the
    members' agreement, mean and spread (``uncertainty``), each member's reward (``members``)."""
    n_pairs = len(rewards) // 2
    if not (uncertainty or members):
        return [{} for _ in range(n_pairs)]
    per_item = rewards.member_rewards()
    agreement = member_agreement(per_item[0::2], per_item[1::2])
    mean, std = rewards.uncertainty()
    fields = []
    for i in range(n_pairs):
        a, b = 2 * i, 2 * i + 1
        pair: dict = {}
        if uncertainty:
            pair.update(member_agreement=float(agreement[i]), ensemble_mean_a=mean[a], ensemble_std_a=std[a],
                        ensemble_mean_b=mean[b], ensemble_std_b=std[b])
        if members:
            pair.update(members_a=per_item[a].tolist(), members_b=per_item[b].tolist())
        fields.append(pair)
    return fields
