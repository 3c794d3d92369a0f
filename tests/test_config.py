"""Config: precedence, validation messages, resolved config re-runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pbt.config import DEFAULTS, ConfigError, Key, load_config, save_config

# keys a script declares itself (as the classification recipe does)
SCRIPT_KEYS = [Key("input_size", "int_list", [32, 32], "[W, H]"),
               Key("train_data", "paths", None, "data", path=True)]


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "yaml_value, cli, expected",
    [
        (None, None, DEFAULTS["lr"]),  # default only
        (0.3, None, 0.3),  # YAML beats default
        (0.3, "0.05", 0.05),  # typed flag beats YAML
        (None, "0.05", 0.05),  # typed flag beats default
    ],
)
def test_precedence_defaults_yaml_cli(tmp_path, yaml_value, cli, expected):
    data = {"num_epochs": 7} if yaml_value is None else {"lr": yaml_value, "num_epochs": 7}
    argv = ["-c", write_yaml(tmp_path / "c.yaml", data)]
    if cli is not None:
        argv += ["--lr", cli]
    cfg = load_config(argv)
    assert cfg.lr == expected
    assert cfg.num_epochs == 7  # a flag not typed never overrides the YAML


def test_untyped_boolean_flag_does_not_override_yaml(tmp_path):
    cfg = load_config(["-c", write_yaml(tmp_path / "c.yaml", {"progress": False})])
    assert cfg.progress is False


@pytest.mark.parametrize("text, value", [("false", False), ("true", True), ("0", False),
                                         ("yes", True)])
def test_booleans_both_ways_on_command_line(text, value):
    assert load_config(["--progress", text]).progress is value
    assert load_config(["--use_prune", text]).use_prune is value


def test_bare_boolean_flag_means_true():
    assert load_config(["--distributed"]).distributed is True


def test_lists_from_command_line():
    cfg = load_config(["--gpu_id", "0", "1", "--input_size", "64", "48", "--milestones", "3"],
                      keys=SCRIPT_KEYS)
    assert cfg.gpu_id == [0, 1]
    assert cfg.input_size == [64, 48]
    assert cfg.milestones == [3]


def test_misspelt_yaml_key_names_key_and_nearest(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"num_epoch": 3})
    with pytest.raises(ConfigError) as err:
        load_config(["-c", path])
    message = str(err.value)
    assert "num_epoch" in message and "num_epochs" in message and path in message


def test_misspelt_flag_names_flag_and_nearest():
    with pytest.raises(ConfigError) as err:
        load_config(["--learning_rat", "0.1"])
    assert "--learning_rat" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(["--batchsize", "8"])
    assert "--batchsize" in str(err.value) and "--batch_size" in str(err.value)


@pytest.mark.parametrize(
    "key, value, expected",
    [("lr", "fast", "a number"), ("batch_size", 2.5, "an integer"),
     ("progress", "maybe", "true or false"), ("input_size", ["a", "b"], "integers")],
)
def test_wrong_type_names_key_value_and_type(tmp_path, key, value, expected):
    with pytest.raises(ConfigError) as err:
        load_config(["-c", write_yaml(tmp_path / "c.yaml", {key: value})], keys=SCRIPT_KEYS)
    message = str(err.value)
    assert key in message and repr(value) in message and expected in message


def test_bad_choice_and_missing_data_path(tmp_path):
    with pytest.raises(ConfigError, match="optim_type.*RMSprop.*SGD"):
        load_config(["--optim_type", "RMSprop"])
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as err:
        load_config(["--train_data", missing], keys=SCRIPT_KEYS)
    assert "train_data" in str(err.value) and missing in str(err.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(["--lr", "0.02", "--gpu_id", "0", "1", "--progress", "false"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(["-c", str(tmp_path / "config.yaml")])
    assert {k: again[k] for k in DEFAULTS} == {k: cfg[k] for k in DEFAULTS}


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    recipe = Path(__file__).parents[1] / "recipes" / "classification.py"
    result = subprocess.run([sys.executable, str(recipe), "--num_epoch", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--num_epoch" in result.stderr and "--num_epochs" in result.stderr
