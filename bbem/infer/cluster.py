"""Blocks on Dask: a LocalCluster on 127.0.0.1 or an existing scheduler at ``tcp://host:port``.

Each run registers a worker plugin that carries the run's job and model (a checkpoint path,
loaded once by each worker, or the model itself); the plugin holds the worker's
:class:`~bbem.infer.worker.BlockResources` for that run and is unregistered when the run ends,
so a long-lived worker keeps nothing of it.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes glibc's
mmap threshold, so each of torch's large temporaries is a fresh ``mmap`` whose pages fault in
zeroed: a U-Net forward runs at half speed (measured: 130 against 65 ms a batch). The plugin
gives the worker glibc's usual heap behaviour while a run lasts and hands the memory back to the
system when it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import os
import uuid
from collections.abc import Iterator
from typing import Any, cast

from distributed import Client, LocalCluster, as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from bbem.errors import UserError
from bbem.infer.plan import ZYX
from bbem.infer.schedulers import BlockProgress, SchedulerReport
from bbem.infer.worker import BlockJob, BlockResources, BlockResult, run_block

#: How long an existing Dask scheduler may take to show a worker before we give up.
WORKER_WAIT_S = 5
#: What a worker imports when it starts, not inside the first block of the first run: MONAI
#: alone takes 1.5-2 s to import. See :func:`dask_setup`.
WORKER_PRELOAD = ("monai.networks.nets", "bbem.model", "bbem.infer.region")

# glibc's mallopt parameters, and the values a run uses: the largest mmap threshold glibc allows
# on 64-bit (32 MiB, what its dynamic threshold grows to) and a trim threshold above it.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_RUN_MMAP_THRESHOLD = 32 * 2**20
_RUN_TRIM_THRESHOLD = 256 * 2**20


def _glibc() -> Any:
    """The C library if it is glibc (it has ``mallopt``), else None (macOS, musl)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(name)
        if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
            return libc
    return None


def heap_for_torch() -> bool:
    """Let large allocations reuse the heap instead of a fresh mmap each; True if applied."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, _RUN_MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, _RUN_TRIM_THRESHOLD)
    )


def heap_for_worker() -> None:
    """Give the run's memory back to the system and restore the trim threshold the worker was
    started with (Dask's, or glibc's default)."""
    libc = _glibc()
    if libc is None:
        return
    libc.malloc_trim(0)
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_", "")
    libc.mallopt(_M_TRIM_THRESHOLD, int(trim) if trim.isdigit() else 128 * 1024)


def dask_setup(worker: Any) -> None:
    """Dask's preload hook: ``dask worker ADDRESS --preload bbem.infer.cluster`` (and the
    LocalCluster this module starts) import what a block needs once, as the worker starts."""
    import importlib

    for name in WORKER_PRELOAD:
        importlib.import_module(name)


class _RunPlugin(WorkerPlugin):
    """One run's state on one worker: its resources, one torch thread and torch's heap while it
    lasts."""

    def __init__(self, job: BlockJob, model: str | Any) -> None:
        self.job = job
        self.model = model

    def setup(self, worker: Any) -> None:
        import torch

        self.resources = BlockResources(self.job, self.model)
        self.torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread per worker process: the cluster is the parallelism
        self.heap_tuned = heap_for_torch()

    def teardown(self, worker: Any) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)
        del self.resources
        if self.heap_tuned:
            heap_for_worker()


def _block_task(name: str, index: ZYX) -> tuple[BlockResult, str]:
    worker = get_worker()
    plugin = cast(_RunPlugin, worker.plugins[name])
    return run_block(plugin.resources, index), worker.address


class DaskScheduler:
    """Blocks on the workers of a Dask ``client`` (and the LocalCluster it owns, if any)."""

    def __init__(self, client: Any, cluster: Any, model: str | Any) -> None:
        self.client = client
        self.cluster = cluster
        self.model = model

    @classmethod
    @contextlib.contextmanager
    def connect(cls, scheduler: str, workers: int, model: str | Any) -> Iterator[DaskScheduler]:
        client, cluster = _connect(scheduler, workers)
        try:
            yield cls(client, cluster, model)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    def run(self, job: BlockJob, todo: list[ZYX], bar: BlockProgress) -> SchedulerReport:
        """Run the blocks on Dask; where they ran (address, workers) and the model loads."""
        client = self.client
        name = f"bbem-infer-{uuid.uuid4().hex}"
        client.register_plugin(_RunPlugin(job, self.model), name=name)
        try:
            n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
            # Bounded submission: the scheduler holds a few tasks per worker, not one per block
            # of a petavoxel volume.
            pending = iter(todo)
            queue = as_completed(
                [
                    client.submit(_block_task, name, i, pure=False)
                    for i in itertools.islice(pending, 2 * n_workers + 2)
                ]
            )
            loads: dict[str, int] = {}
            for fut in queue:
                result, address = fut.result()
                loads[address] = loads.get(address, 0) + result.model_loads
                bar.advance(result.voxels)
                nxt = next(pending, None)
                if nxt is not None:
                    queue.add(client.submit(_block_task, name, nxt, pure=False))
        finally:
            # Frees the model on every worker; a worker lost meanwhile has nothing to free,
            # and a failure here must not hide the run's own result or error.
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(name)
        if not isinstance(self.model, str):
            how = "model sent to every worker"
        elif set(loads.values()) == {1}:
            how = "model loaded once per worker"
        else:
            how = f"model loads per worker: {sorted(loads.values())}"
        return SchedulerReport(
            f"on Dask {client.scheduler.address} with {n_workers} workers ({how})", loads
        )


def _connect(scheduler: str, workers: int) -> tuple[Any, Any]:
    """A distributed Client (and the LocalCluster it owns, or None)."""
    if scheduler == "local":
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",  # nothing outside this machine can reach it
            dashboard_address=None,
            preload=[__name__],  # runs dask_setup in each worker as it starts
        )
        return Client(cluster), cluster
    if scheduler.startswith("tcp://"):
        try:
            client = Client(scheduler, timeout="5s")
        except (OSError, TimeoutError, ValueError) as e:  # ValueError: a malformed address
            raise UserError(
                f"cannot reach the Dask scheduler at {scheduler} ({type(e).__name__}): start it "
                "with `dask scheduler` and workers with `dask worker ADDRESS`, or use "
                "--scheduler local"
            ) from None
        try:  # a scheduler without workers would leave every block waiting forever
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except (OSError, TimeoutError):
            client.close()
            raise UserError(
                f"the Dask scheduler at {scheduler} has no workers after {WORKER_WAIT_S} s: "
                f"start some with `dask worker {scheduler}`"
            ) from None
        return client, None
    raise UserError(f"--scheduler must be threads, local or tcp://HOST:PORT, got {scheduler!r}")
