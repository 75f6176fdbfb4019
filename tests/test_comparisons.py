"""The comparison loop's collection side, as docs/comparison-loop.md tells it:
labellers POST comparisons (idempotently), operators list and export them, jobs queue label
tasks; against a real `reward serve --store` on SQLite and on a real PostgreSQL server. Plus:
bad input is a 4xx that says what to fix, a database that is down is a 503 with Retry-After,
and a comparison acknowledged just before a kill -9 is there after the restart."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import httpx
import pytest

import postgres
from client import RewardClient, RewardServiceError
from server import ServerProcess, in_process_server, running_server
from service.app import create_app
from service.auth import KeyRing, load_keys
from service.registry import load_model
from service.settings import ServiceSettings
from reward_core.store import ComparisonStore, metadata
from trainer.data import load_file

PROMPT = [{"role": "user", "content": "Name a yellow fruit."}]
RESPONSES = ["A banana.", "A cherry, which is red.", "Bananas and lemons are yellow."]


@pytest.fixture(scope="session")
def postgres_server():
    bin_dir = postgres.find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not found (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql "
                    "(.ci/run does) or set REWARD_TEST_PG_BIN")
    server = postgres.PostgresServer(bin_dir)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_url(request, tmp_path_factory):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('store')}/comparisons.db"
    return request.getfixturevalue("postgres_server").url


@pytest.fixture(scope="module")
def service(store_url, model_dirs, tmp_path_factory):
    """`reward serve --store URL` with the tiny BERT, as a user starts it."""
    log = tmp_path_factory.mktemp("log") / "server.log"
    with running_server([f"--model=bert={model_dirs['bert']}", "--store", store_url], log) as server:
        yield server


@pytest.fixture
def labeller() -> str:
    """A labeller id of this test only, so tests sharing a store filter to their own rows."""
    return f"ann-{uuid.uuid4().hex[:8]}"


def test_a_labeller_stores_rankings_and_choices_and_the_operator_lists_and_exports_them(service, labeller, tmp_path):
    with RewardClient(service.url) as client:
        ranked = client.submit_comparison(prompt=PROMPT, responses=RESPONSES, ranking=[2, 0, 1], labeller=labeller,
                                          category="helpfulness", tags=["fruit"], reason="names two yellow fruits")
        picked = client.submit_comparison(prompt="Say hi", responses=["Hi!", "Go away."], choice=0, labeller=labeller,
                                          category="harmlessness")
        page = client.list_comparisons(labeller=labeller)
        helpful = client.list_comparisons(labeller=labeller, category="helpfulness")
        first = client.list_comparisons(labeller=labeller, limit=1)
        second = client.list_comparisons(labeller=labeller, limit=1, after=first.next_after)
        future = client.list_comparisons(labeller=labeller, since=datetime.now(timezone.utc) + timedelta(minutes=1))
        past = client.list_comparisons(labeller=labeller, until=datetime.now(timezone.utc) - timedelta(days=1))
        rows = client.export_comparisons(labeller=labeller)

    assert not ranked.duplicate and not picked.duplicate and picked.id != ranked.id
    assert [c.id for c in page.data] == [ranked.id, picked.id] and page.next_after is None
    stored = page.data[0]
    assert stored.ranking == [2, 0, 1] and stored.kind == "ranking" and stored.tags == ["fruit"]
    assert stored.reason == "names two yellow fruits" and [m.model_dump() for m in stored.prompt] == PROMPT
    assert page.data[1].ranking == [0, 1] and page.data[1].kind == "pairwise"
    assert [c.id for c in helpful.data] == [ranked.id]
    assert [c.id for c in first.data] == [ranked.id] and first.next_after == ranked.id
    assert [c.id for c in second.data] == [picked.id] and second.next_after is None
    assert future.data == [] and past.data == []
    # The export is the rankings format the trainer reads as it is.
    export = tmp_path / "export.jsonl"
    export.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_file(export).records
    assert [r.responses for r in records] == [RESPONSES, ["Hi!", "Go away."]]
    assert [r.ranking for r in records] == [[2, 0, 1], [0, 1]]
    assert [r.category for r in records] == ["helpfulness", "harmlessness"]
    assert records[0].prompt == PROMPT and records[0].best == "Bananas and lemons are yellow."


def test_a_retried_post_is_stored_once_and_a_reused_key_with_other_content_is_refused(service, labeller):
    body = {"prompt": "2+2?", "responses": ["4", "5"], "choice": 0, "labeller": labeller}
    key = {"Idempotency-Key": str(uuid.uuid4())}

    first = httpx.post(f"{service.url}/v1/comparisons", json=body, headers=key)
    again = httpx.post(f"{service.url}/v1/comparisons", json=body, headers=key)
    other = httpx.post(f"{service.url}/v1/comparisons", json={**body, "choice": 1}, headers=key)

    assert first.status_code == 201 and first.json()["duplicate"] is False
    assert again.status_code == 200 and again.json() == {**first.json(), "duplicate": True}
    assert other.status_code == 409 and other.json()["error"]["type"] == "idempotency_conflict"
    assert f"id {first.json()['id']}" in other.json()["error"]["message"] and "new key" in other.json()["error"]["message"]
    with RewardClient(service.url) as client:
        assert [c.id for c in client.list_comparisons(labeller=labeller).data] == [first.json()["id"]]


def test_two_idempotency_keys_on_one_post_are_refused_and_nothing_is_stored(service, labeller):
    body = {"prompt": "2+2?", "responses": ["4", "5"], "choice": 0, "labeller": labeller}
    two = [("Idempotency-Key", str(uuid.uuid4())), ("Idempotency-Key", str(uuid.uuid4()))]

    answer = httpx.post(f"{service.url}/v1/comparisons", json=body, headers=two)

    assert answer.status_code == 400 and answer.json()["error"]["type"] == "ambiguous_idempotency_key"
    assert "exactly one" in answer.json()["error"]["message"]
    with RewardClient(service.url) as client:
        assert client.list_comparisons(labeller=labeller).data == []


@pytest.mark.parametrize("change, status, says", [
    ({"ranking": [0, 0, 1]}, 422, "not a permutation of 0..2"),
    ({"ranking": [0, 1]}, 422, "not a permutation of 0..2"),
    ({"responses": ["only one"], "ranking": [0]}, 422, "at least 2 responses"),
    ({"responses": ["A banana.", "  ", "x"]}, 422, "response 1 is empty"),
    ({"ranking": None}, 422, "send either ranking"),
    ({"choice": 0}, 422, "send either ranking"),
    ({"ranking": None, "choice": 0}, 422, "choice is for two responses"),
    ({"prompt": ""}, 422, "prompt is empty"),
    ({"labeller": " "}, 422, "labeller is blank"),
    ({"rnking": [0, 1, 2]}, 422, "rnking: unknown field"),
    ({"ranking": [True, 0, 2]}, 422, "ranking"),  # a boolean is not an index
])
def test_bad_comparisons_are_refused_with_what_to_fix_and_nothing_is_stored(service, labeller, change, status, says):
    body = {"prompt": PROMPT, "responses": RESPONSES, "ranking": [0, 1, 2], "labeller": labeller, **change}
    body = {k: v for k, v in body.items() if v is not None}

    answer = httpx.post(f"{service.url}/v1/comparisons", json=body)

    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]["message"]
    with RewardClient(service.url) as client:
        assert client.list_comparisons(labeller=labeller).data == []


def test_list_and_key_refusals_say_what_to_fix(service):
    bad_key = httpx.post(f"{service.url}/v1/comparisons", headers={"Idempotency-Key": "has spaces in it"},
                         json={"prompt": "p", "responses": ["a", "b"], "choice": 0, "labeller": "x"})
    bad_range = httpx.get(f"{service.url}/v1/comparisons", params={"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"})
    bad_limit = httpx.get(f"{service.url}/v1/comparisons", params={"limit": 5000})
    bad_time = httpx.get(f"{service.url}/v1/comparisons", params={"since": "yesterday"})

    assert bad_key.status_code == 400 and "Idempotency-Key" in bad_key.json()["error"]["message"]
    assert bad_range.status_code == 422 and "must be after since" in bad_range.json()["error"]["message"]
    assert bad_limit.status_code == 422 and bad_limit.json()["error"]["message"].startswith("query.limit: Input should be less than or equal to 1000")
    assert bad_time.status_code == 422 and bad_time.json()["error"]["message"].startswith("query.since:")


def test_a_job_queues_tasks_and_each_labeller_is_shown_a_different_one(service, labeller):
    other = labeller + "-b"
    with RewardClient(service.url) as client:
        # Drain tasks other tests queued on this store, so the two below are next.
        while client.next_label_task("drainer", lease_s=3600).task is not None:
            pass
        ids = client.add_label_tasks([
            {"prompt": PROMPT, "responses": RESPONSES, "category": "helpfulness", "source": "ppo step 10"},
            {"prompt": "Say hi", "responses": ["Hi!", "Go away."], "source": "ppo step 10"},
        ])
        mine = client.next_label_task(labeller)
        theirs = client.next_label_task(other)
        mine_again = client.next_label_task(labeller)  # a reload of the page shows the same task
        saved = client.submit_comparison(prompt=PROMPT, responses=RESPONSES, ranking=[2, 0, 1], labeller=labeller,
                                         task_id=mine.task.id, category="helpfulness")
        with pytest.raises(RewardServiceError) as twice:
            client.submit_comparison(prompt=PROMPT, responses=RESPONSES, ranking=[0, 1, 2], labeller=other, task_id=mine.task.id)
        with pytest.raises(RewardServiceError) as unknown:
            client.submit_comparison(prompt="p", responses=["a", "b"], choice=0, labeller=other, task_id=10**9)
        after = client.next_label_task(labeller)
        stored = client.list_comparisons(labeller=labeller).data

    assert mine.task.id == ids[0] and mine.task.responses == RESPONSES and mine.task.source == "ppo step 10"
    assert theirs.task.id == ids[1] and mine_again.task.id == ids[0]
    assert [c.task_id for c in stored] == [ids[0]] and stored[0].id == saved.id
    assert twice.value.status == 409 and f"task {ids[0]} was already labelled" in twice.value.message
    assert unknown.value.status == 422 and "not a label task" in unknown.value.message
    assert after.task is None  # the other one is held by `other`


def test_bad_tasks_are_refused(service):
    empty = httpx.post(f"{service.url}/v1/label/tasks", json={"tasks": []})
    one = httpx.post(f"{service.url}/v1/label/tasks", json={"tasks": [{"prompt": "p", "responses": ["a"]}]})
    no_labeller = httpx.get(f"{service.url}/v1/label/tasks/next")

    assert empty.status_code == 422 and "tasks" in empty.json()["error"]["message"]
    assert one.status_code == 422 and "at least 2 responses" in one.json()["error"]["message"]
    assert no_labeller.status_code == 422 and "labeller: required field is missing" in no_labeller.json()["error"]["message"]


# -- settings: labellers, API key scopes, no store ----------------------------------------------

SCORE_KEY = "labeller-key-0123456789abcdef"
ADMIN_KEY = "operator-key-0123456789abcdef"


def test_known_labellers_only_and_reading_needs_the_admin_scope(model_dirs, tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{SCORE_KEY}:score\n{ADMIN_KEY}:score,admin\n")
    settings = ServiceSettings(
        models=[f"bert={model_dirs['bert']}"], store=f"sqlite:///{tmp_path}/c.db", labellers="ann, bob",
        api_keys_file=keys_file, shutdown_drain_s=0,
    )
    model = load_model("bert", model_dirs["bert"], settings)
    app = create_app(settings, [replace(model, batcher=None)], KeyRing(load_keys(None, keys_file)))
    body = {"prompt": "2+2?", "responses": ["4", "5"], "choice": 0}
    with in_process_server(app, settings) as url:
        with RewardClient(url, api_key=SCORE_KEY) as labeller, RewardClient(url, api_key=ADMIN_KEY) as operator:
            stored = labeller.submit_comparison(**body, labeller="ann")
            with pytest.raises(RewardServiceError) as stranger:
                labeller.submit_comparison(**body, labeller="mallory")
            with pytest.raises(RewardServiceError) as not_admin:
                labeller.list_comparisons()
            with pytest.raises(RewardServiceError) as not_admin_export:
                labeller.export_comparisons()
            listed = operator.list_comparisons()
            exported = operator.export_comparisons()
        anonymous = httpx.post(f"{url}/v1/comparisons", json={**body, "labeller": "ann"})
        page = httpx.get(f"{url}/label")

    assert stranger.value.status == 422 and "'mallory' is not one of this service's labellers" in stranger.value.message
    assert not_admin.value.status == 403 and "admin" in not_admin.value.message
    assert not_admin_export.value.status == 403
    assert [c.id for c in listed.data] == [stored.id] and len(exported) == 1
    assert anonymous.status_code == 401
    assert page.status_code == 200 and "<title>Label responses</title>" in page.text  # the page itself is open


def test_without_a_store_the_routes_say_how_to_keep_comparisons(model_dirs):
    settings = ServiceSettings(models=[f"bert={model_dirs['bert']}"], shutdown_drain_s=0)
    model = load_model("bert", model_dirs["bert"], settings)
    with in_process_server(create_app(settings, [replace(model, batcher=None)]), settings) as url:
        answer = httpx.post(f"{url}/v1/comparisons", json={"prompt": "p", "responses": ["a", "b"], "choice": 0, "labeller": "x"})

    assert answer.status_code == 404 and "--store sqlite:///" in answer.json()["error"]["message"]


def test_a_bad_store_url_stops_the_start_with_the_reason(tmp_path):
    log = tmp_path / "server.log"
    server = ServerProcess(["--store", "mysql://db/x"], log)
    assert server.process.wait(timeout=120) == 2
    server.stop()
    assert "only sqlite:///PATH and postgresql://... are supported" in log.read_text()


# -- schema, durability, availability -----------------------------------------------------------

def test_the_migrations_build_the_schema_the_store_queries(store_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    store = ComparisonStore(store_url)
    try:
        with store.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), metadata)
        assert differences == [] and store.revision() == "0001"
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_comparison_acknowledged_before_a_kill_9_is_there_after_the_restart(kind, model_dirs, tmp_path, request):
    url = f"sqlite:///{tmp_path}/comparisons.db" if kind == "sqlite" else request.getfixturevalue("postgres_server").url
    args = [f"--model=bert={model_dirs['bert']}", "--store", url]
    labeller = f"crash-{uuid.uuid4().hex[:8]}"
    server = ServerProcess(args, tmp_path / "first.log")
    try:
        server.wait_ready()
        with RewardClient(server.url, max_concurrency=8) as client, ThreadPoolExecutor(8) as pool:
            sent = [
                {"prompt": f"question {i}", "responses": [f"good {i}", f"bad {i}"], "choice": 0, "labeller": labeller}
                for i in range(24)
            ]
            acknowledged = list(pool.map(lambda body: client.submit_comparison(**body).id, sent))
        server.process.kill()  # SIGKILL right after the last 2xx: no shutdown, no flush
        server.process.wait()
    finally:
        server.stop()

    with running_server(args, tmp_path / "second.log") as restarted, RewardClient(restarted.url) as client:
        stored = {c.id: c for c in client.list_comparisons(labeller=labeller, limit=1000).data}

    assert set(acknowledged) <= set(stored)
    assert sorted(c.prompt for c in stored.values()) == sorted(b["prompt"] for b in sent)


def test_a_database_that_is_down_is_a_503_with_retry_after_and_nothing_is_lost(postgres_server, model_dirs):
    settings = ServiceSettings(models=[f"bert={model_dirs['bert']}"], store=postgres_server.url, shutdown_drain_s=0)
    model = load_model("bert", model_dirs["bert"], settings)
    body = {"prompt": "Is the database up?", "responses": ["yes", "no"], "choice": 1, "labeller": f"ops-{uuid.uuid4().hex[:8]}"}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    with in_process_server(create_app(settings, [replace(model, batcher=None)]), settings) as url:
        assert httpx.get(f"{url}/v1/comparisons").status_code == 200  # connected while the database was up
        postgres_server.stop()
        try:
            down = httpx.post(f"{url}/v1/comparisons", json=body, headers=key, timeout=60)
            listing = httpx.get(f"{url}/v1/comparisons", timeout=60)
            scoring = httpx.post(f"{url}/v1/score", json={"items": [{"prompt": "p", "response": "r"}]}, timeout=60)
        finally:
            postgres_server.start()
        up = httpx.post(f"{url}/v1/comparisons", json=body, headers=key, timeout=60)
        again = httpx.post(f"{url}/v1/comparisons", json=body, headers=key, timeout=60)
        stored = httpx.get(f"{url}/v1/comparisons", params={"labeller": body["labeller"]}).json()["data"]

    assert down.status_code == 503 and down.headers["retry-after"] == "5"
    assert "store is unavailable" in down.json()["error"]["message"] and "same Idempotency-Key" in down.json()["error"]["message"]
    assert listing.status_code == 503 and "retry-after" in listing.headers
    assert scoring.status_code == 200  # scoring does not depend on the store
    assert up.status_code == 201 and again.status_code == 200 and again.json()["id"] == up.json()["id"]
    assert [c["id"] for c in stored] == [up.json()["id"]]
