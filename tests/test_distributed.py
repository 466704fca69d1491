"""Training under torchrun: two CPU processes (gloo) against one, on tiny data built here.

Tolerances. With dropout off, two processes compute what one does in a different float32 order:
each rank's mean over its half of the rows, gloo's sum of the two gradients, then the division by
two; the difference starts at float32 rounding (about 1e-7 relative) and stays there over the few
hundred steps of these runs (measured: weights 1e-7 apart, perplexities 4e-8 relative). The
tolerances below, 1e-5 for weights and perplexities, are a hundred times that, and far below what a
real mistake does: scaling the gradient by 1.01 moves these weights by 7e-3. A resumed run repeats
an uninterrupted one's arithmetic exactly, so it must match exactly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from training.cli import EXIT_BAD_INPUT, main
from training.config import LMConfig, SentimentConfig
from training.data import DataError
from training.distributed import Worker
from training.lm import train_language_model
from training.sentiment import train_sentiment

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
WORDS = "the company said it expects N mr. <unk> is chairman stock fell a of to and in market will has new".split()
POSITIVE = ["a gorgeous film", "witty and gorgeous", "a witty film", "gorgeous", "a good movie", "good and witty"]
NEGATIVE = ["a dull film", "dull and tedious", "a tedious film", "dull", "a bad movie", "bad and dull"]


def torchrun(*args: str) -> subprocess.Popen:
    """Start ``python -m training ARGS`` as two CPU processes under torchrun, one thread each."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training",
         *args, "--threads", "1"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def finished(launch: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    """The launch's result, once it has succeeded."""
    try:
        stdout, stderr = launch.communicate(timeout=timeout)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.communicate()
    assert launch.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(launch.args, launch.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    # Sentences of 3 to 12 words drawn from 20, a few thousand tokens: enough for ~90 BPTT windows an epoch.
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(n),), generator=generator))
             for n in torch.randint(3, 13, (300,), generator=generator)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "valid.txt").write_text("\n".join(lines[:40]) + "\n")
    # 33 examples in batches of 4: the last batch holds one, so one of the two ranks has no row of it.
    examples = [f"1 {s}" for s in POSITIVE] + [f"0 {s}" for s in NEGATIVE]
    (root / "sst-train").write_text("\n".join((examples * 3)[:33]) + "\n")
    (root / "sst-dev").write_text("1 gorgeous and witty\n0 tedious and dull\n1 witty\n0 tedious\n1 good film\n")
    return root


def lm_args(data: Path, run: str, *options: str, device: tuple[str, ...] = ("--device", "cpu")) -> list[str]:
    """A tiny language model on ``data``; on the CPU (gloo) unless ``device`` says otherwise."""
    return ["train-lm", "--train", str(data / "train.txt"), "--valid", str(data / "valid.txt"),
            "--run-dir", str(data / run), "--embedding-size", "16", "--hidden-size", "16", "--batch-size", "4",
            "--bptt", "7", "--decay-after", "1", "--dropout", "0", *device, *options]


def sentiment_args(data: Path, run: str) -> list[str]:
    return ["train-sentiment", "--train", str(data / "sst-train"), "--dev", str(data / "sst-dev"),
            "--run-dir", str(data / run), "--embedding-size", "8", "--hidden-size", "8", "--batch-size", "4",
            "--lr", "0.05", "--dropout", "0", "--epochs", "3", "--evals-per-epoch", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def launches(data: Path) -> Iterator[dict[str, subprocess.Popen]]:
    """The independent two-process runs, started together so that their start-up (each process
    imports torch) overlaps; a test waits for the one it needs with `finished`."""
    started = {
        "lm-two": torchrun(*lm_args(data, "lm-two", "--epochs", "2")),  # uninterrupted, two epochs
        "lm-resumed": torchrun(*lm_args(data, "lm-resumed", "--epochs", "1")),  # continued by a test
        "sst-two": torchrun(*sentiment_args(data, "sst-two")),
    }
    yield started
    for launch in started.values():
        if launch.poll() is None:
            launch.kill()
            launch.communicate()


def history(run_dir: Path, *keys: str) -> list[tuple]:
    return [tuple(h[k] for k in keys) for h in json.loads((run_dir / "metrics.json").read_text())["history"]]


def assert_same_weights(a: dict, b: dict, tolerance: float) -> None:
    assert a.keys() == b.keys()  # the plain module's names: no DistributedDataParallel "module." prefix
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=tolerance, msg=name)


def test_two_processes_train_the_language_model_that_one_process_trains(data, launches, capsys):
    assert main([*lm_args(data, "lm-one", "--epochs", "2"), "--threads", "1"]) == 0
    two_process_lm = finished(launches["lm-two"])
    one, two = data / "lm-one", data / "lm-two"
    assert history(two, "epoch", "lr") == history(one, "epoch", "lr") == [(1, 1.0), (2, 0.5)]
    for (train_one, valid_one), (train_two, valid_two) in zip(history(one, "train_ppl", "valid_ppl"),
                                                              history(two, "train_ppl", "valid_ppl"), strict=True):
        assert train_two == pytest.approx(train_one, rel=TOLERANCE)
        assert valid_two == pytest.approx(valid_one, rel=TOLERANCE)
    checkpoints = [torch.load(run / "checkpoint.pt", weights_only=True) for run in (one, two)]
    assert_same_weights(checkpoints[0]["model"], checkpoints[1]["model"], TOLERANCE)
    assert checkpoints[1]["task"] == "language-model" and checkpoints[1]["epoch"] == 2

    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["command"].startswith("torchrun --nnodes 1 --nproc_per_node 2 ")
    # Rank 0 alone reports: one summary line, one line per epoch.
    assert two_process_lm.stdout.count("vocabulary ") == 1
    assert two_process_lm.stdout.count("epoch   2 |") == 1
    assert "2 processes on cpu (gloo), 2 of the 4 rows each" in two_process_lm.stdout


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(data, launches):
    finished(launches["lm-resumed"])  # one epoch
    second = finished(torchrun(*lm_args(data, "lm-resumed", "--epochs", "2", "--resume")))
    assert "resuming" in second.stdout and second.stdout.count("epoch   2 |") == 1
    finished(launches["lm-two"])

    resumed, straight = (torch.load(data / run / "checkpoint.pt", weights_only=True)
                         for run in ("lm-resumed", "lm-two"))
    assert resumed["epoch"] == straight["epoch"] == 2
    assert_same_weights(straight["model"], resumed["model"], tolerance=0)
    assert resumed["optimizer"] == straight["optimizer"]
    keys = ("epoch", "lr", "train_ppl", "valid_ppl")
    assert history(data / "lm-resumed", *keys) == history(data / "lm-two", *keys)


def test_two_processes_train_the_classifier_that_one_process_trains(data, launches, capsys):
    assert main([*sentiment_args(data, "sst-one"), "--threads", "1"]) == 0
    two = finished(launches["sst-two"])

    keys = ("epoch", "train_accuracy", "dev_accuracy")
    assert history(data / "sst-two", *keys) == history(data / "sst-one", *keys)
    losses = zip(history(data / "sst-one", "train_loss"), history(data / "sst-two", "train_loss"), strict=True)
    for (one,), (two_loss,) in losses:
        assert two_loss == pytest.approx(one, rel=TOLERANCE)
    best = [torch.load(data / run / "best.pt", weights_only=True) for run in ("sst-one", "sst-two")]
    assert best[0]["epoch"] == best[1]["epoch"]  # the same model chosen
    assert_same_weights(best[0]["model"], best[1]["model"], TOLERANCE)
    assert two.stdout.count("dev acc") == 6  # three epochs, two evaluations each, printed by rank 0 alone


def test_a_worker_that_dies_fails_the_run_promptly(data):
    """SIGKILL one of the two workers partway through training, as the kernel's OOM killer would:
    torchrun stops the other and exits non-zero within seconds, naming the failed rank."""
    run = data / "lm-killed"
    launcher = torchrun(*lm_args(data, "lm-killed", "--epochs", "1000"))
    try:
        deadline = time.monotonic() + 90
        while not (run / "checkpoint.pt").exists():  # both ranks are past their first epoch
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.05)
        os.kill(_worker_pid(launcher.pid, rank=1), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=60)
        assert time.monotonic() - killed < 30
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0
    # torchrun's report: the run failed, and the first failure was rank 1, killed.
    assert "FAILED" in stderr and re.search(r"rank\s*:\s*1\b", stderr) and "SIGKILL" in stderr
    assert json.loads((run / "metrics.json").read_text())["history"][-1]["epoch"] < 1000


def _worker_pid(launcher: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank among the launcher's children (Linux /proc)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = next(line for line in status.read_text().splitlines() if line.startswith("PPid:"))
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        if int(parent.split()[1]) == launcher and f"RANK={rank}".encode() in environ:
            return int(status.parent.name)
    raise AssertionError(f"no worker with rank {rank} under pid {launcher}")


def test_the_global_batch_must_split_evenly_among_the_processes(data):
    # The check comes before any collective, so a Worker that only says "rank 0 of 3" is enough.
    three = Worker(rank=0, world_size=3)
    with pytest.raises(DataError, match="batch size 4 is the global batch.*multiple of 3"):
        train_language_model(LMConfig(batch_size=4), data / "train.txt", data / "valid.txt", data / "odd-lm",
                             worker=three)
    with pytest.raises(DataError, match="batch size 4 is the global batch.*multiple of 3"):
        train_sentiment(SentimentConfig(batch_size=4), data / "sst-train", data / "sst-dev", data / "odd-sst",
                        worker=three)
    assert not (data / "odd-lm").exists() and not (data / "odd-sst").exists()


def test_rows_are_split_into_contiguous_blocks_that_cover_the_batch():
    for world_size, rows in ((2, 20), (3, 10), (4, 2)):
        blocks = [list(range(rows))[Worker(rank=r, world_size=world_size).rows(rows)] for r in range(world_size)]
        assert sum(blocks, []) == list(range(rows))
    assert [Worker(rank=r, world_size=2).rows(20) for r in range(2)] == [slice(0, 10), slice(10, 20)]


def test_each_rank_draws_its_own_dropout_masks_and_a_resume_draws_them_again():
    def draws(rank: int, epoch: int) -> torch.Tensor:
        with torch.random.fork_rng():
            Worker(rank=rank, world_size=2).seed(1234, epoch)
            return torch.rand(4)

    assert torch.equal(draws(1, 3), draws(1, 3))
    assert not torch.equal(draws(0, 3), draws(1, 3))
    assert not torch.equal(draws(1, 3), draws(1, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without a GPU")
@pytest.mark.parametrize(("options", "message"), [
    (["--amp"], "--amp (float16 mixed precision with a gradient scaler) needs a CUDA device"),
    (["--device", "cuda"], "--device cuda: PyTorch sees no CUDA device"),
])
def test_cuda_options_on_a_machine_without_a_gpu_are_a_clear_error(data, capsys, options, message):
    assert main(lm_args(data, "no-gpu", "--epochs", "1", *options, device=())) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (data / "no-gpu").exists()
