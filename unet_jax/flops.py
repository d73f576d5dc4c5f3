"""Analytic FLOP count of a U-Net forward pass, for throughput and utilisation figures.

A multiply-add counts as 2 FLOPs. Only the multiply-adds that touch a real input pixel are
counted: a padded ("same") 3×3 convolution does not count the taps that fall on its zero
border, which is also how XLA's cost analysis counts convolutions. The parts:

* ``conv``: the 3×3 convolutions, ``2 · H_out · W_out · C_in · C_out · 9`` each in the
  interior (fewer taps along a padded border);
* ``up``: the up-sampling. A 2×2 stride-2 up-convolution is ``2 · H_in · W_in · C_in · C_out
  · 4``. Bilinear up-sampling is counted as ``model.upsample_bilinear`` computes it: two dense
  interpolation matmuls, ``2 · (2H · H · W + 2W · W · 2H) · C``;
* ``head``: the 1×1 convolution, ``2 · H · W · C_in · num_classes``;
* ``elementwise``: an estimate of the rest, one FLOP per element per operation in evaluation
  mode: bias add 1, BatchNorm 4 (subtract, scale, multiply, add), ReLU 1, 2×2 max-pool 3 per
  output. It is kept apart from ``model``, the count used for GFLOP/s and utilisation.

A training step costs about three forward passes (``train_step_flops``): the backward pass of
each convolution is one convolution for the gradient of its input and one for its weights,
each as large as the forward one. It is slightly less in truth, since no gradient is taken
for the input image.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from unet_jax.geometry import Geometry
from unet_jax.model import UNet, config_of

_UNET_DEFAULTS = {name: p.default
                  for name, p in inspect.signature(UNet.__init__).parameters.items()
                  if p.default is not inspect.Parameter.empty}


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """FLOPs of one forward pass over a whole batch (see the module docstring)."""

  conv: int
  up: int
  head: int
  elementwise: int

  @property
  def model(self) -> int:
    """Multiply-add FLOPs of the convolutions, up-sampling and head: the usual model FLOPs."""
    return self.conv + self.up + self.head

  @property
  def total(self) -> int:
    return self.model + self.elementwise


def _config(model: UNet | Mapping[str, Any]) -> dict[str, Any]:
  if isinstance(model, UNet):
    return dict(in_channels=model.in_channels, num_classes=model.num_classes,
                features=model.features, encoder_padding=model.geometry.encoder_padding,
                decoder_padding=model.geometry.decoder_padding,
                upsample="transpose" if model.ups[0].up is not None else "bilinear",
                norm="batch" if model.inc.norm1 is not None else None,
                use_bias=model.inc.conv1.use_bias, skip_fit=model.geometry.skip_fit,
                **{k: v for k, v in config_of(model).items() if k in _COUNTED_2D_ONLY})
  unknown = set(model) - set(_UNET_DEFAULTS) - {"rngs"}
  if unknown:
    raise ValueError(f"unknown UNet options {sorted(unknown)}; known: {sorted(_UNET_DEFAULTS)}")
  cfg = {**_UNET_DEFAULTS, **model}
  different = {k: cfg[k] for k in _COUNTED_2D_ONLY if cfg[k] != _UNET_DEFAULTS[k]}
  if different:
    raise ValueError(f"the FLOP count covers 2-D U-Nets with the default encoder and "
                     f"up-convolution widths; this model sets {different}")
  return cfg


# Options the count does not cover yet (3-D models and their width options).
_COUNTED_2D_ONLY = ("spatial_dims", "halve_encoder_mid", "upconv_width", "upconv_bias")


def _taps(size: int, padding: str) -> int:
  """(output position, kernel tap) pairs of a 3×3 convolution that land inside the input."""
  return 3 * (size - 2) if padding == "valid" else 3 * size - 2


def forward_flops(model: UNet | Mapping[str, Any], height: int, width: int, *,
                  batch: int = 1) -> FlopCount:
  """FLOPs of one forward pass of ``model`` over a ``[batch, height, width, C]`` input.

  Args:
    model: a ``UNet``, or a mapping of ``UNet`` keyword arguments (missing ones take
      ``UNet``'s defaults), e.g. ``{**model.PRESETS["paper"].keywords, "in_channels": 1}``.
    height, width: a valid input size for that network.
    batch: examples in the batch.

  Raises:
    ValueError: for an input size the network cannot take, or unknown options.
  """
  cfg = _config(model)
  features, bias = list(cfg["features"]), bool(cfg["use_bias"])
  per_output = (1 if bias else 0) + (4 if cfg["norm"] == "batch" else 0) + 1
  geometry = Geometry(len(features) - 1, cfg["encoder_padding"], cfg["decoder_padding"],
                      cfg.get("skip_fit") or "crop")
  geometry.check_shape(height, width)
  sizes = [geometry.trace(height), geometry.trace(width)]
  totals = dict(conv=0, up=0, head=0, elementwise=0)

  def conv3x3(h, w, cin, cout, padding):
    totals["conv"] += 2 * _taps(h, padding) * _taps(w, padding) * cin * cout
    h, w = (h - 2, w - 2) if padding == "valid" else (h, w)
    totals["elementwise"] += per_output * h * w * cout
    return h, w

  def double_conv(h, w, cin, mid, cout, padding):
    h, w = conv3x3(h, w, cin, mid, padding)
    return conv3x3(h, w, mid, cout, padding)

  halve = 2 if cfg["upsample"] == "bilinear" else 1
  widths = features[:-1] + [features[-1] // halve]
  h, w = double_conv(height, width, cfg["in_channels"], widths[0], widths[0],
                     cfg["encoder_padding"])
  skips = []
  for k in range(1, len(widths)):
    skips.append((h, w))
    h, w = h // 2, w // 2  # odd sizes are floored (models that pad up-sampled maps)
    totals["elementwise"] += 3 * h * w * widths[k - 1]
    h, w = double_conv(h, w, widths[k - 1], widths[k], widths[k], cfg["encoder_padding"])
  channels = widths[-1]
  for k in reversed(range(len(features) - 1)):
    skips.pop()
    if cfg["upsample"] == "transpose":
      totals["up"] += 2 * h * w * 4 * channels * features[k]
      totals["elementwise"] += (2 * h) * (2 * w) * features[k]  # its bias
      concat, out = 2 * features[k], features[k]
      mid = out
    else:
      totals["up"] += 2 * (2 * h * h * w + 2 * w * w * 2 * h) * channels
      concat = channels + features[k]
      out, mid = (features[k] if k == 0 else features[k - 1]), concat // 2
    level = len(features) - 2 - k  # decoder levels, deepest first
    h, w = (sizes[0]["ups"][level], sizes[1]["ups"][level])  # after padding to the skip
    h, w = double_conv(h, w, concat, mid, out, cfg["decoder_padding"])
    channels = out
  totals["head"] = 2 * h * w * channels * cfg["num_classes"]
  totals["elementwise"] += h * w * cfg["num_classes"]  # the head's bias
  return FlopCount(**{k: v * batch for k, v in totals.items()})


def train_step_flops(model: UNet | Mapping[str, Any], height: int, width: int, *,
                     batch: int = 1) -> int:
  """Model FLOPs of one training step: three forward passes' ``model`` FLOPs."""
  return 3 * forward_flops(model, height, width, batch=batch).model
