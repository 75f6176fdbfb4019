"""What the trainers (``reward train-rm``, ``reward sft``, ``reward ppo``) share: one way each to
turn dropout off, pick the torch device, show a progress bar and swap a directory into place.

Importing this module loads neither torch nor rich (``reward eval`` and the CLI stay light); each
function imports what it needs.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator

# Float attributes through which attention modules apply dropout without an nn.Dropout
# (Llama/Qwen2's ``attention_dropout``, SDPA encoders' ``dropout_prob``), copied from the config.
DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout_prob")


def disable_dropout(model: Any) -> None:
    """Every dropout probability of ``model`` to 0: each ``nn.Dropout``'s ``p`` and the float
    dropout attributes of attention modules (:data:`DROPOUT_ATTRIBUTES`). ``model.config`` is left
    as it is, so a saved ``config.json`` keeps the architecture's own values."""
    import torch.nn as nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def resolve_device(name: str, local_rank: int = 0, error: type[Exception] = ValueError):
    """The torch device a ``--device`` value names: ``auto`` is CUDA when torch sees a CUDA device,
    else the CPU; ``cuda`` is ``cuda:<local_rank>`` (the process's own GPU under torchrun);
    ``cpu`` and ``cuda:N`` as given. Raises ``error`` when CUDA is asked for and torch sees none."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise error(f"device {name} was asked for but torch sees no CUDA device")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


def progress_bar(enabled: bool = True, *, console: Any = None, stats: bool = False, keep: bool = False):
    """A rich progress bar on stderr: ``description  bar  done/total  elapsed  remaining``, then
    the task's ``stats`` field when ``stats`` (give ``stats=""`` to ``add_task``).

    By default it disappears when done and shows nothing when stderr is not a terminal; with
    ``keep`` it stays on screen and its last state is printed into a log. ``enabled=False``: no bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    if stats:
        columns.append(TextColumn("{task.fields[stats]}"))
    shown = enabled and (keep or console.is_terminal)
    return Progress(*columns, console=console, disable=not shown, transient=not keep)


@contextlib.contextmanager
def replace_dir(target: Path) -> Iterator[Path]:
    """Write a directory atomically: yields an empty temporary directory beside ``target``
    (``.<name>.tmp``); when the block ends without an error it takes ``target``'s place.

    The swap is ``target -> <name>.old``, ``tmp -> target``, then ``<name>.old`` is removed, so a
    kill at any point leaves a complete directory at ``target`` or at ``<name>.old`` (resuming
    code looks at both). On an error the temporary directory is left for the next call to clear."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp"
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)

