"""Other frameworks' endpoints, so their trainers call this service unchanged.

- ``POST /get_reward``: OpenRLHF's remote reward model (``--reward.remote_url URL/get_reward``).
- ``POST /slime_reward``: slime's remote reward model (``{"prompt", "response", "label"}`` in,
  the reward as a bare number out).
- ``POST /classify`` and ``POST /pooling``: vLLM's pooling API as verl's reward loop calls it
  (``data[-1].probs[-1]`` is the reward), in its text form (``input``) and its chat form
  (``messages``, rendered by the model's template like ``/v1/score``).
- ``POST /predict`` and ``POST /rerank``: text-embeddings-inference's routes for a one-output
  sequence classifier. A pair [prompt, response] (``/rerank``: the query and each text) is scored
  as ``/v1/score`` scores that item, a single text as ``/get_reward`` scores a query;
  ``raw_scores: false`` (TEI's default) gives sigmoid(reward).

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
    TEIPrediction,
    TEIPredictRequest,
    TEIRank,
    TEIRerankRequest,
    VLLMUsage,
)
from reward_core.formatting import EncodedInput, PromptError, item_to_conversation, prompt_response_conversation

from ..errors import SCORING_ERRORS, APIError
from ..inference import Inference, sigmoid
from ..registry import ServedModel
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
        rewards, encoded = await inference.score_conversations(request, model, [conversation])
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


async def _score_tei_sequences(request: Request, model: ServedModel, sequences: list[list[str]], truncate: bool | None) -> list[float]:
    """TEI's sequences, in order: a pair [prompt, response] through the model's formatting as
    /v1/score formats it, a single text as /get_reward reads a query. With ``truncate`` false an
    input the model would cut is a 422, as TEI refuses it."""
    inference: Inference = request.app.state.inference
    pairs = [i for i, s in enumerate(sequences) if len(s) == 2]
    singles = [i for i, s in enumerate(sequences) if len(s) == 1]
    scores: list[float] = [0.0] * len(sequences)
    encoded_by_index: dict[int, EncodedInput] = {}
    if pairs:
        conversations = [item_to_conversation({"prompt": sequences[i][0], "response": sequences[i][1]}) for i in pairs]
        rewards, encoded = await inference.score_conversations(request, model, conversations)
        for i, score, e in zip(pairs, rewards.column(), encoded):
            scores[i], encoded_by_index[i] = score, e
    if singles:
        rewards, encoded = await inference.score_texts(request, model, [sequences[i][0] for i in singles])
        for i, score, e in zip(singles, rewards.column(), encoded):
            scores[i], encoded_by_index[i] = score, e
    request.state.items = len(sequences)
    # Whether the model cut an input is known once it is encoded, and the inference path encodes
    # and scores in one step: the refusal comes after the work, which --max-items bounds.
    if truncate is False:
        cut = [i for i in range(len(sequences)) if encoded_by_index[i].truncated]
        if cut:
            more = f" (and {len(cut) - 1} more)" if len(cut) > 1 else ""
            raise APIError(
                422, "input_too_long",
                f"input {cut[0]}{more} is longer than the {model.spec.max_length} tokens model {model.name!r} reads, and "
                "truncate is false; shorten it, or send truncate: true (or leave it out) to have it cut, the prompt's "
                "start first",
            )
    return scores


def _tei_label(model: ServedModel) -> str:
    # A model with objectives serves their combination, which has no class of its own in config.id2label.
    return "reward" if model.spec.objective_names else model.label


@router.post("/predict", response_model=list[TEIPrediction] | list[list[TEIPrediction]], responses=SCORING_ERRORS)
async def predict(body: TEIPredictRequest, request: Request) -> list[TEIPrediction] | list[list[TEIPrediction]]:
    """text-embeddings-inference's ``/predict``: per input its one prediction, the reward (or
    sigmoid(reward), TEI's default) with the model's label; a batch gets one list per input."""
    inference: Inference = request.app.state.inference
    model = inference.pick_model(body.model)
    sequences = body.sequences
    inference.admit(body, len(sequences), "inputs")
    scores = await _score_tei_sequences(request, model, sequences, body.truncate)
    label = _tei_label(model)
    predictions = [[TEIPrediction(score=s if body.raw_scores else sigmoid(s), label=label)] for s in scores]
    return predictions if body.batched else predictions[0]


@router.post("/rerank", response_model=list[TEIRank], response_model_exclude_none=True, responses=SCORING_ERRORS)
async def rerank(body: TEIRerankRequest, request: Request) -> list[TEIRank]:
    """text-embeddings-inference's ``/rerank``: every text scored as the response to the query,
    best first."""
    inference: Inference = request.app.state.inference
    model = inference.pick_model(body.model)
    inference.admit(body, len(body.texts), "texts")
    scores = await _score_tei_sequences(request, model, [[body.query, text] for text in body.texts], body.truncate)
    ranks = [
        TEIRank(index=i, text=body.texts[i] if body.return_text else None, score=s if body.raw_scores else sigmoid(s))
        for i, s in enumerate(scores)
    ]
    return sorted(ranks, key=lambda r: r.score, reverse=True)
