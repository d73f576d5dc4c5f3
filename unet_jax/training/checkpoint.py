"""Training checkpoints with orbax: async saves, the last N and the best k, exact resume.

A checkpoint holds the whole training state (parameters, BatchNorm statistics, optimiser
state, step, RNG key) and the input iterator's position, so a resumed run continues with the
same data. Orbax writes each step to a temporary directory and renames it when complete, so
an interrupted save is never picked up as the latest checkpoint.

Once orbax has finished a step, the SHA-256 of each of its files is recorded in
``<step>/unet_jax_digests.json``; restoring checks them, so a damaged file is named instead
of loaded. A step without that file (saved by an older version, or by a run stopped between
the two writes) still loads, with a notice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

DIGESTS = "unet_jax_digests.json"


class DamagedCheckpointError(ValueError):
  """A checkpoint file differs from the digest recorded when it was saved."""


class Checkpointer:
  """A thin, explicit wrapper over ``ocp.CheckpointManager``.

  Args:
    directory: where step directories are written (created if missing).
    max_to_keep: how many of the latest checkpoints to keep.
    keep_best: how many of the best checkpoints (by ``best_metric``) to keep in addition.
    best_metric: name of the evaluation metric that ranks checkpoints.
    best_mode: ``"max"`` or ``"min"``.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, keep_best: int = 1,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be ≥ 1, got {max_to_keep}")
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric = best_metric
    policies = [checkpoint_managers.LatestN(max_to_keep)]
    # BestN keeps the n largest values of get_metric_fn.
    if best_metric and keep_best:
      sign = 1.0 if best_mode == "max" else -1.0
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: sign * float(metrics[best_metric]), reverse=False,
          n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True,
        # Leftovers of a save that was killed half-way are removed, never read.
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))
    self._undigested: list[int] = []  # saved steps whose digests are not written yet

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any],
           metrics: dict[str, float] | None = None, *, force: bool = False) -> bool:
    """Start an (async) save of ``state`` and the iterator position ``data_state``."""
    if self.best_metric and metrics is not None and self.best_metric not in metrics:
      raise ValueError(f"best_metric {self.best_metric!r} is not among the evaluation metrics "
                       f"{sorted(metrics)}")
    self._write_digests()  # orbax waits for the previous save here anyway
    saved = self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)),
        metrics=metrics, force=force)
    if saved:
      self._undigested.append(step)
    return saved

  def _write_digests(self) -> None:
    """Wait for the save in flight, then record the digests of every step it finished."""
    self.manager.wait_until_finished()
    finished, self._undigested = self._undigested, []
    if jax.process_index() != 0:
      return
    for step in finished:
      step_dir = self.directory / str(step)
      if step in self.manager.all_steps() and step_dir.is_dir():  # not already deleted
        write_digests(step_dir)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The state (shaped and placed like ``abstract_state``) and iterator position at
    ``step``, or by default at the newest step whose files match their digests.

    Newer damaged steps are moved to ``<directory>-damaged/`` with a notice, so that the run
    continues from the newest intact one; a damaged ``step`` asked for by number is refused.
    """
    step = self._agreed_step(step)
    advice = (f"Available steps: {sorted(self.all_steps())}; restore another with "
              f"--config.checkpoint.restore_step=STEP, or delete {self.directory / str(step)} "
              f"to resume from the step before it.")
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=ocp.args.JsonRestore()))
    except FileNotFoundError:
      raise
    except Exception as error:  # orbax raises many types for damaged or foreign files
      raise ValueError(_read_failure(self.directory / str(step), step, error,
                                     advice)) from error
    return restored["state"], restored["data"]

  def _agreed_step(self, step: int | None) -> int:
    """The step to restore, chosen by process 0 (which alone verifies digests and moves
    damaged steps away) and shared with the other processes."""
    choice, error = -1, None
    if jax.process_index() == 0:
      try:
        choice = self._intact_step(step)
      except (ValueError, FileNotFoundError) as raised:
        error = raised
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      choice = int(multihost_utils.broadcast_one_to_all(np.int32(choice)))
    if error is not None:
      raise error
    if choice < 0:
      raise ValueError(f"process 0 found no checkpoint in {self.directory} to restore; its "
                       f"error says why")
    self.manager.reload()  # damaged steps may have been moved away
    return choice

  def _intact_step(self, step: int | None) -> int:
    steps = sorted(self.all_steps())
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}; available "
                                f"steps: {steps}")
      others = [s for s in steps if s != step]
      verify_digests(self.directory / str(step), step, advice=(
          f"Restore another step ({others}) with --config.checkpoint.restore_step=STEP, or "
          f"delete {self.directory / str(step)}."))
      return step
    damaged = []
    for candidate in reversed(steps):
      try:
        verify_digests(self.directory / str(candidate), candidate, advice="")
      except DamagedCheckpointError as error:
        damaged.append((candidate, error))
        continue
      if damaged:
        self._set_aside(damaged, candidate)
      return candidate
    raise DamagedCheckpointError(
        f"every checkpoint in {self.directory} is damaged (steps {steps}): "
        + " ".join(str(error) for _, error in damaged)
        + " Delete them (or the whole directory) to start the run over.")

  def _set_aside(self, damaged: list[tuple[int, DamagedCheckpointError]], intact: int) -> None:
    aside = self.directory.with_name(self.directory.name + "-damaged")
    aside.mkdir(exist_ok=True)
    for step, error in damaged:
      target = aside / str(step)
      if target.exists():
        target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      os.replace(self.directory / str(step), target)
      warnings.warn(f"{error} Resuming from step {intact}, the newest intact checkpoint; the "
                    f"damaged step was moved to {target}.", RuntimeWarning, stacklevel=5)

  def discard_after(self, step: int) -> list[int]:
    """Delete the checkpoints newer than ``step`` (an abandoned continuation); returns them."""
    newer = [s for s in self.all_steps() if s > step]
    for s in newer:
      self.manager.delete(s)
    return newer

  def wait(self) -> None:
    self._write_digests()

  def close(self) -> None:
    self._write_digests()
    self.manager.close()


def write_digests(step_dir: pathlib.Path) -> None:
  """Record the SHA-256 of every file of a finished step in ``step_dir/unet_jax_digests.json``
  (written to a temporary name and renamed: the file is whole or absent)."""
  partial = step_dir / f".{DIGESTS}.partial"
  digests = {path.relative_to(step_dir).as_posix(): _sha256(path)
             for path in sorted(step_dir.rglob("*"))
             if path.is_file() and path.name not in (DIGESTS, partial.name)}
  with open(partial, "w") as file:
    json.dump({"sha256": digests}, file, indent=1)
    file.flush()
    os.fsync(file.fileno())
  os.replace(partial, step_dir / DIGESTS)


def verify_digests(step_dir: pathlib.Path, step: int, *, advice: str) -> bool:
  """Check every file recorded in ``step_dir``'s digests; ``DamagedCheckpointError`` (naming
  the step and the file, then ``advice``) on a mismatch. Returns ``False``, after a notice,
  for a step without digests."""
  record = step_dir / DIGESTS
  where = f"the checkpoint at step {step} in {step_dir.parent}"
  if not record.is_file():
    warnings.warn(f"{where} has no file digests (saved by an older version, or the run "
                  f"stopped before writing them): loading it without an integrity check",
                  RuntimeWarning, stacklevel=3)
    return False
  try:
    digests = json.loads(record.read_text())["sha256"]
    if any(pathlib.PurePosixPath(name).is_absolute() or ".." in name.split("/")
           for name in digests):
      raise ValueError("it names files outside the step")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
    raise DamagedCheckpointError(f"{where} is damaged: its digest file {DIGESTS} cannot be "
                                 f"read ({error}). {advice}".rstrip()) from None
  for name, expected in digests.items():
    path = step_dir / name
    if not path.is_file():
      problem = "is missing"
    elif _sha256(path) != expected:
      problem = (f"has changed since it was saved (its SHA-256 differs from the one recorded "
                 f"then; {path.stat().st_size} bytes now)")
    else:
      continue
    raise DamagedCheckpointError(f"{where} is damaged: its file {name} {problem}. "
                                 f"{advice}".rstrip())
  return True


def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as file:
    return hashlib.file_digest(file, "sha256").hexdigest()


def _read_failure(step_dir: pathlib.Path, step: int, error: Exception, advice: str) -> str:
  """One paragraph for a checkpoint orbax cannot read: the step, the file and the innermost
  reason, without the storage specification that TensorStore appends."""
  chain = [error]
  while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
    chain.append(inner)
  located = [e for e in chain if 'local file "' in str(e)]
  text = str(located[-1] if located else error)
  text = re.split(r" \[tensorstore_spec=| See full TensorStore details", text)[0].strip()
  files = re.findall(r'local file "([^"]+)"', text)
  if files:
    file = pathlib.Path(files[-1])
    size = re.search(r"value of size (\d+)", text)
    if file.is_dir() and size:  # a database folder: find the file that is too short
      sized = [p for p in file.rglob("*") if p.is_file() and p.stat().st_size == int(size[1])]
      file = sized[0] if len(sized) == 1 else file
    name = file.relative_to(step_dir).as_posix() if file.is_relative_to(step_dir) else file
    reason = (f"its file {name} holds {size[1]} bytes, fewer than the checkpoint reads from it "
              f"(a cut-off copy or a full disk?)" if size and file.is_file() else
              f"reading {name} failed: {text.rsplit(': ', 1)[-1]}")
  else:
    reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
  if len(reason) > 300:
    reason = reason[:300] + "..."
  return (f"cannot restore the checkpoint at step {step} in {step_dir.parent}: {reason}. The "
          f"checkpoint is incomplete or damaged, or was written for a different model "
          f"configuration. {advice}")


def best_step(workdir: str | os.PathLike) -> int:
  """The step of the best checkpoint still on disk in a training ``workdir``, by the run's
  ``checkpoint.best_metric`` and ``best_mode`` and the evaluations in ``metrics.jsonl``."""
  import json
  workdir = pathlib.Path(workdir)
  try:
    settings = json.loads((workdir / "config.json").read_text())["train"]["checkpoint"]
    metric, mode = settings["best_metric"], settings.get("best_mode", "max")
  except (OSError, KeyError, ValueError) as error:
    raise ValueError(f"{workdir} is not a training workdir with a best_metric in its "
                     f"config.json, so there is no best checkpoint to choose") from error
  on_disk = set(saved_steps(workdir))
  scores = {}
  if (workdir / "metrics.jsonl").is_file():
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
      row = json.loads(line)
      if row.get("split") == "eval" and row.get("step") in on_disk and metric in row:
        scores[row["step"]] = row[metric]
  if not scores:
    raise ValueError(f"no checkpoint in {workdir / 'checkpoints'} (steps {sorted(on_disk)}) "
                     f"has an evaluation of {metric} in metrics.jsonl; pass a step instead")
  pick = max if mode == "max" else min
  return pick(scores, key=lambda step: (scores[step], step))


def load_model(path: str | os.PathLike, *, step: int | None = None,
               allow_nonfinite: bool = False):
  """A ready ``UNet`` (in eval mode) and its config from any of:

  * a training workdir (``config.json`` + ``checkpoints/``): the latest step, or ``step``,
    whose files must match the digests recorded when it was saved;
  * a directory written by ``python -m unet_jax.convert`` (``config.json`` + ``state/``);
  * a folder written by ``unet_jax.interop.hub.save_pretrained`` (``config.json`` +
    ``model.safetensors``);
  * a PyTorch ``.pth``/``.pt``/``.safetensors`` file (converted on the fly).

  Parameters or statistics holding NaN or infinity are refused (a ``ValueError`` naming
  them) unless ``allow_nonfinite``.
  """
  import json

  from flax import nnx

  from unet_jax.interop import convert, hub

  path = pathlib.Path(path).absolute()
  if path.is_file():
    model, config = convert.load_pytorch(path, allow_nonfinite=allow_nonfinite)
  elif hub.is_pretrained_folder(path):
    model = hub.from_pretrained(path)
    config = json.loads((path / hub.CONFIG).read_text())
    if not allow_nonfinite:
      convert.require_finite(nnx.to_pure_dict(nnx.state(model)), source=str(path))
  elif (path / "state").is_dir():
    model, config = convert.load_flax(path, allow_nonfinite=allow_nonfinite)
  elif (path / "config.json").is_file() and (path / "checkpoints").is_dir():
    model, config = _load_training_checkpoint(path, step, allow_nonfinite)
  elif not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  else:
    raise ValueError(f"{path} is neither a training workdir (config.json + checkpoints/), a "
                     f"converted model (config.json + state/), a pretrained folder "
                     f"(config.json + model.safetensors) nor a PyTorch checkpoint file")
  model.eval()
  return model, config


def saved_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps of a training workdir's checkpoints on disk, in order."""
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _load_training_checkpoint(workdir: pathlib.Path, step: int | None, allow_nonfinite: bool):
  """The model of a training workdir at ``step`` (default: the latest), and its config."""
  import json

  from flax import nnx

  from unet_jax.interop import convert
  from unet_jax.model import UNet

  config = json.loads((workdir / "config.json").read_text())["model"]
  directory = workdir / "checkpoints"
  steps = saved_steps(workdir)
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(f"{directory} has no checkpoint"
                            f"{f' at step {step}' if step is not None else ''}; "
                            f"available steps: {steps}")
  step = steps[-1] if step is None else step
  others = [s for s in steps if s != step]
  advice = (f"Load another step (available: {others}; --step with export, step= with "
            f"load_model), or delete {directory / str(step)}." if others else
            f"It is the only checkpoint in {directory}: train again, or restore the workdir "
            f"from a copy.")
  verify_digests(directory / str(step), step, advice=advice)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UNet(**config, rngs=nnx.Rngs(0))))
  try:
    saved = read_tree(directory / str(step) / "state")
    pure = nnx.to_pure_dict(abstract)
    _fill(pure, saved["params"])
    _fill(pure, saved["batch_stats"])
  except Exception as error:  # orbax raises many types for damaged or foreign files
    raise ValueError(_read_failure(directory / str(step), step, error, advice)) from error
  if not allow_nonfinite:
    convert.require_finite(pure, source=f"the checkpoint at step {step} in {directory}")
  nnx.replace_by_pure_dict(abstract, pure)
  return nnx.merge(graphdef, abstract), config


def read_tree(directory: str | os.PathLike) -> Any:
  """Every array of an orbax item directory, on this process's first device, whatever the
  device topology it was saved from (8 GPUs, 2 hosts, ...)."""
  checkpointer = ocp.StandardCheckpointer()
  # An item of a step written by a composite checkpoint has no step metadata of its own, and
  # orbax warns about that on every read of a healthy checkpoint; only that warning is dropped.
  with _without_absl_warning("Metadata file does not exist"):
    metadata = checkpointer.metadata(directory)
    tree = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          tree)
    return checkpointer.restore(directory, target)


@contextlib.contextmanager
def _without_absl_warning(prefix: str):
  """Drop absl log records that start with ``prefix`` while the block runs."""
  import logging

  class Drop(logging.Filter):
    def filter(self, record):
      return not str(record.getMessage()).startswith(prefix)

  target = logging.getLogger("absl")
  drop = Drop()
  target.addFilter(drop)
  try:
    yield
  finally:
    target.removeFilter(drop)


def _fill(target: dict, saved: dict) -> None:
  """Copy ``saved`` leaves into ``target`` where the keys match (orbax saves list indices as
  strings), checking shapes."""
  for key, value in saved.items():
    matching = next((k for k in target if str(k) == str(key)), None)
    if matching is None:
      raise KeyError(f"checkpoint entry {key!r} has no place in the model")
    if isinstance(value, dict) and set(value) == {"value"}:  # an nnx.Variable's payload
      value = value["value"]
    if isinstance(value, dict):
      _fill(target[matching], value)
    elif tuple(target[matching].shape) != tuple(value.shape):
      raise ValueError(f"{key}: checkpoint shape {value.shape}, model {target[matching].shape}")
    else:
      target[matching] = value
