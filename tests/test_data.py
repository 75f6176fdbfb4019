"""User stories for trainer/data.py: preference data in any common format becomes one record."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from trainer.data import (
    DataError,
    DataSpec,
    PreferenceRecord,
    detect_format,
    load_file,
    load_preferences,
    parse_data_spec,
    write_rankings_jsonl,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

QUESTION = "What is 2+2?"
USER_ASKS = [{"role": "user", "content": QUESTION}]


def write_jsonl(path: Path, rows: list) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def pair_row(i: int) -> dict:
    return {"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}


# The same judgement -- "4" beats "5" as an answer to "What is 2+2?" -- in every supported format.
SAME_PREFERENCE = {
    "hh": ("hh.jsonl", {
        "chosen": f"\n\nHuman: {QUESTION}\n\nAssistant: 4",
        "rejected": f"\n\nHuman: {QUESTION}\n\nAssistant: 5",
    }),
    "trl_standard": ("standard.jsonl.gz", {"prompt": QUESTION, "chosen": "4", "rejected": "5"}),
    "trl_standard_hh_prompt": ("standard_hh.jsonl", {
        "prompt": f"\n\nHuman: {QUESTION}\n\nAssistant:", "chosen": " 4", "rejected": " 5",
    }),
    "trl_conversational": ("conversational.json", {
        "prompt": USER_ASKS,
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }),
    "trl_implicit_conversational": ("implicit.jsonl", {
        "chosen": USER_ASKS + [{"role": "assistant", "content": "4"}],
        "rejected": USER_ASKS + [{"role": "assistant", "content": "5"}],
    }),
    "sharegpt": ("sharegpt.json", {
        "conversations": [{"from": "human", "value": QUESTION}],
        "chosen": {"from": "gpt", "value": "4"},
        "rejected": {"from": "gpt", "value": "5"},
    }),
    "rankings": ("rankings.jsonl.gz", {"prompt": QUESTION, "responses": ["4", "5"], "ranking": [0, 1]}),
}


@pytest.mark.parametrize("fmt", sorted(SAME_PREFERENCE))
def test_every_format_loads_into_the_same_record(tmp_path, fmt):
    # A user has the same judgement stored in some format, as JSONL, gzipped JSONL or a JSON array.
    filename, row = SAME_PREFERENCE[fmt]
    path = tmp_path / filename
    if filename.endswith(".json"):
        write_json(path, [row])
    else:
        write_jsonl(path, [row])

    result = load_file(path)

    # They get one canonical record: the question as a user message, "4" ranked above "5".
    assert detect_format(row) == fmt.replace("_hh_prompt", "")
    (record,) = result.records
    assert record.prompt == USER_ASKS
    assert record.responses == ["4", "5"]
    assert record.ranking == [0, 1]
    assert record.pairs() == [(0, 1)]
    assert (record.source, record.line) == (str(path), 1)
    assert result.report.files[0].malformed == 0


def test_json_object_with_rows_under_data_key(tmp_path):
    # A user exported {"data": [...]} instead of a bare array.
    path = write_json(tmp_path / "wrapped.json", {"data": [pair_row(1), pair_row(2)]})

    records = load_file(path).records

    # Each row loads, numbered by its 1-based position in the array.
    assert [r.line for r in records] == [1, 2]
    assert records[1].responses == ["good 2", "bad 2"]


def test_hh_multi_turn_dialogue_becomes_chat_prompt(tmp_path):
    # A user loads an HH transcript with two human turns; the assistant quotes "Human:" mid-turn.
    shared = (
        "\n\nHuman: Hi there\n\nAssistant: Hello! You wrote Human: hi, right?"
        "\n\nHuman: Tell me a joke"
    )
    path = write_jsonl(tmp_path / "hh.jsonl.gz", [{
        "chosen": shared + "\n\nAssistant: Why did the chicken cross the road?",
        "rejected": shared + "\n\nAssistant: No.",
    }])

    (record,) = load_file(path).records

    # The shared turns are the prompt; only blank-line markers split turns.
    assert record.prompt == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! You wrote Human: hi, right?"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    assert record.responses == ["Why did the chicken cross the road?", "No."]


def test_sharegpt_with_system_prompt_and_history(tmp_path):
    # A user loads LLaMA-Factory DPO data with a system key and an earlier exchange.
    path = write_json(tmp_path / "dpo.json", [{
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": QUESTION},
        ],
        "chosen": {"from": "gpt", "value": "4"},
        "rejected": {"from": "gpt", "value": "Four, I think, but maybe 5"},
        "category": "math",
    }])

    (record,) = load_file(path).records

    # The system prompt comes first, the history keeps its roles.
    assert record.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": QUESTION},
    ]
    assert record.responses == ["4", "Four, I think, but maybe 5"]
    assert record.category == "math"


def test_ranking_of_three_gives_three_pairs_best_first(tmp_path):
    # A labeller ranked three answers: C best, then A, then B.
    path = write_jsonl(tmp_path / "ranked.jsonl", [{
        "prompt": [{"role": "system", "content": "Answer."}] + USER_ASKS,
        "responses": ["A", "B", "C"],
        "ranking": [2, 0, 1],
        "margin": 1.5,
    }])

    (record,) = load_file(path).records

    # Training sees C>A, C>B, A>B, in that order.
    assert record.best == "C"
    assert record.pairs() == [(2, 0), (2, 1), (0, 1)]
    assert record.margin == 1.5


def test_soft_labels_and_categories_are_carried(tmp_path):
    # AlpacaEval-style rows carry the judge's probability and a category.
    row = {**SAME_PREFERENCE["trl_conversational"][1], "p_chosen": 0.8, "category": "koala"}
    (record,) = load_file(write_jsonl(tmp_path / "ae.jsonl", [row])).records

    assert record.p_first == 0.8
    assert record.category == "koala"


def test_malformed_rows_are_reported_with_line_and_reason(tmp_path):
    # A user's file mixes good rows with every kind of broken one (line numbers in comments).
    rows = [
        pair_row(1),                                                        # 1 ok
        "{not json",                                                        # 2
        "[1, 2]",                                                           # 3
        {"foo": "bar"},                                                     # 4
        {"chosen": "4", "rejected": "5"},                                   # 5 implicit prompt, no markers
        {"prompt": QUESTION, "chosen": "  ", "rejected": "5"},              # 6
        {"prompt": QUESTION, "chosen": "4", "rejected": "4"},               # 7
        {"prompt": QUESTION, "responses": ["a", "b", "c"], "ranking": [0, 0, 1]},  # 8
        {"prompt": QUESTION, "responses": ["a"], "ranking": [0]},           # 9
        {**pair_row(10), "p_chosen": 1.5},                                  # 10
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: X\n\nAssistant: c"},  # 11
        {"prompt": QUESTION, "chosen": "4"},                                # 12
        pair_row(13),                                                       # 13 ok
    ]
    path = write_jsonl(tmp_path / "messy.jsonl", rows)

    result = load_file(path, max_bad_fraction=None)

    # Good rows load; every broken one is counted with its line and what is wrong.
    report = result.report.files[0]
    assert [r.line for r in result.records] == [1, 13]
    assert (report.rows_read, report.rows_loaded, report.malformed) == (13, 2, 11)
    reasons = dict(report.problems)
    expected = {
        2: "invalid JSON",
        3: "row must be a JSON object",
        4: "unknown format",
        5: "prompt cannot be told apart",
        6: "chosen response is empty",
        7: "identical",
        8: "not a permutation",
        9: "at least 2 responses",
        10: "p_chosen must be in [0.0, 1.0]",
        11: "differ before their final Assistant turn",
        12: "no 'rejected'",
    }
    assert sorted(reasons) == sorted(expected)
    for line, fragment in expected.items():
        assert fragment in reasons[line], (line, reasons[line])


def test_too_many_malformed_rows_abort_naming_file_and_lines(tmp_path):
    # 2 broken rows in 100 (2%) is more than the default 1% tolerance.
    rows = [pair_row(i) for i in range(100)]
    rows[9] = {"prompt": QUESTION}
    rows[49] = "oops"
    path = write_jsonl(tmp_path / "broken.jsonl", rows)

    with pytest.raises(DataError) as err:
        load_file(path)

    message = str(err.value)
    assert str(path) in message and "2 of 100" in message
    assert "line 10:" in message and "line 50:" in message

    # 1 broken row in 100 is within 1%: it loads, and the row is still reported.
    rows[49] = pair_row(49)
    report = load_file(write_jsonl(path, rows)).report.files[0]
    assert (report.rows_loaded, report.malformed, report.problems[0][0]) == (99, 1, 10)

    # A stricter absolute cap aborts even then.
    with pytest.raises(DataError, match="max_bad_rows=0"):
        load_file(path, max_bad_rows=0)


def test_file_without_usable_rows_or_missing_or_unknown_type_is_an_error(tmp_path):
    # A user points at the wrong file: nothing in it is a preference.
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"no usable rows in .*wrong\.jsonl: first problems: line 1: unknown format"):
        load_file(wrong, max_bad_fraction=None)

    with pytest.raises(DataError, match="not found: .*nope.jsonl"):
        load_file(tmp_path / "nope.jsonl")

    csv = tmp_path / "prefs.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"prefs\.csv: unsupported file type"):
        load_file(csv)


def test_data_spec_strings_give_path_weight_and_max_rows(tmp_path):
    # A user writes PATH[:WEIGHT][:MAX_ROWS] on the command line.
    assert parse_data_spec("hh/train.jsonl.gz") == DataSpec("hh/train.jsonl.gz")
    assert parse_data_spec("a.jsonl:0.5") == DataSpec("a.jsonl", weight=0.5)
    assert parse_data_spec("a.jsonl:2:1000") == DataSpec("a.jsonl", weight=2.0, max_rows=1000)
    assert parse_data_spec("a.jsonl::1000") == DataSpec("a.jsonl", max_rows=1000)
    # Colons that are not numbers stay in the path; an existing file is taken whole.
    assert parse_data_spec("s3:bucket/a.jsonl").path == "s3:bucket/a.jsonl"
    odd = write_jsonl(tmp_path / "run:2", [pair_row(1)])
    assert parse_data_spec(str(odd)) == DataSpec(str(odd))
    assert parse_data_spec("a.jsonl:2", name="mix").name == "mix"
    with pytest.raises(DataError, match="weight"):
        parse_data_spec("a.jsonl:-1")


def test_weight_repeats_or_subsamples_and_max_rows_caps(tmp_path):
    # A user mixes a 10-row file at different weights.
    rows = [pair_row(i) for i in range(10)]
    path = str(write_jsonl(tmp_path / "ten.jsonl", rows))

    doubled = load_preferences([f"{path}:2"]).records
    assert len(doubled) == 20 and doubled[:10] == doubled[10:]

    half = load_preferences([f"{path}:0.5"], seed=1).records
    assert len(half) == 5 and half == load_preferences([f"{path}:0.5"], seed=1).records
    assert len(set(r.line for r in half)) == 5

    # max_rows keeps the first N valid rows, skipping (and reporting) broken ones on the way.
    rows[1] = {"prompt": QUESTION}
    write_jsonl(Path(path), rows)
    capped = load_preferences([DataSpec(path, max_rows=3)], max_bad_fraction=None)
    assert [r.line for r in capped.records] == [1, 3, 4]
    assert (capped.report.files[0].rows_read, capped.report.files[0].malformed) == (4, 1)

    # Several files come out file by file, each named in the report.
    mixed = load_preferences([f"{path}:1:2", DataSpec(path, weight=1.5, max_rows=2, name="extra")],
                             max_bad_fraction=None)
    assert [f.source for f in mixed.report.files] == [path, "extra"]
    assert [f.records_used for f in mixed.report.files] == [2, 3]
    assert {r.source for r in mixed.records} == {path, "extra"}


def test_rankings_written_to_jsonl_load_back_equal(tmp_path):
    # A user converts data to the rankings format and reads it back later.
    original = [
        PreferenceRecord(prompt=USER_ASKS, responses=["4", "5"], ranking=[0, 1], p_first=0.9, category="math"),
        PreferenceRecord(
            prompt=[{"role": "system", "content": "Kind."}] + USER_ASKS,
            responses=["five", "4", "four ✓"],
            ranking=[2, 1, 0],
            margin=2.0,
        ),
    ]
    for name in ("out.jsonl", "sub/out.jsonl.gz"):
        path = tmp_path / name
        assert write_rankings_jsonl(original, path) == 2

        loaded = load_file(path).records

        assert [(r.prompt, r.responses, r.ranking, r.p_first, r.margin, r.category) for r in loaded] == [
            (r.prompt, r.responses, r.ranking, r.p_first, r.margin, r.category) for r in original
        ]


def test_record_construction_rejects_invalid_values():
    # Code that builds records directly gets the same checks as loaded rows.
    with pytest.raises(ValueError, match="permutation"):
        PreferenceRecord(prompt=USER_ASKS, responses=["a", "b"], ranking=[0, 2])
    with pytest.raises(ValueError, match="p_first"):
        PreferenceRecord(prompt=USER_ASKS, responses=["a", "b"], ranking=[0, 1], p_first=-0.1)


REAL_FILES = {
    "alpacaeval/train.jsonl.gz": 40000,
    "alpacaeval/dev.jsonl.gz": 3000,
    "alpacaeval/dev-balanced.jsonl.gz": 1000,
    "hh-harmless/train.jsonl.gz": 1318,
    "hh-harmless/dev.jsonl.gz": 327,
    "truthfulqa/train.jsonl.gz": 1852,
    "truthfulqa/dev.jsonl.gz": 478,
    "sharegpt/dpo_en_demo.json": 300,
    "sharegpt/dpo_zh_demo.json": 300,
}

KNOWN_BAD_LINES = {"hh-harmless/train.jsonl.gz": [50, 540, 726, 982, 1112, 1113, 1167]}


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_shared_data_loads(name):
    # A user trains on the shared datasets next to the project.
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data beside the repo)")

    report = load_file(path).report.files[0]
    print(report)

    # Every row is read and every row is usable, except the known broken HH rows: two empty
    # chosen answers and five answers that contain a "\n\nHuman:"/"\n\nAssistant:" marker.
    assert report.rows_read == REAL_FILES[name]
    assert [line for line, _ in report.problems] == KNOWN_BAD_LINES.get(name, [])
    assert report.rows_loaded == report.rows_read - report.malformed
