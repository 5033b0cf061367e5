"""Test hooks for tests/test_distributed.py.

Python imports ``sitecustomize`` at start-up from the path, so every process a test starts with
this folder on ``PYTHONPATH`` loads this file; the hooks act only in torchrun's workers (``RANK``
set) and only as the ``BBEM_TEST_*`` variables ask:

- ``BBEM_TEST_DUMP=DIR``: after training, each rank saves its model, BB and optimiser state to
  ``DIR/rank<r>.pt`` (what the ranks hold, not what rank 0 wrote);
- ``BBEM_TEST_KILL=R:S``: rank R kills itself with SIGKILL as it begins step S + 1;
- ``BBEM_TEST_SLICE=1``: rank r trains on samples ``r::N`` of the batches a one-process run
  with N times the batch draws (the engine's per-rank stream seeds are ignored), so the run can
  be compared with that one-process run.
"""

from __future__ import annotations

import os


def _install() -> None:
    import signal
    from pathlib import Path

    import torch

    from bbem import distributed as ddp
    from bbem import engine
    from bbem.train import CleftTask

    dump = os.environ.get("BBEM_TEST_DUMP")
    if dump:
        run = engine._Run.run

        def run_and_dump(self, resume, progress):
            out = run(self, resume, progress)
            state = {
                "model": self.model.state_dict(),
                "bb": self.bb.state_dict() if self.bb is not None else None,
                "optimizer": self.opt.state_dict(),
            }
            torch.save(state, Path(dump) / f"rank{self.group.rank}.pt")
            return out

        engine._Run.run = run_and_dump

    kill = os.environ.get("BBEM_TEST_KILL")
    if kill:
        rank, step = (int(v) for v in kill.split(":"))
        train_step = engine._Run.train_step

        def train_step_or_die(self, batch):
            if self.group.rank == rank and self.step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return train_step(self, batch)

        engine._Run.train_step = train_step_or_die

    if os.environ.get("BBEM_TEST_SLICE"):

        def sliced(self, step, seed):
            from bbem.data import batches

            g = ddp.from_env()
            self.dataset.seed = engine.stream_seed(self.cfg.train.seed, step)  # one process's
            whole = batches(self.dataset, g.size * self.cfg.data.batch_size, self.cfg.data.workers)
            return ({k: v[g.rank :: g.size] for k, v in b.items()} for b in whole)

        CleftTask.batches = sliced


if "RANK" in os.environ and any(k.startswith("BBEM_TEST_") for k in os.environ):
    _install()
