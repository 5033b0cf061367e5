"""Peak memory of `bbem convert` on a volume larger than its memory cap.

Writes a CREMI-style hdf5 volume (default 64 x 2048 x 2048 uint8 = 256 MiB, chunk by chunk),
then converts it to OME-Zarr in a child process with a given cap and reports the child's peak
resident memory against a child that only imports bbem. Run: ``python bench/convert_memory.py
[--shape 64,2048,2048] [--cap-mib 64]``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

CHILD = """
import resource, sys, time
from bbem.volumes import convert
t = time.perf_counter()
if sys.argv[1] != "-":
    convert(sys.argv[1], sys.argv[2], max_memory=int(sys.argv[3]) * 2**20, progress=False)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def make_input(path: Path, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("volumes/raw", shape=shape, dtype="uint8", chunks=(4, 256, 256))
        ds.attrs["resolution"] = (40.0, 4.0, 4.0)
        for z in range(0, shape[0], 4):
            block = rng.integers(0, 40, (min(4, shape[0] - z), *shape[1:]), dtype=np.uint8)
            ds[z : z + 4] = block + np.uint8(z % 200)


def child(*args: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="64,2048,2048")
    p.add_argument("--cap-mib", type=int, default=64)
    a = p.parse_args()
    shape = tuple(int(s) for s in a.shape.split(","))
    size_mib = np.prod(shape) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "big.h5", Path(tmp) / "big.zarr"
        make_input(src, shape)  # type: ignore[arg-type]
        _, base = child("-", "-", "0")
        secs, peak = child(str(src), str(dst), str(a.cap_mib))
    print("| volume | size MiB | cap MiB | peak RSS MiB | over import baseline | time s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {'x'.join(map(str, shape))} uint8 | {size_mib:.0f} | {a.cap_mib} | {peak:.0f} | "
        f"{peak - base:.0f} | {secs:.1f} |"
    )
    print(
        f"(maxrss of this parent: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
