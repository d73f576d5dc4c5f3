"""Training checkpoints with orbax: async saves, the last N and the best k, exact resume.

A checkpoint holds the whole training state (parameters, BatchNorm statistics, optimiser
state, step, RNG key) and the input iterator's position, so a resumed run continues with the
same data. Orbax writes each step to a temporary directory and renames it when complete, so
an interrupted save is never picked up as the latest checkpoint.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


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
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)),
        metrics=metrics, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The state (shaped and placed like ``abstract_state``) and iterator position at
    ``step`` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}; available "
                              f"steps: {self.all_steps()}")
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=ocp.args.JsonRestore()))
    except FileNotFoundError:
      raise
    except Exception as error:  # orbax raises many types for damaged or foreign files
      raise ValueError(f"cannot restore the checkpoint at step {step} in {self.directory}: "
                       f"{type(error).__name__}: {error}. It may be incomplete, damaged or "
                       f"from a different model configuration. Available steps: "
                       f"{self.all_steps()}; restore an older one with "
                       f"--config.checkpoint.restore_step=STEP") from error
    return restored["state"], restored["data"]

  def discard_after(self, step: int) -> list[int]:
    """Delete the checkpoints newer than ``step`` (an abandoned continuation); returns them."""
    newer = [s for s in self.all_steps() if s > step]
    for s in newer:
      self.manager.delete(s)
    return newer

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
  on_disk = {int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()}
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


def load_model(path: str | os.PathLike, *, step: int | None = None):
  """A ready ``UNet`` (in eval mode) and its config from any of:

  * a training workdir (``config.json`` + ``checkpoints/``): the latest step, or ``step``;
  * a directory written by ``python -m unet_jax.convert`` (``config.json`` + ``state/``);
  * a folder written by ``unet_jax.interop.hub.save_pretrained`` (``config.json`` +
    ``model.safetensors``);
  * a PyTorch ``.pth``/``.pt``/``.safetensors`` file (converted on the fly).
  """
  import json

  from flax import nnx

  from unet_jax.interop import convert
  from unet_jax.model import UNet

  from unet_jax.interop import hub

  path = pathlib.Path(path).absolute()
  if path.is_file():
    model, config = convert.load_pytorch(path)
  elif hub.is_pretrained_folder(path):
    model = hub.from_pretrained(path)
    config = json.loads((path / hub.CONFIG).read_text())
  elif (path / "state").is_dir():
    model, config = convert.load_flax(path)
  elif (path / "config.json").is_file() and (path / "checkpoints").is_dir():
    config = json.loads((path / "config.json").read_text())["model"]
    steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())
    if not steps or (step is not None and step not in steps):
      raise FileNotFoundError(f"{path / 'checkpoints'} has no checkpoint"
                              f"{f' at step {step}' if step is not None else ''}; "
                              f"available steps: {steps}")
    step = steps[-1] if step is None else step
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UNet(**config, rngs=nnx.Rngs(0))))
    try:
      saved = read_tree(path / "checkpoints" / str(step) / "state")
      pure = nnx.to_pure_dict(abstract)
      _fill(pure, saved["params"])
      _fill(pure, saved["batch_stats"])
    except Exception as error:
      raise ValueError(f"cannot read the checkpoint at step {step} in {path}: "
                       f"{type(error).__name__}: {error}") from error
    nnx.replace_by_pure_dict(abstract, pure)
    model = nnx.merge(graphdef, abstract)
  elif not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  else:
    raise ValueError(f"{path} is neither a training workdir (config.json + checkpoints/), a "
                     f"converted model (config.json + state/), a pretrained folder "
                     f"(config.json + model.safetensors) nor a PyTorch checkpoint file")
  model.eval()
  return model, config


def read_tree(directory: str | os.PathLike) -> Any:
  """Every array of an orbax item directory, on this process's first device, whatever the
  device topology it was saved from (8 GPUs, 2 hosts, ...)."""
  import jax

  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory)
  tree = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(directory, target)


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
