"""Other frameworks' endpoints, so their trainers call this service unchanged.

- ``POST /get_reward``: OpenRLHF's remote reward model (``--reward.remote_url URL/get_reward``).
- ``POST /slime_reward``: slime's remote reward model (``{"prompt", "response", "label"}`` in,
  the reward as a bare number out).
- ``POST /classify`` and ``POST /pooling``: vLLM's pooling API as verl's reward loop calls it
  (``data[-1].probs[-1]`` is the reward), in its text form (``input``) and its chat form
  (``messages``, rendered by the model's template like ``/v1/score``).

Each route only translates shapes: the texts go through ``formatting.encode_texts`` and the
model's batcher via the inference path (``service/inference.py``, ``app.state.inference``: the
same path as ``/v1/score``), so a text scored here and the same input scored through
``/v1/score`` get the same reward.

A model with several reward heads (objectives) serves its combined reward on every route here,
as on ``/v1/score``. ``/get_reward`` also puts each head's reward in ``extra_logs`` (OpenRLHF
logs every key there each step) and takes our extension ``objective`` to make ``rewards`` a
head's. ``/classify`` and ``/pooling`` answer with the combined reward as their one class: vLLM
would return every output of a multi-output classifier (softmaxed, in ``/classify``), and verl
reads ``probs[-1]``, which would then silently be the last head's reward instead of the model's.

An ensemble serves its members' rewards aggregated by the served default rule on every route
here (``reward serve --ensemble-aggregate``, else its reward_model.json): verl's and slime's
bodies have no place to choose one. ``/get_reward`` takes our extensions ``aggregate`` and
``uncertainty_penalty`` as ``/v1/score`` does, and logs the members' mean and standard deviation
per query in ``extra_logs`` (``reward_mean``, ``reward_std``).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from client.protocol import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    GetRewardRequest,
    GetRewardResponse,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
    SlimeRewardRequest,
    VLLMUsage,
)
from reward_core.formatting import PromptError, prompt_response_conversation

from ..errors import SCORING_ERRORS, APIError
from ..inference import Inference, sigmoid
from . import OffLoopBodyRoute

router = APIRouter(tags=["compatibility"], route_class=OffLoopBodyRoute)


@router.post("/get_reward", response_model=GetRewardResponse, responses=SCORING_ERRORS)
async def get_reward(body: GetRewardRequest, request: Request) -> GetRewardResponse:
    """OpenRLHF's remote RM: one reward per ``query`` (full prompt + response text, template
    applied). ``prompts[i]``, when a prefix of ``query[i]``, marks the prompt part (truncation;
    an encoder reads the pair (prompt, rest)). An empty ``query`` gets empty lists."""
    inference: Inference = request.app.state.inference
    model = inference.pick_model(body.model)
    inference.admit(body, len(body.query), "queries")
    inference.check_objective(model, body.objective)
    aggregation = inference.check_ensemble(model, body.aggregate, body.uncertainty_penalty)
    if not body.query:
        return GetRewardResponse(rewards=[], scores=[], extra_logs={})
    rewards, encoded = await inference.score_texts(request, model, body.query, prompt_prefixes=body.prompts)
    scores = rewards.column(body.objective, aggregation)
    extra_logs = {
        "reward_model_tokens": [float(len(e)) for e in encoded],
        "reward_model_truncated": [float(e.truncated) for e in encoded],
    }
    # Each head's raw reward, for a model with several: "objective_<name>" cannot clash with the
    # keys above, whatever a head is called.
    if rewards.objectives:
        extra_logs.update({f"objective_{name}": values for name, values in rewards.by_objective().items()})
    # An ensemble's spread per query: OpenRLHF logs it beside the reward it trains on.
    if rewards.ensemble is not None:
        extra_logs["reward_mean"], extra_logs["reward_std"] = rewards.uncertainty()
    return GetRewardResponse(rewards=scores, scores=scores, extra_logs=extra_logs)


async def _score_vllm_texts(body, request: Request):
    inference: Inference = request.app.state.inference
    model = inference.pick_model(body.model)
    conversation = body.conversation
    if conversation is not None:
        # vLLM's chat form: rendered by the model's own template, exactly as /v1/score renders it.
        inference.admit(body, 1, "conversations")
        rewards, usage = await inference.score_conversations(request, model, [conversation])
        tokens = usage.tokens
    else:
        texts = body.texts
        inference.admit(body, len(texts), "inputs")
        rewards, encoded = await inference.score_texts(
            request, model, texts, add_special_tokens=body.add_special_tokens, max_length=body.truncate_prompt_tokens
        )
        tokens = sum(len(e) for e in encoded)
    # the model's reward: for a model with objectives their combination, for an ensemble its served aggregate
    scores = rewards.column()
    # vLLM echoes the model name it was asked for; ours when none was given.
    name = body.model or model.display_name
    return model, name, scores, VLLMUsage(prompt_tokens=tokens, total_tokens=tokens)


@router.post("/classify", response_model=ClassificationResponse, responses=SCORING_ERRORS)
async def classify(body: ClassificationRequest, request: Request) -> ClassificationResponse:
    """vLLM's classify API. A reward model has one class: ``probs`` is ``[reward]`` with
    ``use_activation: false`` (what verl sends), ``[sigmoid(reward)]`` otherwise (vLLM's default).
    For a model with objectives the one class is their combination, and has no label of its own."""
    model, name, scores, usage = await _score_vllm_texts(body, request)
    activate = body.activation_wanted(default=True)
    # config.id2label[0] of a multi-head model names its first head, not the combination served
    label = model.label if not model.spec.objective_names else None
    data = [
        ClassificationData(index=i, label=label, probs=[sigmoid(s) if activate else s], num_classes=1)
        for i, s in enumerate(scores)
    ]
    return ClassificationResponse(
        id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=name, data=data, usage=usage
    )


@router.post("/pooling", response_model=PoolingResponse, responses=SCORING_ERRORS)
async def pooling(body: PoolingRequest, request: Request) -> PoolingResponse:
    """vLLM's pooling API: ``data[i].data`` is ``[reward]`` (``[sigmoid(reward)]`` with
    ``use_activation: true``)."""
    model, name, scores, usage = await _score_vllm_texts(body, request)
    activate = body.activation_wanted(default=False)
    data = [PoolingData(index=i, data=[sigmoid(s) if activate else s]) for i, s in enumerate(scores)]
    return PoolingResponse(id=f"pool-{uuid.uuid4().hex}", created=int(time.time()), model=name, data=data, usage=usage)



@router.post("/slime_reward", response_model=float, responses=SCORING_ERRORS)
async def slime_reward(body: SlimeRewardRequest, request: Request) -> float:
    """slime's remote RM (``--rm-url .../slime_reward``): the reward of one (prompt, response),
    scored as ``/v1/score`` scores the conversation. A prompt already rendered with a chat
    template is parsed back into its messages."""
    inference: Inference = request.app.state.inference
    model = inference.pick_model(body.model)
    inference.admit(body, 1, "samples")
    try:
        conversation = prompt_response_conversation(body.prompt_value(), body.response)
    except PromptError as exc:
        raise APIError(422, "validation_error", f"prompt: {exc}") from None
    rewards, _ = await inference.score_conversations(request, model, [conversation])
    return rewards.column()[0]
