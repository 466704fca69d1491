"""The command line: ``python -m training <command>``."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from training.config import LM_PRESETS, SENTIMENT_PRESETS, LMConfig, SentimentConfig, with_overrides
from training.data import DataError

EXIT_BAD_INPUT = 2


def _add_config_options(parser: argparse.ArgumentParser, config_type: type, presets: dict) -> None:
    group = parser.add_argument_group("model and schedule (override the preset)")
    defaults = next(iter(presets.values()))
    for f in fields(config_type):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(preset '{next(iter(presets))}': {default})")
        else:
            group.add_argument(flag, type=type(default), default=None, metavar=f.name.upper(),
                               help=f"(preset '{next(iter(presets))}': {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train stacked-LSTM text models and export them to the model store.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    lm = commands.add_parser(
        "train-lm", help="train a word-level language model (truncated BPTT, SGD)",
        description="Train a word-level LSTM language model. One sentence per line, whitespace "
        "tokens; <eos> is added after every line. Checkpoints go to RUN_DIR after every epoch.",
    )
    lm.add_argument("--train", type=Path, required=True, help="training text, e.g. ../shared/data/ptb/ptb.train.txt")
    lm.add_argument("--valid", type=Path, required=True, help="validation text (model selection)")
    lm.add_argument("--run-dir", type=Path, required=True, help="where checkpoints, metrics.json and curves.png go")
    lm.add_argument("--preset", choices=sorted(LM_PRESETS), default="small",
                    help="named configuration: Zaremba et al.'s small/medium/large, or 'cpu' (default: small)")
    lm.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    lm.add_argument("--max-minutes", type=float, default=None,
                    help="stop after the epoch that passes this wall time (resume later with --resume)")
    _add_config_options(lm, LMConfig, LM_PRESETS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python -m training " + shlex.join(argv)
    try:
        if args.command == "train-lm":
            from training.lm import train_language_model

            config = with_overrides(LM_PRESETS[args.preset], vars(args))
            train_language_model(config, args.train, args.valid, args.run_dir, args.resume, args.max_minutes, command)
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
