"""bbem on a CUDA GPU in one short run: train, validate, infer, and say how fast and how large.

1. Trains ``configs/vnc.yaml`` (the real-EM config, split by synapse) for ``--steps`` steps,
   at most ``--max-train-minutes``, with AMP (``train.amp=true``, ``train.device=cuda``),
   validating on the GPU every ``--eval-every`` steps; the cosine schedule is shortened to
   ``--steps``. Training runs through :func:`bbem.engine.fit` with the EM task of
   :mod:`bbem.train`, timed from outside (the task's batch stream and evaluation are wrapped;
   nothing in the loop changes).
2. Predicts the whole VNC crop with the best checkpoint through
   :func:`bbem.infer.predict_volume` (the function behind ``bbem infer``) with ``device=cuda``.
3. Prints one block (GPU, torch/CUDA versions, median ms per training step after warm-up, steps
   done, best validation PR-AUC and its step, inference voxels/s, peak GPU memory of training
   and of inference, wall time) and writes it as ``gpu_check.json`` to ``--out`` or ``$OUT``.

Without CUDA it prints one line and exits 0, touching no data. ``--cpu-smoke`` runs the same
path on the CPU in seconds (a few steps on small synthetic volumes), as the tests do. Run from
the repository root (configs/vnc.yaml reads ../shared/data/vnc-stack1-left.hdf, Gerhard et al.
2013, doi 10.6084/m9.figshare.856713, CC BY-NC-SA 3.0); nothing is downloaded:

    python bench/gpu_check.py                 # on a GPU host; training stops at 4 minutes
    python bench/gpu_check.py --cpu-smoke     # anywhere
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402  (the clock starts before anything is imported)
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bbem without an install (a bare GPU host)

#: Every field of the result, in the order of the JSON; the tests check that each is there.
FIELDS = (
    "mode",
    "device",
    "gpu",
    "torch",
    "cuda",
    "cudnn",
    "config",
    "amp",
    "steps_planned",
    "steps_done",
    "stopped_early",
    "step_ms_median",
    "step_ms_p90",
    "data_wait_ms_median",
    "timed_steps",
    "warmup_steps",
    "train_seconds",
    "val_pr_auc_best",
    "val_pr_auc_best_step",
    "val_pr_auc_last",
    "evals",
    "eval_seconds_median",
    "train_peak_gpu_mib",
    "infer_input",
    "infer_shape",
    "infer_voxels",
    "infer_seconds",
    "infer_voxels_per_second",
    "infer_where",
    "infer_peak_gpu_mib",
    "wall_seconds",
    "settings",
    "host",
)


def say(text: str) -> None:
    """A progress line, flushed: a run killed by a timeout still leaves what it got to."""
    print(f"gpu_check: {text}", flush=True)


class OutOfTime(Exception):
    """Raised from the batch stream when the training time budget is spent."""


class Clock:
    """Times training from outside the loop: when each step's batch is asked for, how long it
    took to arrive, and each evaluation.

    ``starts[s]`` is when the batch of step ``s`` (1-based) was asked for, so ``starts[s + 1] -
    starts[s]`` is one whole step: its batch, forward, backward, optimiser, BB, logging, and any
    evaluation or checkpoint after it (those steps are left out of the step time).
    """

    def __init__(self, steps: int, eval_every: int, checkpoint_every: int, deadline: float):
        self.steps, self.eval_every, self.checkpoint_every = steps, eval_every, checkpoint_every
        self.deadline = deadline
        self.starts: dict[int, float] = {}
        self.waits: dict[int, float] = {}
        self.restarts: set[int] = set()  # steps whose batch came from a fresh stream
        self.evals: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.on_eval: Any = None  # called after each evaluation (writes the partial JSON)

    @property
    def last_step(self) -> int:
        return max(self.starts, default=0)

    def wrap(self, stream: Iterator[Any], step: int) -> Iterator[Any]:
        """``stream`` (the task's batches from ``step`` on), timed."""
        s, first = step, True
        while True:
            s += 1
            t0 = time.perf_counter()
            if t0 > self.deadline:
                raise OutOfTime(f"time budget spent after {s - 1} steps")
            batch = next(stream)
            t1 = time.perf_counter()
            self.starts[s], self.waits[s] = t0, t1 - t0
            if first:
                self.restarts.add(s)
                first = False
            if s in (1, 10) or (s % 100 == 0 and s % self.eval_every):
                ms = self.step_ms()
                shown = f", median step {ms[0]:.1f} ms so far" if ms else ""
                say(f"step {s}/{self.steps}, {t1 - self.t0:.0f} s into training{shown}")
            yield batch

    def step_ms(self, warmup: int = 0) -> tuple[float, float, int] | None:
        """Median and 90th percentile of the plain steps after ``warmup`` (ms), and their count."""
        dts = [
            1000 * (self.starts[s + 1] - self.starts[s])
            for s in sorted(self.starts)
            if s > warmup
            and s + 1 in self.starts
            and s % self.eval_every
            and s % self.checkpoint_every
            and s not in self.restarts
        ]
        if not dts:
            return None
        dts.sort()
        return statistics.median(dts), dts[min(len(dts) - 1, int(0.9 * len(dts)))], len(dts)

    def wait_ms(self, warmup: int = 0) -> float | None:
        w = [1000 * v for s, v in self.waits.items() if s > warmup and s not in self.restarts]
        return statistics.median(w) if w else None

    def evaluated(self, pr_auc: float, seconds: float) -> None:
        step = self.last_step
        self.evals.append({"step": step, "pr_auc": round(pr_auc, 6), "seconds": round(seconds, 2)})
        ms = self.step_ms()
        shown = f", median step {ms[0]:.1f} ms" if ms else ""
        say(
            f"step {step}/{self.steps}: val PR-AUC {pr_auc:.4f} (validation {seconds:.1f} s)"
            f"{shown}, {time.perf_counter() - self.t0:.0f} s into training"
        )
        if self.on_eval is not None:
            self.on_eval()


def timed_task(cfg: Any, clock: Clock) -> Any:
    """bbem's EM task with its batch stream and evaluation timed by ``clock``."""
    from bbem.train import CleftTask

    class TimedTask(CleftTask):
        def batches(self, step: int, seed: int) -> Iterator[Any]:
            return clock.wrap(super().batches(step, seed), step)

        def evaluate(self, model: Any) -> Any:
            t0 = time.perf_counter()
            ev = super().evaluate(model)
            clock.evaluated(float(ev.metrics["val_pr_auc"]), time.perf_counter() - t0)
            return ev

    return TimedTask(cfg)


# -- configs --------------------------------------------------------------------------------------


def smoke_config(work: Path) -> Path:
    """The demo config on two small synthetic volumes made in ``work`` (seconds on a CPU)."""
    import yaml

    from bbem.configfile import read_config

    d = read_config(REPO / "configs" / "demo.yaml")
    d["name"] = "gpu-check-smoke"
    d["data"].update(
        root=str(work),
        train=[{"path": "train.zarr", "synth": {"shape": [16, 96, 96], "seed": 1}}],
        val=[{"path": "val.zarr", "synth": {"shape": [16, 96, 96], "seed": 2}}],
        patch_size=[8, 64, 64],
    )
    d["model"]["channels"] = [4, 8, 16, 32]
    d["bb"].update(warmup_steps=2, refresh_every=2)  # a refresh happens, so BB is exercised
    path = work / "smoke.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


# -- environment ----------------------------------------------------------------------------------


def versions(torch: Any, cuda: bool) -> dict[str, Any]:
    cudnn = torch.backends.cudnn.version() if cuda else None
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
    }


def host() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "commit": commit or None,
    }


def peak_mib(torch: Any, cuda: bool) -> float | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def reset_peak(torch: Any, cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -- the run --------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--config", default="configs/vnc.yaml", help="run config (GPU mode)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    ap.add_argument("--eval-every", type=int, default=None, help="default 250")
    ap.add_argument(
        "--max-train-minutes",
        type=float,
        default=4.0,
        help="stop training when this is spent (the best checkpoint so far is used); default 4",
    )
    ap.add_argument(
        "--warmup-steps", type=int, default=None, help="steps left out of the step time (50)"
    )
    ap.add_argument("--workers", type=int, default=None, help="data loader processes (4)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (cores / 2)")
    ap.add_argument("--infer-workers", type=int, default=None, help="blocks at a time (4)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="folder for gpu_check.json (default $OUT)")
    ap.add_argument("--work", default=None, help="keep the run and prediction here")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="the whole path on the CPU: a few steps on small synthetic volumes",
    )
    a = ap.parse_args(argv)
    smoke = a.cpu_smoke
    cores = os.cpu_count() or 1
    for key, gpu, cpu in (
        ("steps", 1500, 6),
        ("eval_every", 250, 3),
        ("warmup_steps", 50, 1),
        ("workers", 4, 0),
        ("threads", max(1, cores // 2), 1),
        ("infer_workers", 4, 1),
    ):
        if getattr(a, key) is None:
            setattr(a, key, cpu if smoke else gpu)
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    try:
        import torch
    except ImportError:
        say("no CUDA device (torch is not installed); nothing to measure")
        return 0
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    if not cuda and not a.cpu_smoke:
        say(
            f"no CUDA device (torch {torch.__version__}, cuda available: "
            f"{torch.cuda.is_available()}); nothing to measure"
        )
        return 0

    out_dir = a.out or os.environ.get("OUT") or None
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bbem-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(a, torch, cuda, work, Path(out_dir) if out_dir else None)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def run(a: argparse.Namespace, torch: Any, cuda: bool, work: Path, out: Path | None) -> int:
    from bbem.config import load_config
    from bbem.errors import UserError

    config = smoke_config(work) if a.cpu_smoke else Path(a.config)
    sets = [
        f"train.steps={a.steps}",
        f"train.eval_every={a.eval_every}",
        f"train.checkpoint_every={a.eval_every}",
        "train.log_every=10",
        f"train.device={'cuda' if cuda else 'cpu'}",
        "train.amp=true",
        f"train.threads={a.threads}",
        f"data.workers={a.workers}",
        *a.set,
    ]
    try:
        cfg = load_config(config, sets)
    except UserError as e:
        say(f"error: {e}")
        return 1
    if not a.cpu_smoke:
        missing = [
            str(cfg.data.resolve(v.path))
            for v in (*cfg.data.train, *cfg.data.val)
            if not cfg.data.resolve(v.path).is_file()
        ]
        if missing:
            say(
                f"data missing: {', '.join(sorted(set(missing)))} (run from the repository "
                "root, with ../shared/data beside it); nothing measured"
            )
            return 1

    info = versions(torch, cuda)
    result: dict[str, Any] = dict.fromkeys(FIELDS)
    result.update(
        mode="cpu-smoke" if a.cpu_smoke else "gpu",
        device="cuda" if cuda else "cpu",
        **info,
        config=str(config) if not a.cpu_smoke else "configs/demo.yaml (small synthetic volumes)",
        amp=bool(cuda),  # the engine turns AMP on for CUDA only
        steps_planned=a.steps,
        warmup_steps=a.warmup_steps,
        evals=[],
        settings={
            "eval_every": a.eval_every,
            "max_train_minutes": a.max_train_minutes,
            "data_workers": a.workers,
            "torch_threads": a.threads,
            "infer_workers": a.infer_workers,
            "set": list(a.set),
        },
        host=host(),
    )
    where = f"{info['gpu']} (torch {info['torch']}, CUDA {info['cuda']})" if cuda else "the CPU"
    say(f"{result['mode']} on {where}: {a.steps} steps of {result['config']}, work dir {work}")

    def write(phase: str) -> None:
        result["wall_seconds"] = round(time.perf_counter() - T_START, 1)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_check.json").write_text(json.dumps({"phase": phase, **result}, indent=1))

    # -- training ---------------------------------------------------------------------------------
    from bbem.data import ensure_volumes
    from bbem.engine import fit

    ensure_volumes(cfg)  # the smoke volumes are made here
    if cuda:
        torch.cuda.init()
    reset_peak(torch, cuda)
    deadline = time.perf_counter() + 60 * a.max_train_minutes
    clock = Clock(a.steps, a.eval_every, a.eval_every, deadline)

    def after_eval() -> None:
        fill_training(result, clock, a)
        write("training")

    clock.on_eval = after_eval
    run_dir = work / "run"
    t0 = time.perf_counter()
    try:
        fit(timed_task(cfg, clock), cfg.to_dict(), run_dir, progress=False)
    except OutOfTime as e:
        result["stopped_early"] = str(e)
        say(f"training stopped: {e} (--max-train-minutes {a.max_train_minutes})")
    result["train_seconds"] = round(time.perf_counter() - t0, 1)
    result["train_peak_gpu_mib"] = peak_mib(torch, cuda)
    fill_training(result, clock, a)
    for name in ("metrics.csv", "loss.csv"):
        if out is not None and (run_dir / name).is_file():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / name, out / f"gpu_check_{name}")
    write("trained")

    # -- inference --------------------------------------------------------------------------------
    best = run_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        say("no best.pt (no evaluation finished): inference skipped")
    else:
        infer(result, cfg, best, work, a.infer_workers, torch, cuda)
    result["wall_seconds"] = round(time.perf_counter() - T_START, 1)
    write("done")
    print(summary(result, out), flush=True)
    return 0


def fill_training(result: dict[str, Any], clock: Clock, a: argparse.Namespace) -> None:
    ms = clock.step_ms(a.warmup_steps)
    if ms is None and a.cpu_smoke:
        ms = clock.step_ms()  # a handful of steps: take every plain one
    wait = clock.wait_ms(a.warmup_steps)
    evals = clock.evals
    best = max(evals, key=lambda e: e["pr_auc"]) if evals else None  # first of equal ones
    result.update(
        steps_done=clock.last_step,
        step_ms_median=round(ms[0], 2) if ms else None,
        step_ms_p90=round(ms[1], 2) if ms else None,
        timed_steps=ms[2] if ms else 0,
        data_wait_ms_median=round(wait, 2) if wait is not None else None,
        val_pr_auc_best=best["pr_auc"] if best else None,
        val_pr_auc_best_step=best["step"] if best else None,
        val_pr_auc_last=evals[-1]["pr_auc"] if evals else None,
        evals=list(evals),
        eval_seconds_median=statistics.median(e["seconds"] for e in evals) if evals else None,
    )


def infer(
    result: dict[str, Any], cfg: Any, best: Path, work: Path, workers: int, torch: Any, cuda: bool
) -> None:
    """The best checkpoint over the whole file of the first validation box, on the device."""
    from bbem.infer import predict_volume
    from bbem.volumes import open_volume

    spec = cfg.data.val[0]
    path = cfg.data.resolve(spec.path)
    shape = tuple(int(n) for n in open_volume(path, spec.raw_key).shape)
    say(f"inference: {best.name} over {path.name} ({'x'.join(map(str, shape))}) ...")
    reset_peak(torch, cuda)
    t0 = time.perf_counter()
    stats = predict_volume(  # what `bbem infer --device cuda` runs
        best,
        path,
        work / "prediction.zarr",
        key=spec.raw_key,
        workers=workers,
        on_existing="overwrite",
        device="cuda" if cuda else "cpu",
        progress=False,
    )
    wall = time.perf_counter() - t0
    result.update(
        infer_input=f"{path.name}:{spec.raw_key} (whole file)",
        infer_shape=list(shape),
        infer_voxels=stats.voxels,
        infer_seconds=round(stats.seconds, 2),
        infer_voxels_per_second=round(stats.voxels_per_second),
        infer_where=f"{stats.where}; {stats.blocks_total} blocks; call {wall:.1f} s",
        infer_peak_gpu_mib=peak_mib(torch, cuda),
    )


def summary(r: dict[str, Any], out: Path | None) -> str:
    """The one block printed at the end."""

    def num(v: Any, fmt: str = "{:.4f}") -> str:
        return "-" if v is None else fmt.format(v)

    mib = "{:.0f} MiB"
    gpu = r["gpu"] or "no GPU (CPU smoke)"
    stopped = f" (stopped early: {r['stopped_early']})" if r["stopped_early"] else ""
    lines = [
        f"== bbem gpu_check ({r['mode']}) on {gpu}: torch {r['torch']}, CUDA {r['cuda']}, "
        f"cuDNN {r['cudnn']} ==",
        f"training       {r['config']}, AMP {'on' if r['amp'] else 'off'}, "
        f"{r['steps_done']}/{r['steps_planned']} steps in {num(r['train_seconds'], '{:.1f}')} s"
        f"{stopped}",
        f"step time      median {num(r['step_ms_median'], '{:.1f}')} ms/step, p90 "
        f"{num(r['step_ms_p90'], '{:.1f}')} ms ({r['timed_steps']} steps after "
        f"{r['warmup_steps']} warm-up; data wait median "
        f"{num(r['data_wait_ms_median'], '{:.2f}')} ms)",
        f"val PR-AUC     best {num(r['val_pr_auc_best'])} at step {r['val_pr_auc_best_step']} "
        f"(last {num(r['val_pr_auc_last'])}; {len(r['evals'])} evaluations, median "
        f"{num(r['eval_seconds_median'], '{:.1f}')} s each)",
        f"inference      {num(r['infer_voxels_per_second'], '{:,.0f}')} voxels/s: "
        f"{num(r['infer_voxels'], '{:,}')} voxels of {r['infer_input']} in "
        f"{num(r['infer_seconds'], '{:.2f}')} s ({r['infer_where']})",
        f"peak GPU mem   training {num(r['train_peak_gpu_mib'], mib)}, inference "
        f"{num(r['infer_peak_gpu_mib'], mib)} (torch.cuda.max_memory_allocated)",
        f"wall time      {num(r['wall_seconds'], '{:.1f}')} s in all",
    ]
    if out is not None:
        lines.append(f"json           {out / 'gpu_check.json'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
