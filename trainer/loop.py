"""The comparison loop in one command: ``reward loop``.

1. **export** every comparison in the store (``--from-store``, the database ``reward serve --store``
   writes) and train a new reward model on them, mixed with any ``--data`` files (``reward
   train-rm``; every train-rm flag works here);
2. **evaluate** the new version against the model the service is serving, on the ``--dev-data``
   sets, through the eval harness (``trainer/evaluate/``): both are scored over HTTP, the served
   one where it is and the candidate by a temporary ``reward serve`` on a free loopback port;
3. **deploy** it only if its mean dev accuracy is not below the served model's by more than
   ``--threshold``: the service hot-reloads it (``POST /v1/models/{name}/reload``) and
   ``VERSIONS_DIR/current`` is pointed at it, so a service started with
   ``--model NAME=VERSIONS_DIR/current`` serves it after a restart too.

Every run leaves ``VERSIONS_DIR/<version>/`` (the model, ``comparisons.jsonl``, ``eval/report.json``
and ``report.md``, ``decision.json``) and a line in ``VERSIONS_DIR/history.jsonl``, deployed or not.

``reward export-comparisons`` writes the store's comparisons as rankings JSONL, for a look at the
data or a training run elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from .config_flags import add_config_flags
from .data import DataError
from .evaluate.config import EvalConfig
from .evaluate.datasets import ItemPool, build_preference_report, load_datasets
from .evaluate.report import EXIT_INPUT, EXIT_SERVICE, to_jsonable, write_report
from .evaluate.scoring import Target, score_through_service, service_error_message
from .reward_config import RewardTrainingConfig, TrainingConfigError, config_from_args

CURRENT = "current"
HISTORY = "history.jsonl"
CANDIDATE = "candidate"


# --------------------------------------------------------------------------- export-comparisons


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-comparisons", help="write stored comparisons as rankings JSONL for train-rm",
        description="Write the comparisons in a store (the URL given to `reward serve --store`) as JSONL rows of the "
        "rankings format (prompt, responses, ranking best first, category) that `reward train-rm --data` reads.",
    )
    parser.add_argument("--store", required=True, metavar="URL", help="sqlite:///PATH or postgresql://...")
    parser.add_argument("--out", required=True, metavar="FILE", help="the JSONL file to write (replaced atomically)")
    parser.add_argument("--since", type=_datetime, default=None, help="only comparisons stored at or after (ISO 8601)")
    parser.add_argument("--until", type=_datetime, default=None, help="only comparisons stored before (ISO 8601)")
    parser.add_argument("--labeller", default=None, help="only this labeller's")
    parser.add_argument("--category", default=None, help="only this category")
    parser.set_defaults(func=run_export)
    return parser


def _datetime(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time such as 2026-11-23T14:00:00") from exc
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def run_export(args: argparse.Namespace) -> int:
    from reward_core.store import ComparisonStore, Filters, StoreError, export_jsonl

    try:
        store = ComparisonStore(args.store, migrate=False)
        try:
            filters = Filters(since=args.since, until=args.until, labeller=args.labeller, category=args.category)
            n = export_jsonl(store, args.out, filters)
        finally:
            store.close()
    except (StoreError, OSError) as exc:
        print(f"reward export-comparisons: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(json.dumps({"rows": n, "out": str(args.out)}))
    return 0


# --------------------------------------------------------------------------- loop


def add_loop_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "loop", help="retrain on stored comparisons, evaluate against the served model, deploy if not worse",
        description=(
            "Train a new reward model on the stored comparisons (--from-store, plus any --data), evaluate it "
            "against the model the service at --url serves on the --dev-data sets, and hot-reload it into the "
            "service only if its mean dev accuracy is at most --threshold below the served one's. Every "
            "`reward train-rm` flag works here; --output-dir defaults to VERSIONS_DIR/<version>."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_flags(parser, RewardTrainingConfig)
    parser.set_defaults(output_dir=None, progress=False)
    loop = parser.add_argument_group("the loop")
    loop.add_argument("--url", default=os.environ.get("REWARD_URL", "http://127.0.0.1:8000"),
                      help="the running service (env REWARD_URL)")
    loop.add_argument("--model", default=None, metavar="NAME", help="the served model to replace (default: the service's default)")
    loop.add_argument("--versions-dir", required=True, metavar="DIR",
                      help="where versions are written; DIR/current points at the deployed one")
    loop.add_argument("--dev-data", action="append", required=True, metavar="[NAME=]PATH[::MAX_ROWS]",
                      help="dev set judging candidate against served (repeatable; any format train-rm reads)")
    loop.add_argument("--threshold", type=float, default=0.01,
                      help="deploy when candidate mean dev accuracy >= served - THRESHOLD (0.01 = one point)")
    loop.add_argument("--reload-token", default=None,
                      help="the service's REWARD_RELOAD_TOKEN (env REWARD_RELOAD_TOKEN); with API keys on, give --api-key")
    loop.add_argument("--api-key", default=None,
                      help="an API key with score and admin scopes (env REWARD_API_KEY)")
    loop.add_argument("--serve-timeout", type=float, default=600.0, help="seconds to wait for the candidate's server to be ready")
    parser.set_defaults(func=run_loop)
    return parser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    """Block until a `reward serve` we started answers /readyz; RuntimeError if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"reward serve exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"reward serve was not ready after {timeout:g} s; see {log_path}")
        time.sleep(0.25)


@contextlib.contextmanager
def local_server(
    models: dict[str, Path], log_path: Path, timeout: float, extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """``reward serve`` of ``models`` (name -> directory) on a free loopback port, with
    ``extra_args`` (e.g. ``--device cuda``), stopped afterwards; yields its URL."""
    port = _free_port()
    command = [sys.executable, "-m", "reward_cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               *[f"--model={name}={path}" for name, path in models.items()], *extra_args]
    # Its own settings only: the operator's REWARD_* (keys, store, models) are for the real service.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARD_") or k in ("REWARD_DEVICE", "REWARD_DTYPE")}
    env.update(REWARD_SHUTDOWN_DRAIN_S="0", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(url, process, timeout, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def candidate_server(model_dir: Path, log_path: Path, timeout: float):
    """``reward serve`` of the candidate alone (see :func:`local_server`)."""
    return local_server({CANDIDATE: model_dir}, log_path, timeout)


def _admin_headers(args: argparse.Namespace) -> dict[str, str]:
    secret = args.api_key or os.environ.get("REWARD_API_KEY") or args.reload_token or os.environ.get("REWARD_RELOAD_TOKEN")
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def _new_version_name(versions_dir: Path) -> str:
    stamp = datetime.now(timezone.utc).strftime("v%Y%m%d-%H%M%S")
    name, n = stamp, 1
    while (versions_dir / name).exists():
        n += 1
        name = f"{stamp}-{n}"
    return name


def decide(report: dict[str, Any], served: str, candidate: str, threshold: float) -> dict[str, Any]:
    """Deploy when the candidate's mean dev accuracy is at most ``threshold`` below the served model's."""
    served_acc = report["summary"][served]["mean_accuracy"]
    candidate_acc = report["summary"][candidate]["mean_accuracy"]
    per_set = {}
    for name, d in report["datasets"].items():
        side = next(c for c in d["comparisons"] if {c["a"], c["b"]} == {served, candidate})
        # The harness reports accuracy b - a with its paired-bootstrap interval; we want candidate - served.
        if side["a"] == served:
            diff, low, high = side["diff"], side["diff_ci_low"], side["diff_ci_high"]
        else:
            diff, low, high = -side["diff"], -side["diff_ci_high"], -side["diff_ci_low"]
        per_set[name] = {
            "n_pairs": d["n_pairs"], "served": d["models"][served]["accuracy"], "candidate": d["models"][candidate]["accuracy"],
            "candidate_minus_served": diff, "ci95": [low, high],
        }
    deploy = candidate_acc >= served_acc - threshold
    return {
        "deploy": deploy, "threshold": threshold, "served_mean_accuracy": served_acc, "candidate_mean_accuracy": candidate_acc,
        "per_dev_set": per_set,
        "why": (f"candidate {candidate_acc:.4f} >= served {served_acc:.4f} - {threshold:g}" if deploy
                else f"candidate {candidate_acc:.4f} < served {served_acc:.4f} - {threshold:g}: kept the served model"),
    }


def _fail(message: str, code: int) -> int:
    print(f"reward loop: {message}", file=sys.stderr)
    return code


def run_loop(args: argparse.Namespace) -> int:
    import httpx

    from client import RewardClient, RewardServiceError, served_card
    from reward_core.model_dir import ModelDirError

    if not args.from_store and not args.data:
        return _fail("give --from-store URL (the database `reward serve --store` writes) and/or --data files", EXIT_INPUT)
    if args.threshold < 0:
        return _fail("--threshold must be >= 0 (how much worse than the served model a candidate may be)", EXIT_INPUT)
    versions_dir = Path(args.versions_dir)
    api_key = args.api_key or os.environ.get("REWARD_API_KEY")

    # The served model first: no point training for a service that is not there.
    try:
        with RewardClient(args.url, api_key=api_key, max_retries=2) as client:
            card = served_card(client.models(), args.model, args.url)
    except RewardServiceError as exc:
        return _fail(service_error_message(exc), EXIT_SERVICE)
    served_label = card.name if card.name != CANDIDATE else f"{card.name}-served"

    version = _new_version_name(versions_dir)
    args.output_dir = args.output_dir or str(versions_dir / version)
    out = Path(args.output_dir)
    print(f"reward loop: serving {card.name}@{card.version} at {args.url}; training {out}", file=sys.stderr)
    try:
        from .reward import train_reward_model

        result = train_reward_model(config_from_args(args))
    except (DataError, TrainingConfigError, ModelDirError) as exc:
        return _fail(str(exc), EXIT_INPUT)
    if not result.finished:
        return _fail(f"training stopped before the end (--stop-after-steps?); {out} is not a finished model", EXIT_INPUT)

    # Evaluate both through the service, as PPO would see them.
    pool = ItemPool()
    try:
        datasets = load_datasets(args.dev_data, pool, args.max_bad_fraction)
    except DataError as exc:
        return _fail(f"{exc}; nothing to evaluate on", EXIT_INPUT)
    eval_config = EvalConfig(api_key=api_key)  # the eval's defaults: seed 0, 2000 bootstrap resamples...
    targets = [Target(args.url, card.name), Target("", CANDIDATE)]
    try:
        with candidate_server(out, out / "candidate-serve.log", args.serve_timeout) as candidate_url:
            targets[1].url = candidate_url
            scores, timing, heads, ensembles = score_through_service(eval_config, targets, pool, resolve=True)
    except RuntimeError as exc:
        return _fail(str(exc), EXIT_SERVICE)
    except RewardServiceError as exc:
        return _fail(service_error_message(exc), EXIT_SERVICE)
    report_config = eval_config.preference_report_config(datasets)
    report = build_preference_report(datasets, scores, [t.describe() for t in targets], report_config, timing, heads,
                                     ensembles)
    served_label, candidate_label = targets[0].label, targets[1].label
    (out / "eval").mkdir(parents=True, exist_ok=True)
    write_report(report, out / "eval")
    decision = decide(report, served_label, candidate_label, args.threshold)
    decision.update(version=out.name, path=str(out.resolve()), served_before=f"{card.name}@{card.version}",
                    model=card.name, comparisons=_count_lines(out / "comparisons.jsonl"), deployed=False)

    if decision["deploy"]:
        try:
            response = httpx.post(
                f"{args.url.rstrip('/')}/v1/models/{card.name}/reload", json={"path": str(out.resolve())},
                headers=_admin_headers(args), timeout=max(args.serve_timeout, 60),
            )
        except httpx.HTTPError as exc:
            decision["why"] += f"; but the reload request failed ({type(exc).__name__}: {exc})"
            return _finish(versions_dir, out, decision, EXIT_SERVICE)
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            decision["why"] += f"; but the service refused the reload (HTTP {response.status_code}: {message})"
            return _finish(versions_dir, out, decision, EXIT_SERVICE)
        decision["deployed"] = True
        decision["served_after"] = f"{card.name}@{response.json()['model']['version']}"
        _point_current_at(versions_dir, out)
    return _finish(versions_dir, out, decision, 0)


def _point_current_at(versions_dir: Path, version_dir: Path) -> None:
    """VERSIONS_DIR/current -> the version, replaced atomically (a rename over the old link)."""
    link = versions_dir / CURRENT
    tmp = versions_dir / f".{CURRENT}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    target = os.path.relpath(version_dir.resolve(), versions_dir.resolve())
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _finish(versions_dir: Path, out: Path, decision: dict[str, Any], code: int) -> int:
    decision["finished_at"] = datetime.now(timezone.utc).isoformat()
    text = json.dumps(to_jsonable(decision), indent=2)
    (out / "decision.json").write_text(text + "\n", encoding="utf-8")
    versions_dir.mkdir(parents=True, exist_ok=True)
    with open(versions_dir / HISTORY, "a", encoding="utf-8") as f:
        f.write(json.dumps(to_jsonable(decision)) + "\n")
    print(text)
    verdict = "deployed" if decision["deployed"] else "not deployed"
    print(f"reward loop: {out.name} {verdict}: {decision['why']}", file=sys.stderr)
    return code
