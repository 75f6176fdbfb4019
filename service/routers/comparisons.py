"""Routes of the comparison loop: labellers' judgements in, the labelling queue, the export for
training, and the labelling page.

- ``POST /v1/comparisons``: store one comparison; idempotent with an ``Idempotency-Key`` header
  (a retried POST is stored once; the same key with other content is a 409).
- ``GET /v1/comparisons`` (admin scope when API keys are on): filtered, paginated listing.
- ``GET /v1/comparisons/export`` (admin): the same filters, as JSONL in the rankings format
  ``trainer/data.py`` reads.
- ``POST /v1/label/tasks``: queue (prompt, K candidates) for people to rank, e.g. from PPO.
- ``GET /v1/label/tasks/next``: the next task for a labeller (leased for a while).
- ``GET /label``: the page a person uses to rank or pick, posting to the routes above.

The routes are plain ``def``: FastAPI runs them in its thread pool, so a slow database never
blocks the event loop that scoring runs on. Every write is committed before the 2xx.

They read the store (``app.state.store``, None without ``--store``) and the allowed labellers
(``app.state.labellers``, from ``allowed_labellers``) that ``create_app`` puts on the app.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import AfterValidator, BeforeValidator

from client.protocol import (
    MAX_ID,
    Comparison,
    ComparisonCreated,
    ComparisonList,
    ComparisonRequest,
    LabelTask,
    LabelTasksCreated,
    LabelTasksRequest,
    NextLabelTask,
    labeller_id,
)
from reward_core.store import (
    ComparisonStore,
    Filters,
    IdempotencyConflict,
    NewComparison,
    StoreUnavailable,
    TaskProblem,
    rankings_row,
)

from ..errors import STORE_ERRORS, APIError
from ..inference import long_fields
from . import OffLoopBodyRoute

log = logging.getLogger(__name__)

router = APIRouter(tags=["comparisons"], route_class=OffLoopBodyRoute)
LABEL_PAGE = Path(__file__).resolve().parents[1] / "static" / "label.html"
RETRY_AFTER_S = 5
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, no spaces


def _store(request: Request) -> ComparisonStore:
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise APIError(
            404, "store_not_configured",
            "this service keeps no comparisons; start it with --store sqlite:///PATH/comparisons.db "
            "(or postgresql://...; env REWARD_STORE)",
        )
    return store


def _unavailable(exc: StoreUnavailable, what: str) -> APIError:
    log.warning("comparison store unavailable: %s", exc)
    return APIError(
        503, "store_unavailable", f"{exc}; {what} Retry after {RETRY_AFTER_S} s (Retry-After).",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def allowed_labellers(text: str | None) -> frozenset[str] | None:
    """``--labellers`` as a set of ids; None when any id is accepted."""
    if not text:
        return None
    return frozenset(part for part in re.split(r"[\s,]+", text) if part)


def _check_lengths(request: Request, body) -> None:
    limit = request.app.state.settings.max_field_chars
    too_long = long_fields(body.model_dump(include={"prompt", "responses", "tasks"}), limit)
    if too_long:
        where, n = too_long[0]
        raise APIError(413, "field_too_long", f"{where}: {n} characters is over the limit of {limit} per field (--max-field-chars)")


@router.post(
    "/v1/comparisons", response_model=ComparisonCreated, status_code=201,
    responses={**STORE_ERRORS, 200: {"model": ComparisonCreated, "description": "Already stored under this Idempotency-Key: the original."}},
)
def create_comparison(
    body: ComparisonRequest,
    request: Request,
    idempotency_key: str | None = Header(
        default=None, description="Any unique string (a UUID): a retried POST with the same key and body is stored once."
    ),
):
    """Store one comparison; 201 with its id, or 200 with the original's id for a repeated Idempotency-Key."""
    store = _store(request)
    keys = request.headers.getlist("idempotency-key")
    if len(keys) > 1:  # which one counts would be a guess, and a retry sending the other would store twice
        raise APIError(400, "ambiguous_idempotency_key",
                       f"the request has {len(keys)} Idempotency-Key headers; send exactly one")
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise APIError(400, "invalid_idempotency_key", "Idempotency-Key must be 1 to 200 printable ASCII characters without spaces (a UUID is ideal)")
    labellers = request.app.state.labellers
    if labellers is not None and body.labeller not in labellers:
        raise APIError(
            422, "unknown_labeller",
            f"labeller {body.labeller!r} is not one of this service's labellers (--labellers); check the id or ask the operator to add it",
        )
    _check_lengths(request, body)
    new = NewComparison(
        prompt=body.model_dump(mode="json")["prompt"], responses=list(body.responses), ranking=body.best_first(),
        kind="ranking" if body.ranking is not None else "pairwise", labeller=body.labeller, category=body.category,
        tags=list(body.tags), reason=body.reason, task_id=body.task_id,
    )
    try:
        row, created = store.add_comparison(new, idempotency_key)
    except IdempotencyConflict as exc:
        raise APIError(409, "idempotency_conflict", str(exc)) from None
    except TaskProblem as exc:
        raise APIError(exc.status, "task_not_open" if exc.status == 409 else "unknown_task", str(exc)) from None
    except StoreUnavailable as exc:
        raise _unavailable(exc, "the comparison may not have been stored: send it again with the same Idempotency-Key (it is stored once).") from None
    answer = ComparisonCreated(id=row["id"], created_at=row["created_at"], duplicate=not created)
    return JSONResponse(answer.model_dump(mode="json"), status_code=201 if created else 200)


def _no_nul(**values: str | None) -> None:
    for name, value in values.items():
        if value is not None and "\x00" in value:
            raise APIError(422, "validation_error", f"query.{name}: contains a NUL character; remove it")


def _in_utc(name: str, value: datetime | None) -> datetime | None:
    # The store compares in UTC; a time whose UTC is before year 1 or after year 9999 (e.g.
    # 9999-12-31T23:59:59-14:00) has no datetime, so it is refused here, naming the parameter.
    if value is None:
        return None
    try:
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise APIError(
            422, "validation_error",
            f"query.{name}: {value.isoformat()} is outside the times the store can compare (0001-01-01 to "
            "9999-12-31 in UTC); send a time within them",
        ) from None


def _filters(since: datetime | None, until: datetime | None, labeller: str | None, category: str | None) -> Filters:
    _no_nul(labeller=labeller, category=category)
    since, until = _in_utc("since", since), _in_utc("until", until)
    if since is not None and until is not None and until <= since:
        raise APIError(422, "invalid_time_range", f"until ({until.isoformat()}) must be after since ({since.isoformat()})")
    return Filters(since=since, until=until, labeller=labeller, category=category)


def _iso_only(value):
    # pydantic would read a bare number as a Unix timestamp; the filters take ISO 8601 only.
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*", value):
        raise ValueError("give an ISO 8601 time such as 2026-11-27T12:00:00Z, not a number")
    # A "+02:00" typed into a URL arrives as " 02:00": a "+" in a query string means a space.
    if isinstance(value, str) and re.fullmatch(r"\S+T[0-9:.,]+ [0-9]{2}:?[0-9]{2}", value):
        raise ValueError(
            f"{value[:40]!r} has a space where its UTC offset's '+' was: a '+' in a URL's query is read as a "
            "space, so encode it as %2B (since=2026-01-01T00:00:00%2B02:00), or give the time in UTC ending in Z"
        )
    return value


IsoTime = Annotated[datetime, BeforeValidator(_iso_only)]

_SINCE = Query(default=None, description="Only comparisons stored at or after this time (ISO 8601; UTC when no offset).")
_UNTIL = Query(default=None, description="Only comparisons stored before this time (ISO 8601).")
_LABELLER = Query(default=None, max_length=200, description="Only this labeller's comparisons.")
_CATEGORY = Query(default=None, max_length=200, description="Only this category.")


@router.get("/v1/comparisons", response_model=ComparisonList, responses=STORE_ERRORS)
def list_comparisons(
    request: Request,
    since: IsoTime | None = _SINCE,
    until: IsoTime | None = _UNTIL,
    labeller: str | None = _LABELLER,
    category: str | None = _CATEGORY,
    after: int | None = Query(default=None, ge=0, le=MAX_ID, description="The next_after of the previous page."),
    limit: int = Query(default=100, ge=1, le=1000, description="Comparisons per page (at most 1000)."),
) -> ComparisonList:
    """Stored comparisons, oldest first, one page at a time."""
    store = _store(request)
    filters = _filters(since, until, labeller, category)
    try:
        rows, next_after = store.list_comparisons(filters, after=after, limit=limit)
    except StoreUnavailable as exc:
        raise _unavailable(exc, "nothing was read.") from None
    return ComparisonList(data=[Comparison.model_validate(r) for r in rows], next_after=next_after)


@router.get("/v1/comparisons/export", responses={**STORE_ERRORS, 200: {"content": {"application/x-ndjson": {}}}})
def export_comparisons(
    request: Request,
    since: IsoTime | None = _SINCE,
    until: IsoTime | None = _UNTIL,
    labeller: str | None = _LABELLER,
    category: str | None = _CATEGORY,
):
    """Every matching comparison as JSONL in the rankings format (``prompt``, ``responses``,
    ``ranking`` best first, ``category``): ``reward train-rm --data`` reads the file as it is."""
    store = _store(request)
    filters = _filters(since, until, labeller, category)
    try:
        # The first page is read before answering, so a database that is down is a 503, not a
        # 200 cut short; later pages stream.
        first, after = store.list_comparisons(filters, limit=500)
    except StoreUnavailable as exc:
        raise _unavailable(exc, "nothing was read.") from None

    def lines() -> Iterator[bytes]:
        rows, cursor = first, after
        while True:
            for row in rows:
                yield (json.dumps(rankings_row(row), ensure_ascii=False) + "\n").encode("utf-8")
            if cursor is None:
                return
            rows, cursor = store.list_comparisons(filters, after=cursor, limit=500)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/v1/label/tasks", response_model=LabelTasksCreated, status_code=201, responses=STORE_ERRORS)
def create_label_tasks(body: LabelTasksRequest, request: Request) -> LabelTasksCreated:
    """Queue prompts with K candidate responses for people to rank on /label."""
    store = _store(request)
    _check_lengths(request, body)
    if len(body.tasks) > request.app.state.settings.max_items:
        raise APIError(413, "too_many_items", f"{len(body.tasks)} tasks in one request is over the limit of {request.app.state.settings.max_items} (--max-items); split it")
    tasks = [t.model_dump(mode="json") for t in body.tasks]
    try:
        return LabelTasksCreated(ids=store.add_tasks(tasks))
    except StoreUnavailable as exc:
        raise _unavailable(exc, "no task was queued.") from None


@router.get("/v1/label/tasks/next", response_model=NextLabelTask, responses=STORE_ERRORS)
def next_label_task(
    request: Request,
    # The id as POST /v1/comparisons reads it (labeller_id: trimmed, not blank): a blank one leased a
    # task to an id no comparison can carry, and nobody saw the task until the lease ran out.
    labeller: Annotated[
        str,
        Query(min_length=1, max_length=200, description="Who will label it; the task is held for them."),
        AfterValidator(labeller_id),
    ],
    lease_s: float = Query(default=600, gt=0, le=86_400, description="How long the task is held for this labeller."),
) -> NextLabelTask:
    """The oldest task nobody holds (or the one this labeller already holds); null when none."""
    store = _store(request)
    _no_nul(labeller=labeller)
    labellers = request.app.state.labellers
    if labellers is not None and labeller not in labellers:
        raise APIError(422, "unknown_labeller", f"labeller {labeller!r} is not one of this service's labellers (--labellers)")
    try:
        for _ in range(10):
            task, waiting = store.next_task(labeller, lease_s)
            served = _servable(task)
            if task is None or served is not None:
                return NextLabelTask(task=served, waiting=waiting)
            # Stored before text was checked (a lone surrogate, say): set it aside rather than
            # fail this labeller on every retry for the length of the lease.
            log.warning("label task %s cannot be served (its stored text is not valid); set aside", task["id"])
            store.set_aside_task(task["id"])
    except StoreUnavailable as exc:
        raise _unavailable(exc, "no task was handed out.") from None
    return NextLabelTask(task=None, waiting=waiting)


def _servable(task: dict | None) -> LabelTask | None:
    """The task as it will be answered, or None when it cannot be (or there is none)."""
    if task is None:
        return None
    try:
        served = LabelTask.model_validate(task)
        json.dumps(served.model_dump(mode="json"), ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError):
        return None
    return served


def page_csp(html: str) -> str:
    """The Content-Security-Policy of a page: only its own inline <script> and <style> blocks
    (by their SHA-256), requests to this origin only, no frames, forms or plugins."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        digests = [base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode() for b in blocks]
        return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


@router.get("/label", response_class=HTMLResponse, include_in_schema=False)
def label_page() -> HTMLResponse:
    """The labelling page: plain HTML and a little JavaScript talking to the routes above."""
    html = LABEL_PAGE.read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": page_csp(html), "Referrer-Policy": "no-referrer"})

