"""The config schema: overrides, loading, validation messages, the shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bbem.config import BBSection, RunConfig, apply_overrides, load_config, resolve_volumes
from bbem.errors import UserError
from bbem.model import DEFAULT_MODEL


def test_apply_overrides_parses_yaml_values_and_copies():
    base = {"bb": {"density": 0.5}, "model": {"channels": [8, 16]}}
    out = apply_overrides(
        base, ["model.channels=[16,32,64]", "bb.density=0.3", "bb.regrow=false", "new.a.b=x"]
    )
    assert out["model"]["channels"] == [16, 32, 64]
    assert out["bb"]["density"] == 0.3
    assert out["bb"]["regrow"] is False
    assert out["new"] == {"a": {"b": "x"}}
    assert base == {"bb": {"density": 0.5}, "model": {"channels": [8, 16]}}


def test_apply_overrides_errors():
    with pytest.raises(UserError, match=r"bb\.density is a value"):
        apply_overrides({"bb": {"density": 0.5}}, ["bb.density.x=1"])
    with pytest.raises(UserError, match="not key=value"):
        apply_overrides({}, ["bb.density"])
    with pytest.raises(UserError, match="empty part"):
        apply_overrides({}, ["bb..density=1"])


REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))
# the EM configs (the companion tasks' configs have their own schema)
EM_CONFIGS = [REPO / "configs" / n for n in ("demo.yaml", "cremi.yaml")] + sorted(
    (REPO / "configs" / "bench").glob("real_*.yaml")
)


@pytest.fixture
def demo(monkeypatch) -> Path:
    monkeypatch.chdir(REPO)
    return REPO / "configs" / "demo.yaml"


@pytest.mark.parametrize("path", EM_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_configs_validate_and_round_trip(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    f = cfg.model.downsample_factor()
    assert all(s % k == 0 for s, k in zip(cfg.data.patch_size, f, strict=True))
    # the saved config.yaml reads back to the same config
    again = RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    assert Path(cfg.data.root).is_absolute()


def test_at_least_the_required_configs_exist():
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    assert {"demo.yaml", "cremi.yaml"} <= names
    assert {f"bench/real_{m}.yaml" for m in ("dense", "bb", "magnitude", "random")} <= names


def test_bench_configs_differ_only_in_method(monkeypatch):
    monkeypatch.chdir(REPO)
    dicts = [
        load_config(REPO / f"configs/bench/real_{m}.yaml").to_dict()
        for m in ("dense", "bb", "magnitude", "random")
    ]
    for d in dicts:
        d.pop("name")
        d["bb"].pop("method")
    assert all(d == dicts[0] for d in dicts)
    # split by synapse (y), as configs/vnc.yaml: a split by section leaks synapses
    assert dicts[0]["data"]["train"][0]["y_range"] == [0, 640]
    assert dicts[0]["data"]["val"][0]["y_range"] == [640, 1024]


def test_bench_configs_find_the_real_data(shared_data, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs/bench/real_bb.yaml")
    if shared_data.resolve() != (REPO.parent / "shared" / "data").resolve():
        pytest.skip("real data moved by BBEM_SHARED_DATA; the config's relative path differs")
    assert resolve_volumes(cfg) == [shared_data.resolve() / "vnc-stack1-left.hdf"] * 2


def test_cremi_missing_files_say_where_and_how(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "cremi.yaml")
    with pytest.raises(UserError) as e:
        resolve_volumes(cfg)
    msg = str(e.value)
    assert "sample_A_20160501.hdf" in msg
    assert str(tmp_path / "data" / "cremi") in msg
    assert "https://cremi.org/data/" in msg
    assert "\n" not in msg
    assert [v.path for v in cfg.data.train] == ["sample_A_20160501.hdf", "sample_B_20160501.hdf"]
    assert [v.path for v in cfg.data.val] == ["sample_C_20160501.hdf"]


def test_missing_plain_file_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_dict(
        {
            "name": "x",
            "data": {"train": [{"path": "a.zarr"}], "val": [{"path": "/abs/b.zarr"}]},
            "train": {"steps": 1},
        }
    )
    with pytest.raises(UserError, match=r"a\.zarr not found.*data\.train\[0\]\.path"):
        resolve_volumes(cfg)


def test_synth_volumes_are_made_by_the_data_side_not_by_the_config(tmp_path, monkeypatch):
    from bbem.data import ensure_volumes

    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_dict(
        {
            "name": "x",
            "data": {
                "root": "d",
                "train": [{"path": "t.zarr", "synth": {"shape": [4, 64, 64], "seed": 3}}],
                "val": [{"path": "t.zarr"}],  # the same file: made once, from the train spec
            },
            "train": {"steps": 1},
        }
    )
    # resolving a config writes nothing
    assert resolve_volumes(cfg) == [tmp_path / "d" / "t.zarr"] * 2
    assert not (tmp_path / "d").exists()
    paths = ensure_volumes(cfg)
    assert paths == [tmp_path / "d" / "t.zarr"] * 2
    from bbem.volumes import open_volume

    assert open_volume(paths[0], "volumes/raw").shape == (4, 64, 64)


def test_loading_a_config_loads_no_torch(demo):
    code = (
        "import sys; from bbem.config import load_config; "
        "load_config('configs/demo.yaml', ['model.norm=[group, {num_groups: 4}]']); "
        "assert 'torch' not in sys.modules, 'torch loaded'; "
        "assert 'monai' not in sys.modules, 'monai loaded'"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_monai_layer_names_match_the_installed_monai():
    from monai.networks.layers.factories import Act, Norm

    from bbem.architecture import MONAI_ACTS, MONAI_NORMS

    assert tuple(n.lower() for n in Norm.names) == MONAI_NORMS
    assert tuple(n.lower() for n in Act.names) == MONAI_ACTS


def test_one_downsample_factor():
    from bbem.architecture import downsample_factor

    assert downsample_factor() == (2, 8, 8)  # DEFAULT_MODEL
    assert downsample_factor({"strides": [2, [1, 2, 2]]}) == (2, 4, 4)
    assert downsample_factor({"name": "basicunet"}) == (16, 16, 16)
    import bbem.model

    assert bbem.model.downsample_factor is downsample_factor


def test_overrides_apply_before_validation(demo):
    cfg = load_config(demo, ["data.patch_size=[16,128,64]", "augment.rot90=0"])
    assert cfg.data.patch_size == (16, 128, 64)
    cfg = load_config(demo, ["model.channels=[16,32,64,128]", "bb.density=0.3", "train.steps=7"])
    assert cfg.model.channels == [16, 32, 64, 128]
    assert cfg.bb.density == 0.3
    assert cfg.train.steps == 7
    cfg = load_config(demo, ["data.train.0.z_range=[0,10]"])
    assert cfg.data.train[0].z_range == (0, 10)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bb.densty=0.3", "config error: bb.densty is not a field; did you mean bb.density?"),
        ("bb.density=1.5", "config error: bb.density must be in (0, 1], got 1.5"),
        ("bb.density=0", "config error: bb.density must be in (0, 1], got 0"),
        ("augment.flip=0.2", "augment.flip is not a field; did you mean augment.flips?"),
        (
            "data.train.0.rawkey=a",
            "data.train[0].rawkey is not a field; did you mean data.train[0].raw_key?",
        ),
        ("trian.steps=3", "trian is not a field; did you mean train?"),
        ("zzz=3", "zzz is not a field; valid keys: name, data"),
        (
            "bb.method=magnitud",
            "bb.method must be 'dense', 'bb', 'bb_tiers', 'magnitude' or 'random' (did you mean 'magnitude'?)",
        ),
        ("train.steps=0", "train.steps must be greater than 0, got 0"),
        (
            "data.patch_size=[15,128,128]",
            "data.patch_size [15, 128, 128] must be a multiple of the model's downsample factor [2, 8, 8] along z, y, x: try [16, 128, 128]",
        ),
        ("data.patch_size=[16,128]", "data.patch_size is too short"),
        (
            "model.strides=[[1,2,2],[1,2],[2,2,2]]",
            "model.strides[1] must be an integer or a [z, y, x] triple of integers, got [1, 2]",
        ),
        (
            "model.channels=[8,16]",
            "model.strides needs one entry per level below the top: 1 for channels [8, 16], got 3",
        ),
        ("loss.pos_weight=lots", "loss.pos_weight must be a number or 'auto', got 'lots'"),
        ("loss.pos_weight=-1", "loss.pos_weight must be > 0 or 'auto', got -1"),
        ("bb.density=null", "bb.density is required for method 'bb'"),
        ("augment.noise=2", "augment.noise must be less than or equal to 1, got 2"),
        (
            "data.train.0.z_range=[5,2]",
            "data.train[0].z_range must be [start, stop] with 0 <= start < stop, got [5, 2]",
        ),
        ("train=3", "train must be a section"),
        ("train.device=gpu", "train.device must be 'auto', 'cpu' or 'cuda'"),
        ("train.threads=0", "train.threads must be greater than or equal to 1, got 0"),
        ("data.patch_size=[16,128,64]", "has y != x, but augment.rot90 turns patches"),
        ("model.norm=instanc", "model.norm must be one of MONAI's instance, batch"),
        ("model.act=rellu", "did you mean 'relu'?"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(demo, override, message):
    with pytest.raises(UserError) as e:
        load_config(demo, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_many_errors_report_the_first_and_count(demo):
    with pytest.raises(UserError, match=r"and 1 more problem\)$"):
        load_config(demo, ["bb.densty=0.3", "train.steps=-1"])


def test_missing_and_unreadable_config_files(tmp_path):
    with pytest.raises(UserError, match=r"config file .*nope\.yaml not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(bad)
    bad.write_text("name: x\ndata: {train: [{path: a}], val: [{path: b}]}\n")
    with pytest.raises(UserError, match="config error: train is required"):
        load_config(bad)


def test_defaults_and_empty_sections(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "c.yaml"
    p.write_text(
        "name: x\ndata: {train: [{path: a}], val: [{path: b}]}\ntrain: {steps: 5}\naugment:\n"
    )
    cfg = load_config(p)
    assert cfg.model.model_dump(mode="json") == {**DEFAULT_MODEL}
    assert cfg.data.patch_size == (16, 160, 160)
    assert (cfg.data.batch_size, cfg.data.pos_fraction, cfg.data.workers) == (2, 0.5, 0)
    assert cfg.bb.method == "dense"
    assert cfg.bb_kwargs() is None
    assert cfg.data.root == str(tmp_path.resolve())
    assert cfg.data.resolve("a") == tmp_path.resolve() / "a"
    assert cfg.data.resolve("/x/y") == Path("/x/y")
    assert cfg.loss.pos_weight == 2.0
    assert cfg.optim.lr == 1e-3
    assert cfg.train.device == "auto"


def test_bb_kwargs_build_the_cores_config(demo):
    from bbem.bb import BBConfig

    cfg = load_config(demo, ["bb.method=magnitude", "bb.mode=out", "bb.density=0.25"])
    c = BBConfig(**cfg.bb_kwargs())
    assert (c.method, c.mode, c.density, c.refresh_every) == ("magnitude", "out", 0.25, 25)


def test_bb_section_is_bbconfig_plus_dense():
    """Every BBConfig field is a bb key with the same default and the same allowed values;
    the YAML adds only ``method: dense`` (its default) and so an optional density."""
    import dataclasses
    import typing

    from bbem.bb import BBConfig
    from bbem.bb.config import CHOICES, RANGES

    core = {f.name: f.default for f in dataclasses.fields(BBConfig)}
    fields = BBSection.model_fields
    assert set(fields) == set(core)
    ours = BBSection(method="bb", density=0.5).model_dump()
    assert ours == {**core, "method": "bb", "density": 0.5}
    assert BBSection().method == "dense"
    assert BBSection().density is None
    for name, allowed in CHOICES.items():
        extra = ("dense",) if name == "method" else ()
        assert typing.get_args(fields[name].annotation) == (*extra, *allowed), name
    # each range is enforced alike: a value just outside fails both, with the same words
    for name, allowed in RANGES.items():
        bad = (
            (allowed.lo if allowed.lo_open else allowed.lo - 1) if allowed.lo is not None else None
        )
        if bad is None:
            continue
        with pytest.raises(ValueError, match=f"{name} must be {re.escape(str(allowed))}"):
            BBConfig(**{"density": 0.5, name: bad})
        with pytest.raises(UserError, match=f"bb.{name} must be {re.escape(str(allowed))}"):
            RunConfig.from_dict(
                {
                    "name": "x",
                    "data": {"train": [{"path": "a"}], "val": [{"path": "a"}]},
                    "bb": {"method": "bb", "density": 0.5, name: bad},
                    "train": {"steps": 1},
                }
            )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bb.min_fan=0", "bb.min_fan must be greater than or equal to 1, got 0"),
        ("bb.tier_low=0.9", "bb.tier_low (0.9) must not exceed bb.tier_high (0.7)"),
        ("bb.ema=1", "bb.ema must be in [0, 1), got 1"),
        ("bb.spread=0", "bb.spread must be greater than 0, got 0"),
        ("bb.probe=conv", "bb.probe must be 'act' or 'output'"),
        ("bb.method=dense", None),
    ],
)
def test_bb_rules_in_yaml(demo, override, message):
    if message is None:
        assert load_config(demo, [override, "bb.density=null"]).bb_kwargs() is None
        return
    with pytest.raises(UserError) as e:
        load_config(demo, ["bb.method=bb", "bb.density=0.5", override])
    assert message in str(e.value)


def test_model_section_builds_a_model_that_fits_the_patch(demo):
    import torch

    from bbem.model import build_model

    cfg = load_config(demo, ["data.patch_size=[8,32,32]", "model.norm=[instance, {affine: true}]"])
    net = build_model(cfg.to_dict()["model"])
    out = net(torch.zeros(1, 1, *cfg.data.patch_size))
    assert out.shape == (1, 1, *cfg.data.patch_size)
