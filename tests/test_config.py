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


# -- bad inputs: out-of-range ints, huge or repeated YAML, long values ----------------------
@pytest.mark.parametrize("key, value, low, high", [
    ("batch_size", "99999999999999999999", 1, 1000000), ("batch_size", "0", 1, 1000000),
    ("num_workers", "-1", 0, 512), ("num_workers", "100000", 0, 512),
    ("num_epochs", "0", 1, 1000000), ("num_epochs", "10000000000", 1, 1000000),
    ("log_freq", "0", 1, 1000000000), ("save_steps", "-5", 0, 1000000000),
    ("keep_checkpoints", "0", 1, 1000000), ("seed", "-1", 0, 2**32 - 1),
    ("seed", str(2**64), 0, 2**32 - 1), ("main_process_port", "70000", 0, 65535),
    ("num_processes", "100000", 0, 256), ("grad_accum_steps", "0", 1, 65536),
    ("early_stop_patience", "-1", 0, 1000000), ("prune_steps", "100000", 1, 1000),
    ("round_to", "-8", 0, 4096), ("mix_off_epochs", "-1", 0, 1000000),
])
def test_int_keys_out_of_range_name_key_value_and_range(key, value, low, high):
    with pytest.raises(ConfigError) as err:
        load_config([f"--{key}", value])
    message = str(err.value)
    assert f"'{key}'" in message and value in message, message
    assert f"from {low} to {high}" in message, message


def test_int_keys_at_their_bounds_are_accepted():
    cfg = load_config(["--batch_size", "1000000", "--seed", str(2**32 - 1), "--num_workers",
                       "0", "--main_process_port", "65535", "--save_steps", "0"])
    assert (cfg.batch_size, cfg.seed, cfg.num_workers) == (1000000, 2**32 - 1, 0)


def test_a_config_file_over_the_size_cap_is_refused_before_parsing(tmp_path):
    from pbt.config import MAX_CONFIG_BYTES

    # about 2 MB of YAML: parsing it would take PyYAML tens of seconds; the cap answers first
    path = tmp_path / "big.yaml"
    path.write_text("rgb_mean: [" + ", ".join(["0.5"] * 400_000) + "]\n")
    assert path.stat().st_size > MAX_CONFIG_BYTES
    with pytest.raises(ConfigError) as err:
        load_config(["-c", str(path)])
    message = str(err.value)
    assert str(path) in message and str(MAX_CONFIG_BYTES) in message, message
    assert len(message) < 400, message
    # at the cap it is read (and the long value is named short)
    path.write_text("milestones: [" + ", ".join(["x"] * 5000) + "]\n")
    assert path.stat().st_size <= MAX_CONFIG_BYTES
    with pytest.raises(ConfigError, match="milestones") as err:
        load_config(["-c", str(path)])
    assert len(str(err.value)) < 400 and "..." in str(err.value), str(err.value)


@pytest.mark.parametrize("key, value", [("run_name", "x/" * 50_000),
                                        ("milestones", ["x"] * 100_000),
                                        ("batch_size", 10**4000)],
                         ids=["long-string", "long-list", "4000-digit-int"])
def test_error_messages_never_quote_a_long_value_in_full(tmp_path, key, value):
    with pytest.raises(ConfigError) as err:
        load_config([], **{key: value})
    message = str(err.value)
    assert key in message and len(message) < 300 and "..." in message, message[:500]
    # a path is quoted longer (its end names the file), but not without end either
    with pytest.raises(ConfigError) as err:
        load_config(["--model_file", str(tmp_path / ("d" * 5000))])
    assert "model_file" in str(err.value) and len(str(err.value)) < 500


def test_a_key_given_twice_in_a_yaml_mapping_names_the_file_key_and_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# tuned\nlr: 0.05\nnum_epochs: 3\nlr: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(["-c", str(path)])
    message = str(err.value)
    assert str(path) in message and "'lr'" in message, message
    assert "lines 2 and 4" in message, message
    # a YAML merge key ("<<") may still be overridden: that is no repeat
    path.write_text("base: &base {lr: 0.1}\nlr: 0.3\n")
    with pytest.raises(ConfigError, match="unknown key 'base'"):
        load_config(["-c", str(path)])


def test_a_directory_given_as_config_file_is_named_a_directory(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(["-c", str(tmp_path)])
    assert "is a directory" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(ConfigError, match="is a directory; a file is expected"):
        load_config(["--finetune", str(tmp_path)])
