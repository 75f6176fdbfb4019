"""`reward eval`'s flags map one to one onto EvalConfig, the dataclass its run functions (and
`reward loop`) take: every parsed flag is a field, with the field's default."""

from __future__ import annotations

import argparse
import dataclasses

from trainer.evaluate.cli import add_eval_parser
from trainer.evaluate.config import EvalConfig


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reward")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_every_flag_is_a_field_and_the_defaults_agree():
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    preference = parse(["eval"])
    best_of_n = parse(["eval", "best-of-n", "--policy", "p", "--prompts", "f"])
    assert set(vars(preference)) - {"command", "func"} | set(vars(best_of_n)) - {"command", "func"} == fields
    assert EvalConfig.from_namespace(preference) == EvalConfig()
    assert EvalConfig.from_namespace(best_of_n) == EvalConfig(eval_mode="best-of-n", policy="p", prompts="f")


def test_flags_before_the_mode_are_kept():
    args = parse(["eval", "--seed", "3", "--url", "http://a", "--no-plots",
                  "best-of-n", "--policy", "p", "--data", "d.jsonl", "--n", "4"])
    config = EvalConfig.from_namespace(args)
    assert (config.seed, config.urls, config.plots, config.bon_data, config.n_samples) == (3, ["http://a"], False, "d.jsonl", 4)
