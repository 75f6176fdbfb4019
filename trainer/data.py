"""Load preference data from every common format into one canonical record.

Every row, whatever its source format, becomes a :class:`PreferenceRecord`:
a chat prompt (list of ``{"role", "content"}`` messages), K >= 2 candidate
responses, and a best-first ranking over them.  A pair is K=2 with ranking
``[0, 1]`` (chosen first, rejected second).

Formats, detected per row from the keys present (see :func:`detect_format`):

``hh``
    Anthropic HH transcripts: ``chosen``/``rejected`` are whole dialogues
    ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` that differ only in the final
    assistant turn.
``trl_standard``
    ``prompt``, ``chosen``, ``rejected`` strings (the prompt may also be a
    list of messages, or an HH transcript ending in ``"\\n\\nAssistant:"``).
``trl_conversational`` / ``trl_implicit_conversational``
    ``chosen``/``rejected`` are lists of messages, with or without a
    ``prompt`` list; messages before the final assistant message are part of
    the prompt and must be the same on both sides.
``sharegpt``
    LLaMA-Factory DPO style: ``conversations`` of ``{"from", "value"}`` turns,
    ``chosen``/``rejected`` single turns, optional ``system`` string.
``rankings``
    InstructGPT style: ``prompt`` (string or messages), ``responses`` (K >= 2
    strings) and ``ranking`` (best-first permutation of ``range(K)``).  This is
    also what :func:`write_rankings_jsonl` writes.

Responses to score on their own, without a preference (:func:`load_items`, e.g. a policy's
rollouts): rows ``{"prompt", "response"}`` (``reward eval best-of-n``'s ``samples.jsonl``),
``{"messages"}`` ending with the assistant's answer, ``{"samples": [...]}`` of those (``reward
ppo``'s ``metrics.jsonl``), or any preference row above (each of its responses).

A candidate pool (rows waiting for people's judgement, e.g. PPO samples) is read by
:func:`load_candidates`: ``{"prompt", "responses"}`` rows without a ranking, or rows of any
format above (their judgement kept beside them).

Optional extra keys on any row: ``category`` (string), ``p_chosen`` (AlpacaEval:
probability that the chosen / best-ranked response is better; ``p_first`` is
accepted too), ``margin`` (number).

Malformed rows are never dropped silently: each is counted in the file's
:class:`FileReport` with its line number and a reason, and a file with too many
of them aborts the load with :class:`DataError` (see :func:`load_file`).

Standard library and reward_core.formatting (the one prompt parser, HH transcripts included)
only: this module must stay importable without torch.
"""

from __future__ import annotations

import dataclasses

import gzip
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from client.protocol import TRAINED_ROLES
from reward_core.formatting import PromptError, looks_like_hh, parse_hh_transcript, parse_message, parse_prompt

__all__ = [
    "DataError",
    "MalformedRowError",
    "PreferenceRecord",
    "DataSpec",
    "FileReport",
    "LoadReport",
    "LoadResult",
    "FORMATS",
    "detect_format",
    "parse_row",
    "parse_data_spec",
    "load_file",
    "load_preferences",
    "write_rankings_jsonl",
    "ResponseItem",
    "ItemLoadResult",
    "item_row_format",
    "parse_item_row",
    "load_items",
    "Candidates",
    "parse_candidates_row",
    "load_candidates",
]

# The prompt roles a training row may hold; the comparison store refuses others on the way in.
ROLES = TRAINED_ROLES

FORMATS = (
    "hh",
    "trl_standard",
    "trl_conversational",
    "trl_implicit_conversational",
    "sharegpt",
    "rankings",
)

#: How many ``(line, reason)`` examples a :class:`FileReport` keeps (the count is always complete).
MAX_PROBLEM_EXAMPLES = 20

#: Default tolerance for malformed rows, as a fraction of the rows read from one file.
DEFAULT_MAX_BAD_FRACTION = 0.01

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


class DataError(ValueError):
    """A data file cannot be used: missing, unreadable, or too many malformed rows."""


class MalformedRowError(ValueError):
    """One row cannot be turned into a :class:`PreferenceRecord`; the message says why."""


# --------------------------------------------------------------------------- record


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference judgement in canonical form.

    ``ranking`` lists indices into ``responses``, best first.  ``p_first`` is an
    optional soft label: the probability that the best-ranked response is
    better (for pairs: that ``responses[ranking[0]]`` beats the other).
    ``source`` names the file (or the name given in its :class:`DataSpec`) and
    ``line`` is the 1-based line (JSONL) or array index (JSON) of the row.

    Construction validates everything; invalid values raise
    :class:`MalformedRowError` (a ``ValueError``).
    """

    prompt: list[dict]
    responses: list[str]
    ranking: list[int]
    p_first: float | None = None
    margin: float | None = None
    category: str | None = None
    source: str = ""
    line: int = 0
    objective: str | None = None  # the reward head this record trains (DataSpec.objective)

    def __post_init__(self) -> None:
        _check_prompt(self.prompt)
        _check_responses(self.responses)
        _check_ranking(self.ranking, len(self.responses))
        if self.p_first is not None:
            _check_number(self.p_first, "p_first", lo=0.0, hi=1.0)
        if self.margin is not None:
            _check_number(self.margin, "margin")
        if self.category is not None and not isinstance(self.category, str):
            raise MalformedRowError(f"category must be a string, got {type(self.category).__name__}")

    @property
    def best(self) -> str:
        """The best-ranked response."""
        return self.responses[self.ranking[0]]

    @property
    def worst(self) -> str:
        """The worst-ranked response."""
        return self.responses[self.ranking[-1]]

    def pairs(self) -> list[tuple[int, int]]:
        """All ``(better_idx, worse_idx)`` pairs implied by the ranking: K(K-1)/2 of them.

        Ordered by the better response's rank, then the worse one's: for ranking
        ``[2, 0, 1]`` this is ``[(2, 0), (2, 1), (0, 1)]``.
        """
        r = self.ranking
        return [(r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]

    def to_row(self) -> dict:
        """This record as a row of the ``rankings`` format (what :func:`write_rankings_jsonl` writes)."""
        row: dict[str, Any] = {
            "prompt": [dict(m) for m in self.prompt],
            "responses": list(self.responses),
            "ranking": list(self.ranking),
        }
        for key in ("p_first", "margin", "category"):
            value = getattr(self, key)
            if value is not None:
                row[key] = value
        return row


def _check_prompt(prompt: Any) -> None:
    if not isinstance(prompt, list) or not prompt:
        raise MalformedRowError("prompt must be a non-empty list of messages")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise MalformedRowError(f"prompt message {i} must be a dict with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise MalformedRowError(f"prompt message {i} has role {m['role']!r}, expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise MalformedRowError(f"prompt message {i} content must be a string")
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise MalformedRowError("prompt has no non-empty user message")


def _check_responses(responses: Any) -> None:
    if not isinstance(responses, list):
        raise MalformedRowError("responses must be a list of strings")
    if len(responses) < 2:
        raise MalformedRowError(f"need at least 2 responses to compare, got {len(responses)}")
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise MalformedRowError(f"response {i} must be a string, got {type(r).__name__}")
        if not r.strip():
            raise MalformedRowError(f"response {i} is empty or whitespace-only")
        key = r.strip()
        if key in seen:
            if len(responses) == 2:
                raise MalformedRowError("chosen and rejected responses are identical")
            raise MalformedRowError(f"responses {seen[key]} and {i} are identical")
        seen[key] = i


def _check_ranking(ranking: Any, k: int) -> None:
    if not isinstance(ranking, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ranking
    ):
        raise MalformedRowError("ranking must be a list of integers")
    if sorted(ranking) != list(range(k)):
        raise MalformedRowError(f"ranking {ranking} is not a permutation of range({k})")


def _check_number(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedRowError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise MalformedRowError(f"{name} must be in [{lo}, {hi}], got {value!r}")


# --------------------------------------------------------------------------- row parsing


def detect_format(row: Any) -> str:
    """Name the format of one row from the keys present: one of :data:`FORMATS` or ``"unknown"``."""
    if not isinstance(row, dict):
        return "unknown"
    if "responses" in row or "ranking" in row:
        return "rankings"
    if "conversations" in row:
        return "sharegpt"
    if "chosen" in row and "rejected" in row:
        chosen, rejected = row["chosen"], row["rejected"]
        if isinstance(chosen, (list, dict)) or isinstance(rejected, (list, dict)):
            return "trl_conversational" if "prompt" in row else "trl_implicit_conversational"
        if "prompt" in row:
            return "trl_standard"
        if isinstance(chosen, str) and looks_like_hh(chosen):
            return "hh"
    return "unknown"


def parse_row(row: Any, *, source: str = "", line: int = 0) -> PreferenceRecord:
    """Turn one row of any supported format into a :class:`PreferenceRecord`.

    Raises :class:`MalformedRowError` with a human-readable reason.
    """
    if not isinstance(row, dict):
        raise MalformedRowError(f"row must be a JSON object, got {type(row).__name__}")
    fmt = detect_format(row)
    if fmt == "unknown":
        raise MalformedRowError(_unknown_reason(row))
    try:
        prompt, responses, ranking = _PARSERS[fmt](row)
    except PromptError as e:  # a prompt, message or transcript the core's parser refused
        raise MalformedRowError(str(e)) from None
    p_first, margin, category = _extras(row)
    return PreferenceRecord(
        prompt=prompt,
        responses=responses,
        ranking=ranking,
        p_first=p_first,
        margin=margin,
        category=category,
        source=source,
        line=line,
    )


def _unknown_reason(row: dict) -> str:
    keys = sorted(row)
    if "chosen" in row and "rejected" in row and isinstance(row["chosen"], str):
        return (
            "chosen/rejected are plain strings with no 'prompt' key and no '\\n\\nHuman:'/"
            "'\\n\\nAssistant:' markers, so the prompt cannot be told apart from the response"
        )
    if ("chosen" in row) != ("rejected" in row):
        present, missing = ("chosen", "rejected") if "chosen" in row else ("rejected", "chosen")
        return f"has '{present}' but no '{missing}'"
    return (
        f"unknown format (keys: {keys}); expected chosen/rejected (+prompt), "
        "conversations+chosen+rejected, or prompt+responses+ranking"
    )


# -- HH transcripts (split into turns by reward_core.formatting.parse_hh_transcript)


def _parse_hh(row: dict) -> tuple[list[dict], list[str], list[int]]:
    sides = {}
    for side in ("chosen", "rejected"):
        value = row[side]
        if not isinstance(value, str):
            raise MalformedRowError(f"{side} must be a transcript string like the other side")
        turns = parse_hh_transcript(value, side)
        if not turns or turns[-1]["role"] != "assistant":
            raise MalformedRowError(f"{side} does not end with an '\\n\\nAssistant:' turn")
        sides[side] = turns
    chosen, rejected = sides["chosen"], sides["rejected"]
    if chosen[:-1] != rejected[:-1]:
        at = next(
            (i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
            min(len(chosen), len(rejected)) - 1,
        )
        raise MalformedRowError(
            f"chosen ({len(chosen)} turns) and rejected ({len(rejected)} turns) differ before "
            f"their final Assistant turn, first at turn {at + 1}; a response probably contains "
            "a '\\n\\nHuman:' or '\\n\\nAssistant:' marker"
        )
    return _pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


# -- TRL standard / conversational


def _parse_trl_standard(row: dict) -> tuple[list[dict], list[str], list[int]]:
    prompt, chosen, rejected = row["prompt"], _string(row, "chosen"), _string(row, "rejected")
    if isinstance(prompt, str) and looks_like_hh(prompt):
        # TRL-extracted HH: prompt "...\n\nAssistant:", responses " answer"
        chosen, rejected = chosen.strip(), rejected.strip()
    return _pair(parse_prompt(prompt), chosen, rejected)


def _parse_trl_conversational(row: dict) -> tuple[list[dict], list[str], list[int]]:
    prompt = parse_prompt(row["prompt"]) if "prompt" in row else []
    sides = {}
    for side in ("chosen", "rejected"):
        value = row[side]
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not value:
            raise MalformedRowError(f"{side} must be a non-empty list of messages")
        messages = [parse_message(m, f"{side} message {i}") for i, m in enumerate(value)]
        if messages[-1]["role"] != "assistant":
            raise MalformedRowError(f"{side} must end with an assistant message, got {messages[-1]['role']!r}")
        sides[side] = messages
    chosen, rejected = sides["chosen"], sides["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise MalformedRowError("chosen and rejected differ before their final assistant message")
    return _pair(prompt + chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


# -- ShareGPT (LLaMA-Factory)


def _parse_sharegpt(row: dict) -> tuple[list[dict], list[str], list[int]]:
    conversations = row["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise MalformedRowError("conversations must be a non-empty list of turns")
    prompt = [parse_message(t, f"conversations turn {i}") for i, t in enumerate(conversations)]
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise MalformedRowError("system must be a string")
        if system.strip():
            prompt.insert(0, {"role": "system", "content": system})
    responses = []
    for side in ("chosen", "rejected"):
        if side not in row:
            raise MalformedRowError(f"missing '{side}'")
        value = row[side]
        if isinstance(value, dict):
            turn = parse_message(value, side)
            if turn["role"] != "assistant":
                raise MalformedRowError(f"{side} turn is from {turn['role']!r}, expected an assistant ('gpt') turn")
            value = turn["content"]
        elif not isinstance(value, str):
            raise MalformedRowError(f"{side} must be a {{'from': 'gpt', 'value': ...}} turn")
        responses.append(value)
    return _pair(prompt, *responses)


# -- rankings (InstructGPT)


def _parse_rankings(row: dict) -> tuple[list[dict], list[str], list[int]]:
    for key in ("prompt", "responses", "ranking"):
        if key not in row:
            raise MalformedRowError(f"rankings row is missing '{key}'")
    prompt = parse_prompt(row["prompt"])
    responses = row["responses"]
    if not isinstance(responses, list):
        raise MalformedRowError("responses must be a list of strings")
    ranking = row["ranking"]
    if not isinstance(ranking, list):
        raise MalformedRowError("ranking must be a list of integers")
    return prompt, list(responses), list(ranking)


_PARSERS = {
    "hh": _parse_hh,
    "trl_standard": _parse_trl_standard,
    "trl_conversational": _parse_trl_conversational,
    "trl_implicit_conversational": _parse_trl_conversational,
    "sharegpt": _parse_sharegpt,
    "rankings": _parse_rankings,
}


# -- shared helpers


def _pair(prompt: list[dict], chosen: str, rejected: str) -> tuple[list[dict], list[str], list[int]]:
    """A chosen/rejected pair as (prompt, responses, ranking), naming the side that is empty."""
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise MalformedRowError(f"{side} response is empty or whitespace-only")
    return prompt, [chosen, rejected], [0, 1]


def _string(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise MalformedRowError(f"{key} must be a string, got {type(value).__name__}")
    return value


def _extras(row: dict) -> tuple[float | None, float | None, str | None]:
    p_key = "p_chosen" if "p_chosen" in row else "p_first"
    p_first = row.get(p_key)
    if p_first is not None:
        _check_number(p_first, p_key, lo=0.0, hi=1.0)
        p_first = float(p_first)
    margin = row.get("margin")
    if margin is not None:
        _check_number(margin, "margin")
        margin = float(margin)
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        raise MalformedRowError(f"category must be a string, got {type(category).__name__}")
    return p_first, margin, category


# --------------------------------------------------------------------------- files


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def _jsonl_rows(lines: Iterable[bytes]) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line, row, error)``; blank lines are skipped, bad lines yield an error."""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as e:
            yield number, None, f"invalid UTF-8: {e.reason}"
        except json.JSONDecodeError as e:
            yield number, None, f"invalid JSON: {e.msg} at column {e.colno}"


def _json_rows(data: bytes, path: Path) -> Iterator[tuple[int, Any, str | None]]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8: {e}") from e
    except json.JSONDecodeError as e:
        first = next((ln for ln in data.split(b"\n") if ln.strip()), b"")
        try:
            looks_jsonl = isinstance(json.loads(first), dict)
        except ValueError:
            looks_jsonl = False
        if looks_jsonl:  # a .json file that is really JSON Lines
            yield from _jsonl_rows(data.split(b"\n"))
            return
        raise DataError(f"{path}: invalid JSON: {e}") from e
    if isinstance(doc, dict):
        doc = next((doc[k] for k in ("data", "rows") if isinstance(doc.get(k), list)), None)
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of rows or an object with a list under 'data' or 'rows'")
    for index, row in enumerate(doc, start=1):
        yield index, row, None


def iter_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line, row, error)`` for every row of a file; JSONL is streamed, not read whole."""
    if not path.exists():
        hint = " (data specs are PATH[:WEIGHT][:MAX_ROWS])" if ":" in path.name else ""
        raise DataError(f"data file not found: {path}{hint}")
    if not path.is_file():
        raise DataError(f"not a file: {path}")
    suffix = _suffix(path)
    try:
        with (gzip.open(path, "rb") if suffix.endswith(".gz") else open(path, "rb")) as f:
            if suffix.startswith(".jsonl"):
                yield from _jsonl_rows(f)
            else:
                yield from _json_rows(f.read(), path)
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated archives
        raise DataError(f"{path}: cannot read file: {e}") from e


@dataclass
class FileReport:
    """What happened to one file: rows read, loaded, and the malformed ones (line, reason)."""

    source: str
    path: str
    rows_read: int = 0
    rows_loaded: int = 0
    malformed: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # first MAX_PROBLEM_EXAMPLES
    formats: dict[str, int] = field(default_factory=dict)
    weight: float = 1.0
    records_used: int = 0  # after weighting

    @property
    def bad_fraction(self) -> float:
        return self.malformed / self.rows_read if self.rows_read else 0.0

    def add_problem(self, line: int, reason: str) -> None:
        self.malformed += 1
        if len(self.problems) < MAX_PROBLEM_EXAMPLES:
            self.problems.append((line, reason))

    def first_problems(self, n: int = 5) -> str:
        shown = "; ".join(f"line {line}: {reason}" for line, reason in self.problems[:n])
        more = self.malformed - min(n, len(self.problems))
        return shown + (f"; ... and {more} more" if more > 0 else "")

    def __str__(self) -> str:
        formats = ", ".join(f"{k}={v}" for k, v in sorted(self.formats.items())) or "-"
        text = (
            f"{self.source}: {self.rows_loaded}/{self.rows_read} rows loaded, "
            f"{self.malformed} malformed ({self.bad_fraction:.2%}), formats: {formats}, "
            f"weight {self.weight:g} -> {self.records_used} records"
        )
        if self.malformed:
            text += "\n  " + self.first_problems()
        return text


@dataclass
class LoadReport:
    files: list[FileReport] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return sum(f.rows_read for f in self.files)

    @property
    def rows_loaded(self) -> int:
        return sum(f.rows_loaded for f in self.files)

    @property
    def malformed(self) -> int:
        return sum(f.malformed for f in self.files)

    def __str__(self) -> str:
        return "\n".join(str(f) for f in self.files)


@dataclass
class LoadResult:
    records: list[PreferenceRecord]
    report: LoadReport


def _check_bad_rows(report: FileReport, max_bad_fraction: float | None, max_bad_rows: int | None) -> None:
    if report.rows_loaded == 0:
        why = f"first problems: {report.first_problems()}" if report.malformed else "the file has no rows"
        raise DataError(f"no usable rows in {report.path}: {why}")
    too_many_fraction = max_bad_fraction is not None and report.bad_fraction > max_bad_fraction
    too_many_rows = max_bad_rows is not None and report.malformed > max_bad_rows
    if too_many_fraction or too_many_rows:
        limit = (
            f"max_bad_fraction={max_bad_fraction:g}" if too_many_fraction else f"max_bad_rows={max_bad_rows}"
        )
        raise DataError(
            f"too many malformed rows in {report.path}: {report.malformed} of {report.rows_read} "
            f"({report.bad_fraction:.1%}) exceeds {limit}; first problems: {report.first_problems()}. "
            "This usually means a wrong file or an unsupported format."
        )


def load_file(
    path: str | Path,
    *,
    max_rows: int | None = None,
    max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
    max_bad_rows: int | None = None,
    name: str | None = None,
) -> LoadResult:
    """Load one ``.jsonl``, ``.jsonl.gz``, ``.json`` or ``.json.gz`` file of preference rows.

    Rows are read in order until ``max_rows`` valid records are collected (all
    rows if None).  Every malformed row is counted in the report with its line
    and reason.  The load aborts with :class:`DataError` when the malformed
    rows exceed ``max_bad_fraction`` of the rows read, or number more than
    ``max_bad_rows`` (when given), or when no row is usable.

    Why 1% by default: real datasets carry a few broken rows (e.g. an HH
    response that itself contains a ``"\\n\\nHuman:"`` marker, an empty answer),
    and those are worth skipping with a report rather than failing a run.  More
    than 1% bad rows almost always means the wrong file, a format this loader
    does not understand, or a broken export, and training on the rest would
    silently use the wrong data.  Pass ``max_bad_fraction=None`` (or 1.0) to
    accept any amount.
    """
    path = Path(path)
    source = name if name is not None else str(path)

    def parse(row: Any, line: int) -> tuple[PreferenceRecord, str]:
        return parse_row(row, source=source, line=line), detect_format(row)

    records, report = _read_rows(path, source, parse, max_rows, max_bad_fraction, max_bad_rows)
    return LoadResult(records=records, report=LoadReport(files=[report]))


def _read_rows(
    path: Path, source: str, parse: Any, max_rows: int | None, max_bad_fraction: float | None, max_bad_rows: int | None,
) -> tuple[list[Any], FileReport]:
    """``parse(row, line) -> (item, format name)`` over a file's rows, every malformed row in the
    report, and the load refused by :func:`_check_bad_rows`'s policy."""
    report = FileReport(source=source, path=str(path))
    items: list[Any] = []
    rows = iter_rows(path)
    for line, row, error in rows:
        if max_rows is not None and len(items) >= max_rows:
            rows.close()  # stop reading: the file is closed now, not at garbage collection
            break
        report.rows_read += 1
        if error is None:
            try:
                item, fmt = parse(row, line)
            except MalformedRowError as e:
                error = str(e)
        if error is not None:
            report.add_problem(line, error)
            continue
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
        items.append(item)
    report.rows_loaded = report.records_used = len(items)
    _check_bad_rows(report, max_bad_fraction, max_bad_rows)
    return items, report


# --------------------------------------------------------------------------- candidate pools

#: The format name a pool row without a judgement is counted under in a :class:`FileReport`.
CANDIDATES_FORMAT = "candidates"


@dataclass(frozen=True)
class Candidates:
    """A prompt and K >= 2 candidate responses waiting for a judgement: one row of a candidate
    pool (a PPO rollout's samples, say) that people may be asked to rank.

    ``ranking`` is the row's own judgement (best first) when it came from a preference file, None
    for a row that has none; ``source`` and ``line`` say where it came from, as for a record."""

    prompt: list[dict]
    responses: list[str]
    ranking: list[int] | None = None
    category: str | None = None
    source: str = ""
    line: int = 0

    def __post_init__(self) -> None:
        _check_prompt(self.prompt)
        _check_responses(self.responses)
        if self.ranking is not None:
            _check_ranking(self.ranking, len(self.responses))
        if self.category is not None and not isinstance(self.category, str):
            raise MalformedRowError(f"category must be a string, got {type(self.category).__name__}")

    def as_record(self) -> PreferenceRecord:
        """The row as a preference record, for a row that carries its judgement."""
        if self.ranking is None:
            raise ValueError(f"{self.source}:{self.line} has no judgement (no ranking) to train on")
        return PreferenceRecord(prompt=self.prompt, responses=self.responses, ranking=self.ranking,
                                category=self.category, source=self.source, line=self.line)


def parse_candidates_row(row: Any, *, source: str = "", line: int = 0) -> Candidates:
    """One pool row: ``{"prompt", "responses"}`` (a string or messages, K >= 2 strings; optional
    ``category``) without a judgement, or any row :func:`parse_row` reads, its judgement kept."""
    if isinstance(row, dict) and "responses" in row and "ranking" not in row:
        if "prompt" not in row:
            raise MalformedRowError("a candidates row needs 'prompt' beside 'responses'")
        try:
            prompt = parse_prompt(row["prompt"])
        except PromptError as e:
            raise MalformedRowError(str(e)) from None
        responses = row["responses"]
        # as a comparison's (parse_row): the service refuses a label task it could not train on
        _check_prompt(prompt)
        _check_responses(responses)
        _, _, category = _extras(row)
        return Candidates(prompt=prompt, responses=list(responses), category=category, source=source, line=line)
    record = parse_row(row, source=source, line=line)
    return Candidates(prompt=record.prompt, responses=record.responses, ranking=record.ranking,
                      category=record.category, source=source, line=line)


def load_candidates(
    path: str | Path,
    *,
    max_rows: int | None = None,
    max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
    name: str | None = None,
) -> tuple[list[Candidates], FileReport]:
    """A candidate pool file (any suffix :func:`load_file` reads): rows of
    :func:`parse_candidates_row`, malformed ones counted and refused past ``max_bad_fraction``
    as :func:`load_file` does."""
    path = Path(path)
    source = name if name is not None else str(path)

    def parse(row: Any, line: int) -> tuple[Candidates, str]:
        candidates = parse_candidates_row(row, source=source, line=line)
        return candidates, CANDIDATES_FORMAT if candidates.ranking is None else detect_format(row)

    return _read_rows(path, source, parse, max_rows, max_bad_fraction, None)


# --------------------------------------------------------------------------- specs and mixing


@dataclass(frozen=True)
class DataSpec:
    """One data file to load: ``weight`` scales how often its records appear, ``max_rows`` caps it."""

    path: str
    weight: float = 1.0
    max_rows: int | None = None
    name: str = ""
    objective: str | None = None  # the reward head its records train (a multi-objective model)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))
        if self.objective is not None:
            from reward_core.objectives import OBJECTIVE_NAME

            if not isinstance(self.objective, str) or not OBJECTIVE_NAME.match(self.objective):
                raise DataError(
                    f"{self.path}: objective {self.objective!r}: use lower-case letters, digits and '_' "
                    "(e.g. objective=harmlessness)"
                )
        if not self.name:
            object.__setattr__(self, "name", self.path)
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise DataError(f"{self.path}: weight must be a finite number >= 0, got {w!r}")
        object.__setattr__(self, "weight", float(w))
        if self.max_rows is not None and (
            isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 1
        ):
            raise DataError(f"{self.path}: max_rows must be a positive integer, got {self.max_rows!r}")


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def parse_data_spec(text: str, *, name: str | None = None) -> DataSpec:
    """Parse ``"PATH[:WEIGHT][:MAX_ROWS][:objective=NAME]"``, e.g. ``"hh/train.jsonl.gz:0.5"``,
    ``"a.jsonl:2:1000"`` or ``"hh/train.jsonl.gz:3:objective=harmlessness"``.

    Trailing ``:``-separated parts are taken as WEIGHT/MAX_ROWS only when they
    parse as numbers (``"a.jsonl::1000"`` keeps weight 1), so paths containing
    ``:`` still work; a path that exists as given is always taken whole.
    ``objective=NAME`` (last) names the reward head the file's records train.
    """
    if not isinstance(text, str) or not text:
        raise DataError(f"empty data spec: {text!r}")
    objective = None
    if not Path(text).exists():
        head, sep, tail = text.rpartition(":")
        if sep and tail.startswith("objective="):
            text, objective = head, tail[len("objective="):]
            if not objective:
                raise DataError(f"data spec {text!r}: objective= needs a name, e.g. objective=harmlessness")
    parts = text.split(":")
    path, weight, max_rows = text, 1.0, None
    if not Path(text).exists():
        if len(parts) >= 3 and _as_int(parts[-1]) is not None and (parts[-2] == "" or _as_number(parts[-2]) is not None):
            path = ":".join(parts[:-2])
            weight = _as_number(parts[-2]) if parts[-2] else 1.0
            max_rows = _as_int(parts[-1])
        elif len(parts) >= 2 and _as_number(parts[-1]) is not None:
            path, weight = ":".join(parts[:-1]), _as_number(parts[-1])
    if not path:
        raise DataError(f"data spec {text!r} has no path")
    return DataSpec(path=path, weight=weight, max_rows=max_rows, name=name or path, objective=objective)


def weight_draw(n_records: int, weight: float, seed: int, path: str | Path) -> list[int]:
    """The indices a file's records are used at under ``weight`` (``load_preferences``): each
    floor(weight) times, then a random fraction drawn with ``seed`` and the file's path as given
    (kept in file order)."""
    whole = math.floor(weight)
    out = list(range(n_records)) * whole
    extra = round((weight - whole) * n_records)
    if extra:
        out += sorted(random.Random(f"{seed}:{path}").sample(range(n_records), extra))
    return out


def load_preferences(
    specs: Iterable[DataSpec | str] | DataSpec | str,
    *,
    max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
    max_bad_rows: int | None = None,
    seed: int = 0,
) -> LoadResult:
    """Load and mix several files (specs are :class:`DataSpec` or ``"PATH[:WEIGHT][:MAX_ROWS]"`` strings).

    Each file is loaded with :func:`load_file` (same malformed-row policy), then
    weighted: weight ``w`` repeats the file's records ``floor(w)`` times plus a
    random ``w - floor(w)`` fraction of them, chosen with ``seed`` (so 0.5
    halves a file and 2 doubles it).  Records come out file by file, in file
    order; shuffling is the trainer's job.
    """
    if isinstance(specs, (str, DataSpec)):
        specs = [specs]
    parsed = [s if isinstance(s, DataSpec) else parse_data_spec(s) for s in specs]
    if not parsed:
        raise DataError("no data files given")
    records: list[PreferenceRecord] = []
    report = LoadReport()
    for spec in parsed:
        result = load_file(
            spec.path,
            max_rows=spec.max_rows,
            max_bad_fraction=max_bad_fraction,
            max_bad_rows=max_bad_rows,
            name=spec.name,
        )
        file_report = result.report.files[0]
        loaded = result.records
        if spec.objective is not None:
            loaded = [dataclasses.replace(r, objective=spec.objective) for r in loaded]
        weighted = [loaded[i] for i in weight_draw(len(loaded), spec.weight, seed, spec.path)]
        file_report.weight = spec.weight
        file_report.records_used = len(weighted)
        records.extend(weighted)
        report.files.append(file_report)
    return LoadResult(records=records, report=report)


# --------------------------------------------------------------------------- responses without a preference


@dataclass(frozen=True)
class ResponseItem:
    """One response to its prompt, to be scored on its own (no preference between responses)."""

    prompt: list[dict]
    response: str


@dataclass
class ItemLoadResult:
    items: list[ResponseItem]
    report: FileReport


def _response_item(prompt: Any, response: Any) -> ResponseItem:
    # An empty response is kept: a policy that stops at once wrote it, and PPO scored it.
    if not isinstance(response, str):
        raise MalformedRowError(f"response must be a string, got {type(response).__name__}")
    try:
        messages = parse_prompt(prompt)
    except PromptError as e:
        raise MalformedRowError(str(e)) from None
    if not messages:
        raise MalformedRowError("prompt has no messages")
    return ResponseItem(messages, response)


def _messages_item(value: Any) -> ResponseItem:
    if not isinstance(value, list) or len(value) < 2:
        raise MalformedRowError("messages must be a list of at least a prompt turn and the assistant's answer")
    try:
        messages = [parse_message(m, f"message {i}") for i, m in enumerate(value)]
    except PromptError as e:
        raise MalformedRowError(str(e)) from None
    if messages[-1]["role"] != "assistant":
        raise MalformedRowError(f"messages must end with the assistant's answer, not a {messages[-1]['role']!r} turn")
    return _response_item(messages[:-1], messages[-1]["content"])


def item_row_format(row: dict) -> str:
    """How a row of responses to score alone is written: ``samples``, ``prompt_response``,
    ``messages``, or a preference format (:func:`detect_format`; ``unknown`` when none)."""
    if "samples" in row:
        return "samples"
    if "response" in row:
        return "prompt_response"
    fmt = detect_format(row)
    return "messages" if fmt == "unknown" and "messages" in row else fmt


def parse_item_row(row: Any, *, source: str = "", line: int = 0) -> list[ResponseItem]:
    """The responses of one row, each with its prompt: ``{"prompt", "response"}``,
    ``{"messages"}`` (the last one the assistant's answer), ``{"samples": [rows of those]}``
    (``reward ppo``'s metrics.jsonl), or a preference row of any format (each of its responses).
    Raises :class:`MalformedRowError` with the reason."""
    if not isinstance(row, dict):
        raise MalformedRowError(f"row must be a JSON object, got {type(row).__name__}")
    form = item_row_format(row)
    if form == "samples":
        samples = row["samples"]
        if not isinstance(samples, list) or not samples:
            raise MalformedRowError("samples must be a non-empty list of {prompt, response} objects")
        items = []
        for i, sample in enumerate(samples):
            try:
                items += parse_item_row(sample, source=source, line=line)
            except MalformedRowError as e:
                raise MalformedRowError(f"sample {i}: {e}") from None
        return items
    if form == "prompt_response":
        if "prompt" not in row:
            raise MalformedRowError("a row with 'response' needs its 'prompt' (a string or a list of messages)")
        return [_response_item(row["prompt"], row["response"])]
    if form == "messages":
        return [_messages_item(row["messages"])]
    if form == "unknown":
        raise MalformedRowError(
            f"{_unknown_reason(row)}; a response to score alone is {{'prompt', 'response'}}, {{'messages'}} ending "
            "with the assistant's answer, or {'samples': [...]} of those"
        )
    record = parse_row(row, source=source, line=line)
    return [ResponseItem(record.prompt, r) for r in record.responses]


def load_items(
    path: str | Path,
    *,
    max_rows: int | None = None,
    max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
    name: str | None = None,
) -> ItemLoadResult:
    """Load the responses of one file (rows of :func:`parse_item_row`'s forms) in file order,
    ``max_rows`` rows at most. Malformed rows are counted and judged as :func:`load_file` does."""
    path = Path(path)
    report = FileReport(source=name if name is not None else str(path), path=str(path))
    items: list[ResponseItem] = []
    rows = iter_rows(path)
    for line, row, error in rows:
        if max_rows is not None and report.rows_loaded >= max_rows:
            rows.close()
            break
        report.rows_read += 1
        if error is None:
            try:
                found = parse_item_row(row, source=report.source, line=line)
            except MalformedRowError as e:
                error = str(e)
        if error is not None:
            report.add_problem(line, error)
            continue
        form = item_row_format(row)
        report.formats[form] = report.formats.get(form, 0) + 1
        report.rows_loaded += 1
        items += found
    report.records_used = len(items)
    _check_bad_rows(report, max_bad_fraction, None)
    return ItemLoadResult(items=items, report=report)


def write_rankings_jsonl(records: Iterable[PreferenceRecord], path: str | Path) -> int:
    """Write records in the ``rankings`` format (``.jsonl`` or ``.jsonl.gz``); returns the row count.

    The output loads back with :func:`load_file` into equal prompts, responses,
    rankings, ``p_first``, ``margin`` and ``category``.
    """
    path = Path(path)
    suffix = path.name.lower()
    if not (suffix.endswith(".jsonl") or suffix.endswith(".jsonl.gz")):
        raise DataError(f"{path}: write_rankings_jsonl writes .jsonl or .jsonl.gz files")
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r.to_row(), ensure_ascii=False) + "\n" for r in records]
    data = "".join(lines).encode("utf-8")
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return len(lines)
