"""Where the blocks run: ``threads`` (this process, ``workers`` blocks at a time sharing one
model), ``local`` (a Dask LocalCluster of ``workers`` processes on 127.0.0.1) or
``tcp://host:port`` (an existing Dask scheduler; :mod:`bbem.infer.cluster`).

Every scheduler runs the blocks it is given and reports where they ran; a Dask worker loads
the model once per run and uses one torch thread.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from bbem.errors import UserError
from bbem.infer.plan import ZYX
from bbem.infer.worker import BlockJob, BlockResources, run_block
from bbem.progress import progress_bar

#: ``tcp://HOST:PORT``, the host a name, an IPv4 address or a bracketed IPv6 address
_TCP_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})/?")


def check_scheduler(scheduler: str) -> None:
    """Refuse a malformed ``--scheduler`` before anything is opened or written."""
    s = str(scheduler)
    if s in ("threads", "local"):
        return
    if not s.startswith("tcp://"):
        raise UserError(f"--scheduler must be threads, local or tcp://HOST:PORT, got {s!r}")
    m = _TCP_ADDRESS.fullmatch(s)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise UserError(
            f"--scheduler {s} is not a scheduler address: give tcp://HOST:PORT with a port "
            "number, as `dask scheduler` prints it (e.g. tcp://127.0.0.1:8786)"
        )


@dataclass(frozen=True)
class SchedulerReport:
    """Where the blocks ran (one phrase for the summary line), and how often each Dask worker
    loaded the model from disk (by worker address; empty for threads)."""

    where: str
    worker_model_loads: Mapping[str, int] = field(default_factory=dict)


class BlockProgress:
    """The run's progress bar (blocks done / total, voxels per second, time left)."""

    def __init__(self, total: int, already: int, enabled: bool) -> None:
        self.bar = progress_bar("blocks", "{task.fields[rate]}", enabled=enabled)
        self.total = total
        self.already = already
        self.voxels = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> BlockProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task(
            "infer", total=self.total, completed=self.already, rate="- vox/s"
        )
        self.t0 = time.perf_counter()
        return self

    def advance(self, voxels: int) -> None:
        self.voxels += voxels
        rate = self.voxels / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, advance=1, rate=f"{rate:,.0f} vox/s")

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)


class Scheduler(Protocol):
    def run(self, job: BlockJob, todo: list[ZYX], bar: BlockProgress) -> SchedulerReport:
        """Run the blocks ``todo`` of ``job``, advancing ``bar`` as each finishes."""
        ...


class ThreadScheduler:
    """The blocks in this process, ``workers`` at a time on threads sharing one model.

    Each thread gets ``cores // workers`` torch threads: on a busy machine torch's intra-op
    threads spin on each other (2 on 2 busy cores ran 4x slower than 1, bench/), while blocks
    on separate threads release the GIL inside torch and never wait on each other.
    """

    def __init__(self, workers: int, model: Any, volume: Any) -> None:
        self.workers = workers
        self.model = model  # loaded by the caller: the threads never load it again
        self.volume = volume

    def run(self, job: BlockJob, todo: list[ZYX], bar: BlockProgress) -> SchedulerReport:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        import torch

        res = BlockResources(job, self.model, self.volume)
        torch_threads = torch.get_num_threads()
        per_block = max(1, (os.cpu_count() or 1) // self.workers)
        torch.set_num_threads(per_block)
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bbem-infer")
        try:
            pending = iter(todo)
            running = {
                pool.submit(run_block, res, i) for i in itertools.islice(pending, self.workers)
            }
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    bar.advance(fut.result().voxels)
                    nxt = next(pending, None)
                    if nxt is not None:
                        running.add(pool.submit(run_block, res, nxt))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(torch_threads)
        return SchedulerReport(
            f"in one process, {self.workers} blocks at a time ({per_block} torch thread(s) each)"
        )


@contextmanager
def open_scheduler(
    scheduler: str, workers: int, checkpoint: str | None, model: Any, volume: Any
) -> Iterator[Scheduler]:
    """The scheduler ``scheduler`` names, closed (cluster and client) on exit.

    ``model`` is the loaded model; ``checkpoint`` its path, when it came from one: Dask workers
    then load it themselves (once each) rather than receive it. A Dask scheduler is reached
    here, first, so an unreachable one fails in seconds and before anything is written.
    """
    if scheduler == "threads":
        yield ThreadScheduler(workers, model, volume)
        return
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise UserError(
            "--scheduler local/tcp needs dask.distributed: pip install 'dask[distributed]'"
        ) from None
    from bbem.infer.cluster import DaskScheduler

    with DaskScheduler.connect(scheduler, workers, checkpoint if checkpoint else model) as s:
        yield s
