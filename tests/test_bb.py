"""The Budgeted Broadcast core: budget, rule, regrowth, masking, state, bake, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bb_nets import NETS, FeedForward, ResNet2d, batch_for
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bbem.bb import BBConfig, attach_bb, balance_fit, binary_entropy, decorrelation
from bbem.bb.controller import bb_degrees, rank_logit, solve_budget, topk_mask

METHODS = ["bb", "bb_tiers", "magnitude", "random"]


def _train(model, bb, x, steps, opt=None):
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2)
    bb.set_optimizer(opt)
    model.train()
    refreshed = []
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if bb.step():
            refreshed.append(bb.step_count)
    return opt, refreshed


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["in", "out"])
def test_exact_budget_after_every_refresh(net, method, mode):
    torch.manual_seed(0)
    model = NETS[net]()
    cfg = BBConfig(density=0.37, method=method, mode=mode, refresh_every=2, ramp_steps=4, min_fan=1)
    bb = attach_bb(model, cfg)
    assert bb.layers, "no layer masked"
    x = batch_for(net)
    for _ in range(4):
        _, refreshed = _train(model, bb, x, 2)
        assert refreshed
        d = bb.target_density()
        for name, layer in bb.layers.items():
            m = layer.mask.mask
            want = round(d * m.numel())
            # exact whenever min_fan allows it; never off by more than one edge per unit
            assert abs(int(m.sum()) - want) <= (0 if want >= layer.units else layer.units), name
            assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_dense_layers_left_alone_where_fan_is_one():
    model = NETS["unet3d"]()
    bb = attach_bb(model, BBConfig(density=0.5), layers=(nn.Conv3d,))
    for layer in bb.layers.values():
        assert layer.c_in > 1
        assert layer.c_out > 1
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert len(bb.layers) < len(convs)  # first conv (C_in 1) and output conv (C_out 1) skipped


@pytest.mark.parametrize("mode", ["in", "out"])
def test_rule_busier_units_keep_fewer_edges(mode):
    torch.manual_seed(1)
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.fill_(0.1)
    model = nn.Sequential(layer)
    bb = attach_bb(model, BBConfig(density=0.5, mode=mode, spread=0.1, skip_unit_fan=False))
    rec = bb.layers["0"]
    a = torch.rand(rec.units) * 0.9 + 0.05
    rec.on_rate.copy_(a)
    bb.refresh()
    deg = rec.unit_mask().sum(1)
    order = torch.argsort(a)
    assert torch.all(deg[order][1:] <= deg[order][:-1])  # higher on-rate -> never more edges


def test_rule_fits_the_balance_line():
    g = torch.Generator().manual_seed(3)
    K, U = 256, 256
    a = torch.rand(U, generator=g) * 0.5 + 0.25  # logit in about +-1.1: no clipping at spread 0.4
    deg = bb_degrees(a, K, total=round(0.5 * U * K), spread=0.4, k_min=1, k_max=None)
    assert int(deg.sum()) == round(0.5 * U * K)
    assert deg.min() > 1
    assert deg.max() < K
    fit = balance_fit(a, deg, K)
    assert fit["r2"] > 0.95
    # log((1-a)/a) = beta k with beta kbar = 1 / spread: the paper's balance line; balance_fit's
    # slope is beta K, and kbar = 0.5 K here
    assert fit["slope"] == pytest.approx(1 / (0.4 * 0.5), rel=0.05)


def test_spread_is_relative_to_the_mean_degree():
    # the same on-rates give the same degrees in mean-degree units at every density, so one
    # spread serves 0.5 and 0.1; with the spread of K (METHOD.md) the swing grows 5x at 0.1
    g = torch.Generator().manual_seed(4)
    K, U = 512, 256
    a = torch.rand(U, generator=g) * 0.4 + 0.3  # logit within +-0.85
    rel = {}
    for d in (0.5, 0.1):
        total = round(d * U * K)
        deg = bb_degrees(a, K, total, spread=0.5, k_min=1, k_max=None)
        assert int(deg.sum()) == total
        rel[d] = deg.double() / (total / U)
    assert torch.allclose(rel[0.5], rel[0.1], atol=2 / (0.1 * K))  # rounding: one edge
    assert float(rel[0.1].min()) > 0.5  # no unit squeezed to its floor
    # the same total at 0.1 with the K-relative swing of METHOD.md's spread 0.5 (0.5 / 0.1
    # = 5 mean degrees per unit of log-odds): the on-rate-0.7 end sits at the floor
    old = bb_degrees(a, K, round(0.1 * U * K), spread=0.5 / 0.1, k_min=1, k_max=None)
    assert int((old == 1).sum()) > U // 10


def test_rank_allocation_keeps_order_and_strength_but_not_the_law():
    # the ablation: degrees from on-rate ranks instead of log-odds
    g = torch.Generator().manual_seed(5)
    K, U = 128, 200
    # skewed on-rates, most units quiet: evenly spaced ranks misplace the busy tail
    a = torch.rand(U, generator=g) ** 3 * 0.7 + 0.15
    logit = torch.log((1 - a) / a).double()
    r = rank_logit(logit)
    assert torch.equal(torch.argsort(r, stable=True), torch.argsort(logit, stable=True))
    assert float(r.mean()) == pytest.approx(float(logit.mean()))
    assert float(r.std()) == pytest.approx(float(logit.std()))
    assert torch.allclose(r.sort().values.diff(), r.sort().values.diff()[0].expand(U - 1))
    total = round(0.3 * U * K)
    law = bb_degrees(a, K, total, spread=0.2, k_min=1, k_max=None)
    rank = bb_degrees(a, K, total, spread=0.2, k_min=1, k_max=None, allocation="rank")
    assert int(rank.sum()) == int(law.sum()) == total
    order = torch.argsort(a)
    assert torch.all(rank[order][1:] <= rank[order][:-1])  # busier: never more edges
    # measured: R^2 0.97 (the law) against 0.85 (rank)
    assert balance_fit(a, law, K)["r2"] > balance_fit(a, rank, K)["r2"] + 0.08


def test_rank_logit_leaves_degenerate_layers_alone():
    one = torch.tensor([0.3], dtype=torch.float64)
    same = torch.full((5,), -0.2, dtype=torch.float64)
    assert torch.equal(rank_logit(one), one)
    assert torch.equal(rank_logit(same), same)


@settings(max_examples=60, deadline=None)
@given(
    u=st.integers(1, 40),
    k=st.integers(1, 40),
    density=st.floats(0.01, 1.0),
    seed=st.integers(0, 1000),
    spread=st.floats(0.01, 5.0),
)
def test_solve_budget_properties(u, k, density, seed, spread):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(u, generator=g)
    total = round(density * u * k)
    deg = bb_degrees(a, k, total, spread, k_min=1, k_max=None)
    assert deg.min() >= min(1, k)
    assert deg.max() <= k
    assert int(deg.sum()) == max(total, u * min(1, k))
    order = torch.argsort(a.clamp(1e-4, 1 - 1e-4))
    assert torch.all(deg[order][1:] <= deg[order][:-1])


def test_solve_budget_respects_caps():
    deg = solve_budget(
        torch.zeros(4, dtype=torch.float64),
        torch.ones(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        torch.tensor([1.0, 10, 10, 10]),
        total=20,
    )
    assert deg.tolist()[0] == 1
    assert int(deg.sum()) == 20


def test_solve_budget_matches_bisection_on_large_layers():
    # Oracle: bisect t on the real-valued sum; the integer degrees may differ by < 1 per unit.
    g = torch.Generator().manual_seed(0)
    u, k = 3000, 512
    base = torch.randn(u, generator=g, dtype=torch.float64) * 100
    slope = torch.rand(u, generator=g, dtype=torch.float64) * 50 + 1
    lo = torch.randint(0, 20, (u,), generator=g).double()
    hi = torch.randint(200, k + 1, (u,), generator=g).double()
    total = 160_000
    deg = solve_budget(base, slope, lo, hi, total)
    a, b = -1e6, 1e6
    for _ in range(200):
        t = (a + b) / 2
        s = torch.minimum(torch.maximum(base + t * slope, lo), hi).sum()
        a, b = (t, b) if s < total else (a, t)
    real = torch.minimum(torch.maximum(base + a * slope, lo), hi)
    assert int(deg.sum()) == total
    assert torch.all((deg - real).abs() < 1 + 1e-6)
    assert torch.all(deg >= lo)
    assert torch.all(deg <= hi)


@settings(max_examples=40, deadline=None)
@given(
    u=st.integers(1, 30), k=st.integers(1, 30), seed=st.integers(0, 1000), levels=st.integers(1, 4)
)
def test_topk_mask_against_sorting_oracle(u, k, seed, levels):
    # Few distinct score levels force ties; the oracle is a stable descending sort per row.
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (u, k), generator=g).float()
    deg = torch.randint(0, k + 1, (u,), generator=g)
    m = topk_mask(scores, deg)
    for row in range(u):
        order = sorted(range(k), key=lambda j: (-scores[row, j].item(), j))
        expect = torch.zeros(k)
        expect[order[: int(deg[row])]] = 1
        assert torch.equal(m[row], expect)


def test_topk_mask_counts_and_choice():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    m = topk_mask(scores, torch.tensor([2, 1]))
    assert m.tolist() == [[1, 0, 1], [0, 1, 0]]


@pytest.mark.parametrize("regrow", [True, False])
def test_regrowth(regrow):
    layer = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1, 9.0).repeat(4, 1))
    model = nn.Sequential(layer)
    bb = attach_bb(
        model, BBConfig(density=0.5, method="magnitude", regrow=regrow, skip_unit_fan=False)
    )
    bb.refresh()
    m0 = bb.layers["0"].mask.mask.clone()
    assert m0[:, 0].sum() == 0  # smallest edge pruned
    with torch.no_grad():
        layer.parametrizations.weight.original[:, 0] = 100.0
    bb.refresh()
    m1 = bb.layers["0"].mask.mask
    assert int(m1.sum()) == int(m0.sum())
    if regrow:
        assert m1[:, 0].sum() == 4  # came back
    else:
        assert m1[:, 0].sum() == 0  # never does


@pytest.mark.parametrize("opt_name", ["Adam", "AdamW"])
def test_masked_edges_zero_weight_zero_grad(opt_name):
    torch.manual_seed(0)
    model = ResNet2d()
    opt = getattr(torch.optim, opt_name)(model.parameters(), lr=1e-2, weight_decay=1e-2)
    bb = attach_bb(model, BBConfig(density=0.4, refresh_every=100, method="random"), optimizer=opt)
    x = batch_for("resnet2d")
    _train(model, bb, x, 3, opt)  # dense warm steps build up Adam moments
    bb.refresh()
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        for layer in bb.layers.values():
            mask = layer.mask.mask.bool()
            w = layer.module.weight
            g = layer.module.parametrizations.weight.original.grad
            off = ~mask
            assert torch.all(w[off] == 0)
            assert torch.all(g[off] == 0)
        opt.step()
        for layer in bb.layers.values():
            assert torch.all(layer.module.weight[~layer.mask.mask.bool()] == 0)


def test_optimizer_moments_reset_for_changed_edges():
    torch.manual_seed(0)
    model = FeedForward()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    bb = attach_bb(
        model, BBConfig(density=0.5, method="magnitude", refresh_every=1000), optimizer=opt
    )
    _train(model, bb, batch_for("ffn"), 3, opt)
    bb.refresh()
    for layer in bb.layers.values():
        p = layer.module.parametrizations.weight.original
        pruned = ~layer.mask.mask.bool()
        assert torch.all(opt.state[p]["exp_avg"][pruned] == 0)
        assert torch.all(opt.state[p]["exp_avg_sq"][pruned] == 0)
        assert opt.state[p]["exp_avg_sq"][~pruned].abs().sum() > 0


def test_schedule_warmup_ramp_and_interval():
    model = FeedForward()
    bb = attach_bb(model, BBConfig(density=0.2, warmup_steps=3, ramp_steps=10, refresh_every=5))
    assert bb.target_density(0) == 1.0
    assert bb.target_density(2) == 1.0
    assert bb.target_density(3) == pytest.approx(1.0)
    assert bb.target_density(8) == pytest.approx(0.2 + 0.8 * 0.5**3)
    assert bb.target_density(13) == pytest.approx(0.2)
    assert bb.target_density(100) == 0.2
    _, refreshed = _train(model, bb, batch_for("ffn"), 14)
    assert refreshed == [3, 8, 13]
    assert all(torch.all(layer.mask.mask == 1) for layer in bb.layers.values()) is False


def test_warmup_is_dense_and_tracks_on_rates():
    model = FeedForward()
    bb = attach_bb(model, BBConfig(density=0.3, warmup_steps=10, ema=0.5))
    _train(model, bb, batch_for("ffn"), 5)
    for layer in bb.layers.values():
        assert torch.all(layer.mask.mask == 1)
        assert not torch.allclose(layer.on_rate, torch.full_like(layer.on_rate, 0.5))


def test_on_rate_is_measured_after_the_activation():
    conv = nn.Conv2d(2, 3, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(3, affine=False), nn.ReLU(), nn.Conv2d(3, 2, 1))
    bb = attach_bb(model, BBConfig(density=0.5, ema=0.0), layers=["0"])
    rec = bb.layers["0"]
    assert not rec.probe.fallback
    model.train()
    x = torch.randn(64, 2, 4, 4)
    model(x)
    bb.step()
    # BatchNorm centres each channel, so about half the positions are on after the ReLU
    assert torch.allclose(rec.on_rate, torch.full((3,), 0.5), atol=0.1)


def test_on_rate_fallback_and_fan_out_probe():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([1.0, -1.0, 1.0]))
    model = nn.Sequential(lin)
    bb = attach_bb(model, BBConfig(density=0.5, ema=0.0, skip_unit_fan=False))
    model.train()
    model(torch.randn(8, 4))
    bb.step()
    assert bb.layers["0"].on_rate.tolist() == [1.0, 0.0, 1.0]

    lin2 = nn.Linear(3, 5)
    model2 = nn.Sequential(lin2)
    bb2 = attach_bb(model2, BBConfig(density=0.5, ema=0.0, mode="out", skip_unit_fan=False))
    x = torch.tensor([[1.0, -1.0, 0.5], [1.0, -2.0, -0.5]])
    model2.train()
    model2(x)
    bb2.step()
    assert bb2.layers["0"].on_rate.tolist() == [1.0, 0.0, 0.5]


def test_eval_forwards_do_not_move_on_rates():
    model = FeedForward()
    bb = attach_bb(model, BBConfig(density=0.5))
    model.eval()
    model(batch_for("ffn"))
    bb.step()
    assert all(torch.all(layer.on_rate == 0.5) for layer in bb.layers.values())


@pytest.mark.parametrize("net", sorted(NETS))
def test_bake_keeps_outputs_and_leaves_a_plain_model(net):
    torch.manual_seed(0)
    model = NETS[net]()
    bb = attach_bb(model, BBConfig(density=0.5, refresh_every=2))
    x = batch_for(net)
    _train(model, bb, x, 4)
    model.eval()
    with torch.no_grad():
        before = model(x)
    bb.bake()
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert all(
        k.endswith(("weight", "bias")) or "running" in k or "num_batches" in k
        for k in model.state_dict()
    )
    with pytest.raises(RuntimeError):
        bb.step()


def test_modes_override_per_layer():
    model = FeedForward()
    bb = attach_bb(model, BBConfig(density=0.5, mode="in"), modes={"ff2": "out"})
    assert bb.layers["ff1"].mode == "in"
    assert bb.layers["ff2"].mode == "out"
    assert bb.layers["ff2"].units == 32


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"density": 0.5, "method": "lottery"}, "method"),
        ({"density": 0.5, "mode": "sideways"}, "mode"),
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"density": 0.5, "rescale": "cube"}, "rescale"),
        ({"density": 0.5, "allocation": "linear"}, "allocation"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BBConfig(**kwargs)


def test_bad_layers_and_attaching_twice():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.LSTM(4, 4))
    with pytest.raises(ValueError, match="ConvTranspose2d"):
        attach_bb(model, BBConfig(density=0.5), layers=(nn.ConvTranspose2d,))
    with pytest.raises(ValueError, match="LSTM"):
        attach_bb(model, BBConfig(density=0.5), layers=(nn.LSTM,))
    with pytest.raises(ValueError, match="grouped"):
        attach_bb(model, BBConfig(density=0.5), layers=["1"])
    ff = FeedForward()
    attach_bb(ff, BBConfig(density=0.5))
    with pytest.raises(ValueError, match="twice"):
        attach_bb(ff, BBConfig(density=0.5))
    with pytest.raises(ValueError, match="no layer"):
        attach_bb(nn.Sequential(nn.ReLU()), BBConfig(density=0.5))


def test_diagnostics_against_numpy():
    assert binary_entropy(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0.0, 1.0, 0.0]
    a = torch.tensor([0.1, 0.3])
    want = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert float(binary_entropy(a)[0]) == pytest.approx(want, rel=1e-5)

    rng = np.random.default_rng(0)
    means = rng.normal(size=(50, 6))
    means[:, 1] = means[:, 0] * 2 + 0.01 * rng.normal(size=50)
    r = np.corrcoef(means.T)
    want = np.abs(r[~np.eye(6, dtype=bool)]).mean()
    assert decorrelation(torch.tensor(means)) == pytest.approx(want, rel=1e-9)

    k = rng.integers(1, 64, size=30)
    on = rng.uniform(0.05, 0.95, size=30)
    fit = balance_fit(torch.tensor(on), torch.tensor(k), 64)
    y = np.log((1 - on) / on)
    slope, intercept = np.polyfit(k / 64, y, 1)
    assert fit["slope"] == pytest.approx(slope)
    assert fit["intercept"] == pytest.approx(intercept)


def test_stats_and_summary_shapes():
    model = FeedForward()
    bb = attach_bb(model, BBConfig(density=0.5, refresh_every=1), modes={"ff2": "out"})
    _train(model, bb, batch_for("ffn"), 2)
    st = bb.stats()
    assert st["ff1"]["fan_in"].shape == (32,)
    assert st["ff1"]["fan_out"].shape == (16,)
    assert st["ff1"]["on_rate"].shape == (32,)
    assert st["ff2"]["on_rate"].shape == (32,)
    assert st["ff1"]["density"] == pytest.approx(0.5)
    s = bb.summary()
    assert s["density"] == pytest.approx(0.5)
    assert 0 < s["model_param_density"] < 1
    assert set(st["ff1"]["balance"]) >= {"slope", "intercept", "r2"}


def test_output_probe_reads_the_layer_not_the_activation():
    conv = nn.Conv2d(2, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.0, -1.0, 1.0]))
    model = nn.Sequential(conv, nn.BatchNorm2d(3, affine=False), nn.ReLU(), nn.Conv2d(3, 2, 1))
    bb = attach_bb(model, BBConfig(density=0.5, ema=0.0, probe="output"), layers=["0"])
    model.train()
    model(torch.randn(8, 2, 4, 4))
    bb.step()
    assert bb.layers["0"].on_rate.tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("release", ["bake", "detach"])
def test_attach_again_after_release(release):
    torch.manual_seed(0)
    model = FeedForward()
    bb = attach_bb(model, BBConfig(density=0.5, refresh_every=1))
    x = batch_for("ffn")
    _train(model, bb, x, 3)
    getattr(bb, release)()
    assert not hasattr(model, "_bbem_bb")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="attach_bb again"):
        bb.step()
    again = attach_bb(model, BBConfig(density=0.25, refresh_every=1))
    _train(model, again, x, 3)
    assert again.density() == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize("mode", ["in", "out"])
def test_deepcopy_gives_the_copy_its_own_probes(mode):
    import copy

    torch.manual_seed(0)
    model = FeedForward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bb = attach_bb(model, BBConfig(density=0.5, mode=mode, warmup_steps=0), optimizer=opt)
    twin = copy.deepcopy(model)
    twin_bb = twin._bbem_bb
    assert twin_bb is not bb
    assert twin_bb.model is twin
    assert twin_bb.optimizer is None
    twin.train()
    twin(batch_for("ffn"))
    assert all(layer.probe.count == 0 for layer in bb.layers.values())  # original untouched
    assert all(layer.probe.count == 1 for layer in twin_bb.layers.values())
    twin_bb.bake()  # releasing the copy leaves the original attached and live
    assert model._bbem_bb is bb
    model(batch_for("ffn"))
    assert all(layer.probe.count == 1 for layer in bb.layers.values())
    bb.step()


@pytest.mark.parametrize("mode", ["in", "out"])
def test_sqrt_rescale_is_exact(mode):
    """scale[o] = sqrt(C_in / kept inputs of o), and the effective weight is W * mask * scale."""
    torch.manual_seed(3)
    model = FeedForward()
    bb = attach_bb(model, BBConfig(density=0.3, mode=mode, spread=0.3, warmup_steps=0))
    for layer in bb.layers.values():
        layer.on_rate.copy_(torch.rand(layer.units) * 0.9 + 0.05)
    bb.refresh()
    for layer in bb.layers.values():
        m = layer.mask.mask
        kept_in = m.sum(1)
        assert int(kept_in.min()) < layer.c_in  # something was pruned in some row
        torch.testing.assert_close(layer.mask.scale, torch.sqrt(layer.c_in / kept_in.clamp_min(1)))
        w = layer.module.parametrizations.weight.original
        torch.testing.assert_close(
            layer.module.weight,
            w * (m * layer.mask.scale[:, None]).view(*m.shape, *[1] * (w.dim() - 2)),
        )


@pytest.mark.parametrize("mode", ["in", "out"])
def test_tiers_busy_units_keep_fewer_edges_than_rare(mode):
    torch.manual_seed(4)
    layer = nn.Linear(64, 48)
    model = nn.Sequential(layer)
    cfg = BBConfig(density=0.5, mode=mode, method="bb_tiers", skip_unit_fan=False)
    bb = attach_bb(model, cfg)
    rec = bb.layers["0"]
    a = torch.full((rec.units,), 0.4)
    a[: rec.units // 3] = 0.9  # busy: above tier_high 0.7
    a[-(rec.units // 3) :] = 0.05  # rare: below tier_low 0.1
    rec.on_rate.copy_(a)
    bb.refresh()
    deg = rec.unit_mask().sum(1)
    busy, rare, mid = deg[a > cfg.tier_high], deg[a < cfg.tier_low], deg[(a >= 0.1) & (a <= 0.7)]
    assert busy.max() < rare.min()
    assert busy.max() < mid.min()
    # the tiers' ratio: busy keep dens_busy / dens_rare of what rare units keep (to rounding)
    assert float(busy.float().mean() / rare.float().mean()) == pytest.approx(
        cfg.dens_busy / cfg.dens_rare, abs=0.05
    )


@pytest.mark.parametrize("mode", ["in", "out"])
def test_random_edges_keep_bbs_degrees_but_not_its_choice(mode):
    # the ablation that parts how many edges (the law) from which (the largest weights)
    torch.manual_seed(6)
    a = torch.rand(48) * 0.9 + 0.05

    def masks(edges: str, method: str = "bb") -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for weight_seed in (7, 8):  # the same net with other weights
            torch.manual_seed(weight_seed)
            layer = nn.Linear(48, 48)
            cfg = BBConfig(density=0.3, mode=mode, method=method, edges=edges, skip_unit_fan=False)
            bb = attach_bb(nn.Sequential(layer), cfg)
            bb.layers["0"].on_rate.copy_(a)
            bb.refresh()
            out.append(bb.layers["0"].unit_mask().clone())
        return out[0], out[1]

    w1, w2 = masks("magnitude")
    r1, r2 = masks("random")
    assert torch.equal(r1.sum(1), w1.sum(1))  # BB's degrees, unit by unit
    assert torch.equal(r1, r2)  # the weights do not choose
    assert not torch.equal(w1, w2)  # they do for the rule's own choice
    assert not torch.equal(r1, w1)
    # magnitude ignores it: its edges stay the largest weights
    m1, _ = masks("random", method="magnitude")
    m0, _ = masks("magnitude", method="magnitude")
    assert torch.equal(m1, m0)
