"""Config: validation errors name the key; YAML, override strings and Flower run config layer in order."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fl_covid.config import PROTOCOLS, Config, federated_config, load_config, parse_overrides, project_root
from fl_covid.errors import ConfigError
from fl_covid.reporting import PROTOCOL_TEXT


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"learning-rate": 0.1}, "learning-rate"),  # unknown key
        ({"batch-size": "big"}, "batch-size"),  # wrong type
        ({"batch-size": 16.5}, "batch-size"),  # float for an int
        ({"width": True}, "width"),  # bool for a float
        ({"exclude-label-conflicts": "maybe"}, "exclude-label-conflicts"),
        ({"sites": 3}, "sites"),
        ({"num-server-rounds": -1}, "num-server-rounds"),  # negative rounds
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.05}, "temperature"),
        ({"folds": 4, "fold": 4}, "fold"),  # fold >= folds
        ({"fold": -1}, "fold"),
        ({"protocol": "random"}, "protocol"),
        ({"image-size": 16}, "image-size"),
        ({"bn-transform": "crops"}, "bn-transform"),
        ({"bn-transform": "site_x=train"}, "bn-transform"),  # not a site of the run
        ({"bn-transform": "site_a_sarscov2=resize"}, "bn-transform"),
        ({"equalize": True, "standardize": True}, "equalize"),
        ({"method": "fedprox", "server-lr": 2.0}, "server-lr"),  # Flower's FedProx has no server step
    ],
)
def test_bad_values_raise_naming_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, overrides)


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    file = tmp_path / "list.yaml"
    file.write_text("- width\n- 0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{file}.*must hold a mapping"):
        load_config(file)


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text("width: [0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{file} is not valid YAML"):
        load_config(file)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml.*not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_unknown_key_names_it(tmp_path: Path) -> None:
    file = tmp_path / "typo.yaml"
    file.write_text("widht: 0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown config key 'widht'"):
        load_config(file)


def test_yaml_then_overrides(tmp_path: Path) -> None:
    file = tmp_path / "exp.yaml"
    file.write_text("width: 0.5\nlr: 0.01\nsites: [a, b]\nskip_unreadable: true\n", encoding="utf-8")
    config = load_config(file, {"lr": "0.002"})
    assert config.width == 0.5 and config.lr == 0.002 and config.sites == ("a", "b")
    assert config.skip_unreadable is True
    assert config.batch_size == Config().batch_size


def test_parse_overrides() -> None:
    pairs = parse_overrides(["lr=0.001", " width = 0.5 ", "sites=a,b", "data-root=/x=y", "tag="])
    assert pairs == {"lr": "0.001", "width": "0.5", "sites": "a,b", "data-root": "/x=y", "tag": ""}
    config = load_config(None, {**pairs, "skip-unreadable": "true", "seed": "-3"})
    assert config.lr == 0.001 and isinstance(config.lr, float)
    assert config.width == 0.5 and config.sites == ("a", "b") and config.data_root == "/x=y"
    assert config.skip_unreadable is True and config.seed == -3
    for bad in ("lr0.1", "=3"):
        with pytest.raises(ConfigError, match=f"override '{bad}' is not of the form key=value"):
            parse_overrides([bad])


def test_config_is_frozen_and_replace_validates() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]
    assert config.replace(width=0.5).width == 0.5 and config.width == 0.25
    with pytest.raises(ConfigError, match="'temperature'"):
        config.replace(temperature=0)
    assert load_config(None, config.to_dict()) == config


def test_federated_config_precedence(tmp_path: Path) -> None:
    file = tmp_path / "fed.yaml"
    file.write_text("seed: 1\nlocal-steps: 5\nlr: 0.01\nwidth: 0.5\ndata-root: /yaml/root\n", encoding="utf-8")
    run_config = {
        "config-file": str(file),
        "overrides": "seed=2 local-steps=7 width=0.125",
        "seed": 3,
        "method": "fedbn",
        "data-root": "",
        "output-dir": "",
        "resume": "",
    }
    config = federated_config(run_config)
    assert config.seed == 2  # the override string beats the run config scalar and the YAML
    assert federated_config({**run_config, "overrides": ""}).seed == 3  # run config scalar beats the YAML
    assert config.local_steps == 7 and config.width == 0.125  # override string beats the YAML
    assert config.lr == 0.01  # YAML beats the defaults
    assert config.method == "fedbn"
    assert config.data_root == "/yaml/root"  # empty run-config data-root keeps the YAML value
    assert federated_config({**run_config, "data-root": "/run/root"}).data_root == "/run/root"


def test_federated_config_empty_data_root_keeps_default(tmp_path: Path) -> None:
    file = tmp_path / "plain.yaml"
    file.write_text("width: 0.125\n", encoding="utf-8")
    config = federated_config({"config-file": str(file), "data-root": "", "output-dir": "", "overrides": ""})
    assert config.data_root == ""
    assert config.resolved_data_root() == project_root() / "data"
    assert config.resolved_output_dir() == project_root() / "runs"


def test_federated_config_bad_override_names_the_key(tmp_path: Path) -> None:
    file = tmp_path / "plain.yaml"
    file.write_text("width: 0.125\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'temperature'"):
        federated_config({"config-file": str(file), "overrides": "temperature=-1"})


def test_a_federated_run_of_a_contrastive_method_refuses_the_original_covidnet() -> None:
    with pytest.raises(ConfigError, match="config key 'arch'.*fedbn-proto.*redesigned"):
        federated_config({"method": "fedbn-proto", "overrides": "arch=covidnet"})
    assert federated_config({"method": "fedbn", "overrides": "arch=covidnet"}).arch == "covidnet"


def test_the_in_process_run_config_refuses_unknown_keys() -> None:
    from fl_covid.experiments.federation import default_run_config

    with pytest.raises(ConfigError, match=r"unknown run-config keys \['eval-every'\].*overrides"):
        default_run_config(**{"eval-every": 1})


def test_every_split_protocol_is_described_for_reports() -> None:
    assert set(PROTOCOL_TEXT) == set(PROTOCOLS)


def test_bn_transform_one_value_or_per_site() -> None:
    sites = ["site_a_sarscov2", "site_b_covidct"]
    assert load_config(None, {"sites": sites}).bn_transforms == ("eval", "eval")
    assert load_config(None, {"sites": sites, "bn-transform": "train"}).bn_transforms == ("train", "train")
    per_site = load_config(None, {"sites": sites, "bn-transform": "site_a_sarscov2=train"})
    assert per_site.bn_transforms == ("train", "eval")
