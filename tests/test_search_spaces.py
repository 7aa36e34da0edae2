"""Search spaces: the YAML syntax, its checks (file + knob named), Tune domains, sampling, applying."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, Field

from pmvis.core.config import apply_dotted, build_config
from pmvis.core.errors import PmvisError
from pmvis.models.fusion import FuseConfig
from pmvis.models.vis.config import LossConfig
from pmvis.platform.pseudo.filters import FilterConfig
from pmvis.platform.tune.knobs import KNOB_ROOTS, base_config, check_knob_path
from pmvis.platform.tune.search_spaces import SearchSpace, list_spaces, load_space

SHIPPED = ("mask_sources", "filters", "tk_loss", "pmvis", "demo")
MODELS = {"fuse": FuseConfig, "filter": FilterConfig, "loss": LossConfig}


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_spaces_are_listed():
    assert set(SHIPPED) <= set(list_spaces())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_samples_build_valid_configs(name):
    space = load_space(name)
    assert len(space) > 0 and space.name == name
    rng = np.random.default_rng(0)
    base = base_config()
    for _ in range(20):
        knobs = space.sample(rng)
        assert set(knobs) == set(space.knobs)
        applied = apply_dotted(base, knobs)
        models = {root: build_config(cls, applied[root], source=f"{name} sample") for root, cls in MODELS.items()}
        for path, value in knobs.items():  # every sampled value landed in its model
            root, *rest = path.split(".")
            node = models[root].model_dump()
            for seg in rest:
                node = node[seg]
            assert node == value
        assert space.knobs_of(applied) == knobs
        assert set(space.validate(knobs)) == set(space.roots)


def test_shipped_spaces_cover_the_issue_knobs():
    mask = load_space("mask_sources").knobs
    for source in ("hqsam", "track", "boxinst", "grabcut"):
        assert f"fuse.source_weights.{source}" in mask and f"fuse.scm_thresholds.{source}" in mask
    assert mask["fuse.mode"].kind == "choice"
    assert {"filter.ria_tau", "filter.missing_min_confidence", "filter.missing_min_area"} <= set(load_space("filters").knobs)
    tk = load_space("tk_loss").knobs
    assert tk["loss.tk_patch_size"].args == (1, 3, 5)
    assert tk["loss.tk_k"].kind == "randint" and tk["loss.tk_k"].args == (1, 10)  # K in 1..9
    for f in ("tk_window", "tk_dilation", "tk_threshold", "tk_weight"):
        assert f"loss.{f}" in tk
    full = load_space("pmvis").knobs
    for part in ("mask_sources", "filters", "tk_loss"):
        assert set(load_space(part).knobs) <= set(full)
    assert {"loss.pseudo_focal_weight", "loss.pseudo_dice_weight", "loss.class_weight"} <= set(full)


def test_sample_is_reproducible_and_stays_in_range():
    space = load_space("tk_loss")
    assert space.sample(3) == space.sample(3) == space.sample(random.Random(3))
    for _ in range(50):
        s = space.sample(np.random.default_rng())
        assert 1 <= s["loss.tk_k"] <= 9 and isinstance(s["loss.tk_k"], int)
        assert 0.01 <= s["loss.tk_threshold"] < 0.5
        assert s["loss.tk_patch_size"] in (1, 3, 5)
        assert s["loss.tk"] is True


def test_to_tune_gives_nested_tune_domains_that_resolve():
    from ray import tune
    from ray.tune.search.sample import Categorical, Domain, Float, Integer
    from ray.tune.search.variant_generator import generate_variants

    space = load_space("pmvis")
    param_space = space.to_tune()
    assert isinstance(param_space["fuse"]["source_weights"]["hqsam"], Float)
    assert isinstance(param_space["fuse"]["mode"], Categorical)
    assert isinstance(param_space["loss"]["tk_k"], Integer)
    assert isinstance(param_space["loss"]["tk_weight"], Domain)
    assert param_space["loss"]["tk"] is True and param_space["loss"]["mode"] == "pmvis"
    param_space["filter"]["ria_tau"] = tune.grid_search([0.6, 0.7])
    resolved = [cfg for _, cfg in generate_variants(param_space)]
    assert [c["filter"]["ria_tau"] for c in resolved] == [0.6, 0.7]
    for cfg in resolved:  # a trial config reads back and validates
        knobs = space.knobs_of(cfg)
        space.validate(knobs)


def test_grid_maps_to_grid_search(tmp_path):
    space = load_space(_write(tmp_path, "filter.ria_tau: {grid: [0.6, 0.7, 0.8]}\nfuse.mode: {choice: [select, vote]}\n"))
    assert space.to_tune()["filter"]["ria_tau"] == {"grid_search": [0.6, 0.7, 0.8]}
    assert space.grid_size == 3
    assert {space.sample(i)["filter.ria_tau"] for i in range(40)} == {0.6, 0.7, 0.8}


def test_load_space_by_path_and_name(tmp_path):
    path = _write(tmp_path, "# a comment\nfilter.ria_tau: {uniform: [0.6, 0.8]}\nloss.tk: true\n", "mine.yaml")
    space = load_space(path)
    assert isinstance(space, SearchSpace) and space.name == "mine" and space.source == str(path)
    assert space.knobs["loss.tk"].kind == "value"
    assert load_space(str(path)).knobs.keys() == space.knobs.keys()
    with pytest.raises(PmvisError, match="no search space 'nope'.*tk_loss"):
        load_space("nope")


def test_include_merges_and_overrides(tmp_path):
    _write(tmp_path, "filter.ria_tau: {uniform: [0.6, 0.8]}\n", "a.yaml")
    space = load_space(_write(tmp_path, "include: [a.yaml, tk_loss]\nfilter.ria_tau: 0.65\n", "b.yaml"))
    assert space.knobs["filter.ria_tau"].args == 0.65
    assert "loss.tk_k" in space.knobs
    _write(tmp_path, "include: [d.yaml]\n", "c.yaml")
    _write(tmp_path, "include: [c.yaml]\n", "d.yaml")
    with pytest.raises(PmvisError, match="include cycle"):
        load_space(tmp_path / "c.yaml")


@pytest.mark.parametrize("text, knob, message", [
    ("fuse.mode: {pick: [select, vote]}", "fuse.mode", "unknown distribution 'pick'"),
    ("fuse.mode: {choice: [select], grid: [vote]}", "fuse.mode", "exactly one key"),
    ("filter.ria_tau: {uniform: [0.9, 0.5]}", "filter.ria_tau", "low < high"),
    ("filter.ria_tau: {uniform: [0.5]}", "filter.ria_tau", r"needs \[low, high\]"),
    ("filter.ria_tau: {uniform: [a, 0.5]}", "filter.ria_tau", "finite numbers"),
    ("loss.tk_weight: {loguniform: [0.0, 1.0]}", "loss.tk_weight", "0 < low"),
    ("loss.tk_k: {randint: [1.5, 9]}", "loss.tk_k", "integers"),
    ("loss.tk_k: {randint: [5, 5]}", "loss.tk_k", "low < high"),
    ("fuse.mode: {choice: []}", "fuse.mode", "non-empty list"),
    ("fuse.modee: {choice: [select]}", "fuse.modee", "FuseConfig .* has no field 'modee'"),
    ("optim.lr: {uniform: [0.1, 0.2]}", "optim.lr", "unknown root 'optim'"),
    ("ria_tau: 0.7", "ria_tau", "unknown knob"),
    ("loss.tk_k.x: {randint: [1, 3]}", "loss.tk_k.x", "no sub-knob 'x'"),
    ("filter.ria_tau: {uniform: [0.5, 1.5]}", "filter.ria_tau", "value 1.5 is invalid"),
    ("fuse.mode: {choice: [select, median]}", "fuse.mode", "value 'median' is invalid"),
    ("fuse.source_weights.hqsam: {uniform: [-1.0, 1.0]}", "fuse.source_weights.hqsam", "value -1.0 is invalid"),
    ("loss.tk_patch_size: {choice: [2, 3]}", "loss.tk_patch_size", "positive odd integer"),
    ("filter.missing_min_area: {uniform: [1.5, 8.0]}", "filter.missing_min_area", "value 1.5 is invalid"),
])
def test_malformed_space_names_file_and_knob(tmp_path, text, knob, message):
    path = _write(tmp_path, text + "\n")
    with pytest.raises(PmvisError) as err:
        load_space(path)
    assert str(path) in str(err.value)
    assert knob in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


def test_bad_yaml_and_shape_name_the_file(tmp_path):
    for text in ("- a\n- b\n", "fuse.mode: [unclosed\n"):
        path = _write(tmp_path, text)
        with pytest.raises(PmvisError, match=str(path)):
            load_space(path)


def test_coupled_knobs_are_checked_together(tmp_path):
    # tk_k <= tk_window²: 25 is fine with window 5 only; sampling it with window 3 is invalid.
    ok = load_space(_write(tmp_path, "loss.tk_window: 5\nloss.tk_k: {randint: [1, 26]}\n", "ok.yaml"))
    assert ok.knobs["loss.tk_k"].args == (1, 26)
    bad = _write(tmp_path, "loss.tk_window: {choice: [3, 5]}\nloss.tk_k: {randint: [1, 26]}\n", "bad.yaml")
    with pytest.raises(PmvisError, match=r"bad\.yaml.*loss\.tk_window, loss\.tk_k.*tk_k must be in"):
        load_space(bad)
    never = _write(tmp_path, "loss.tk_window: {choice: [3, 5]}\nloss.tk_k: {randint: [1, 40]}\n", "never.yaml")
    with pytest.raises(PmvisError, match=r"never\.yaml: loss\.tk_k: value 39 is invalid"):
        load_space(never)


def test_check_knob_path_walks_models_and_dicts():
    assert check_knob_path("fuse.source_weights.any_new_source")[1] is FuseConfig
    assert check_knob_path("filter.fuse.mode")[1] is FilterConfig  # nested model
    with pytest.raises(PmvisError, match="empty segment"):
        check_knob_path("fuse..mode")
    with pytest.raises(PmvisError, match="no sub-knob"):
        check_knob_path("fuse.source_weights.hqsam.x")


def test_apply_knobs_sets_paths_without_touching_base():
    base = {"fuse": FuseConfig().model_dump(), "x": 1}
    out = apply_dotted(base, {"fuse.source_weights.hqsam": 1.7, "fuse.mode": "vote", "loss.tk": True})
    assert out["fuse"]["source_weights"] == {"hqsam": 1.7, "track": 1.0, "boxinst": 1.0, "grabcut": 0.5}
    assert out["fuse"]["mode"] == "vote" and out["loss"] == {"tk": True} and out["x"] == 1
    assert base["fuse"]["source_weights"]["hqsam"] == 1.0 and "loss" not in base
    with pytest.raises(PmvisError, match="'x' is a int"):
        apply_dotted(base, {"x.y": 2})


def test_knob_roots_can_be_extended(tmp_path, monkeypatch):
    class TrainKnobs(BaseModel):
        lr: float = Field(1e-4, gt=0)
        batch: int = 4

    monkeypatch.setitem(KNOB_ROOTS, "train", TrainKnobs)
    space = load_space(_write(tmp_path, "train.lr: {loguniform: [1.0e-5, 1.0e-3]}\ntrain.batch: {choice: [2, 4, 8]}\n"))
    assert space.roots == ["train"]
    assert base_config(["train"]) == {"train": {"lr": 1e-4, "batch": 4}}
    assert isinstance(space.validate(space.sample(0))["train"], TrainKnobs)
    with pytest.raises(PmvisError, match="TrainKnobs .* has no field 'momentum'"):
        load_space(_write(tmp_path, "train.momentum: 0.9\n", "m.yaml"))
