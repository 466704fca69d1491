"""Several training processes under ``torchrun``: this process's place in the run (its rank and
device), the process group's set-up and teardown, and the few collectives the trainers need.

``torchrun --nproc_per_node N [--nnodes M --rdzv_backend c10d --rdzv_endpoint host:port] -m training
train-lm ...`` starts N x M copies of the command and tells each its place through environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without them the command is one
process and nothing here communicates: a single process is the world-size-1 case of the same code.

Gradients are averaged over the ranks by PyTorch's DistributedDataParallel (gloo on CPU, nccl on
CUDA). Rank 0 is the main process: it alone prints, shows progress and writes the run directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.data import DataError

DEVICES = ("auto", "cpu", "cuda")
CPU = torch.device("cpu")
# A collective that waits longer than this fails the run instead of hanging it (a machine lost
# without torchrun noticing, a rank stuck). Ranks work in lock step: in a healthy run one waits for
# another seconds (rank 0 writing a checkpoint and plots) to a minute (a slower machine reading data).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Worker:
    """This process's place in a training run: rank ``rank`` of ``world_size``, on ``device``.
    ``Worker()`` is a single process on the CPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        """For the run's first line of output, e.g. ``2 processes on cpu (gloo)``."""
        if not self.distributed:
            return f"1 process on {self.device}"
        return f"{self.world_size} processes on {self.device.type} ({dist.get_backend()})"

    def log(self, message: str) -> None:
        """Print ``message`` on rank 0; the other ranks stay quiet."""
        if self.is_main:
            print(message, flush=True)

    def rows(self, count: int) -> slice:
        """This rank's contiguous block of ``count`` rows: rank r of N takes [r*count//N, (r+1)*count//N),
        so the blocks of ranks 0..N-1 in order are exactly the ``count`` rows. The blocks are equal
        when N divides ``count``; some are empty when ``count`` < N."""
        return slice(self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size)

    def total(self, *values: float) -> list[float]:
        """Each value summed over the ranks (in float64), the same numbers on every rank."""
        if not self.distributed:
            return list(values)
        summed = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return summed.tolist()

    def main_decides(self, decision: bool) -> bool:
        """Rank 0's ``decision`` on every rank. A decision that depends on the clock (stop after this
        epoch?) could differ between ranks; one rank leaving the loop while another waits for it in
        the next all-reduce would stall the run."""
        if not self.distributed:
            return decision
        flag = torch.tensor([decision], dtype=torch.uint8, device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def synchronise(self, module: nn.Module) -> nn.Module:
        """``module`` inside DistributedDataParallel when there are several ranks: backward() then leaves
        every rank with the gradient averaged over the ranks. Only what runs through the wrapper's
        forward() is synchronised. ``module`` itself in a single process."""
        if not self.distributed:
            return module
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def seed(self, seed: int, epoch: int) -> None:
        """Seed PyTorch's generators for one epoch's random draws (dropout masks) from (seed, epoch, rank):
        ranks draw independent masks for their rows, and a resumed run draws what an uninterrupted one would."""
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch, self.rank]).generate_state(1)[0]))


SINGLE_PROCESS = Worker()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (what checkpoints and exports hold)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def rank_label() -> str:
    """``"rank R: "`` in a process started by torchrun with others, ``""`` otherwise: a prefix for
    messages that every rank may print."""
    return f"rank {os.environ['RANK']}: " if _launched_with_others() else ""


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank is gone or silent: nccl and
    the rendezvous store raise DistError, gloo a RuntimeError about its connection or a timeout."""
    if not _launched_with_others():
        return False
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(sign in str(error) for sign in _GLOO_LOST_CONTACT))


_GLOO_LOST_CONTACT = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timeout", "Broken pipe")


def _launched_with_others() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_command() -> str:
    """The torchrun command line that started this process (as far as its environment tells)."""
    nodes, per_node = os.environ.get("GROUP_WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    return f"torchrun --nnodes {nodes} --nproc_per_node {per_node} -m training"


def choose_device(option: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when PyTorch sees a GPU, else the CPU. With CUDA, local rank k uses GPU k."""
    if option not in DEVICES:
        raise DataError(f"unknown device {option!r}; choose {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if option == "cuda" and not cuda:
        raise DataError("--device cuda: PyTorch sees no CUDA device here (torch.cuda.is_available() is False); "
                        "use --device cpu")
    if option == "cpu" or not cuda:
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise DataError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                        "start at most one process per GPU (torchrun --nproc_per_node), or use --device cpu")
    return torch.device("cuda", local_rank)


@contextmanager
def start(device: str = "auto", amp: bool = False) -> Iterator[Worker]:
    """This process's `Worker`, from torchrun's environment variables (a single process without them).
    With several ranks it joins the process group (gloo on CPU, nccl on CUDA) and leaves it on exit.
    A DataError for a device that is not there, or ``amp`` (float16 mixed precision) off CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = choose_device(device, local_rank)
    if amp and chosen.type != "cuda":
        raise DataError("--amp (float16 mixed precision with a gradient scaler) needs a CUDA device; "
                        "this run is on the CPU: drop --amp")
    worker = Worker(rank, world_size, local_rank, chosen)
    if not worker.distributed:
        yield worker
        return
    if not dist.is_available():
        raise DataError("this PyTorch build has no torch.distributed; run one process")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=chosen if chosen.type == "cuda" else None)
    try:
        yield worker
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave together: a rank that tears its group down while another still writes its files (rank 0)
    # can abort in gloo's threads at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
