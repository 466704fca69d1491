"""The training command line end to end on tiny data (train, resume, export, evaluate): results, and clear
messages with exit code 2 for bad input, never a traceback."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from app.manifest import load_manifest
from app.sessions import create_session
from training.cli import EXIT_BAD_INPUT, build_parser, main

PTB_LINES = " the company said it expects N \n mr. <unk> is chairman \n" * 30


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "train.txt").write_text(PTB_LINES)
    (tmp_path / "valid.txt").write_text(PTB_LINES[:200])
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02abc")
    (tmp_path / "latin1.txt").write_bytes("cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    return tmp_path


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def _train_lm(corpus, run, *options):
    """train-lm arguments for a tiny model on the corpus fixture, into ``corpus/run``. One thread: a
    model this small gains nothing from more, and they slow it down on a busy machine."""
    return ["train-lm", "--train", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"),
            "--run-dir", str(corpus / run), "--embedding-size", "8", "--hidden-size", "8", "--batch-size", "2",
            "--bptt", "5", "--threads", "1", *options]


def _export(run_dir, store, name, *options):
    return ["export", "--run-dir", str(run_dir), "--store", str(store), "--name", name, *options]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ("missing.txt", "data file not found"),
        ("empty.txt", "data file is empty"),
        ("binary.txt", "binary file"),
        ("latin1.txt", "not valid UTF-8"),
    ],
)
def test_bad_language_model_data_exits_2_with_a_message(corpus, capsys, train, message):
    code, err = _run(["train-lm", "--train", str(corpus / train), "--valid", str(corpus / "valid.txt"),
                      "--run-dir", str(corpus / "run")], capsys)
    assert code == EXIT_BAD_INPUT
    assert message in err and "Traceback" not in err


def test_malformed_sentiment_data_exits_2(corpus, capsys):
    (corpus / "sst.txt").write_text("1 good\nnot-a-label here\n")
    code, err = _run(["train-sentiment", "--train", str(corpus / "sst.txt"), "--dev", str(corpus / "sst.txt"),
                      "--run-dir", str(corpus / "run")], capsys)
    assert code == EXIT_BAD_INPUT and "sst.txt:2" in err


def test_existing_run_and_version_are_not_overwritten(corpus, capsys):
    args = _train_lm(corpus, "run", "--epochs", "1")
    assert _run(args, capsys)[0] == 0
    code, err = _run(args, capsys)
    assert code == EXIT_BAD_INPUT and "--resume" in err
    # --resume continues the finished run: nothing left to do, the checkpoint stays.
    assert _run([*args, "--resume"], capsys)[0] == 0

    export = _export(corpus / "run", corpus / "store", "tiny-lm", "--valid", str(corpus / "valid.txt"))
    assert _run(export, capsys)[0] == 0
    manifest = (corpus / "store" / "tiny-lm" / "1" / "manifest.json").read_bytes()
    code, err = _run([*export, "--version", "1"], capsys)
    assert code == EXIT_BAD_INPUT and "already exists" in err
    assert (corpus / "store" / "tiny-lm" / "1" / "manifest.json").read_bytes() == manifest
    # Without --version the next free version is used.
    assert _run(export, capsys)[0] == 0
    assert (corpus / "store" / "tiny-lm" / "2" / "manifest.json").exists()


def test_evaluate_reproduces_the_exported_figures_and_refuses_a_bad_version(corpus, capsys):
    assert _run(_train_lm(corpus, "run", "--epochs", "1"), capsys)[0] == 0
    version = corpus / "store" / "tiny-lm" / "1"
    assert _run(_export(corpus / "run", corpus / "store", "tiny-lm", "--valid", str(corpus / "valid.txt")),
                capsys)[0] == 0
    assert main(["evaluate", str(version), str(corpus / "valid.txt"), "--graph", "full-int8",
                 "--compare-to", "full"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == load_manifest(version).metrics["valid_int8"]
    assert printed["graph"] == "full-int8" and printed["compared_to"] == "full"
    assert 0 <= printed["top1_agreement"] <= 1 and 0 <= printed["top5_agreement"] <= 1
    assert main(["evaluate", str(version), str(corpus / "valid.txt"), "--graph", "full", "--compare-to", "full"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["top1_agreement"], printed["top5_agreement"]) == (1.0, 1.0)  # a graph agrees with itself
    code, err = _run(["evaluate", str(version), str(corpus / "valid.txt"), "--compare-to", "half"], capsys)
    assert code == EXIT_BAD_INPUT and "no 'half' graph" in err

    code, err = _run(["evaluate", str(corpus), str(corpus / "valid.txt")], capsys)
    assert code == EXIT_BAD_INPUT and "manifest.json is missing" in err and "Traceback" not in err
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["graphs"]["full"]
    (version / "manifest.json").write_text(json.dumps(manifest))
    code, err = _run(["evaluate", str(version), str(corpus / "valid.txt")], capsys)
    assert code == EXIT_BAD_INPUT and "lists no 'full' graph" in err


def test_help_explains_every_option():
    parser = build_parser()
    for command in ("train-lm", "train-sentiment", "distill-sentiment", "export", "evaluate"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help"


@pytest.mark.parametrize("command", ["train-sentiment", "distill-sentiment"])
def test_a_setting_with_named_values_lists_them_and_refuses_others(command, capsys):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    assert "--lr-schedule {constant,cosine}" in sub.format_help()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([command, "--lr-schedule", "linear"])
    assert exit_info.value.code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "--lr-schedule: invalid choice: 'linear'" in error and "constant" in error and "cosine" in error


def test_real_process_exit_code_and_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training", "train-lm", "--train", str(tmp_path / "nope.txt"),
         "--valid", str(tmp_path / "nope.txt"), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert result.stderr.strip() == f"error: data file not found: {tmp_path / 'nope.txt'}"


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(corpus, capsys):
    # Dropout draws from the RNG in every window and the rate decays each epoch, so the runs agree
    # only if the weights, the optimizer and the RNG state all carry over.
    schedule = ["--epochs", "3", "--dropout", "0.3", "--decay-after", "1"]
    # --max-minutes 0 stops after the first epoch, as a session running out of time would.
    assert _run(_train_lm(corpus, "interrupted", *schedule, "--max-minutes", "0"), capsys)[0] == 0
    assert [h["epoch"] for h in json.loads((corpus / "interrupted" / "metrics.json").read_text())["history"]] == [1]
    assert _run(_train_lm(corpus, "interrupted", *schedule, "--resume"), capsys)[0] == 0
    assert _run(_train_lm(corpus, "uninterrupted", *schedule), capsys)[0] == 0

    resumed, straight = (torch.load(corpus / run / "checkpoint.pt", weights_only=True)
                         for run in ("interrupted", "uninterrupted"))
    assert resumed["epoch"] == straight["epoch"] == 3
    assert resumed["model"].keys() == straight["model"].keys()
    for name, weights in straight["model"].items():
        assert torch.equal(resumed["model"][name], weights), name
    assert resumed["optimizer"] == straight["optimizer"]
    assert torch.equal(resumed["rng"], straight["rng"])
    assert resumed["best_valid_loss"] == straight["best_valid_loss"]

    def losses(run):
        history = json.loads((corpus / run / "metrics.json").read_text())["history"]
        return [(h["epoch"], h["lr"], h["train_ppl"], h["valid_ppl"]) for h in history]

    assert [epoch for epoch, *_ in losses("uninterrupted")] == [1, 2, 3]
    assert losses("interrupted") == losses("uninterrupted")


def test_resume_may_change_the_schedule_but_not_the_model(corpus, capsys):
    args = _train_lm(corpus, "run", "--epochs", "1")
    assert _run(args, capsys)[0] == 0
    code, err = _run([*args, "--resume", "--hidden-size", "16"], capsys)
    assert code == EXIT_BAD_INPUT and "cannot change hidden_size" in err
    code, err = _run([*args, "--resume", "--normaliser", "whitespace"], capsys)
    assert code == EXIT_BAD_INPUT and "cannot change normaliser" in err
    assert _run([*args, "--resume", "--epochs", "2", "--decay-after", "1"], capsys)[0] == 0
    metrics = json.loads((corpus / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["history"][1]["lr"] == 0.5
    assert metrics["command"].count("train-lm") == 2


def test_sentiment_run_exports_with_metrics_measured_on_the_graph(tmp_path, capsys):
    lines = ["1 a gorgeous film", "1 witty and gorgeous", "0 a dull film", "0 dull and tedious"] * 4
    (tmp_path / "train").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev").write_text("1 gorgeous and witty\n0 tedious and dull\n")
    train = ["train-sentiment", "--train", str(tmp_path / "train"), "--dev", str(tmp_path / "dev"),
             "--run-dir", str(tmp_path / "run"), "--embedding-size", "8", "--hidden-size", "8", "--epochs", "2"]
    assert _run(train, capsys)[0] == 0
    checkpoint = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert checkpoint["task"] == "sentiment" and checkpoint["normaliser"] == "sst"
    export = _export(tmp_path / "run", tmp_path / "store", "tiny-sentiment", "--valid", str(tmp_path / "dev"),
                     "--note", "tiny")
    assert _run(export, capsys)[0] == 0
    manifest = json.loads((tmp_path / "store" / "tiny-sentiment" / "1" / "manifest.json").read_text())
    assert manifest["task"] == "sentiment" and manifest["labels"] == ["negative", "positive"]
    assert manifest["tokenizer"]["normaliser"] == "sst"
    assert manifest["metrics"]["valid"]["examples"] == 2
    assert 0.0 <= manifest["metrics"]["valid"]["accuracy"] <= 1.0
    assert "valid_int8" not in manifest["metrics"]  # a classifier has no int8 graph (training/export.py)
    assert manifest["training"]["note"] == "tiny" and manifest["training"]["epochs"] == 2


def test_the_training_normaliser_is_recorded_in_the_checkpoint_and_the_manifest(corpus, capsys):
    assert _run(_train_lm(corpus, "run", "--epochs", "1", "--normaliser", "whitespace"), capsys)[0] == 0
    checkpoint = torch.load(corpus / "run" / "best.pt", weights_only=True)
    assert checkpoint["task"] == "language-model" and checkpoint["normaliser"] == "whitespace"
    assert _run(_export(corpus / "run", corpus / "store", "tiny-lm"), capsys)[0] == 0
    assert load_manifest(corpus / "store" / "tiny-lm" / "1").tokenizer.normaliser == "whitespace"


def test_failed_export_leaves_no_version_behind(corpus, capsys):
    assert _run(_train_lm(corpus, "run", "--epochs", "1"), capsys)[0] == 0
    # The test file is measured on the staged graphs; when it is unreadable nothing is moved into place.
    code, err = _run(_export(corpus / "run", corpus / "store", "tiny-lm", "--test", str(corpus / "binary.txt")),
                     capsys)
    assert code == EXIT_BAD_INPUT and "binary file" in err
    assert list((corpus / "store" / "tiny-lm").iterdir()) == []


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        ({"config": {}, "vocab": [], "model": {}, "normaliser": "ptb"}, "has no 'task' key"),
        ({"task": "language-model", "config": {}, "vocab": [], "model": {}}, "has no 'normaliser' key"),
        ({"task": "translation", "normaliser": "ptb"}, "has task 'translation'"),
        ({"task": "sentiment", "normaliser": "sst", "args": argparse.Namespace(lr=1.0)}, "weights_only=True refuses"),
    ],
)
def test_checkpoint_that_does_not_say_what_it_holds_is_refused_by_name(tmp_path, capsys, checkpoint, message):
    (tmp_path / "run").mkdir()
    torch.save(checkpoint, tmp_path / "run" / "best.pt")
    code, err = _run(_export(tmp_path / "run", tmp_path / "store", "tiny-lm"), capsys)
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert str(tmp_path / "run" / "best.pt") in err and message in err


def test_a_run_can_start_from_an_exported_version(corpus, capsys):
    """--init-from reads a version's ONNX weights back: the new run starts exactly where the
    version is (same valid perplexity as the export measured), keeps its vocabulary and
    architecture, and trains on from there."""
    for untied in (False, True):
        name = "untied" if untied else "tied"
        first = _train_lm(corpus, f"first-{name}", "--epochs", "1", *(["--no-tied"] if untied else ["--tied"]))
        assert main(first) == 0
        assert main(_export(corpus / f"first-{name}", corpus / "store", f"tiny-{name}", "--version", "1",
                            "--valid", str(corpus / "valid.txt"))) == 0
        version = corpus / "store" / f"tiny-{name}" / "1"
        capsys.readouterr()
        code = main(["train-lm", "--train", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"),
                     "--run-dir", str(corpus / f"second-{name}"), "--init-from", str(version), "--batch-size", "2",
                     "--bptt", "5", "--threads", "1", "--epochs", "1", "--lr", "0.1"])
        out = capsys.readouterr().out
        assert code == 0
        starting = float(out.split("starting from")[1].split("valid ppl")[1].split()[0])
        exported = json.loads((corpus / f"first-{name}" / "metrics.json").read_text())["best_valid_ppl"]
        assert starting == pytest.approx(exported, rel=1e-3)
        checkpoint = torch.load(corpus / f"second-{name}" / "checkpoint.pt", weights_only=True)
        assert checkpoint["config"]["hidden_size"] == 8 and checkpoint["config"]["tied"] is not untied
        assert checkpoint["vocab"] == (version / "vocab.txt").read_text().split("\n")[:-1]
        assert "weights from" in checkpoint["command"]


def test_init_from_refuses_what_contradicts_the_version(corpus, capsys):
    assert main(_train_lm(corpus, "first", "--epochs", "1")) == 0
    assert main(_export(corpus / "first", corpus / "store", "tiny", "--version", "1")) == 0
    version = str(corpus / "store" / "tiny" / "1")
    base = ["train-lm", "--train", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"), "--threads", "1"]
    cases = [
        (["--run-dir", str(corpus / "a"), "--init-from", version, "--hidden-size", "16"], "--hidden-size 16"),
        (["--run-dir", str(corpus / "first"), "--init-from", version, "--resume"], "--resume continues"),
        (["--run-dir", str(corpus / "b"), "--init-from", str(corpus / "store" / "tiny")], "not a model-store"),
        (["--run-dir", str(corpus / "c"), "--init-from", version, "--normaliser", "sst"], "normaliser"),
    ]
    for options, message in cases:
        code, err = _run(base + options, capsys)
        assert code == EXIT_BAD_INPUT, options
        assert message in err and "Traceback" not in err


def test_export_from_version_writes_the_same_weights_again_with_the_training_record(corpus, capsys):
    assert _run(_train_lm(corpus, "run", "--epochs", "1"), capsys)[0] == 0
    store = corpus / "store"
    assert _run(_export(corpus / "run", store, "tiny-lm", "--note", "first"), capsys)[0] == 0
    again = ["export", "--from-version", str(store / "tiny-lm" / "1"), "--store", str(store), "--name", "tiny-lm",
             "--valid", str(corpus / "valid.txt")]
    assert _run(again, capsys)[0] == 0
    first, second = (load_manifest(store / "tiny-lm" / v) for v in ("1", "2"))
    assert second.version == 2 and second.graphs["full-int8"].activation_scales == "fixed"
    for key in ("command", "seed", "epochs", "history", "config"):
        assert second.training[key] == first.training[key]
    assert second.training["note"].startswith("first Weights exported again from tiny-lm v1")
    assert second.metrics["valid_int8"]["compared_to"] == "full"
    # The float graphs compute what the first version's do.
    zeros = np.zeros((first.architecture["layers"], 1, 8), dtype=np.float32)
    feeds = {"tokens": np.array([[1, 2, 3, 4]], dtype=np.int64), "h0": zeros, "c0": zeros}
    outputs = [create_session(store / "tiny-lm" / v / "model.onnx").run(None, feeds)[0] for v in ("1", "2")]
    assert np.array_equal(*outputs)
    # A directory that is not a version is a clear error; --run-dir and --from-version exclude each other.
    code, err = _run([*again[:2], str(corpus / "run"), *again[3:]], capsys)
    assert code == EXIT_BAD_INPUT and "not a model-store version" in err
    with pytest.raises(SystemExit):
        main([*again, "--run-dir", str(corpus / "run")])
