"""``attach_bb`` and the :class:`BudgetedBroadcast` handle: probes, schedule, refresh, state."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bbem.bb import controller
from bbem.bb.config import MODES, BBConfig
from bbem.bb.diagnostics import balance_fit, binary_entropy
from bbem.bb.masking import (
    SUPPORTED,
    EdgeMask,
    add_mask,
    check_maskable,
    edge_scores,
    layer_weight,
    original_weight,
    remove_mask,
)
from bbem.bb.probes import ActHook, LayerHook, PreHook, Probe, following_activation

LayerSelector = tuple[type, ...] | Sequence[str] | Callable[[str, nn.Module], bool]

STATE_FORMAT = "bbem-bb-1"


@dataclass
class _Layer:
    name: str
    module: nn.Module
    mask: EdgeMask
    mode: str
    probe: Probe
    on_rate: Tensor  # EMA, [units]
    rand_scores: Tensor | None = None
    hooks: list[Any] = field(default_factory=list)

    @property
    def c_out(self) -> int:
        return self.mask.mask.shape[0]

    @property
    def c_in(self) -> int:
        return self.mask.mask.shape[1]

    @property
    def units(self) -> int:
        return self.c_out if self.mode == "in" else self.c_in

    @property
    def full_fan(self) -> int:
        return self.c_in if self.mode == "in" else self.c_out

    def unit_mask(self) -> Tensor:
        """``[units, full_fan]``: rows are the units the rule controls."""
        return self.mask.mask if self.mode == "in" else self.mask.mask.T


class BudgetedBroadcast:
    """The handle ``attach_bb`` returns. Call :meth:`step` after every optimiser step."""

    def __init__(self, model: nn.Module, config: BBConfig, layers: list[_Layer], optimizer=None):
        self.model = model
        self.config = config
        self.layers = {layer.name: layer for layer in layers}
        self.optimizer = optimizer
        self.step_count = 0
        self.refreshes = 0
        self.masked = False
        self.baked = False

    # -- schedule ---------------------------------------------------------------------------
    def target_density(self, step: int | None = None) -> float:
        """Density the schedule asks for at ``step``: 1 in warm-up, then a cubic ramp to ``density``."""
        c = self.config
        t = self.step_count if step is None else step
        if t < c.warmup_steps:
            return 1.0
        if c.ramp_steps > 0 and t < c.warmup_steps + c.ramp_steps:
            frac = (t - c.warmup_steps) / c.ramp_steps
            return c.density + (1 - c.density) * (1 - frac) ** 3
        return c.density

    def refresh_due(self) -> bool:
        c = self.config
        t = self.step_count
        return t >= c.warmup_steps and (t - c.warmup_steps) % c.refresh_every == 0

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Optimiser whose moments are reset for edges a refresh prunes or regrows (as RigL does)."""
        self.optimizer = optimizer

    def step(self) -> bool:
        """Advance one training step: fold the on-rates into their EMAs, refresh masks when due.

        Returns True when masks were refreshed.
        """
        self._check_live()
        self._update_ema()
        self.step_count += 1
        if self.refresh_due():
            self.refresh()
            return True
        return False

    # -- on-rates ---------------------------------------------------------------------------
    def _update_ema(self) -> None:
        items = list(self.layers.values())
        if not items:
            return
        sums, counts = zip(*(layer.probe.take() for layer in items), strict=True)
        flat = torch.cat(
            [s.float() for s in sums]
            + [torch.tensor(counts, dtype=torch.float32, device=sums[0].device)]
        )
        if dist.is_available() and dist.is_initialized():
            # All ranks fold the same fractions, so all hold the same EMAs and the same masks.
            dist.all_reduce(flat)
        n_units = sum(layer.units for layer in items)
        totals, cnts = flat[:n_units], flat[n_units:]
        start = 0
        for i, layer in enumerate(items):
            u = layer.units
            if cnts[i] > 0:
                frac = totals[start : start + u] / cnts[i]
                ema = self.config.ema
                layer.on_rate.mul_(ema).add_((1 - ema) * frac.to(layer.on_rate.device))
            start += u

    # -- refresh ----------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute every mask for the current target density (vectorised over units)."""
        self._check_live()
        density = self.target_density()
        for layer in self.layers.values():
            self._refresh_layer(layer, density)
        self.masked = True
        self.refreshes += 1

    def _refresh_layer(self, layer: _Layer, density: float) -> None:
        c = self.config
        U, K = layer.units, layer.full_fan
        total = round(density * U * K)
        old = layer.unit_mask().clone()
        k_max = old.sum(1) if (not c.regrow and self.masked) else None
        if c.method == "bb":
            deg = controller.bb_degrees(
                layer.on_rate, K, total, c.spread, c.min_fan, k_max, c.allocation
            )
        elif c.method == "bb_tiers":
            deg = controller.tier_degrees(
                layer.on_rate,
                K,
                total,
                c.tier_high,
                c.tier_low,
                c.dens_busy,
                c.dens_rare,
                c.min_fan,
                k_max,
            )
        else:
            deg = controller.uniform_degrees(U, K, total, k_max)
        if c.random_edges:
            assert layer.rand_scores is not None  # attach_bb draws them when they are used
            scores = layer.rand_scores
        else:
            scores = edge_scores(layer.module)
            if layer.mode == "out":
                scores = scores.T
        if k_max is not None:
            # No regrowth: only edges kept so far compete.
            scores = torch.where(old > 0, scores, torch.full_like(scores, -1.0))
        new = controller.topk_mask(scores.float(), deg)
        full = new if layer.mode == "in" else new.T
        layer.mask.mask.copy_(full)
        if c.rescale == "sqrt":
            kept_in = full.sum(1).clamp_min(1)
            layer.mask.scale.copy_(torch.sqrt(layer.c_in / kept_in))
        self._reset_moments(layer, changed=(new != old) if layer.mode == "in" else (new != old).T)

    def _reset_moments(self, layer: _Layer, changed: Tensor) -> None:
        if self.optimizer is None or not bool(changed.any()):
            return
        p = original_weight(layer.module)
        state = self.optimizer.state.get(p)
        if not state:
            return
        # Index the changed channel pairs rather than multiply by a mask: a refresh changes a
        # few percent of edges, so this touches a few percent of the moment tensors.
        # (A tuple of indices: boolean-mask assignment is 15x slower on CPU.)
        pairs = changed.to(p.device).nonzero(as_tuple=True)
        for value in state.values():
            if torch.is_tensor(value) and value.shape == p.shape:
                value[pairs] = 0

    # -- reporting --------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per layer: density (edges, params), on-rates, fan-in, fan-out, traffic, entropy, balance."""
        out: dict[str, dict[str, Any]] = {}
        for name, layer in self.layers.items():
            m = layer.mask.mask
            fan_in, fan_out = m.sum(1).long().cpu(), m.sum(0).long().cpu()
            deg = fan_in if layer.mode == "in" else fan_out
            a = layer.on_rate.detach().float().cpu()
            k_w = original_weight(layer.module)[0, 0].numel()
            h = binary_entropy(a)
            out[name] = {
                "mode": layer.mode,
                "full_fan": layer.full_fan,
                "density": float(m.mean()),
                "kept_params": int(m.sum()) * k_w,
                "params": m.numel() * k_w,
                "on_rate": a,
                "fan_in": fan_in,
                "fan_out": fan_out,
                "traffic": a * deg.float(),
                "entropy": float(h.sum()),
                "entropy_mean": float(h.mean()),
                "balance": balance_fit(a, deg, layer.full_fan),
            }
        return out

    def density(self) -> float:
        """Kept fraction of edges over every masked layer; cheap enough for every step."""
        kept = sum(float(layer.mask.mask.sum()) for layer in self.layers.values())
        edges = sum(layer.mask.mask.numel() for layer in self.layers.values())
        return kept / edges if edges else 1.0

    def summary(self) -> dict[str, float]:
        """The net as plain floats: density (edges and parameters), traffic, entropy, balance."""
        st = self.stats()
        if not st:
            return {}
        params = sum(s["params"] for s in st.values())
        kept_p = sum(s["kept_params"] for s in st.values())
        model_params = sum(p.numel() for p in self.model.parameters())
        a = torch.cat([s["on_rate"] for s in st.values()])
        deg = torch.cat(
            [
                (s["fan_in"] if s["mode"] == "in" else s["fan_out"]).float() / s["full_fan"]
                for s in st.values()
            ]
        )
        h = binary_entropy(a)
        bal = balance_fit(a, deg, 1.0)
        return {
            "step": float(self.step_count),
            "target_density": self.target_density(),
            "density": self.density(),
            "param_density": kept_p / params,
            "model_param_density": (model_params - (params - kept_p)) / model_params,
            "on_rate_mean": float(a.mean()),
            "traffic": float(sum(float(s["traffic"].sum()) for s in st.values())),
            "entropy": float(h.sum()),
            "entropy_mean": float(h.mean()),
            "balance_slope": bal["slope"],
            "balance_intercept": bal["intercept"],
            "balance_r2": bal["r2"],
            "layers": float(len(st)),
        }

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step_count,
            "refreshes": self.refreshes,
            "masked": self.masked,
            "layers": {
                name: {
                    "mode": layer.mode,
                    "on_rate": layer.on_rate.detach().cpu().clone(),
                    "mask": layer.mask.mask.detach().cpu().clone(),
                    "scale": layer.mask.scale.detach().cpu().clone(),
                }
                for name, layer in self.layers.items()
            },
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError("load_state_dict: not a bbem BB state (format tag missing)")
        missing = set(self.layers) ^ set(sd["layers"])
        if missing:
            raise ValueError(
                f"load_state_dict: layers differ from the attached ones: {sorted(missing)[:5]}"
            )
        self.step_count = int(sd["step"])
        self.refreshes = int(sd.get("refreshes", 0))
        self.masked = bool(sd.get("masked", True))
        with torch.no_grad():
            for name, s in sd["layers"].items():
                layer = self.layers[name]
                layer.on_rate.copy_(s["on_rate"])
                layer.mask.mask.copy_(s["mask"])
                layer.mask.scale.copy_(s["scale"])
                layer.probe.take()

    def bake(self) -> nn.Module:
        """Multiply masks (and rescale) into the weights; remove parametrizations and hooks."""
        return self._release(leave_parametrized=True)

    def detach(self) -> nn.Module:
        """Remove BB without baking (the weights become the unmasked originals)."""
        return self._release(leave_parametrized=False)

    def _release(self, leave_parametrized: bool) -> nn.Module:
        """The one way out: hooks, parametrizations and the model's mark go together, so the
        model can be attached again."""
        self._check_live()
        for layer in self.layers.values():
            for h in layer.hooks:
                h.remove()
            layer.hooks.clear()
            remove_mask(layer.module, bake=leave_parametrized)
        if getattr(self.model, "_bbem_bb", None) is self:
            del self.model._bbem_bb
        self.baked = True
        return self.model

    def __deepcopy__(self, memo: dict[int, Any]) -> BudgetedBroadcast:
        # Reached through ``copy.deepcopy(model)`` (EMA/SWA copies): the copy gets its own
        # layers, probes and hooks (the hooks are objects, so the memo maps them to the copy's
        # probes), but not the optimiser, which trains the original's weights only.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = None if k == "optimizer" else copy.deepcopy(v, memo)
        return new

    def _check_live(self) -> None:
        if self.baked:
            raise RuntimeError(
                "BB was baked or detached from this model; attach_bb again to continue"
            )


def _selected(model: nn.Module, layers: LayerSelector) -> list[tuple[str, nn.Module]]:
    named = [(n, m) for n, m in model.named_modules() if n]
    if callable(layers) and not isinstance(layers, type):
        return [(n, m) for n, m in named if layers(n, m)]
    items = tuple(layers) if not isinstance(layers, type) else (layers,)
    if all(isinstance(x, type) for x in items):
        types = cast(tuple[type[nn.Module], ...], items)
        for t in types:
            if not issubclass(t, SUPPORTED) or t.__name__.startswith("ConvTranspose"):
                raise ValueError(
                    f"layers: cannot mask type {t.__name__}; BB masks {[s.__name__ for s in SUPPORTED]}"
                )
        return [(n, m) for n, m in named if isinstance(m, types)]
    if all(isinstance(x, str) for x in items):
        return [(n, m) for n, m in named if any(fnmatch.fnmatchcase(n, p) for p in items)]
    raise ValueError(
        "layers: give a tuple of layer types, a list of name patterns, or a callable(name, module)"
    )


def attach_bb(
    model: nn.Module,
    config: BBConfig,
    layers: LayerSelector = SUPPORTED,
    modes: Mapping[str, str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> BudgetedBroadcast:
    """Attach BB (or a baseline) to every selected layer of ``model``.

    Args:
        layers: layer types (default Linear and Conv1d/2d/3d), fnmatch patterns of module
            names, or a predicate ``(name, module) -> bool``.
        modes: ``{name pattern: "in" | "out"}`` overriding ``config.mode`` per layer (the
            Transformer recipe: fan-in on the first feed-forward linear, fan-out on the second).
        optimizer: lets refreshes reset the moments of edges they prune or regrow.

    Layers with one input or output channel stay dense unless ``config.skip_unit_fan`` is off.
    """
    if not isinstance(config, BBConfig):
        raise ValueError(f"attach_bb: config must be a BBConfig, got {type(config).__name__}")
    if getattr(model, "_bbem_bb", None) is not None:
        raise ValueError("attach_bb: this model already has BB attached (attaching twice)")
    for pattern, mode in (modes or {}).items():
        if mode not in MODES:
            raise ValueError(f"modes[{pattern!r}] must be one of {list(MODES)}, got {mode!r}")
    chosen = _selected(model, layers)
    for name, m in chosen:
        check_maskable(name, m)
    if config.skip_unit_fan:
        chosen = [(n, m) for n, m in chosen if min(layer_weight(m).shape[:2]) > 1]
    if not chosen:
        raise ValueError("layers: no layer of the model matched, nothing to prune")

    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    leaf_index = {n: i for i, (n, _) in enumerate(leaves)}
    gen = torch.Generator().manual_seed(int(config.seed))
    records: list[_Layer] = []
    for name, module in chosen:
        mode = config.mode
        for pattern, pattern_mode in (modes or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                mode = pattern_mode
        weight = layer_weight(module)
        device = weight.device
        c_out, c_in = weight.shape[:2]
        units = c_out if mode == "in" else c_in
        mask = add_mask(module)
        rec = _Layer(
            name=name,
            module=module,
            mask=mask,
            mode=mode,
            probe=Probe(units, device),
            on_rate=torch.full((units,), 0.5, device=device),
        )
        if config.random_edges:
            s = torch.rand(c_out, c_in, generator=gen)
            rec.rand_scores = (s if mode == "in" else s.T).to(device)
        index = leaf_index.get(name) if config.probe == "act" else None
        _add_probe_hooks(rec, leaves, index)
        records.append(rec)
    bb = BudgetedBroadcast(model, config, records, optimizer)
    # marks the model so a second attach is refused (nn.Module's __setattr__ stub takes
    # tensors and modules only)
    model._bbem_bb = bb  # type: ignore[assignment]
    return bb


def _add_probe_hooks(rec: _Layer, leaves: list[tuple[str, nn.Module]], index: int | None) -> None:
    channel_dim = -1 if isinstance(rec.module, nn.Linear) else 1
    if rec.mode == "out":
        rec.hooks.append(rec.module.register_forward_pre_hook(PreHook(rec.probe, channel_dim)))
        return
    weight_layers = (nn.modules.conv._ConvNd, nn.Linear)
    act = following_activation(leaves, index, weight_layers) if index is not None else None
    rec.probe.fallback = act is None
    rec.hooks.append(rec.module.register_forward_hook(LayerHook(rec.probe, channel_dim)))
    if act is not None:
        rec.hooks.append(act[1].register_forward_hook(ActHook(rec.probe, channel_dim)))
