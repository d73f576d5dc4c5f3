"""Checkpoint integrity: digests recorded at save and checked at restore, a resume that falls
back to the newest intact step, readable errors for truncated checkpoints, and refusal of
NaN or infinite weights on load and conversion."""

import json
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unet_jax import training
from unet_jax.interop import convert, pth
from unet_jax.training.checkpoint import (DIGESTS, Checkpointer, DamagedCheckpointError,
                                          load_model)

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from configs import default  # noqa: E402

STATE = {"w": jnp.zeros(4096)}


def _weights(step):
  """Incompressible values whose first one is ``step``."""
  return jnp.asarray(np.random.default_rng(step).normal(size=4096)).at[0].set(float(step))


def _save_steps(directory, steps, *, async_save=True):
  checkpointer = Checkpointer(directory, max_to_keep=10, async_save=async_save)
  for step in steps:
    checkpointer.save(step, {"w": _weights(step)}, {"next_index": step}, force=True)
  checkpointer.close()


# The two-process resume from the newest intact step is tested in test_multiprocess.py, on the
# checkpoints of its two-process run.


def _data_file(step_dir):
  """The largest of the files that hold array bytes (in ``d/`` folders) under ``state/``."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _flip(path, count=64):
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("async_save", [True, False])
def test_every_finished_step_records_the_digest_of_each_of_its_files(tmp_path, async_save):
  _save_steps(tmp_path, [1, 2], async_save=async_save)
  for step in (1, 2):
    step_dir = tmp_path / str(step)
    recorded = json.loads((step_dir / DIGESTS).read_text())["sha256"]
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
               if p.is_file() and p.name != DIGESTS}
    assert set(recorded) == on_disk and any(name.startswith("state/") for name in recorded)
  assert not list(tmp_path.rglob(f"*{DIGESTS}.partial"))


def test_a_tampered_step_is_refused_by_number_and_skipped_on_resume(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2, 3])
  damaged = _data_file(directory / "3")
  _flip(damaged)
  name = damaged.relative_to(directory / "3").as_posix()

  checkpointer = Checkpointer(directory, max_to_keep=10)
  with pytest.raises(DamagedCheckpointError, match=rf"step 3 in .*checkpoints is damaged: its "
                                                   rf"file {name} has changed"):
    checkpointer.restore(STATE, step=3)
  with pytest.warns(RuntimeWarning, match=rf"step 3 .* damaged: its file {name} .* Resuming "
                                          rf"from step 2, the newest intact .* moved to"):
    state, data = checkpointer.restore(STATE)
  assert float(state["w"][0]) == 2.0 and data == {"next_index": 2}
  assert sorted(checkpointer.all_steps()) == [1, 2]
  assert (tmp_path / "checkpoints-damaged" / "3" / name).is_file()
  # The run goes on: step 3 can be saved again, with digests.
  checkpointer.save(3, {"w": _weights(3)}, {"next_index": 3}, force=True)
  checkpointer.close()
  assert (directory / "3" / DIGESTS).is_file()


def test_a_missing_file_and_an_unreadable_digest_file_count_as_damage(tmp_path):
  _save_steps(tmp_path, [1, 2])
  missing = _data_file(tmp_path / "2")
  missing.unlink()
  (tmp_path / "1" / DIGESTS).write_text("{not json")
  checkpointer = Checkpointer(tmp_path, max_to_keep=10)
  with pytest.raises(DamagedCheckpointError, match=rf"step 2 .* file "
                                                   rf"{missing.relative_to(tmp_path / '2')} is "
                                                   rf"missing"):
    checkpointer.restore(STATE, step=2)
  with pytest.raises(DamagedCheckpointError, match="every checkpoint in .* is damaged"):
    checkpointer.restore(STATE)


def test_a_step_without_digests_loads_with_a_one_line_notice(tmp_path):
  _save_steps(tmp_path, [1])
  (tmp_path / "1" / DIGESTS).unlink()  # as saved before digests, or cut off before them
  checkpointer = Checkpointer(tmp_path)
  with pytest.warns(RuntimeWarning, match="step 1 .* has no file digests") as notices:
    state, _ = checkpointer.restore(STATE)
  assert len(notices) == 1 and "\n" not in str(notices[0].message)
  assert float(state["w"][0]) == 1.0


def test_a_truncated_checkpoint_is_one_readable_paragraph(tmp_path):
  _save_steps(tmp_path, [1, 2])
  (tmp_path / "2" / DIGESTS).unlink()  # with digests it would be named as damaged earlier
  truncated = _data_file(tmp_path / "2")
  _truncate(truncated)
  checkpointer = Checkpointer(tmp_path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    with pytest.raises(ValueError) as error:
      checkpointer.restore(STATE)
  message = str(error.value)
  assert len(message) < 600 and "\n" not in message, message
  assert "tensorstore_spec" not in message and "{" not in message
  for part in ("step 2", truncated.relative_to(tmp_path / "2").as_posix(),
               "--config.checkpoint.restore_step", f"delete {tmp_path / '2'}"):
    assert part in message, (part, message)
  assert error.value.__cause__ is not None  # the original error stays chained


# load_model: the path that predict, evaluate and export take.

def _workdir(tmp_path, steps=(1, 2), *, poison=None):
  """A training workdir holding a tiny model's parameters at ``steps``; ``poison`` puts a NaN
  into the first value of that parameter (a ``/``-path)."""
  kwargs = training.model_kwargs(default.get_config("tiny").model)
  model = training.create_model(kwargs)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if poison:
    *parents, leaf = poison.split("/")
    node = params
    for part in parents:
      node = node[int(part) if part.isdigit() else part]
    node[leaf] = node[leaf].at[(0,) * node[leaf].ndim].set(jnp.nan)
  state = {"params": params,
           "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}
  checkpointer = Checkpointer(tmp_path / "checkpoints", max_to_keep=10)
  for step in steps:
    checkpointer.save(step, state, {}, force=True)
  checkpointer.close()
  (tmp_path / "config.json").write_text(json.dumps({"model": kwargs}))
  return tmp_path


def test_load_model_refuses_a_tampered_step_and_loads_an_intact_one(tmp_path):
  workdir = _workdir(tmp_path)
  damaged = _data_file(workdir / "checkpoints" / "2")
  _flip(damaged)
  name = damaged.relative_to(workdir / "checkpoints" / "2").as_posix()
  with pytest.raises(DamagedCheckpointError, match=rf"step 2 .* its file {name} has changed.*"
                                                   rf"Load another step \(available: \[1\]"):
    load_model(workdir)
  model, _ = load_model(workdir, step=1)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(nnx.state(model)))


def test_load_model_names_the_file_of_a_truncated_step_in_a_short_message(tmp_path):
  workdir = _workdir(tmp_path, steps=(1,))
  (workdir / "checkpoints" / "1" / DIGESTS).unlink()
  _truncate(_data_file(workdir / "checkpoints" / "1"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    with pytest.raises(ValueError, match="cannot restore the checkpoint at step 1") as error:
      load_model(workdir)
  assert len(str(error.value)) < 600 and "tensorstore_spec" not in str(error.value)


def test_load_model_refuses_nan_parameters_unless_allowed(tmp_path):
  workdir = _workdir(tmp_path, steps=(1,), poison="downs/0/conv/conv1/kernel")
  with pytest.raises(ValueError, match=r"step 1 .* holds NaN or infinite values in 1 "
                                       r"tensor\(s\): downs/0/conv/conv1/kernel \(1 of .*"
                                       r"allow_nonfinite=True"):
    load_model(workdir)
  model, _ = load_model(workdir, allow_nonfinite=True)
  assert np.isnan(model.downs[0].conv.conv1.kernel[...]).sum() == 1


def _nan_state_dict(path):
  """A tiny milesial-layout file whose first convolution holds one NaN."""
  model = training.create_model(training.model_kwargs(default.get_config("tiny").model))
  state = convert.to_pytorch(model, "milesial")
  state["inc.double_conv.0.weight"][0, 0, 1, 1] = np.nan
  pth.save_safetensors(state, path)
  return path


def test_conversion_refuses_nan_weights_unless_allowed(tmp_path):
  path = _nan_state_dict(tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=r"NaN or infinite values in 1 tensor\(s\): "
                                       r"inc.double_conv.0.weight \(1 of 36 values\)"):
    convert.load_pytorch(path)
  with pytest.raises(ValueError, match=r"inc.double_conv.0.weight"):
    load_model(path)
  model, _ = convert.load_pytorch(path, allow_nonfinite=True)
  assert np.isnan(model.inc.conv1.kernel[...]).sum() == 1
  model, _ = load_model(path, allow_nonfinite=True)
  assert np.isnan(model.inc.conv1.kernel[...]).sum() == 1


def test_convert_command_line_refuses_nan_weights_unless_allowed(tmp_path, capsys):
  path = _nan_state_dict(tmp_path / "model.safetensors")
  with pytest.raises(SystemExit) as exit_:
    convert.main([str(path), str(tmp_path / "refused")])
  assert exit_.value.code == 2
  assert "inc.double_conv.0.weight" in capsys.readouterr().err
  assert not (tmp_path / "refused").exists()
  convert.main([str(path), str(tmp_path / "allowed"), "--allow-nonfinite"])
  with pytest.raises(ValueError, match=r"inc/conv1/kernel \(1 of 36"):
    load_model(tmp_path / "allowed")
  model, _ = load_model(tmp_path / "allowed", allow_nonfinite=True)
  assert np.isnan(model.inc.conv1.kernel[...]).sum() == 1


@pytest.mark.slow
def test_resume_falls_back_from_a_tampered_step_and_load_model_refuses_it(tmp_path):
  config = default.get_config("tiny")  # 4 steps, a checkpoint every 2
  training.train_and_evaluate(config, str(tmp_path))
  damaged = _data_file(tmp_path / "checkpoints" / "4")
  _flip(damaged)
  name = damaged.relative_to(tmp_path / "checkpoints" / "4").as_posix()
  with pytest.raises(DamagedCheckpointError, match=rf"step 4 .* file {name}"):
    load_model(tmp_path)

  config.num_steps = 6
  with pytest.warns(RuntimeWarning, match=rf"step 4 .* file {name} .* Resuming from step 2"):
    final = training.train_and_evaluate(config, str(tmp_path))
  assert final
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 6 and all((tmp_path / "checkpoints" / str(s) / DIGESTS).is_file()
                                for s in steps)
  assert (tmp_path / "checkpoints-damaged" / "4").is_dir()
  load_model(tmp_path)
