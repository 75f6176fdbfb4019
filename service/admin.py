"""Hot reload: ``POST /v1/models/{name}/reload`` swaps a served model for a fresh load of its
directory (or another one) without stopping the service.

The new model is loaded and warmed up in a worker thread while the old one keeps serving; then
the name points at the new one, and the old one is retired once the requests that already
picked it have their scores. No request fails or waits on the swap itself. Both copies are in
memory for that moment. A directory that cannot load leaves the old model serving and answers
with the reason.

Reloading is off unless the service was started with ``--reload-token`` (``REWARD_RELOAD_TOKEN``)
and the request carries ``Authorization: Bearer <token>``: it loads code paths and memory on
demand, which is not for every client that can score.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from fastapi import APIRouter, Request

from client.protocol import ErrorResponse, ReloadRequest, ReloadResponse

from .app import APIError, _card
from reward_core.model_dir import ModelDirError
from .registry import attach_batchers, load_model

log = logging.getLogger(__name__)

router = APIRouter(tags=["models"])
_reload_lock = asyncio.Lock()  # one reload at a time: two would hold three copies in memory


def _check_token(request: Request) -> None:
    keys = getattr(request.app.state, "keys", None)
    if keys is not None and keys.enabled:
        return  # API keys are on: AccessMiddleware has already checked this key's `admin` scope
    expected = request.app.state.settings.reload_token
    if not expected:
        raise APIError(403, "reload_disabled", "hot reload is off; start the service with REWARD_RELOAD_TOKEN (or --reload-token) to allow it")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        raise APIError(401, "unauthorized", "reload needs the header 'Authorization: Bearer <reload token>'")


@router.post(
    "/v1/models/{name}/reload", response_model=ReloadResponse,
    responses={status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 408, 413, 422, 429, 500, 503)},
)
async def reload_model(name: str, request: Request, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load the model's directory again (or ``path``) and serve it under the same name."""
    _check_token(request)
    app = request.app
    served = app.state.served
    async with _reload_lock:
        old = app.state.models.get(name)
        if old is None:
            raise APIError(404, "model_not_found", f"model {name!r} is not served here; served: {', '.join(app.state.models)}")
        path = body.path if body is not None and body.path else old.path
        settings, loop = app.state.settings, asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            new = await loop.run_in_executor(None, load_model, name, path, settings)
        except ModelDirError as exc:
            raise APIError(422, "model_load_failed", f"{exc}; model {name!r} keeps serving version {old.spec.version}") from exc
        attach_batchers([new], settings, app.state.metrics, app.state.score_cache)
        await loop.run_in_executor(None, new.warm_up)
        new.batcher.start()
        seconds = time.perf_counter() - started
        # The swap: from here every new request picks the new model.
        served[served.index(old)] = new
        app.state.models[name] = new
        log.info("reloaded %s: %s -> %s in %.1f s", name, old.spec.version, new.spec.version, seconds)
    await old.retire()
    return ReloadResponse(model=_card(new, new is served[0]), previous_version=old.spec.version or "", seconds=seconds)
