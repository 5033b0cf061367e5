"""One mask refresh of a Conv3d(256, 256, 3): bbem's vectorised refresh vs a per-row Python loop.

The per-row loop is how the published notebooks refresh (one top-k per unit). Run:
    .venv/bin/python bench/bb_refresh.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from bbem.bb import BBConfig, attach_bb
from bbem.bb.masking import original_weight


def per_row_refresh(weight: torch.Tensor, on_rate: torch.Tensor, density: float) -> torch.Tensor:
    """The notebooks' way: a Python loop over units, each keeping its own top-k by |W|."""
    c_out, c_in = weight.shape[:2]
    scores = weight.abs().reshape(c_out, c_in, -1).sum(-1)
    logit = torch.log((1 - on_rate) / on_rate)
    k = (c_in * (density + 0.1 * (logit - logit.mean()))).round().clamp(1, c_in).long()
    mask = torch.zeros(c_out, c_in)
    for o in range(c_out):
        idx = torch.topk(scores[o], int(k[o])).indices
        mask[o, idx] = 1.0
    return mask


def timed(fn, repeats: int = 100) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least noisy)")
    torch.set_num_threads(ap.parse_args().threads)
    torch.manual_seed(0)
    conv = nn.Conv3d(256, 256, 3)
    bb = attach_bb(nn.Sequential(conv), BBConfig(density=0.5, spread=0.1))
    layer = bb.layers["0"]
    layer.on_rate.copy_(torch.rand(256) * 0.8 + 0.1)
    ours = timed(bb.refresh)
    # A refresh in training also resets AdamW moments of changed edges: build the state,
    # then time refreshes that alternate between two densities so edges really change.
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-3)
    conv(torch.randn(1, 256, 3, 3, 3)).sum().backward()
    opt.step()
    bb.set_optimizer(opt)
    flip = iter(range(10**6))

    def refresh_changing() -> None:
        bb.config.density = 0.5 if next(flip) % 2 else 0.45
        bb.refresh()

    with_opt = timed(refresh_changing)
    bb.config.density = 0.5
    loop = timed(lambda: per_row_refresh(original_weight(conv).detach(), layer.on_rate, 0.5))
    print(f"| refresh of Conv3d(256,256,3), {torch.get_num_threads()} threads | median ms |")
    print("|---|---|")
    print(f"| bbem (vectorised) | {ours:.2f} |")
    print(f"| bbem, 5% of edges changing, AdamW moments reset | {with_opt:.2f} |")
    print(f"| per-row Python loop (notebooks) | {loop:.2f} |")
    print(f"| speed-up | {loop / ours:.1f}x |")


if __name__ == "__main__":
    main()
