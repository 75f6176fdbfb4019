"""``reward serve``: the service's command-line flags, one per ServiceSettings field."""

from __future__ import annotations

import argparse
import logging
import sys


def add_serve_parser(subparsers) -> None:
    from .settings import ServiceSettings

    parser = subparsers.add_parser(
        "serve", help="serve reward models over HTTP",
        description="Serve reward models over HTTP. Every flag can also be set as REWARD_<NAME> in the environment.",
    )
    fields = ServiceSettings.model_fields
    parser.add_argument(
        "--model", dest="models", action="append", metavar="NAME=PATH",
        help=f"{fields['models'].description} Repeatable. Default: the shipped default reward model.",
    )
    for name, field in fields.items():
        if name == "models":
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            default = "" if field.default is None else f" (default: {field.default})"  # None: the description says
            parser.add_argument(flag, dest=name, default=None, help=f"{field.description}{default}")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import os

    from pydantic import ValidationError

    from .auth import KeyFileError, KeyRing, is_loopback, load_keys
    from .logs import configure_logging
    from .settings import ServiceSettings

    overrides = {k: v for k, v in vars(args).items() if k in ServiceSettings.model_fields and v is not None}
    try:
        settings = ServiceSettings(**overrides)
        settings.model_paths()
        keys = KeyRing(load_keys(settings.api_key, settings.api_keys_file, settings.api_keys))
    except (ValidationError, ValueError, KeyFileError) as exc:
        print(f"reward serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    if not keys.enabled and not is_loopback(settings.host) and not settings.insecure:
        print(
            f"reward serve: refusing to bind {settings.host} without API keys: anyone who can reach it could "
            "use the models. Give --api-key, --api-keys or --api-keys-file (or REWARD_API_KEY, REWARD_API_KEYS, "
            "REWARD_API_KEYS_FILE), bind "
            "127.0.0.1, or pass --insecure if the network in front of it does the access control.",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("service")
    log.info("authentication %s", f"on ({len(keys.keys)} keys)" if keys.enabled else "off (loopback only)")

    store = None
    if settings.store:
        # Opened (and migrated) before the models load, so a wrong URL or a database that is
        # down stops the start at once with the reason.
        from reward_core.store import ComparisonStore, StoreError

        try:
            store = ComparisonStore(settings.store)
        except StoreError as exc:
            print(f"reward serve: {exc}", file=sys.stderr)
            return 2
        log.info("comparisons are stored in %s", store.display_url)

    # One level of parallelism for tokenisation: the --tokenizer-threads pool. The fast
    # tokenizer's own thread pool (rayon, one thread per core) inside each of those threads would
    # compete with the backend's intra-op threads for the same cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from .app import create_app
    from reward_core.model_dir import ModelDirError
    from .registry import load_models
    from .server import server_for

    torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
    try:
        models = load_models(settings)
    except ModelDirError as exc:
        # No half-ready server: a model that cannot load stops the process with the reason.
        log.error("cannot load a model: %s", exc)
        print(f"reward serve: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, models, keys, store)
    server = server_for(app, settings)
    server.run()
    # uvicorn reports a failed start (port in use, say) by setting started=False and returning.
    return 0 if server.started else 1
