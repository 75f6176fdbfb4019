"""``reward score``: score a JSONL file of items with a running reward service.

Each input line is ``{"prompt", "response"}`` or ``{"messages"}``, optionally with extra keys
(an "id", metadata) that are kept in the output but not sent. Each output line is the input
object plus ``"score"``, in input order; with ``--objectives`` (a model with several reward
heads) also ``"objectives"``: each head's reward by name; with ``--uncertainty`` (an ensemble)
``"ensemble_mean"`` and ``"ensemble_std"``, with ``--members`` ``"members"``: each member's reward.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import sys
import typing
from typing import Any, Sequence, TextIO

import httpx
from pydantic import ValidationError

from .client import DEFAULT_URL, RewardClient, RewardServiceError
from .protocol import AggregateRule, MessagesItem, PromptResponseItem, as_item

ITEM_KEYS_PROMPT_RESPONSE = ("prompt", "response")
ITEM_KEYS_MESSAGES = ("messages",)
MAX_REPORTED_BAD_LINES = 20
AGGREGATE_RULES = typing.get_args(AggregateRule)


def add_score_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "score",
        help="score a JSONL file of items with a running service",
        description=(
            'Score a JSONL file: each line {"prompt", "response"} or {"messages"} (other keys such as '
            '"id" are kept in the output, not sent). Writes each line back with a "score", in input order.'
        ),
    )
    parser.add_argument("input", help="JSONL file of items ('-' for stdin; .gz is read compressed)")
    parser.add_argument("-o", "--output", default="-", help="where to write scored JSONL (default: stdout)")
    parser.add_argument(
        "--url", default=os.environ.get("REWARD_URL", DEFAULT_URL), help="service URL (env REWARD_URL; default %(default)s)"
    )
    parser.add_argument("--model", default=None, help="model name (default: the service's default model)")
    parser.add_argument("--normalize", action="store_true", help="return normalized rewards (model's mean/std)")
    parser.add_argument(
        "--objective", default=None, metavar="NAME",
        help="a model with several reward heads: score with this head instead of their combination "
        "(GET /v1/models lists them)",
    )
    parser.add_argument(
        "--objectives", action="store_true",
        help='a model with several reward heads: also write each head\'s reward ("objectives": {name: reward})',
    )
    parser.add_argument(
        "--aggregate", default=None, choices=AGGREGATE_RULES,
        help="an ensemble model: how its members' rewards become the score (default: what the service serves)",
    )
    parser.add_argument(
        "--uncertainty-penalty", type=_penalty, default=None, metavar="X",
        help="an ensemble model, with --aggregate mean_minus_var: the λ of mean - λ·var (default: the served one)",
    )
    parser.add_argument(
        "--uncertainty", action="store_true",
        help='an ensemble model: also write the members\' mean and standard deviation ("ensemble_mean", "ensemble_std")',
    )
    parser.add_argument(
        "--members", action="store_true", help='an ensemble model: also write each member\'s reward ("members": [...])'
    )
    parser.add_argument("--chunk-size", type=_positive_int, default=64, help="items per request (default %(default)s)")
    parser.add_argument("--concurrency", type=_positive_int, default=8, help="requests in flight (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default %(default)s)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (env REWARD_API_KEY)")
    parser.set_defaults(func=run_score)
    return parser


def _penalty(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class InputError(Exception):
    """Bad input lines, each already formatted as ``file:line: what is wrong``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _open_input(path: str):
    if path == "-":
        # Not closed on exit: stdin belongs to the process, not to this command.
        return contextlib.nullcontext(sys.stdin)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _validation_text(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'item'}: {e['msg']}" for e in exc.errors())


def _item_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The keys the service takes; everything else stays local."""
    has_messages = "messages" in obj
    has_prompt_response = any(k in obj for k in ITEM_KEYS_PROMPT_RESPONSE)
    if has_messages and has_prompt_response:
        # Which one to score would be a guess; the other keys would be silently ignored.
        raise ValueError('has both "messages" and "prompt"/"response"; give one shape')
    if has_messages:
        return {k: obj[k] for k in ITEM_KEYS_MESSAGES}
    if not has_prompt_response:
        raise ValueError('is not an item: expected {"prompt", "response"} or {"messages"}')
    return {k: obj[k] for k in ITEM_KEYS_PROMPT_RESPONSE if k in obj}


def read_items(source: TextIO, name: str) -> tuple[list[dict], list[PromptResponseItem | MessagesItem]]:
    """The objects of each non-blank line and their items; InputError lists every bad line."""
    objects, items, problems = [], [], []
    for line_number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        where = f"{name}:{line_number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        try:
            item = as_item(_item_fields(obj))
        except ValidationError as exc:
            problems.append(f"{where}: {_validation_text(exc)}")
            continue
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        objects.append(obj)
        items.append(item)
    if problems:
        raise InputError(problems)
    return objects, items


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    # stderr only: stdout carries the scored JSONL.
    console = Console(stderr=True)
    return Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    )


def run_score(args: argparse.Namespace, *, transport: httpx.BaseTransport | None = None) -> int:
    """Score ``args.input`` and write it to ``args.output``. ``transport`` is for tests."""
    name = "<stdin>" if args.input == "-" else args.input
    try:
        with _open_input(args.input) as source:
            objects, items = read_items(source, name)
    except InputError as exc:
        shown = exc.problems[:MAX_REPORTED_BAD_LINES]
        more = len(exc.problems) - len(shown)
        for problem in shown:
            print(problem, file=sys.stderr)
        if more:
            print(f"... and {more} more bad lines", file=sys.stderr)
        print(f"reward score: {len(exc.problems)} bad line(s) in {name}; nothing was sent", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        print(f"reward score: cannot read {name}: {exc}", file=sys.stderr)
        return 2

    scores: list[float] = []
    per_objective: dict[str, list[float]] | None = None
    response = None
    model_name = "no model (empty input)"
    if items:
        api_key = getattr(args, "api_key", None) or os.environ.get("REWARD_API_KEY")
        try:
            with RewardClient(
                args.url,
                timeout=getattr(args, "timeout", 60.0),
                chunk_size=args.chunk_size,
                max_concurrency=args.concurrency,
                api_key=api_key,
                transport=transport,
            ) as client, _progress_bar() as bar:
                task = bar.add_task("scoring", total=len(items))
                response = client.score(
                    items, model=args.model, normalize=args.normalize,
                    objective=getattr(args, "objective", None), return_objectives=getattr(args, "objectives", False),
                    aggregate=getattr(args, "aggregate", None), uncertainty_penalty=getattr(args, "uncertainty_penalty", None),
                    return_uncertainty=getattr(args, "uncertainty", False), return_members=getattr(args, "members", False),
                    progress=lambda done, total: bar.update(task, completed=done),
                )
        except (RewardServiceError, ValueError) as exc:  # ValueError: a bad --objective, refused before sending
            print(f"reward score: {exc}", file=sys.stderr)
            return 1
        scores, model_name, per_objective = response.scores, response.model, response.objectives
        if len(scores) != len(objects):
            print(f"reward score: the service returned {len(scores)} scores for {len(objects)} items", file=sys.stderr)
            return 1

    # Written only once everything is scored, so a failed run leaves no half-written output.
    scored = [{**obj, "score": score} for obj, score in zip(objects, scores)]
    if per_objective is not None:
        for i, row in enumerate(scored):
            row["objectives"] = {name: values[i] for name, values in per_objective.items()}
    for field in ("ensemble_mean", "ensemble_std", "members"):  # an ensemble's, when asked
        values = getattr(response, field, None)
        if values is not None:
            for row, value in zip(scored, values):
                row[field] = value
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored)
    try:
        if args.output == "-":
            sys.stdout.write(lines)
            sys.stdout.flush()
        else:
            with open(args.output, "w", encoding="utf-8") as out:
                out.write(lines)
    except OSError as exc:
        print(f"reward score: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    print(f"reward score: scored {len(scores)} item(s) with {model_name}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A parser with only ``score``, for use without the project's main ``reward`` CLI."""
    parser = argparse.ArgumentParser(prog="reward", description="Call a running reward service.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_score_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
