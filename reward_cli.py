"""``reward``: the one command line of the project.

Each subcommand's flags are declared beside the code they configure and imported lazily, so
``reward score`` never loads torch, and this module is the only place that knows both the
service and the trainer.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

# subcommand -> (module, function adding its parser, one-line help). Only the chosen
# subcommand's module is imported.
_SUBCOMMANDS = {
    "serve": ("service.cli", "add_serve_parser", "serve reward models over HTTP"),
    "score": ("client.cli", "add_score_parser", "score a JSONL file of items with a running service"),
    "train-rm": ("trainer.reward", "add_train_rm_parser", "train a reward model on preference data"),
    "eval": ("trainer.evaluate.cli", "add_eval_parser", "evaluate served reward models: accuracy, calibration, side by side, best-of-N"),
    "augment": ("trainer.augment", "add_augment_parser", "write synthetic comparisons (dismissive and off-topic answers) from a source's prompts"),
    "sft": ("trainer.sft", "add_sft_parser", "fine-tune a causal LM on demonstrations (the chosen answers of preference data)"),
    "ppo": ("trainer.ppo", "add_ppo_parser", "RLHF: PPO on a policy from `reward sft`, rewards from a running `reward serve`"),
    "export-comparisons": ("trainer.loop", "add_export_parser", "write stored comparisons as rankings JSONL for train-rm"),
    "loop": ("trainer.loop", "add_loop_parser", "retrain on stored comparisons, evaluate against the served model, deploy if not worse"),
    "queue-uncertain": ("trainer.active_labelling", "add_queue_uncertain_parser", "queue for labelling the candidates the served ensemble's members disagree on most"),
    "export-onnx": ("trainer.export", "add_export_onnx_parser", "export a reward-model directory to ONNX (optionally int8) for --backend onnx"),
    "export-warm": ("trainer.warm", "add_export_warm_parser", "average an ensemble's members into one single reward model (WARM)"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="reward", description="Train, serve and call reward models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, function_name, help_text) in _SUBCOMMANDS.items():
        if name == chosen:
            getattr(importlib.import_module(module_name), function_name)(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
