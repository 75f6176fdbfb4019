"""The served models: ``GET /v1/models``, and ``POST /v1/models/{name}/reload``, the hot reload
(the swap itself is ``ModelRegistry.reload`` in service/registry.py).

Reloading is off unless the service was started with ``--reload-token`` (``REWARD_RELOAD_TOKEN``)
and the request carries ``Authorization: Bearer <token>``: it loads code paths and memory on
demand, which is not for every client that can score. With API keys on, it needs a key with the
``admin`` scope instead (checked by the access middleware).
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request

from client.protocol import CombineRule, EnsembleCard, ModelCard, ModelList, ReloadRequest, ReloadResponse

from ..errors import RELOAD_ERRORS, APIError, shown
from ..registry import ModelRegistry, ReloadFailed, ServedModel, UnknownModel
from . import OffLoopBodyRoute

router = APIRouter(tags=["models"], route_class=OffLoopBodyRoute)


def _card(m: ServedModel, is_default: bool) -> ModelCard:
    objectives = m.spec.objectives
    return ModelCard(
        name=m.name, version=m.spec.version or "", path=str(m.path), backend=m.backend.name,
        max_length=m.spec.max_length, dtype=m.backend.dtype, device=m.backend.device,
        architecture=m.spec.architecture, normalize_available=m.spec.normalize_available, default=is_default,
        objectives=list(objectives.names) if objectives is not None else None,
        combine=CombineRule(
            rule=objectives.combine, weights=list(objectives.weights) if objectives.weights is not None else None,
            gate_temperature=objectives.gate_temperature if objectives.gated else None,
        ) if objectives is not None else None,
        ensemble=EnsembleCard(
            members=m.ensemble.members, top_layers=m.ensemble.top_layers, aggregate=m.ensemble.aggregate,
            uncertainty_penalty=m.ensemble.uncertainty_penalty,
        ) if m.ensemble is not None else None,
    )


# Fields a single model's card does not have (objectives, ensemble) are omitted, so its card reads as before (1.0).
@router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
async def list_models(request: Request) -> ModelList:
    registry: ModelRegistry = request.app.state.registry
    return ModelList(data=[_card(m, registry.is_default(m)) for m in registry.list()])


def _check_token(request: Request) -> None:
    keys = request.app.state.keys
    if keys.enabled:
        return  # API keys are on: AccessMiddleware has already checked this key's `admin` scope
    expected = request.app.state.settings.reload_token
    if not expected:
        raise APIError(403, "reload_disabled", "hot reload is off; start the service with REWARD_RELOAD_TOKEN (or --reload-token) to allow it")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        raise APIError(401, "unauthorized", "reload needs the header 'Authorization: Bearer <reload token>'")


@router.post("/v1/models/{name}/reload", response_model=ReloadResponse, response_model_exclude_none=True, responses=RELOAD_ERRORS)
async def reload_model(name: str, request: Request, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load the model's directory again (or ``path``) and serve it under the same name."""
    _check_token(request)
    registry: ModelRegistry = request.app.state.registry
    try:
        reloaded = await registry.reload(name, body.path if body is not None and body.path else None)
    except UnknownModel:
        raise APIError(404, "model_not_found", f"model {shown(name)} is not served here; served: {', '.join(registry.names())}") from None
    except ReloadFailed as exc:
        raise APIError(422, "model_load_failed", str(exc)) from exc
    new = reloaded.model
    return ReloadResponse(model=_card(new, registry.is_default(new)), previous_version=reloaded.previous_version or "", seconds=reloaded.seconds)
