"""The training command line: clear messages and exit code 2 for bad input, never a traceback."""

import json
import subprocess
import sys

import pytest

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
    args = ["train-lm", "--train", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"),
            "--run-dir", str(corpus / "run"), "--embedding-size", "8", "--hidden-size", "8", "--epochs", "1",
            "--batch-size", "2", "--bptt", "5"]
    assert _run(args, capsys)[0] == 0
    code, err = _run(args, capsys)
    assert code == EXIT_BAD_INPUT and "--resume" in err
    # --resume continues the finished run: nothing left to do, the checkpoint stays.
    assert _run([*args, "--resume"], capsys)[0] == 0

    export = ["export", "--run-dir", str(corpus / "run"), "--store", str(corpus / "store"), "--name", "tiny-lm",
              "--valid", str(corpus / "valid.txt")]
    assert _run(export, capsys)[0] == 0
    manifest = (corpus / "store" / "tiny-lm" / "1" / "manifest.json").read_bytes()
    code, err = _run([*export, "--version", "1"], capsys)
    assert code == EXIT_BAD_INPUT and "already exists" in err
    assert (corpus / "store" / "tiny-lm" / "1" / "manifest.json").read_bytes() == manifest
    # Without --version the next free version is used.
    assert _run(export, capsys)[0] == 0
    assert (corpus / "store" / "tiny-lm" / "2" / "manifest.json").exists()

    code, _ = _run(["evaluate", str(corpus / "store" / "tiny-lm" / "1"), str(corpus / "valid.txt")], capsys)
    assert code == 0
    code, err = _run(["evaluate", str(corpus), str(corpus / "valid.txt")], capsys)
    assert code == EXIT_BAD_INPUT and "no manifest.json" in err


def test_help_explains_every_option():
    parser = build_parser()
    for command in ("train-lm", "train-sentiment", "export", "evaluate"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help"


def test_real_process_exit_code_and_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training", "train-lm", "--train", str(tmp_path / "nope.txt"),
         "--valid", str(tmp_path / "nope.txt"), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert result.stderr.strip() == f"error: data file not found: {tmp_path / 'nope.txt'}"


def test_interrupted_run_resumes_where_it_stopped(corpus, capsys):
    args = ["train-lm", "--train", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"),
            "--run-dir", str(corpus / "run"), "--embedding-size", "8", "--hidden-size", "8", "--epochs", "3",
            "--batch-size", "2", "--bptt", "5"]
    # --max-minutes 0 stops after the first epoch, as a session running out of time would.
    assert _run([*args, "--max-minutes", "0"], capsys)[0] == 0
    metrics = json.loads((corpus / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert _run([*args, "--resume"], capsys)[0] == 0
    metrics = json.loads((corpus / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["config"]["epochs"] == 3


def test_resume_may_change_the_schedule_but_not_the_model(corpus, capsys):
    args = ["train-lm", "--train", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"),
            "--run-dir", str(corpus / "run"), "--embedding-size", "8", "--hidden-size", "8", "--epochs", "1",
            "--batch-size", "2", "--bptt", "5"]
    assert _run(args, capsys)[0] == 0
    code, err = _run([*args, "--resume", "--hidden-size", "16"], capsys)
    assert code == EXIT_BAD_INPUT and "cannot change hidden_size" in err
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
    export = ["export", "--run-dir", str(tmp_path / "run"), "--store", str(tmp_path / "store"),
              "--name", "tiny-sentiment", "--valid", str(tmp_path / "dev"), "--note", "tiny"]
    assert _run(export, capsys)[0] == 0
    manifest = json.loads((tmp_path / "store" / "tiny-sentiment" / "1" / "manifest.json").read_text())
    assert manifest["task"] == "sentiment" and manifest["labels"] == ["negative", "positive"]
    assert manifest["metrics"]["valid"]["examples"] == 2
    assert 0.0 <= manifest["metrics"]["valid"]["accuracy"] <= 1.0
    assert manifest["metrics"]["valid_int8"]["graph"] == "full-int8"
    assert manifest["training"]["note"] == "tiny" and manifest["training"]["epochs"] == 2
