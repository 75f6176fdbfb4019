"""Config dataclass <-> argparse flags, one flag per field (the pattern of ``reward train-rm``).

A field ``per_device_batch_size`` becomes ``--per-device-batch-size``; its ``metadata`` holds the
help text and any extra ``add_argument`` keywords (``choices``, ``metavar``...). Booleans get
``--flag/--no-flag``, lists are repeatable, ``X | None`` fields take an ``X``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import fields
from typing import Any


def flag_help(text: str, **extra: Any) -> dict[str, Any]:
    """A config field's ``metadata``: its help text plus any extra ``add_argument`` keywords."""
    return {"help": text, **extra}


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        meta = dict(f.metadata)
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta.pop("help", None)}
        kwargs.update(meta)
        annotation = hints[f.name]
        args = typing.get_args(annotation)
        base = next((a for a in args if a is not type(None)), annotation) if args and type(None) in args else annotation
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list or base is list:
            kwargs["action"] = "append"
            element = (typing.get_args(base) or (str,))[0]
            if element in (int, float):
                kwargs["type"] = element
        else:
            kwargs["type"] = base
        kwargs["default"] = default if not isinstance(default, list) else None
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def add_config_subcommand(
    subparsers, name: str, config_class: type, run: Any, *, help: str, description: str,
) -> argparse.ArgumentParser:
    """The ``reward NAME`` subcommand of a trainer: one flag per field of its config dataclass,
    defaults shown in ``--help``, ``run(args)`` as what it does."""
    parser = subparsers.add_parser(
        name, help=help, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_flags(parser, config_class)
    parser.set_defaults(func=run)
    return parser


def config_from_namespace(config_class: type, args: argparse.Namespace) -> Any:
    values: dict[str, Any] = {}
    for f in fields(config_class):
        value = getattr(args, f.name, None)
        if value is None and f.default_factory is not dataclasses.MISSING:
            continue
        values[f.name] = value
    return config_class(**values)
