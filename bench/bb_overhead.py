"""Training-step time of a MONAI 3D U-Net on CPU with BB (mode in, density 0.5, refresh every 50)
over the same net dense. Goal: ratio <= 1.10. Run:
    .venv/bin/python bench/bb_overhead.py [--steps 60]
Dense and BB steps are interleaved in rounds so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bbem.bb import BBConfig, BudgetedBroadcast, attach_bb
from bbem.model import build_model

MODEL = {
    "channels": [16, 32, 64, 128],
    "strides": [[1, 2, 2], [1, 2, 2], [2, 2, 2]],
    "num_res_units": 2,
}


def make(bb: bool) -> tuple[nn.Module, torch.optim.Optimizer, BudgetedBroadcast | None]:
    torch.manual_seed(0)
    model = build_model(MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle = None
    if bb:
        handle = attach_bb(
            model,
            BBConfig(density=0.5, mode="in", refresh_every=50),
            layers=(nn.Conv3d,),
            optimizer=opt,
        )
    return model, opt, handle


def one_step(model, opt, handle, x, y) -> float:
    t = time.perf_counter()
    opt.zero_grad()
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    opt.step()
    if handle is not None:
        handle.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--shape", default="16,96,96")
    args = ap.parse_args()
    z, y_, x_ = (int(v) for v in args.shape.split(","))
    x = torch.randn(1, 1, z, y_, x_)
    y = (torch.rand(1, 1, z, y_, x_) > 0.99).float()
    dense, bbnet = make(False), make(True)
    td, tb = [], []
    for _ in range(args.steps):
        td.append(one_step(*dense, x, y))
        tb.append(one_step(*bbnet, x, y))
    # the first steps warm allocators; the BB run refreshes at step 50 (counted in its median)
    td, tb = td[5:], tb[5:]
    md, mb = statistics.median(td), statistics.median(tb)
    print(
        f"| MONAI UNet {MODEL['channels']}, patch {args.shape}, {torch.get_num_threads()} threads | median step s |"
    )
    print("|---|---|")
    print(f"| dense | {md:.3f} |")
    print(f"| BB in, density 0.5, refresh 50 | {mb:.3f} |")
    print(f"| ratio BB / dense | {mb / md:.3f} |")
    print(f"| mean ratio | {statistics.mean(tb) / statistics.mean(td):.3f} |")


if __name__ == "__main__":
    main()
