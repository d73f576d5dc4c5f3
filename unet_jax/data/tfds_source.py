"""Any TFDS segmentation dataset, read through ``tfds.data_source`` (random access, no TensorFlow).

``tfds.data_source(name, split=..., data_dir=...)`` reads a dataset prepared in the
``array_record`` format with numpy only. *Preparing* it (downloading and converting, once)
needs TensorFlow, which is the optional ``tf`` extra::

  pip install -e ".[tf]"
  python -c "import tensorflow_datasets as tfds; tfds.data_source('oxford_iiit_pet', data_dir='DIR')"

(``data_dir`` defaults to ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``; about 800 MB for
``oxford_iiit_pet``). Training never downloads: an unprepared dataset is an error that repeats
the commands above.

Each record's image (``data.tfds.image_key``) and mask (``mask_key``) become
``{"image": float32 [H, W, C], "label": int32 [H, W]}`` through the value → class map
``mask_values`` / ``ignore_values`` of :mod:`unet_jax.data.decode`. Presets fill the keys and
the map of known datasets when they are left empty:

* ``oxford_iiit_pet`` (Parkhi et al. 2012): ``image``, ``segmentation_mask``, a trimap with
  1 = pet, 2 = background, 3 = border (the uncertain rim around the pet). It maps to
  **0 = background, 1 = pet, 2 = border** (``mask_values=(2, 1, 3)``): background is class 0 as
  in every other source, and the border stays a class of its own, as in the dataset's own
  3-class task. For a binary pet/background task, set ``mask_values=(2, 1)`` and
  ``ignore_values=(3,)``.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from unet_jax.data import decode

PRESETS = {
    "oxford_iiit_pet": dict(image_key="image", mask_key="segmentation_mask",
                            mask_values=(2, 1, 3)),
}


class TFDSSource:
  """Random-access ``{"image", "label"}`` examples of one split of a prepared TFDS dataset.

  Args:
    name: the TFDS name, e.g. ``"oxford_iiit_pet"``.
    split: a TFDS split, slices included (``"train"``, ``"test[:500]"``).
    data_dir: where the prepared dataset lives; ``None`` for TFDS's default.
    image_key, mask_key: the record's image ``[H, W, C]`` and mask ``[H, W(, 1)]`` features.
    channels: image channels to return.
    table: mask value → class (or ``IGNORE``), from :func:`decode.class_table`.
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None, image_key: str,
               mask_key: str, channels: int, table: dict[int, int]):
    import tensorflow_datasets as tfds
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # tfds raises many types for a missing or unprepared dataset
      raise ValueError(
          f"cannot open TFDS dataset {name!r} (split {split!r}, data_dir "
          f"{data_dir or 'default'}); is it prepared there, in the array_record format? TFDS "
          f"says: {type(error).__name__}: {str(error)[:500]}\nPrepare it "
          f"once (needs TensorFlow): pip install -e \".[tf]\" && python -c \"import "
          f"tensorflow_datasets as tfds; tfds.data_source({name!r}, data_dir="
          f"{data_dir or '~/tensorflow_datasets'!r})\"") from error
    self.name, self.split = name, split
    self.image_key, self.mask_key = image_key, mask_key
    self.channels, self.table = channels, dict(table)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._source[index]
    where = f"{self.name}[{self.split}] example {index}"
    missing = [k for k in (self.image_key, self.mask_key) if k not in record]
    if missing:
      raise KeyError(f"{where} has no feature {missing}; its features are {sorted(record)}. "
                     f"Set data.tfds.image_key / mask_key.")
    image = decode.to_image(record[self.image_key], self.channels, name=where)
    label = decode.to_label(record[self.mask_key], self.table, name=f"{where} {self.mask_key}")
    decode.check_same_size(image, label, name=where)
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return f"TFDSSource({self.name!r}, split={self.split!r}, {len(self)} examples)"


def from_config(config: ml_collections.ConfigDict, split: str, *, channels: int) -> TFDSSource:
  """The ``data.tfds`` source of ``split`` (``"train"`` → ``train_split``, ``"validation"`` →
  ``val_split``); empty keys and map come from ``PRESETS[name]``."""
  splits = {"train": config.train_split, "validation": config.val_split}
  if split not in splits:
    raise ValueError(f"unknown split {split!r}; a TFDS source has {tuple(splits)}")
  preset = PRESETS.get(config.name, {})
  fields = {key: config[key] or preset.get(key) for key in ("image_key", "mask_key",
                                                            "mask_values")}
  unset = [key for key, value in fields.items() if not value]
  if unset:
    raise ValueError(f"data.tfds.{', '.join(unset)} must be set for {config.name!r} (presets "
                     f"exist for {sorted(PRESETS)})")
  return TFDSSource(config.name, splits[split], data_dir=config.data_dir or None,
                    image_key=fields["image_key"], mask_key=fields["mask_key"],
                    channels=channels,
                    table=decode.class_table(fields["mask_values"], config.ignore_values))
