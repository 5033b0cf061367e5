"""The network over one region: its downsampling factor, test-time flips, and MONAI's
Gaussian-blended sliding windows (:func:`predict_region`, also what training validates with);
one block of a plan (:func:`predict_block`, what ``bbem infer`` workers run) and a whole
in-memory volume block by block with progress (:func:`predict_blocks`, what the napari plugin
runs)."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Generator, Mapping, Sequence
from typing import Any, cast

import numpy as np

from bbem.errors import UserError
from bbem.infer.plan import ZYX, Plan, fmt

#: MONAI's Gaussian blending sigma, as a fraction of the window (its default).
SIGMA_SCALE = 0.125


def model_factor(model: Any, model_config: Mapping[str, Any] | None = None) -> ZYX:
    """The network's downsampling factor (z, y, x), from its config or from a MONAI net itself."""
    from bbem.architecture import BASICUNET_FACTOR, downsample_factor, stride_product

    if model_config is not None:
        return downsample_factor(model_config)
    strides = getattr(model, "strides", None)  # monai.networks.nets.UNet keeps them
    if strides is not None:
        return stride_product(strides)
    if type(model).__name__ == "BasicUNet":
        return BASICUNET_FACTOR
    raise UserError(
        f"cannot tell the downsampling factor of a {type(model).__name__}: pass roi_size "
        "(a multiple of it) or a bbem checkpoint"
    )


class _Predictor:
    """Window -> cleft probability; with ``tta`` the running mean over the 8 flips in z, y, x.

    Input and output ``[B, 1, Z, Y, X]``. The running mean keeps one extra window in memory
    whatever the number of flips.
    """

    FLIPS: tuple[tuple[int, ...], ...] = tuple(
        dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n)
    )

    def __init__(self, model: Any, tta: bool) -> None:
        self.model = model
        self.tta = tta

    def __call__(self, x: Any) -> Any:
        import torch

        if not self.tta:
            return torch.sigmoid(self.model(x))
        mean = None
        for k, dims in enumerate(self.FLIPS, start=1):
            xf = torch.flip(x, dims) if dims else x
            p = torch.sigmoid(self.model(xf))
            p = torch.flip(p, dims) if dims else p
            mean = p if mean is None else mean.add_(p.sub_(mean), alpha=1.0 / k)
        return mean


@functools.lru_cache(maxsize=8)
def gaussian_weights(roi: ZYX) -> Any:
    """The Gaussian importance map ``[Z, Y, X]`` (float32, peak 1) for windows of ``roi``:
    MONAI's (sigma ``SIGMA_SCALE`` times the window along each axis), but symmetric and with
    no floor. MONAI floors its map at 1e-3, which in a window's edges and corners, where the
    product of the axes' Gaussians is smaller, makes the weights of overlapping windows
    equal: there a window's worst predictions (least context) count as much as its
    neighbour's best, and showed as seams at window edges (2.6x the mean row-to-row change of
    a demo prediction). The product of 1-D Gaussians is never 0 (corners about 1e-11 in
    float32), so every voxel is still covered. A pure function of ``roi``, kept so that each
    block does not recompute it."""
    import torch

    axes = [torch.signal.windows.gaussian(r, std=SIGMA_SCALE * r) for r in roi]
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return w / w.max()


def predict_region(model: Any, raw: np.ndarray, plan: Plan, tta: bool = False) -> np.ndarray:
    """Probabilities ``[Z, Y, X]`` float32 for a region ``[Z, Y, X]`` of normalised raw.

    Windows of ``plan.roi`` placed by MONAI from the region's corner, ``plan.step`` apart,
    blended with a Gaussian. Called on a :meth:`Plan.read_box` region it reproduces a
    whole-volume prediction there.
    """
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[None, None]
    # Windows run where the model lives (a GPU while training validates); blending stays on
    # the CPU, so a large region never has to fit in device memory.
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    sw_device = param.device if param is not None else x.device
    with torch.inference_mode():
        out = sliding_window_inference(
            x,
            sw_device=sw_device,
            device=x.device,
            roi_size=plan.roi,
            sw_batch_size=1,  # one window per forward: the result cannot depend on batching
            predictor=_Predictor(model, tta),
            overlap=plan.overlap,
            mode="gaussian",
            sigma_scale=SIGMA_SCALE,
            roi_weight_map=gaussian_weights(tuple(plan.roi)),
        )
    return cast(torch.Tensor, out)[0, 0].numpy()  # one tensor: the predictor returns one


def predict_block(
    model: Any, raw: Any, plan: Plan, index: Sequence[int], tta: bool = False
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Block ``index`` of ``plan``: the voxels it owns and their probabilities float32.

    ``raw`` is the whole volume's raw EM (anything sliceable: numpy, dask, a lazy volume);
    only the block's :meth:`Plan.read_box` is read and normalised
    (:func:`bbem.volumes.normalize_raw`). Blocks put together equal a whole-volume prediction.
    """
    from bbem.volumes.normalize import normalize_raw

    read = plan.read_box(index)
    own = plan.block_box(index)
    prob = predict_region(model, normalize_raw(np.asarray(raw[read])), plan, tta)
    crop = tuple(slice(o.start - r.start, o.stop - r.start) for o, r in zip(own, read, strict=True))
    return own, prob[crop]


def predict_blocks(
    model: Any, raw: Any, plan: Plan, tta: bool = False
) -> Generator[tuple[int, int], None, np.ndarray]:
    """Probabilities ``[Z, Y, X]`` float32 of a whole volume, block by block.

    Yields ``(done, total)`` blocks before the first and after each block, so a caller can show
    progress and stop between blocks (by not resuming the generator); returns the volume.
    """
    out = np.empty(plan.shape, np.float32)
    total = plan.n_blocks
    yield 0, total
    for done, index in enumerate(plan.blocks(), start=1):
        own, prob = predict_block(model, raw, plan, index, tta)
        out[own] = prob
        yield done, total
    return out


def check_window_fits(model: Any, plan: Plan, factor: ZYX, input: Any) -> None:
    """Refuse a volume so small that the network cannot run on one window of it.

    A window capped to a small volume can reach the network's deepest level as a single voxel,
    where instance normalisation fails (a ValueError deep in the first block). Only that case
    is tried, on one zero window, so a normal run costs nothing.
    """
    if math.prod(r // f for r, f in zip(plan.roi, factor, strict=True)) > 1:
        return
    import torch

    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    x = torch.zeros((1, 1, *plan.roi), device=param.device if param is not None else "cpu")
    try:
        with torch.inference_mode():
            model(x)
    except (ValueError, RuntimeError):
        need = (factor[0], 2 * factor[1], 2 * factor[2])
        raise UserError(
            f"{input} is {fmt(plan.shape)} voxels (z,y,x), too small for this network: a "
            f"window of it shrinks to a single voxel at the network's deepest level (it "
            f"downsamples by {fmt(factor)}); infer a volume of at least {fmt(need)} voxels"
        ) from None
