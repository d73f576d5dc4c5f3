"""Hub-style model folders: ``config.json`` + ``model.safetensors``.

The layout of ``huggingface_hub``'s ``ModelHubMixin`` folders, so that a model can be pushed to
and pulled from the Hugging Face Hub (``push_to_hub``, ``from_pretrained("user/repo")``) by
users who are online, and shared as a plain folder by everyone else:

* ``config.json`` holds exactly the ``UNet`` keyword arguments (``model.config_of``);
* ``model.safetensors`` holds every parameter and BatchNorm statistic, named by its path in the
  model (``downs.0.conv.conv1.kernel``), in Flax's layouts (NHWC activations, HWIO kernels),
  with ``{"format": "flax", "library": "unet-jax"}`` as metadata.

So a folder loads with nothing but the model class::

  config = json.loads((folder / "config.json").read_text())
  model = UNet(**config, rngs=nnx.Rngs(0))
  flat = safetensors.numpy.load_file(folder / "model.safetensors")
  # put each array at its path: nnx.replace_by_pure_dict(state, unflattened), as below

``huggingface_hub`` is optional: only ``push_to_hub`` and loading by repository id need it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import numpy as np
from flax import nnx

from unet_jax.model import UNet, config_of

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{name}."))
    else:
      flat[name] = np.asarray(value)
  return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = (int(part) if part.isdigit() else part for part in name.split("."))
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def save_pretrained(model: UNet, directory: str | os.PathLike) -> pathlib.Path:
  """Write ``model`` to ``directory`` as ``config.json`` + ``model.safetensors``."""
  from safetensors.numpy import save_file
  directory = pathlib.Path(directory)
  if directory.exists() and not directory.is_dir():
    raise ValueError(f"{directory} exists and is not a directory")
  directory.mkdir(parents=True, exist_ok=True)
  weights = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))
  partial = directory / f".{WEIGHTS}.partial"
  save_file(weights, str(partial), metadata={"format": "flax", "library": "unet-jax"})
  os.replace(partial, directory / WEIGHTS)  # never a half-written file under the real name
  (directory / CONFIG).write_text(json.dumps(config_of(model), indent=2) + "\n")
  return directory


def is_pretrained_folder(path: str | os.PathLike) -> bool:
  path = pathlib.Path(path)
  return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def from_pretrained(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> UNet:
  """The model in a local folder written by ``save_pretrained``, or in a Hub repository
  (``"user/repo"``: downloaded with ``huggingface_hub.snapshot_download(**hub_kwargs)``).

  Returns the model in evaluation mode. Loading reads JSON and safetensors only: it runs no
  code from the files.
  """
  from safetensors.numpy import load_file
  path = pathlib.Path(name_or_path)
  if not path.is_dir():
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
      raise FileNotFoundError(f"{path} is not a folder with {CONFIG} and {WEIGHTS}, nor a "
                              f"Hub repository id (user/name)")
    path = _download(str(name_or_path), **hub_kwargs)
  if not is_pretrained_folder(path):
    raise FileNotFoundError(f"{path} has no {CONFIG} and {WEIGHTS} (written by "
                            f"save_pretrained)")
  config = json.loads((path / CONFIG).read_text())
  try:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UNet(**config, rngs=nnx.Rngs(0))))
  except TypeError as error:
    raise ValueError(f"{path / CONFIG} is not a unet-jax model config: {error}") from error
  pure = nnx.to_pure_dict(abstract)
  saved = _unflatten(load_file(str(path / WEIGHTS)))
  _fill(pure, saved, path / WEIGHTS)
  nnx.replace_by_pure_dict(abstract, pure)
  model = nnx.merge(graphdef, abstract)
  model.eval()
  return model


def _fill(target: dict, saved: dict, source: pathlib.Path, prefix: str = "") -> None:
  """Copy ``saved`` into ``target`` leaf by leaf, checking names, shapes and dtypes."""
  missing = sorted(set(target) - set(saved), key=str)
  extra = sorted(set(saved) - set(target), key=str)
  if missing or extra:
    raise ValueError(f"{source} does not match its config at '{prefix or '.'}': missing "
                     f"{[f'{prefix}{k}' for k in missing][:8]}, unexpected "
                     f"{[f'{prefix}{k}' for k in extra][:8]}")
  for key, value in target.items():
    if isinstance(value, dict):
      _fill(value, saved[key], source, f"{prefix}{key}.")
    else:
      array = saved[key]
      if tuple(array.shape) != tuple(value.shape) or array.dtype != value.dtype:
        raise ValueError(f"{source}: {prefix}{key} has shape {tuple(array.shape)} and dtype "
                         f"{array.dtype}; the config needs {tuple(value.shape)} "
                         f"{value.dtype}")
      target[key] = array


def _download(repo_id: str, **hub_kwargs: Any) -> pathlib.Path:
  try:
    from huggingface_hub import snapshot_download
  except ImportError as error:
    raise FileNotFoundError(f"{repo_id!r} is not a local folder, and loading from the Hub "
                            f"needs huggingface_hub: pip install huggingface_hub") from error
  return pathlib.Path(snapshot_download(repo_id, allow_patterns=[CONFIG, WEIGHTS],
                                        **hub_kwargs))


def push_to_hub(model: UNet, repo_id: str, **hub_kwargs: Any) -> str:
  """Write ``model`` to a temporary folder and upload it to the Hub repository ``repo_id``
  (``huggingface_hub.upload_folder(**hub_kwargs)``; needs a token and network). Returns the
  commit URL."""
  import tempfile

  from huggingface_hub import create_repo, upload_folder
  create_repo(repo_id, exist_ok=True, token=hub_kwargs.get("token"))
  with tempfile.TemporaryDirectory() as folder:
    save_pretrained(model, folder)
    return str(upload_folder(repo_id=repo_id, folder_path=folder, **hub_kwargs))
