"""Several processes (torchrun): what :mod:`bbem.engine` needs to train with
DistributedDataParallel, and the ``--nproc`` launcher.

``torchrun --nproc-per-node N -m bbem train CONFIG`` starts N copies of the command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`join` reads them and joins the process
group (NCCL on GPUs, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU). Where ``WORLD_SIZE`` is
unset (or 1) every helper here is a no-op and training is the single-process one, unchanged.

The rules, one place each:

- **who writes**: rank 0 creates (or reopens) and locks the run directory and broadcasts its
  path, so a generated ``runs/<name>-<time>`` is agreed; the other ranks get a
  :class:`PeerRunDir`, which creates, locks and writes nothing. Rank 0 alone writes metrics,
  ``bb.csv``, ``loss.csv``, the log and the checkpoints, and runs validation (the others wait at
  their next collective, hence the long :data:`TIMEOUT`).
- **what every rank agrees on**: the model starts from rank 0's weights (DDP broadcasts them),
  gradients are averaged (DDP), the logged loss is the ranks' mean (:func:`mean`), and BB's
  on-rate EMAs are all-reduced before a refresh (:mod:`bbem.bb.core`), so masks and optimiser
  moment resets are the same everywhere.
- **resume**: ``last.pt`` holds every rank's RNG states (:func:`gather`); each rank restores
  its own, so a run resumed on the same number of processes repeats an unbroken one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bbem.errors import UserError
from bbem.rundir import RunDir

#: How long a rank waits at a collective: rank 0 validates while the others wait.
TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def on(self) -> bool:
        """Whether several processes train together."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory and validates."""
        return self.rank == 0


_owned = False  # whether join() started the process group (leave() ends only that)


def from_env(env: Mapping[str, str] | None = None) -> Group:
    """The torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``); a single process where ``WORLD_SIZE`` is unset or 1."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1:
        return Group()
    try:
        size = int(env["WORLD_SIZE"])
        g = Group(
            int(env["RANK"]),
            size,
            int(env.get("LOCAL_RANK", env["RANK"])),
            int(env.get("LOCAL_WORLD_SIZE", size)),
        )
    except (KeyError, ValueError) as e:
        raise UserError(
            f"WORLD_SIZE is set but {e} is missing or not a number: use torchrun"
        ) from None
    if not 0 <= g.rank < g.size:
        raise UserError(f"RANK {g.rank} is outside WORLD_SIZE {g.size}: use torchrun")
    return g


def join(device: torch.device) -> tuple[Group, torch.device]:
    """Join the process group torchrun describes (once per process): the group and this rank's
    device (``cuda:LOCAL_RANK`` for a CUDA ``device``)."""
    global _owned
    g = from_env()
    if not g.on:
        return g, device
    if not dist.is_available():
        raise UserError("this torch has no torch.distributed: train on one process")
    if device.type == "cuda":
        if g.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {g.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "start at most one process per GPU"
            )
        device = torch.device("cuda", g.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        _owned = True
    if dist.get_world_size() != g.size:
        raise UserError(f"the process group has {dist.get_world_size()} ranks, WORLD_SIZE {g.size}")
    return g, device


def leave(finished: bool = False) -> None:
    """End the process group :func:`join` started (a caller's own group stays).

    ``finished``: every rank got here without an error, so they meet at a barrier first and
    no rank tears its gloo pairs down while another still uses them (a rank of a resumed
    2-process run aborted with "terminate called without an active exception" at the end,
    in the full test suite). After an error there is no barrier: a dead peer would hang it.
    """
    global _owned
    if _owned and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
    _owned = False


@contextlib.contextmanager
def main_first(g: Group) -> Iterator[None]:
    """Rank 0 runs the block first (making a shared file), then the others."""
    if g.on and not g.main:
        dist.barrier()
    yield
    if g.on and g.main:
        dist.barrier()


def cores(g: Group) -> int:
    """Threads per process: the machine's cores shared by the processes on it."""
    return max(1, (os.cpu_count() or 1) // g.local_size)


def broadcast(g: Group, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not g.on:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(g: Group, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere, and on one process)."""
    if not g.on:
        return None
    out: list[Any] | None = [None] * g.size if g.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def mean(g: Group, value: torch.Tensor) -> float:
    """The mean over ranks of a scalar tensor (its value on one process)."""
    if not g.on:
        return value.item()
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return t.item() / g.size


def wrap(g: Group, model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel (the model itself on one process). DDP
    broadcasts rank 0's parameters and buffers (BB's masks among them) and averages gradients;
    the BB parametrization's ``original`` weights are the parameters it synchronises."""
    if not g.on:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def own_rng(g: Group, ck: Mapping[str, Any], path: Path) -> Any:
    """This rank's RNG states in a checkpoint; a UserError when it was written by another
    number of processes (the batch streams, and the effective batch, would change)."""
    saved = int(ck.get("world_size", 1))
    if saved != g.size:
        raise UserError(
            f"{path} was trained on {saved} process(es), this is {g.size}: resume it with "
            f"--nproc {saved} (or torchrun --nproc-per-node {saved})"
        )
    return ck["rng_ranks"][g.rank] if g.on else ck.get("rng")


def open_run_dir(
    g: Group, path: str | os.PathLike, resume: bool, config: Mapping[str, Any]
) -> RunDir:
    """Rank 0 creates (or, to resume, opens) the run directory and tells the others its path;
    they get a :class:`PeerRunDir` there. A failure on rank 0 is a UserError on every rank."""
    rd, error = None, None
    if g.main:
        try:
            rd = RunDir.open(path) if resume else RunDir.create(path, config)
        except Exception as e:
            if not g.on:
                raise
            error = e
    got = broadcast(g, [str(rd.path) if rd else None, None if error is None else str(error)])
    if error is not None:
        raise error
    if got[1] is not None:
        raise UserError(f"rank 0 could not open the run directory: {got[1]}")
    return rd if rd is not None else PeerRunDir(got[0])


class PeerRunDir(RunDir):
    """The run directory as a rank other than 0 sees it: a path to read ``last.pt`` from. It
    creates, locks and writes nothing; the log goes nowhere."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, lock=False)

    @property
    def log(self) -> logging.Logger:
        logger = logging.getLogger("bbem.run.peer")
        logger.propagate = False
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())
        return logger

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()  # rank 0 alone cleans up or keeps what the run wrote

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        return

    def append_bb(self, step: int, bb: Any) -> None:
        return

    def append_loss(self, row: Mapping[str, Any]) -> None:
        return

    def truncate_after(self, step: int) -> None:
        return


# -- bbem train --nproc N -------------------------------------------------------------------------


def check_launch(nproc: int, device: str = "auto") -> None:
    """A UserError when ``--nproc nproc`` cannot work with ``train.device`` here."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        raise UserError("--nproc starts torchrun itself: drop it when running under torchrun")
    if nproc > 1 and not dist.is_available():
        raise UserError("this torch has no torch.distributed: drop --nproc")
    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if gpus and nproc > gpus:
        raise UserError(
            f"--nproc {nproc} needs a GPU per process and {gpus} are visible: use --nproc "
            f"{gpus}, or train.device=cpu"
        )


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``bbem ARGV`` on ``nproc`` processes of this machine: torchrun (``torch.distributed.run
    --standalone``, a free port on localhost) with this process as its agent. The exit status:
    0, or the first failed process's (``128 + signal`` for a killed one)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "bbem", *argv])
    env = dict(os.environ)
    # torchrun would set 1 and say so; the engine sets train.threads (or the cores shared out)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(args)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code
    finally:
        os.environ.clear()
        os.environ.update(env)
    return 0
