"""Property-based tests over the whole wire protocol (client/protocol.py), against one served tiny
BERT with a comparison store: Hypothesis builds requests for every route, ours and the
compatible ones, in the right shapes but with hostile values (lone surrogates, NUL, empty and
over-long fields, extreme integers and dates), and checks:

- every route answers 2xx, or a 4xx in the error shape ({"error": {code, type, message,
  request_id}}); never a 5xx;
- whatever a POST accepted can be read back by every GET: a stored comparison by the listing
  and the export, a queued label task by the labelling queue.

Few examples per route (the same ones each run: derandomized), so it stays within seconds in
``make test``; tests/test_hostile_inputs.py holds the single probes of issue #21 these generalise."""

from __future__ import annotations

import json
import string
from dataclasses import replace
from datetime import datetime

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server import in_process_server
from service.app import create_app
from service.registry import load_model
from service.settings import ServiceSettings

EXAMPLES = 40
MAX_FIELD_CHARS = 2000

# Text as a caller may send it: ordinary, empty, blank, a lone surrogate (a JSON "\ud800"),
# NUL, a character outside the BMP, direction marks, just over the field limit.
HOSTILE = ["", " ", "\ud800", "x\udfffy", "a\x00b", "\U0001F600", "\u202e\ufeff", "x" * (MAX_FIELD_CHARS + 1)]


def mostly(ordinary, hostile):
    """Three times in four an ordinary value, else a hostile one: a body then often has a single
    hostile field, which is what reaches the code behind validation."""
    return st.one_of(ordinary, ordinary, ordinary, hostile)


TEXT = mostly(st.text(string.ascii_letters + " ", min_size=1, max_size=12), st.one_of(st.text(max_size=8), st.sampled_from(HOSTILE)))
# Query strings cannot carry a lone surrogate (a URL is UTF-8 bytes); everything else can come.
QUERY_TEXT = mostly(st.text(string.ascii_letters, min_size=1, max_size=12),
                    st.one_of(st.text(string.printable, max_size=12), st.sampled_from(["", "a\x00b", "\U0001F600", "x" * 300])))
INT = mostly(st.integers(0, 3), st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30])))
FLOAT = mostly(st.floats(1, 600), st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-9, 86_400.0, 1e300])))
OFFSETS = ["", "Z", "+00:00", "+14:00", "-14:00", "+23:59"]
DATE = st.one_of(
    st.builds(lambda d, off: d.isoformat() + off, st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59)),
              st.sampled_from(OFFSETS)),
    st.sampled_from(["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "0000-01-01", "yesterday", ""]),
)


def maybe(strategy):
    return st.one_of(st.none(), strategy)


def body(required: dict, optional: dict | None = None):
    """A JSON object: the required keys, any of the optional ones (absent rather than null)."""
    return st.fixed_dictionaries(required, optional=optional or {})


MESSAGE = body({"role": mostly(st.sampled_from(["user", "assistant"]), st.sampled_from(["system", "tool", "robot"])),
               "content": TEXT})
PROMPT = st.one_of(TEXT, st.lists(MESSAGE, max_size=3))
ITEM = st.one_of(body({"prompt": PROMPT, "response": TEXT}), body({"messages": st.lists(MESSAGE, max_size=3)}))
MODEL = {"model": maybe(st.one_of(TEXT, st.sampled_from(["bert", "~nosuchuser", "/" + "d" * 300])))}
# Protocol 1.1: a reward head by name (the served model has one head: always refused, never a 5xx).
OBJECTIVES = {"objective": maybe(st.one_of(TEXT, st.sampled_from(["truthfulness", "x" * 65]))), "return_objectives": st.booleans()}
# Protocol 1.2: an ensemble's rule and λ (the served model is not an ensemble: always refused, never a 5xx).
ENSEMBLE = {"aggregate": maybe(st.one_of(st.sampled_from(["mean", "min", "mean_minus_var"]), TEXT)),
            "uncertainty_penalty": maybe(st.one_of(FLOAT, INT, st.booleans(), TEXT))}
ENSEMBLE_FLAGS = {"return_uncertainty": st.booleans(), "return_members": st.booleans()}
VLLM = {**MODEL, "truncate_prompt_tokens": maybe(INT), "priority": INT, "add_special_tokens": st.booleans(),
        "use_activation": maybe(st.booleans()), "user": maybe(TEXT), "request_id": maybe(TEXT)}
RESPONSES = mostly(st.lists(TEXT, min_size=2, max_size=4), st.lists(TEXT, max_size=17))
COMPARISON = body(
    {"prompt": PROMPT, "responses": RESPONSES, "labeller": TEXT},
    {"choice": maybe(INT), "ranking": maybe(st.lists(INT, max_size=4)), "category": maybe(TEXT),
     "tags": st.lists(TEXT, max_size=3), "reason": maybe(TEXT), "task_id": maybe(INT)},
)
TASK = body({"prompt": PROMPT, "responses": RESPONSES}, {"category": maybe(TEXT), "source": maybe(TEXT)})

POSTS = {
    "/v1/score": body({"items": st.lists(ITEM, max_size=3)},
                      {**MODEL, **OBJECTIVES, **ENSEMBLE, **ENSEMBLE_FLAGS, "normalize": st.booleans()}),
    "/v1/compare": body({"pairs": st.lists(body({"prompt": PROMPT, "a": TEXT, "b": TEXT}), max_size=3)},
                        {**MODEL, **OBJECTIVES, **ENSEMBLE, **ENSEMBLE_FLAGS}),
    "/get_reward": body({"query": st.lists(TEXT, max_size=3)},
                        {**MODEL, "prompts": maybe(st.lists(TEXT, max_size=3)), "objective": OBJECTIVES["objective"], **ENSEMBLE}),
    "/classify": body({"input": st.one_of(TEXT, st.lists(TEXT, max_size=3))}, VLLM),
    "/pooling": body({"input": st.one_of(TEXT, st.lists(TEXT, max_size=3))}, {**VLLM, "encoding_format": TEXT}),
    "/v1/comparisons": COMPARISON,
    "/v1/label/tasks": body({"tasks": mostly(st.lists(TASK, min_size=1, max_size=3), st.lists(TASK, max_size=3))}),
    "/v1/models/bert/reload": body({}, {"path": maybe(TEXT)}),
}
GETS = {
    "/v1/comparisons": body({}, {"since": DATE, "until": DATE, "after": INT, "limit": INT, "labeller": QUERY_TEXT,
                                 "category": QUERY_TEXT}),
    "/v1/comparisons/export": body({}, {"since": DATE, "until": DATE, "labeller": QUERY_TEXT, "category": QUERY_TEXT}),
    "/v1/label/tasks/next": body({"labeller": QUERY_TEXT}, {"lease_s": FLOAT}),
    "/v1/models": body({}),
}
# The probes of issue #21, always among the examples (Hypothesis tries them first).
PROBES = {
    "/v1/score": [{"items": [{"prompt": "x\ud800y", "response": "x\ud800y"}]}, {"items": [{"prompt": "p", "response": "r"}], "model": "~nosuchuser"}],
    "/v1/compare": [{"pairs": [{"prompt": "x\ud800y", "a": "a", "b": "b"}]}],
    "/get_reward": [{"query": ["x\ud800y"]}],
    "/classify": [{"input": ["x\ud800y"]}, {"input": "x" * (MAX_FIELD_CHARS + 1)}],
    "/pooling": [{"input": "x\ud800y"}],
    "/v1/comparisons": [{"prompt": "p", "responses": ["a", "x\ud800y"], "choice": 0, "labeller": "ann"},
                        {"prompt": "p", "responses": ["a", "b"], "choice": 0, "labeller": "ann", "task_id": 2**63}],
    "/v1/label/tasks": [{"tasks": [{"prompt": "poison \ud800 task", "responses": ["a", "b"]}]},
                        {"tasks": [{"prompt": [{"role": "user", "content": "\U0001F600 hi"}], "responses": ["a", "b \u202e"]}]}],
    "/v1/models/bert/reload": [{"path": "x\ud800y"}],
}
GET_PROBES = {
    "/v1/comparisons": [{"since": "9999-12-31T23:59:59-14:00"}, {"until": "0001-01-01T00:00:00+14:00"}, {"after": 2**63}],
    "/v1/comparisons/export": [{"since": "9999-12-31T23:59:59-14:00"}],
    "/v1/label/tasks/next": [{"labeller": "ann", "lease_s": float("nan")}],
    "/v1/models": [{}],
}


def run_property(test, strategy, probes: list[dict], name: str) -> None:
    """``test`` over ``strategy`` (keyword ``name``), the probes first."""
    test = given(**{name: strategy})(test)
    for probe in probes:
        test = example(**{name: probe})(test)
    PROPERTY(test)()


PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def http(model_dirs, tmp_path_factory):
    store = f"sqlite:///{tmp_path_factory.mktemp('property-store')}/comparisons.db"
    config = ServiceSettings(models=[f"bert={model_dirs['bert']}"], max_items=8, max_field_chars=MAX_FIELD_CHARS,
                             shutdown_drain_s=0, max_wait_ms=0, store=store)
    model = load_model("bert", model_dirs["bert"], config)
    with in_process_server(create_app(config, [replace(model, batcher=None)]), config) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def post(http: httpx.Client, path: str, payload) -> httpx.Response:
    # json.dumps escapes lone surrogates (\ud800) as a hostile client's JSON would carry them.
    return http.post(path, content=json.dumps(payload), headers={"content-type": "application/json"})


def check_answer(answer: httpx.Response) -> None:
    where = f"{answer.request.method} {answer.request.url}: {answer.status_code} {answer.text[:300]}"
    assert answer.status_code < 500, where
    if answer.status_code >= 400:
        error = answer.json()["error"]
        assert error["code"] == answer.status_code and error["type"] and error["message"], where
        assert error["request_id"] == answer.headers["x-request-id"], where


@pytest.mark.parametrize("path", sorted(POSTS))
def test_every_post_answers_2xx_or_a_4xx_in_the_error_shape(http, path):
    def never_a_5xx(payload):
        answer = post(http, path, payload)
        check_answer(answer)
        if path == "/v1/comparisons" and answer.status_code in (200, 201):
            read_back_comparison(http, answer.json()["id"], payload)

    run_property(never_a_5xx, POSTS[path], PROBES[path], "payload")


@pytest.mark.parametrize("path", sorted(GETS))
def test_every_get_answers_2xx_or_a_4xx_in_the_error_shape(http, path):
    def never_a_5xx(params):
        answer = http.get(path, params=params)
        check_answer(answer)
        if answer.status_code == 200 and path.endswith("export"):
            [json.loads(line) for line in answer.text.splitlines()]

    run_property(never_a_5xx, GETS[path], GET_PROBES[path], "params")


def read_back_comparison(http: httpx.Client, id_: int, sent: dict) -> None:
    """A stored comparison is served back, as sent, by the listing and by the export."""
    labeller = sent["labeller"].strip()
    listed = http.get("/v1/comparisons", params={"labeller": labeller, "after": id_ - 1, "limit": 1})
    check_answer(listed)
    assert listed.status_code == 200
    [row] = listed.json()["data"]
    assert row["id"] == id_ and row["responses"] == sent["responses"] and row["labeller"] == labeller
    assert row["prompt"] == sent["prompt"]
    exported = http.get("/v1/comparisons/export", params={"labeller": labeller})
    assert exported.status_code == 200, exported.text
    rows = {r["comparison_id"]: r for r in map(json.loads, exported.text.splitlines())}
    assert rows[id_]["responses"] == sent["responses"]


def test_every_queued_label_task_is_handed_out(http):
    """Round trip of the labelling queue: queue hostile tasks (those accepted are kept), then
    draw until the queue is empty; every draw is a 200 and every accepted task comes out."""
    accepted: list[int] = []

    def queue(payload):
        answer = post(http, "/v1/label/tasks", payload)
        check_answer(answer)
        if answer.status_code == 201:
            accepted.extend(answer.json()["ids"])

    run_property(queue, POSTS["/v1/label/tasks"], PROBES["/v1/label/tasks"], "payload")
    assert accepted, "no task was accepted; the strategy is too hostile to test the round trip"
    drawn: set[int] = set()
    for n in range(len(accepted) + 200):
        answer = http.get("/v1/label/tasks/next", params={"labeller": f"drainer-{n}", "lease_s": 600})
        check_answer(answer)
        assert answer.status_code == 200
        task = answer.json()["task"]
        if task is None:
            break
        drawn.add(task["id"])
    assert set(accepted) <= drawn
