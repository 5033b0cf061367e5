"""Block-wise inference over EM volumes of any size, in one process or on a Dask cluster.

- :mod:`~bbem.infer.plan`: how a volume is cut into blocks and sliding windows, so that the
  result does not depend on the block size;
- :mod:`~bbem.infer.region`: the network over one region (MONAI's Gaussian-blended windows,
  test-time flips);
- :mod:`~bbem.infer.predict`: :func:`predict_volume`, the whole run, and ``bbem infer``;
- :mod:`~bbem.infer.array`: :func:`predict_array`, a volume held in memory (napari-bbem);
- :mod:`~bbem.infer.store`: the output, its lock, the ``.partial`` store and its run record
  (what makes ``--resume`` exact);
- :mod:`~bbem.infer.worker`: one block, and what a worker keeps open during a run;
- :mod:`~bbem.infer.schedulers`, :mod:`~bbem.infer.cluster`: threads, a Dask LocalCluster or
  an existing ``tcp://`` scheduler.
"""

from bbem.infer.array import MAX_VOXELS, predict_array, predict_steps
from bbem.infer.plan import DEFAULT_BLOCK, DEFAULT_ROI, Plan, halo_cost, make_plan
from bbem.infer.predict import (
    DEFAULT_MIN_SIZE,
    InferStats,
    infer_from_cli,
    predict_volume,
    resolve_threshold,
)
from bbem.infer.region import model_factor, predict_block, predict_blocks, predict_region
from bbem.infer.store import OnExisting

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_MIN_SIZE",
    "DEFAULT_ROI",
    "MAX_VOXELS",
    "InferStats",
    "OnExisting",
    "Plan",
    "halo_cost",
    "infer_from_cli",
    "make_plan",
    "model_factor",
    "predict_array",
    "predict_block",
    "predict_blocks",
    "predict_region",
    "predict_steps",
    "predict_volume",
    "resolve_threshold",
]
