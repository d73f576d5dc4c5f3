"""Config values checked before any compute: one clear line per problem, every config passes."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from unet_jax import training
from unet_jax.training.config_checks import check_config

ROOT = pathlib.Path(__file__).parents[1]
# Every file in configs/ with its variants; a new config file must be added here.
VARIANTS = {"default.py": ["", "tiny", "multilabel"], "folder.py": ["", "tiny"],
            "isbi2012.py": ["", "small", "cpu", "tiny", "small,tiny"], "oxford_pets.py": ["", "tiny"],
            "volume.py": ["", "cpu", "sparse", "folder", "cpu,sparse"]}


def _get_config(file: str, variant: str = ""):
  spec = importlib.util.spec_from_file_location(f"config_{file[:-3]}", ROOT / "configs" / file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def tiny_config(**overrides):
  config = _get_config("default.py", "tiny")
  with config.ignore_type():
    for key, value in overrides.items():
      *parents, leaf = key.split(".")
      target = config
      for parent in parents:
        target = target[parent]
      target[leaf] = value
  return config


def test_every_config_file_is_listed():
  assert sorted(p.name for p in (ROOT / "configs").glob("*.py")) == sorted(VARIANTS)


@pytest.mark.parametrize("file, variant", [(f, v) for f, vs in VARIANTS.items() for v in vs])
def test_the_shipped_configs_pass(file, variant):
  check_config(_get_config(file, variant), num_devices=1)


@pytest.mark.parametrize("field, value, valid", [
    ("eval_every", 0, "an integer ≥ 1"),
    ("log_every", -3, "an integer ≥ 1"),
    ("checkpoint.every", 0, "an integer ≥ 1"),
    ("num_steps", -1, "an integer ≥ 1"),
    ("num_steps", 2.5, "an integer ≥ 1"),
    ("num_steps", True, "an integer ≥ 1"),
    ("batch_size", 0, "an integer ≥ 1"),
    ("optimizer.learning_rate", -1e-3, "a finite number > 0"),
    ("optimizer.learning_rate", 0.0, "a finite number > 0"),
    ("optimizer.learning_rate", float("nan"), "a finite number > 0"),
    ("optimizer.learning_rate", float("inf"), "a finite number > 0"),
    ("optimizer.momentum", 1.0, "a number in [0, 1)"),
    ("optimizer.warmup_steps", -1, "an integer ≥ 0"),
    ("optimizer.grad_clip_norm", -1.0, "a finite number ≥ 0, or None"),
    ("loss.dice_weight", -1.0, "a finite number ≥ 0"),
    ("data.tile_size", (0, 32), "(height, width) or (depth, height, width): integers ≥ 1"),
    ("data.tile_size", (32, 32, 3), "(height, width) or one integer for a model with spatial_dims=2"),
    ("data.image_size", (32, -32), "(height, width) or (depth, height, width): integers ≥ 1"),
    ("data.num_val", 0, "an integer ≥ 1"),
    ("data.prefetch", -1, "an integer ≥ 0"),
    ("data.seed", -1, "an integer ≥ 0"),
    ("data.augment.contrast", 1.5, "a number in [0, 1]"),
    ("data.weight_map.sigma", 0.0, "a finite number > 0"),
    ("checkpoint.max_to_keep", 0, "an integer ≥ 1"),
    ("checkpoint.best_mode", "maximum", "'max' or 'min'"),
    ("checkpoint.restore_step", -2, "an integer ≥ 0, or None"),
    ("model.features", (8,), "at least two integers ≥ 1"),
    ("model.dropout", 1.0, "a number in [0, 1)"),
])
def test_each_bad_value_is_named_with_what_is_valid(field, value, valid):
  with pytest.raises(ValueError) as error:
    check_config(tiny_config(**{field: value}))
  message = str(error.value)
  assert message.startswith("1 invalid config value(s):")
  assert f"--config.{field} is {value!r}; it must be {valid}" in message


def test_every_problem_is_listed_in_one_error():
  config = tiny_config(eval_every=0, num_steps=-1, **{"optimizer.learning_rate": -0.1})
  with pytest.raises(ValueError) as error:
    check_config(config)
  lines = str(error.value).splitlines()
  assert lines[0] == "3 invalid config value(s):"
  assert [line.split(" is ")[0].strip() for line in lines[1:]] == [
      "--config.num_steps", "--config.eval_every", "--config.optimizer.learning_rate"]


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=6), "the global batch size 6 does not divide evenly over 4 devices"),
    ({"data.class_names": ("a", "b", "c")},
     "--config.data.class_names has 3 name(s) ('a', 'b', 'c') but --config.model.num_classes "
     "is 2"),
    ({"data.channels": 3}, "--config.data.channels is 3: the data has 3 channel(s) but the "
     "model takes 1 (--config.model.in_channels)"),
    ({"data.weight_map.enabled": True, "data.weight_map.foreground": 2},
     "--config.data.weight_map.foreground is 2; it must be a class, an integer in 0 … 1"),
])
def test_fields_that_must_agree(overrides, message):
  with pytest.raises(ValueError) as error:
    check_config(tiny_config(**overrides), num_devices=4)
  assert message in str(error.value)


def test_held_out_fraction_is_checked_only_without_a_validation_folder():
  config = _get_config("folder.py", "tiny")
  config.data.folder.val_fraction = 1.0
  with pytest.raises(ValueError, match=r"val_fraction is 1\.0; without data\.folder\.val_dir"):
    check_config(config)
  config.data.folder.val_dir = "elsewhere"
  check_config(config)


def test_train_and_evaluate_checks_before_building_anything(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"--config\.eval_every is 0"):
    training.train_and_evaluate(tiny_config(eval_every=0), str(workdir))
  assert not workdir.exists()


def test_train_py_reports_bad_values_without_a_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/default.py:tiny",
       "--config.eval_every=0", "--config.num_steps=-1",
       "--config.optimizer.learning_rate=-0.001", f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert "error: 3 invalid config value(s):" in result.stderr
  assert "--config.optimizer.learning_rate is -0.001; it must be a finite number > 0" in (
      result.stderr)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [32, (32,), [32]])
def test_one_integer_is_a_square_size(value):
  """``--config.data.tile_size=32`` reaches the config as ``(32,)``: a square."""
  from unet_jax.geometry import as_hw
  check_config(tiny_config(**{"data.tile_size": value}))
  assert as_hw(value) == (32, 32)
