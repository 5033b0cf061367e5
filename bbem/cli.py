"""The ``bbem`` command: argument handling and display only; the work lives in the modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from bbem.errors import UserError, one_line


def _zyx(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers z,y,x, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 0:
        raise argparse.ArgumentTypeError(
            f"expected three non-negative integers z,y,x, got {text!r}"
        )
    return parts


# -- handlers: each imports its module lazily so `bbem --help` stays fast -------------------------


def _zyx_float(text: str) -> tuple[float, float, float]:
    try:
        v = tuple(float(t) for t in text.split(","))
    except ValueError:
        v = ()
    if len(v) != 3 or min(v) <= 0:
        raise argparse.ArgumentTypeError(f"expected three positive numbers z,y,x, got {text!r}")
    return v


def _train(a: argparse.Namespace) -> int | None:
    from bbem.train import launch_from_cli, train_from_cli

    if a.nproc is not None:
        return launch_from_cli(a.nproc, a.config, a.set, run_dir=a.run_dir, resume=a.resume)
    train_from_cli(config=a.config, overrides=a.set, run_dir=a.run_dir, resume=a.resume)
    return None


def _infer(a: argparse.Namespace) -> None:
    from bbem.infer import infer_from_cli

    infer_from_cli(a)


def _export(a: argparse.Namespace) -> None:
    from bbem.model import export_model

    out = export_model(a.checkpoint, a.out, overwrite=a.overwrite)
    print(f"wrote {out}")


def _evaluate(a: argparse.Namespace) -> None:
    from bbem.metrics import evaluate_from_cli

    evaluate_from_cli(
        prediction=a.prediction,
        truth=a.truth,
        mask=a.mask,
        json_path=a.json,
        plot_path=a.plot,
        margin=a.margin,
        threshold=a.threshold,
        min_size=a.min_size,
        voxel_size=a.voxel_size,
        match_distance_nm=a.match_distance,
        connectivity=a.connectivity,
        cremi=False if a.no_cremi else None,
        overwrite=a.overwrite,
    )


def _convert(a: argparse.Namespace) -> None:
    from bbem.volumes import convert_from_cli

    convert_from_cli(a.input, a.output, key=a.key, chunks=a.chunks, overwrite=a.overwrite)


def _synth(a: argparse.Namespace) -> None:
    from bbem.synth import synth_from_cli

    synth_from_cli(a.output, shape=a.shape, seed=a.seed, preview=a.preview, overwrite=a.overwrite)


def _report(a: argparse.Namespace) -> None:
    from bbem.report import report_from_cli

    report_from_cli(a.run_dir, overwrite=a.overwrite)


def _asr(a: argparse.Namespace) -> None:
    from bbem.companions.asr import run_from_cli

    run_from_cli(config=a.config, overrides=a.set, run_dir=a.run_dir, resume=a.resume)


def _faceid(a: argparse.Namespace) -> None:
    from bbem.companions.faceid import run_from_cli

    run_from_cli(config=a.config, overrides=a.set, run_dir=a.run_dir, resume=a.resume)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bbem",
        description="Synaptic cleft detection in EM volumes with Budgeted Broadcast pruning.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(
        name: str, fn: Callable[[argparse.Namespace], int | None], help: str
    ) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help)
        s.set_defaults(func=fn)
        return s

    s = cmd("train", _train, "train a 3D U-Net (with BB pruning) from a YAML config")
    s.add_argument("config", nargs="?", help="YAML config (not needed with --resume)")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set bb.density=0.3 (repeatable)",
    )
    s.add_argument("--run-dir", help="where the run goes (default runs/<config>-<time>)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    s.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N processes of this machine (DDP, one per GPU; gloo on the CPU): runs "
        "this command under torchrun; the batch per step is N x data.batch_size",
    )

    s = cmd("infer", _infer, "predict cleft probabilities over a volume of any size")
    s.add_argument("checkpoint")
    s.add_argument("input", help="input volume (zarr, tiff, hdf5; path:key selects a dataset)")
    s.add_argument("output", help="output zarr (or .tif for small volumes)")
    s.add_argument("--key", help="dataset inside the input container")
    s.add_argument("--block", type=_zyx, help="block shape z,y,x (aligned to output chunks)")
    s.add_argument(
        "--halo",
        type=_zyx,
        help="overlap of neighbouring sliding windows z,y,x (default a quarter of the window)",
    )
    s.add_argument(
        "--scheduler",
        default="threads",
        help="threads | local | tcp://HOST:PORT (an existing Dask scheduler)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes for --scheduler local; blocks run at a time for threads",
    )
    s.add_argument("--tta", action="store_true", help="average the 8 flips in z, y, x")
    s.add_argument(
        "--threshold",
        help="also write cleft instance labels (26-connected components where the stored level "
        "rint(255 p) >= ceil(255 t): bbem's one rule, as evaluate and napari); 'val' uses the "
        "threshold validation chose",
    )
    s.add_argument(
        "--min-size",
        type=int,
        default=100,
        help="labels: drop clefts smaller than this many voxels (0 keeps all; default 100)",
    )
    s.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model runs (auto: CUDA where visible, else the CPU)",
    )
    g = s.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="finish an interrupted run")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")

    s = cmd("export", _export, "write a plain model with the BB masks baked in")
    s.add_argument("checkpoint")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")

    s = cmd("evaluate", _evaluate, "voxel/object F1, PR-AUC and CREMI distances of a prediction")
    s.add_argument("prediction")
    s.add_argument("truth")
    s.add_argument("--mask", help="ignore mask: voxels where it is 0 are not scored")
    s.add_argument("--json", help="write every number and the protocol to this JSON file")
    s.add_argument("--plot", help="write the PR curve to this PNG")
    s.add_argument("--margin", type=_zyx, default=None, help="border margin z,y,x not scored")
    s.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="threshold for object and CREMI measures (default: the validation threshold "
        "bbem infer stored with the prediction, else 0.5)",
    )
    s.add_argument("--min-size", type=int, help="smallest object in voxels (default 100)")
    s.add_argument(
        "--voxel-size", type=_zyx_float, help="voxel size z,y,x in nm (default: from the truth)"
    )
    s.add_argument(
        "--match-distance", type=float, help="also match objects by centroid distance (nm)"
    )
    s.add_argument("--connectivity", type=int, choices=(6, 18, 26), help="default 26")
    s.add_argument("--no-cremi", action="store_true", help="skip the CREMI distances")
    s.add_argument("--overwrite", action="store_true", help="replace existing --json / --plot")

    s = cmd("convert", _convert, "convert hdf5/tiff/zarr to zarr v3 (OME-Zarr), chunk by chunk")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--key", help="dataset inside the input container")
    s.add_argument("--chunks", type=_zyx, help="output chunk shape z,y,x")
    s.add_argument("--overwrite", action="store_true")

    s = cmd("synth", _synth, "make a synthetic CREMI-like EM volume with cleft labels")
    s.add_argument("output")
    s.add_argument("--shape", type=_zyx, default=(32, 256, 256))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preview", help="write a PNG montage of sections with clefts outlined")
    s.add_argument("--overwrite", action="store_true")

    s = cmd("report", _report, "plots and a summary of a run directory")
    s.add_argument("run_dir")
    s.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR/report")

    for name, fn, what in (
        ("asr", _asr, "speech recognition"),
        ("faceid", _faceid, "face identification"),
    ):
        s = cmd(name, fn, f"companion task: {what} with BB on the same core")
        s.add_argument("config", nargs="?", help="YAML config (not needed with --resume)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        s.add_argument("--run-dir")
        s.add_argument(
            "--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint"
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UserError as e:
        # one line, even when the message quotes a library's multi-line exception
        print(f"bbem {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bbem {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
