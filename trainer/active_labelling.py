"""Which candidates people should label next: ``reward queue-uncertain``.

In the InstructGPT loop the policy's samples are ranked by people and the reward model is
retrained on the rankings. Labels are the costly part, and a label teaches the RM most where the
RM does not know the answer. An ensemble says where that is: its members learned from different
bootstrap samples, so where they disagree about which response is better, the data they saw did
not settle it.

The command reads a pool of candidates (a prompt and K responses per row: PPO samples, or any
preference file ``trainer/data.py`` reads), scores every response through the service with each
member's reward (``return_members``), computes each row's **disagreement**, and queues the N
rows the members disagree on most as label tasks (``POST /v1/label/tasks``). ``--random`` picks N
rows at random instead (seeded): the baseline an experiment compares against.

Disagreement of one row, over its K(K-1)/2 pairs of responses (so rows of any K compare):

* ``order`` (the default): per pair, the members' agreement ``a``, the share of members that
  rank the first response above the second (a tie counts half); the pair's disagreement is
  ``1 - |2a - 1|``: 0 when every member orders the pair the same way, 1 when they split evenly.
  The row's is the mean over its pairs. A label says which response is better and nothing about
  by how much, so what a label can settle is the order; this is the members' doubt about it.
* ``margin_std``: per pair, the population standard deviation over members of the reward margin
  ``r_first - r_second``; the row's is the mean over its pairs. It also counts members that
  agree on the order but not on the size of the margin, which a label does not settle, and it is
  in reward units, so it depends on the model's scale.

``order`` takes few values (with M members and no exact ties, a pair's is one of floor(M/2) + 1),
so rows tie; ties go to the row with the larger ``margin_std``, then to the earlier row.
``margin_std`` rows that tie go by ``order``, then by position.

A model that is not an ensemble (or an ensemble of one) is refused: one model's reward says
nothing about what it does not know (``|r_a - r_b|`` near 0 is a close call, not doubt).
``--random`` works with any model and scores nothing.

Tasks show the responses in a seeded random order: every preference file lists the better
response first, and a labeller should not see the answer in the position.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .config_flags import add_config_subcommand, config_from_namespace, flag_help
from .data import Candidates, DataError, load_candidates
from .evaluate.report import EXIT_INPUT, EXIT_SERVICE

RULES = ("order", "margin_std")
RANDOM = "random"
# What a label task holds (client/protocol.py's MAX_COMPARISON_RESPONSES).
MAX_TASK_RESPONSES = 16
# Tasks per POST /v1/label/tasks: well under the service's --max-items.
TASKS_PER_REQUEST = 64


class QueueError(ValueError):
    """A run that cannot go on, with what to do about it."""


# --------------------------------------------------------------------------- disagreement


def pair_indices(k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (first, second) response indices of every pair of K responses."""
    first, second = np.triu_indices(k, 1)
    return first, second


def disagreements(members: np.ndarray) -> dict[str, float]:
    """Both measures of one row from its members' rewards ``[K responses, M members]``."""
    from reward_core.ensemble import member_agreement

    members = np.asarray(members, dtype=np.float64)
    first, second = pair_indices(members.shape[0])
    agreement = member_agreement(members[first], members[second])
    margins = members[first] - members[second]
    return {
        "order": float(np.mean(1.0 - np.abs(2.0 * agreement - 1.0))),
        "margin_std": float(np.mean(margins.std(axis=-1))),
    }


def rank_by_disagreement(scores: Sequence[dict[str, float]], rule: str) -> list[int]:
    """Row indices, most disagreement first by ``rule``; ties by the other measure, then by position."""
    if rule not in RULES:
        raise QueueError(f"disagreement must be one of {', '.join(RULES)}, not {rule!r}")
    other = RULES[1 - RULES.index(rule)]
    primary = np.array([s[rule] for s in scores], dtype=np.float64)
    secondary = np.array([s[other] for s in scores], dtype=np.float64)
    position = np.arange(len(scores))
    return np.lexsort((position, -secondary, -primary)).tolist()


def pick_uncertain(scores: Sequence[dict[str, float]], n: int, rule: str = "order") -> list[int]:
    """The ``n`` rows the members disagree on most, by ``rule``."""
    return rank_by_disagreement(scores, rule)[:n]


def pick_random(n_rows: int, n: int, seed: int) -> list[int]:
    """``n`` distinct rows drawn at random (seeded), in the order drawn."""
    return random.Random(seed).sample(range(n_rows), min(n, n_rows))


# --------------------------------------------------------------------------- scoring


def score_members(client: Any, pool: Sequence[Candidates], model: str | None,
                  progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """Each row's members' rewards ``[K, M]``, every distinct (prompt, response) scored once
    through the service (``return_members``)."""
    from client import RewardServiceError

    index: dict[tuple[str, str], int] = {}
    items: list[dict[str, Any]] = []
    rows: list[list[int]] = []
    for candidates in pool:
        prompt_key = json.dumps(candidates.prompt, ensure_ascii=False, sort_keys=True)
        row = []
        for response in candidates.responses:
            key = (prompt_key, response)
            if key not in index:
                index[key] = len(items)
                items.append({"prompt": candidates.prompt, "response": response})
            row.append(index[key])
        rows.append(row)
    if not items:
        return []
    response = client.score(items, model=model, return_members=True, progress=progress)
    if response.members is None or len(response.members) != len(items):
        got = "none" if response.members is None else len(response.members)
        raise RewardServiceError(None, "invalid_response", f"asked for each member's reward of {len(items)} items, got {got}")
    members = np.asarray(response.members, dtype=np.float64)
    return [members[row] for row in rows]


# --------------------------------------------------------------------------- the command


@dataclass
class QueueUncertainConfig:
    """Everything a ``reward queue-uncertain`` run takes; each field is one flag."""

    pool: list[str] = field(default_factory=list, metadata=flag_help(
        'Candidate pool: JSONL (.gz, .json) rows {"prompt", "responses"} (PPO samples, say) or of any preference '
        "format train-rm reads (repeatable).", metavar="PATH"))
    max_rows: int | None = field(default=None, metadata=flag_help("Read at most this many rows of each pool file."))
    picks: int = field(default=100, metadata=flag_help("How many rows to queue (or write, with --dry-run)."))
    disagreement: str = field(default="order", metadata=flag_help(
        "order: the members' split on which response is better, 1 - |2a - 1| per pair (a: the share of members "
        "ranking the first above the second); margin_std: the members' standard deviation of the reward margin "
        "per pair. Both the mean over a row's pairs; see docs/comparison-loop.md.", choices=RULES))
    random: bool = field(default=False, metadata=flag_help(
        "Pick --picks rows at random (seeded by --seed) instead: the baseline; any model, nothing scored."))
    seed: int = field(default=0, metadata=flag_help("Seed of --random and of the order tasks show their responses in."))
    url: str = field(default_factory=lambda: os.environ.get("REWARD_URL", "http://127.0.0.1:8000"), metadata=flag_help(
        "The service that scores the pool and keeps the label queue (env REWARD_URL)."))
    model: str | None = field(default=None, metadata=flag_help(
        "The served ensemble to ask (default: the service's default model).", metavar="NAME"))
    api_key: str | None = field(default=None, metadata=flag_help(
        "Sent as 'Authorization: Bearer KEY' (env REWARD_API_KEY); the score scope is enough."))
    out: str | None = field(default=None, metadata=flag_help(
        "Write the picks here as JSONL, best pick first: the row, where it came from, both disagreement "
        "measures and, when queued, its task id.", metavar="FILE"))
    dry_run: bool = field(default=False, metadata=flag_help(
        "Queue nothing: only write the picks to --out (no store needed)."))
    source: str = field(default="queue-uncertain", metadata=flag_help(
        "Each task's source, followed by how it was picked (e.g. 'queue-uncertain (order 0.800)')."))
    category: str | None = field(default=None, metadata=flag_help(
        "Each task's category (default: the row's own, if any)."))
    shuffle: bool = field(default=True, metadata=flag_help(
        "Show each task's responses in a seeded random order (a preference file lists the better one first)."))
    max_bad_fraction: float = field(default=0.01, metadata=flag_help(
        "Abort when more than this fraction of a pool file's rows are malformed."))
    chunk_size: int = field(default=64, metadata=flag_help("Items per score request."))
    concurrency: int = field(default=4, metadata=flag_help("Score requests in flight."))
    timeout: float = field(default=120.0, metadata=flag_help("Seconds per request."))

    def validate(self) -> None:
        if not self.pool:
            raise QueueError("give the candidate pool with --pool PATH (JSONL rows {\"prompt\", \"responses\"})")
        if self.picks < 1:
            raise QueueError("--picks must be at least 1")
        if self.dry_run and not self.out:
            raise QueueError("a dry run queues nothing and writes its picks to --out FILE: give --out")
        if self.disagreement not in RULES:
            raise QueueError(f"--disagreement must be one of {', '.join(RULES)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise QueueError("--max-rows must be at least 1")


def load_pool(paths: Sequence[str], max_rows: int | None, max_bad_fraction: float) -> tuple[list[Candidates], dict[str, Any]]:
    """Every row of the pool files, and what was read (rows per file; rows over a task's 16
    responses are set aside, counted)."""
    pool: list[Candidates] = []
    report: dict[str, Any] = {"files": [], "too_many_responses": 0}
    for path in paths:
        rows, file_report = load_candidates(path, max_rows=max_rows, max_bad_fraction=max_bad_fraction)
        fits = [r for r in rows if len(r.responses) <= MAX_TASK_RESPONSES]
        report["too_many_responses"] += len(rows) - len(fits)
        report["files"].append({"path": str(path), "rows_read": file_report.rows_read, "rows": len(fits),
                                "malformed": file_report.malformed, "formats": dict(file_report.formats)})
        pool.extend(fits)
    report["rows"] = len(pool)
    return pool, report


def label_task(candidates: Candidates, how: str, config: QueueUncertainConfig, order: list[int]) -> dict[str, Any]:
    """The task a person sees: the row's prompt and responses in ``order``."""
    task: dict[str, Any] = {"prompt": candidates.prompt, "responses": [candidates.responses[i] for i in order],
                            "source": f"{config.source} ({how})"[:200]}
    category = config.category or candidates.category
    if category:
        task["category"] = category
    return task


def _mean(scores: Sequence[dict[str, float]], rule: str) -> float | None:
    return float(np.mean([s[rule] for s in scores])) if scores else None


def queue_uncertain(config: QueueUncertainConfig, *, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score the pool, pick, write ``--out`` and queue the tasks; the run's summary.

    Raises QueueError (what to change), DataError (the pool) or RewardServiceError (the service)."""
    from client import RewardClient, served_card

    config.validate()
    pool, read = load_pool(config.pool, config.max_rows, config.max_bad_fraction)
    if not pool:
        raise QueueError("the pool has no row of 2 to 16 responses to queue")
    api_key = config.api_key or os.environ.get("REWARD_API_KEY")
    with RewardClient(config.url, api_key=api_key, chunk_size=config.chunk_size, max_concurrency=config.concurrency,
                      timeout=config.timeout) as client:
        card = served_card(client.models(), config.model, config.url)
        if not config.random and (card.ensemble is None or card.ensemble.members < 2):
            what = "is not an ensemble" if card.ensemble is None else "is an ensemble of one member"
            raise QueueError(
                f"model {card.name!r} at {config.url} {what}, and the members' disagreement is what picks the "
                "uncertain rows: serve a model trained with `reward train-rm --ensemble K` (K >= 2), or pick at "
                "random with --random"
            )
        scores: list[dict[str, float]] | None = None
        if config.random:
            picked = pick_random(len(pool), config.picks, config.seed)
        else:
            scores = [disagreements(m) for m in score_members(client, pool, card.name, progress)]
            picked = pick_uncertain(scores, config.picks, config.disagreement)

        rng = random.Random(f"{config.seed}:order")
        orders = []
        for i in picked:
            order = list(range(len(pool[i].responses)))
            if config.shuffle:
                rng.shuffle(order)
            orders.append(order)
        hows = [f"random, seed {config.seed}" if config.random else f"{config.disagreement} {scores[i][config.disagreement]:.3f}"
                for i in picked]
        task_ids: list[int] = []
        if not config.dry_run:
            tasks = [label_task(pool[i], how, config, order) for i, how, order in zip(picked, hows, orders)]
            for start in range(0, len(tasks), TASKS_PER_REQUEST):
                task_ids += client.add_label_tasks(tasks[start:start + TASKS_PER_REQUEST])

    if config.out:
        write_picks(config.out, pool, picked, scores, orders, task_ids)
    summary: dict[str, Any] = {
        "model": f"{card.name}@{card.version}", "url": config.url,
        "picker": RANDOM if config.random else config.disagreement, "seed": config.seed,
        "pool": read, "picks": len(picked), "queued": len(task_ids), "task_ids": task_ids,
        "out": config.out,
    }
    if scores is not None:
        chosen = [scores[i] for i in picked]
        summary["disagreement"] = {
            "pool": {rule: _mean(scores, rule) for rule in RULES},
            "picks": {rule: _mean(chosen, rule) for rule in RULES},
        }
    return summary


def write_picks(path: str, pool: Sequence[Candidates], picked: Sequence[int], scores: Sequence[dict[str, float]] | None,
                orders: Sequence[list[int]], task_ids: Sequence[int]) -> None:
    """The picks as JSONL, best pick first (``rank`` 0): the row as read (``responses`` in the
    pool's order, ``ranking`` when it had one), where it came from, ``disagreement`` (both
    measures, when scored), ``shown_order`` (the pool indices in the order the task shows them)
    and ``task_id`` when queued."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rank, (i, order) in enumerate(zip(picked, orders)):
            c = pool[i]
            row: dict[str, Any] = {"rank": rank, "source": c.source, "line": c.line, "prompt": c.prompt,
                                   "responses": c.responses, "shown_order": order}
            if c.ranking is not None:
                row["ranking"] = c.ranking
            if c.category is not None:
                row["category"] = c.category
            if scores is not None:
                row["disagreement"] = scores[i]
            if task_ids:
                row["task_id"] = task_ids[rank]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def add_queue_uncertain_parser(subparsers) -> argparse.ArgumentParser:
    return add_config_subcommand(
        subparsers, "queue-uncertain", QueueUncertainConfig, run_queue_uncertain,
        help="queue for labelling the candidates the served ensemble's members disagree on most",
        description=(
            "Score a pool of candidates (a prompt and K responses per row) through the service with each member of "
            "the served ensemble, and queue the --picks rows whose members disagree most about which response is "
            "better as label tasks (POST /v1/label/tasks); --random picks at random instead (the baseline); "
            "--dry-run --out FILE only writes the picks."
        ),
    )


def run_queue_uncertain(args: argparse.Namespace) -> int:
    from client import RewardServiceError

    from .evaluate.scoring import service_error_message
    from .utils import progress_bar

    config = config_from_namespace(QueueUncertainConfig, args)
    try:
        with progress_bar(enabled=not config.random) as bar:  # --random scores nothing
            task = bar.add_task("scoring the pool", total=None)
            summary = queue_uncertain(config, progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (QueueError, DataError) as exc:
        print(f"reward queue-uncertain: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except RewardServiceError as exc:
        print(f"reward queue-uncertain: {service_error_message(exc)}", file=sys.stderr)
        return EXIT_SERVICE
    print(json.dumps(summary, indent=2))
    return 0

