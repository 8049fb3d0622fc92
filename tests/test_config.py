"""Strict TOML configs: every shipped config loads as written, mistakes are errors that name the key."""
import tomllib
from typing import Any

import pytest

from layers.encoder import map_sizes
from layers.model import pool_kernels
from layers.rules import get_rule
from sim.data.datasets import dataset_info
from sim.errors import ConfigError
from sim.run.config import Config, load_config, parse_override, to_dict, to_toml
from tests.helpers import ROOT

CONFIGS = sorted((ROOT / "launch/configs").glob("*.toml"))


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 3}} -> {"train.steps": 3}: every setting of a TOML table or a config's dict."""
    found = {}
    for key, value in values.items():
        found.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return found


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path, tmp_path):
    config = load_config(path)
    loaded, written, defaults = flat(to_dict(config)), flat(tomllib.loads(path.read_text())), flat(to_dict(Config()))
    assert written, f"{path.name} sets nothing"
    for key, value in written.items():  # every key of the file (unknown ones are errors) holds the file's value
        assert loaded[key] == value, key
    for key in loaded.keys() - written.keys():  # and nothing else moved off its default
        assert loaded[key] == defaults[key], key
    again = tmp_path / "config.toml"
    again.write_text(to_toml(config))
    assert load_config(again) == config and again.read_text() == to_toml(load_config(again))  # as a run folder has it


def test_paper_configs_use_the_paper_settings():
    for name, grid_kernels in [("cifar10", [4, 4, 4, 2, 2, 1]), ("stl10", [12, 12, 12, 6, 6, 3]),
                               ("tiny_imagenet", [8, 8, 8, 4, 4, 2])]:
        config = load_config(CONFIGS[0].parent / f"{name}.toml")
        assert (config.model.width, config.train.batch_size, config.train.epochs) == (1.0, 32, 300)
        assert config.optim.lr == 2e-4
        # no rule.pool: each method gets its own paper pooling from the same config
        size = dataset_info(config.data.name).image_size
        assert pool_kernels(get_rule(config.method), size, config.rule.pool) == grid_kernels
        clapp = load_config(CONFIGS[0].parent / f"{name}.toml", ["method=clapp"])
        assert pool_kernels(get_rule("clapp"), size, clapp.rule.pool) == list(map_sizes(size))  # global mean


def test_overrides_are_toml_values(tmp_path):
    config = load_config(None, ["rule.pool=[4,4,4,2,2,1]", "model.width=0.125", "method=clapp_pp_dfb",
                                "train.steps=7", "probe.augment=false", 'data.root="/x y"', "data.name=cifar10"])
    assert config.rule.pool == [4, 4, 4, 2, 2, 1]
    assert config.model.width == 0.125 and config.train.steps == 7 and config.probe.augment is False
    assert config.method == "clapp_pp_dfb" and config.data.root == "/x y"
    again = tmp_path / "resolved.toml"
    again.write_text(to_toml(config))
    assert load_config(again) == config  # the resolved config written to a run folder reloads as is


def test_integers_are_accepted_where_floats_are_expected():
    assert load_config(None, ["model.width=1"]).model.width == 1.0


@pytest.mark.parametrize("override, words", [
    ("train.stepz=3", ["unknown config key 'train.stepz'", "train.steps"]),
    ("colour=3", ["unknown config key 'colour'"]),
    ("train.steps=1.5", ["train.steps must be int", "1.5"]),
    ("train.steps=true", ["train.steps must be int"]),
    ("rule.pool=[4,4,'a',2,2,1]", ["rule.pool[2] must be int"]),
    ("model.width=-1", ["model.width must be positive"]),
    ("train.batch_size=1", ["train.batch_size must be >= 2"]),
    ("method=clap", ["unknown method 'clap'", "clapp_pp_dfb", "bp_infonce"]),
    ("rule.contrast=square", ["rule.contrast", "hinge, softhinge, phyll, linear"]),
    ("train=3", ["train is a section"]),
    ("steps", ["--set expects key=value"]),
])
def test_mistakes_name_the_key(override, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    for word in words:
        assert word in str(error.value)


def test_pooling_that_does_not_fit_fails_at_config_time():
    with pytest.raises(ConfigError, match="block 4 has a 4x4 map and kernel 6"):
        load_config(None, ["data.name=cifar10", "rule.pool=[12,12,12,6,6,3]"])


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('method = "clapp_pp"\n[train]\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_a_folder_as_config_lists_its_toml_files(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "launch/configs")
    assert all(str(path) in str(caught.value) for path in CONFIGS), caught.value
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ConfigError, match=f"config {tmp_path} is a folder without .toml files; give a TOML file"):
        load_config(tmp_path)
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(ConfigError, match=f"give one of its TOML files: {tmp_path / 'a.toml'}$"):
        load_config(tmp_path)


def test_parse_override_nests_keys():
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}
