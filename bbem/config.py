"""The validated run config: YAML in, a typed :class:`RunConfig` out, one clear line per mistake.

Overrides from the command line (``--set a.b.c=value``, :func:`bbem.configfile.apply_overrides`)
are applied to the raw YAML dict before validation, so they are checked by the same rules as the
file. Loading a config loads neither torch nor MONAI, and writes nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_type_hints

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from bbem.architecture import DEFAULT_MODEL, MONAI_ACTS, MONAI_NORMS, downsample_factor
from bbem.bb import config as bb_config
from bbem.bb.config import BBConfig
from bbem.configfile import apply_overrides, read_config  # noqa: F401 - apply_overrides re-exported
from bbem.errors import UserError
from bbem.validation import format_validation_error

# -- the schema -----------------------------------------------------------------------------------

CREMI_URL = "https://cremi.org/data/"
CREMI_FILES = ("sample_A_20160501.hdf", "sample_B_20160501.hdf", "sample_C_20160501.hdf")

ZYX = tuple[int, int, int]


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo must never train with a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthSpec(_Section):
    """A synthetic volume to make (``bbem.data.ensure_volumes``) when the path is absent."""

    shape: ZYX = (24, 256, 256)
    seed: int = 0

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: ZYX) -> ZYX:
        if min(v) <= 0:
            raise ValueError("must be three positive integers z, y, x")
        return v


class VolumeSpec(_Section):
    """One raw + cleft-label volume: a file (hdf5, zarr, ...) and the keys inside it."""

    path: str
    raw_key: str = "volumes/raw"
    label_key: str = "volumes/labels/clefts"
    #: The box used, as [start, stop) voxel ranges per axis; None means the whole axis. Split
    #: train and validation by synapse, not by section: a synapse spans several sections, so a
    #: z split puts the same synapses on both sides (``y_range: [0, 640]`` to train and
    #: ``[640, 1024]`` to validate on the VNC crop).
    z_range: tuple[int, int] | None = None
    y_range: tuple[int, int] | None = None
    x_range: tuple[int, int] | None = None
    synth: SynthSpec | None = None

    @field_validator("z_range", "y_range", "x_range")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError("must be [start, stop] with 0 <= start < stop")
        return v

    @property
    def box(self) -> tuple[tuple[int, int] | None, ...]:
        """``(z_range, y_range, x_range)``."""
        return (self.z_range, self.y_range, self.x_range)


class DataConfig(_Section):
    """Where the volumes are and how training patches are drawn from them."""

    #: Relative volume paths resolve against this; relative or unset, it resolves against the
    #: current working directory (``load_config`` stores it absolute so a resumed run finds the
    #: same files from anywhere).
    root: str | None = None
    train: list[VolumeSpec] = Field(min_length=1)
    val: list[VolumeSpec] = Field(min_length=1)
    patch_size: ZYX = (16, 160, 160)
    batch_size: int = Field(2, ge=1)
    #: Fraction of patches forced to contain a cleft voxel (the rest are uniform). 0.5 with
    #: ``loss.pos_weight`` 2 learned the VNC crop to PR-AUC 0.62 in 3000 steps where 0.8 with
    #: weight 10 reached 0.43 (README, "The detector").
    pos_fraction: float = Field(0.5, ge=0.0, le=1.0)
    workers: int = Field(0, ge=0)
    #: Volumes smaller than this are read into memory once (fast patches on CPU).
    in_memory_mb: float = Field(512.0, ge=0.0)

    @field_validator("patch_size")
    @classmethod
    def _patch_positive(cls, v: ZYX) -> ZYX:
        if min(v) <= 0:
            raise ValueError("must be three positive integers z, y, x")
        return v

    def root_path(self) -> Path:
        """The data root as an absolute path (the current directory when unset)."""
        return (Path.cwd() / Path(self.root or ".").expanduser()).resolve()

    def resolve(self, path: str) -> Path:
        """A volume path: absolute as given, relative against :meth:`root_path`."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root_path() / p).resolve()


def _default_strides() -> list[int | ZYX]:
    return [tuple(s) for s in DEFAULT_MODEL["strides"]]


class ModelConfig(_Section):
    """The MONAI U-Net (see :func:`bbem.model.build_model`); defaults are ``DEFAULT_MODEL``."""

    name: Literal["unet", "basicunet"] = DEFAULT_MODEL["name"]
    channels: list[int] = Field(default_factory=lambda: list(DEFAULT_MODEL["channels"]))
    strides: list[int | ZYX] = Field(default_factory=_default_strides)
    num_res_units: int = Field(DEFAULT_MODEL["num_res_units"], ge=0)
    #: A MONAI norm or activation name, or ``[name, {arguments}]`` (e.g. ``[group, {num_groups: 4}]``).
    norm: str | tuple[str, dict[str, Any]] = DEFAULT_MODEL["norm"]
    act: str | tuple[str, dict[str, Any]] = DEFAULT_MODEL["act"]
    dropout: float = Field(DEFAULT_MODEL["dropout"], ge=0.0, lt=1.0)

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        if len(v) < 2 or min(v) <= 0:
            raise ValueError("must be at least two positive channel counts, e.g. [16, 32, 64]")
        return v

    @field_validator("norm", "act")
    @classmethod
    def _layer_name(cls, v: Any, info: ValidationInfo) -> Any:
        names = MONAI_NORMS if info.field_name == "norm" else MONAI_ACTS
        name = (v if isinstance(v, str) else v[0]).lower()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"must be one of MONAI's {', '.join(names)}{hint}")
        return v

    @field_validator("strides")
    @classmethod
    def _strides(cls, v: list[int | ZYX]) -> list[int | ZYX]:
        flat = [s for x in v for s in (x if isinstance(x, tuple) else (x,))]
        if flat and min(flat) <= 0:
            raise ValueError("must be positive integers or z, y, x triples")
        return v

    @model_validator(mode="after")
    def _levels(self) -> ModelConfig:
        if self.name == "unet" and len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"model.strides needs one entry per level below the top: "
                f"{len(self.channels) - 1} for channels {self.channels}, got {len(self.strides)}"
            )
        if self.name == "basicunet" and len(self.channels) != 6:
            raise ValueError(f"model.channels for basicunet needs 6 numbers, got {self.channels}")
        return self

    def downsample_factor(self) -> ZYX:
        """The U-Net's total downsampling along z, y, x (see :mod:`bbem.architecture`)."""
        return downsample_factor(self.model_dump())


class _BBRules(_Section):
    """The YAML's own rules over the fields :func:`_bb_fields` takes from ``BBConfig``."""

    @model_validator(mode="after")
    def _needs_density(self) -> Any:
        values = self.model_dump()
        if values["method"] != "dense" and values["density"] is None:
            raise ValueError(
                f"bb.density is required for method {values['method']!r}: set e.g. bb.density: 0.5"
            )
        problem = bb_config.relation_problem(values, "bb.")
        if problem:
            raise ValueError(problem)
        return self


def _in_range(allowed: bb_config.Range) -> Any:
    def check(v: Any) -> Any:
        problem = None if v is None else allowed.problem(v)
        if problem:
            raise ValueError(problem)
        return v

    return AfterValidator(check)


def _bb_fields() -> dict[str, Any]:
    """Pydantic fields for every ``BBConfig`` field (type, default, range, meaning), plus the
    YAML's extras: ``method: dense`` (no pruning, the default) and so an optional density."""
    hints = get_type_hints(BBConfig, vars(bb_config))
    methods = ("dense", *bb_config.METHODS)
    out: dict[str, Any] = {
        "method": (
            Literal[methods],
            Field("dense", description="dense (no pruning), or a BBConfig method"),
        )
    }
    for f in dataclasses.fields(BBConfig):
        if f.name == "method":
            continue
        tp, doc, allowed = hints[f.name], f.metadata["doc"], f.metadata["range"]
        default = f.default
        if f.name == "density":  # required unless method: dense
            tp, default = tp | None, None
        if allowed is not None:
            tp = Annotated[tp, _in_range(allowed)]
        out[f.name] = (tp, Field(default, description=doc))
    return out


#: The ``bb`` section: ``bbem.bb.BBConfig``'s fields, or ``method: dense`` for no pruning
#: (METHOD.md explains them).
if TYPE_CHECKING:
    # create_model's fields exist only at run time: to a type checker the section is Any
    BBSection = Any
else:
    BBSection = create_model(
        "BBSection",
        __base__=_BBRules,
        __doc__="``bbem.bb.BBConfig`` fields, or ``method: dense`` for no pruning (METHOD.md).",
        **_bb_fields(),
    )


class LossConfig(_Section):
    """BCE + Dice; ``pos_weight`` up-weights the rare cleft voxels in BCE."""

    bce_weight: float = Field(1.0, ge=0.0)
    dice_weight: float = Field(1.0, ge=0.0)
    #: BCE positive-class weight, or ``auto``: background/foreground ratio of the training labels
    #: (hundreds for clefts: far from calibrated, and slower to learn; see ``pos_fraction``).
    pos_weight: float | Literal["auto"] = 2.0
    #: BCE weight of the background voxels within ``near_radius`` in-plane pixels of a cleft
    #: (the hard negatives beside it: the rest of the synaptic density). 1 is plain BCE.
    near_weight: float = Field(1.0, gt=0.0)
    near_radius: int = Field(4, ge=1)

    @field_validator("pos_weight")
    @classmethod
    def _pos_weight(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return v

    @model_validator(mode="after")
    def _some_loss(self) -> LossConfig:
        if self.bce_weight == 0 and self.dice_weight == 0:
            raise ValueError("loss.bce_weight and loss.dice_weight are both 0: nothing to train")
        return self


Prob = Annotated[float, Field(ge=0.0, le=1.0)]


class AugmentConfig(_Section):
    """Probabilities (per patch) and sizes of the augmentations (see :func:`bbem.data.build_augment`)."""

    enabled: bool = True
    #: Probability of a flip along each of z, y, x (independently).
    flips: Prob = 0.5
    #: In-plane (y-x) quarter turns and transposes only: EM z is ~10x coarser than y, x.
    rot90: Prob = 0.5
    #: In-plane (y-x) elastic deformation with a small rotation, the same for every section;
    #: off by default, it is slow on CPU.
    elastic: Prob = 0.0
    #: Pixels between the control points of the random deformation grid.
    elastic_spacing: int = Field(48, ge=4)
    #: Control-point displacement range, in pixels.
    elastic_magnitude: tuple[float, float] = (0.0, 4.0)
    #: Largest in-plane rotation, in degrees.
    elastic_rotate: float = Field(15.0, ge=0.0, le=180.0)
    intensity: Prob = 0.5
    intensity_scale: float = Field(0.1, ge=0.0)
    intensity_shift: float = Field(0.1, ge=0.0)
    noise: Prob = 0.2
    noise_std: float = Field(0.03, ge=0.0)
    missing_section: Prob = 0.1
    misaligned_section: Prob = 0.1
    misaligned_max_shift: int = Field(8, ge=1)
    motion_blur: Prob = 0.1
    motion_blur_kernel: int = Field(9, ge=3)


class OptimConfig(_Section):
    """AdamW with linear warm-up then the schedule."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    #: Steps of linear learning-rate warm-up from 0.
    warmup_steps: int = Field(20, ge=0)
    #: Max gradient norm; None turns clipping off.
    grad_clip: float | None = Field(1.0, gt=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"


class TrainConfig(_Section):
    """Length, evaluation and checkpoint cadence, seed and device."""

    steps: int = Field(gt=0)
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool | Literal["auto"] = "auto"
    #: CPU threads for torch; ``None`` uses every core. Set 1 to run several jobs side by side.
    threads: int | None = Field(None, ge=1)


class RunConfig(_Section):
    """A whole run: what ``bbem train CONFIG`` reads and the run directory's ``config.yaml``."""

    name: str = Field(min_length=1)
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    bb: BBSection = Field(default_factory=BBSection)
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, d: Any) -> Any:
        # `augment:` with nothing under it reads as None in YAML: mean "all defaults".
        if isinstance(d, dict):
            d = {k: v for k, v in d.items() if not (v is None and k in _SECTIONS)}
        return d

    @model_validator(mode="after")
    def _patch_fits_model(self) -> RunConfig:
        f = self.model.downsample_factor()
        p = self.data.patch_size
        if any(s % k for s, k in zip(p, f, strict=True)):
            fix = [max(k, round(s / k) * k) for s, k in zip(p, f, strict=True)]
            raise ValueError(
                f"data.patch_size {list(p)} must be a multiple of the model's downsample factor "
                f"{list(f)} along z, y, x: try {fix}"
            )
        if self.augment.enabled and self.augment.rot90 > 0 and p[1] != p[2]:
            raise ValueError(
                f"data.patch_size {list(p)} has y != x, but augment.rot90 turns patches a quarter "
                "turn in y-x: make y and x equal or set augment.rot90: 0"
            )
        return self

    def bb_kwargs(self) -> dict[str, Any] | None:
        """Keyword arguments for ``bbem.bb.BBConfig(**kw)``; None for ``method: dense``."""
        if self.bb.method == "dense":
            return None
        return self.bb.model_dump()

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe dict (lists, not tuples) that :meth:`from_dict` reads back."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Validate a dict (a saved config.yaml); errors become one-line :class:`UserError`."""
        if not isinstance(d, Mapping):
            raise UserError(f"config error: expected a mapping of sections, got {type(d).__name__}")
        try:
            return cls.model_validate(dict(d))
        except ValidationError as e:
            raise UserError(format_validation_error(e, cls)) from None


_SECTIONS = ("model", "bb", "loss", "augment", "optim")


# -- loading --------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides, validate.

    Unknown keys and bad values raise one-line :class:`UserError` naming the key path (with a
    close-match suggestion for typos). ``data.root`` is made absolute (relative to the current
    directory) so the saved config finds the same data from anywhere.
    """
    d = read_config(path, list(overrides), example="configs/demo.yaml")
    cfg = RunConfig.from_dict(d)
    cfg.data.root = str(cfg.data.root_path())
    return cfg


def _is_cremi(path: Path) -> bool:
    return path.name in CREMI_FILES or "cremi" in str(path).lower()


def resolve_volumes(cfg: RunConfig) -> list[Path]:
    """The absolute path of every train/val volume, checking each exists or can be made.

    Writes nothing: a missing volume with a ``synth`` spec is returned as it is; bbem.data
    makes it (:func:`bbem.data.ensure_volumes`, or the loaders when they first open it). A
    missing volume without one raises :class:`UserError` naming it and where it is expected
    (and, for CREMI, where the samples are published).
    """
    specs = [
        (split, i, spec)
        for split in ("train", "val")
        for i, spec in enumerate(getattr(cfg.data, split))
    ]
    # a volume listed twice (train and val boxes of one file) needs its synth spec only once
    made = {cfg.data.resolve(spec.path) for _, _, spec in specs if spec.synth is not None}
    out = []
    for split, i, spec in specs:
        p = cfg.data.resolve(spec.path)
        if not p.exists() and p not in made:
            hint = "fix data.root or the path"
            if _is_cremi(p):
                hint = (
                    f"download the CREMI samples ({', '.join(CREMI_FILES)}) from "
                    f"{CREMI_URL} into {p.parent}, or set data.root"
                )
            raise UserError(
                f"data file {p.name} not found: data.{split}[{i}].path {spec.path!r} "
                f"is expected at {p}; {hint}"
            )
        out.append(p)
    return out
