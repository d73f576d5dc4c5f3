"""``unet_jax.model.UNet`` rebuilt in PyTorch with the Flax model's weights, for benchmarks.

``torch_twin(net)`` returns a ``torch.nn.Module`` with the same architecture, initial weights
and BatchNorm statistics as the Flax ``net`` (transposed up-sampling; the walkthrough's and the
paper's presets, any widths and depth). It has the walkthrough's module names, so a BatchNorm
model's state dict is what ``unet_jax.convert.to_pytorch(net, "walkthrough")`` writes; the
copy here also covers models without normalisation (the paper's).
"""

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from unet_jax import model


class TorchUNet(nn.Module):
  """``unet_jax.model.UNet`` in PyTorch (transposed up-sampling), with the walkthrough's
  module names: ``layer1..``, ``decoder{k}.{up, conv_relu}``, ``last``. Layers a preset does
  not have (BatchNorm in the paper's model) are ``nn.Identity``, so indices stay put."""

  def __init__(self, *, in_channels, num_classes, features, encoder_padding,
               decoder_padding, norm, use_bias, concat_order, dropout):
    super().__init__()
    self.depth, self.concat_order = len(features) - 1, concat_order
    widths = [in_channels, *features]
    pad = {"valid": 0, "same": 1}
    for k in range(self.depth + 1):
      setattr(self, f"layer{k + 1}", _double_conv(widths[k], widths[k + 1],
                                                  pad[encoder_padding], norm, use_bias))
    for k in range(self.depth, 0, -1):
      decoder = nn.Module()
      decoder.up = nn.ConvTranspose2d(features[k], features[k - 1], kernel_size=2, stride=2)
      decoder.conv_relu = _double_conv(2 * features[k - 1], features[k - 1],
                                       pad[decoder_padding], norm, use_bias)
      setattr(self, f"decoder{k}", decoder)
    self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
    self.last = nn.Conv2d(features[0], num_classes, 1)

  def forward(self, x):
    skips = []
    for k in range(1, self.depth + 1):
      x = getattr(self, f"layer{k}")(x)
      skips.append(x)
      x = F.max_pool2d(x, 2)
    x = self.dropout(getattr(self, f"layer{self.depth + 1}")(x))
    for k in range(self.depth, 0, -1):
      decoder = getattr(self, f"decoder{k}")
      up, skip = decoder.up(x), skips.pop()
      top, left = (skip.shape[2] - up.shape[2]) // 2, (skip.shape[3] - up.shape[3]) // 2
      skip = skip[:, :, top:top + up.shape[2], left:left + up.shape[3]]
      parts = [skip, up] if self.concat_order == "skip_up" else [up, skip]
      x = decoder.conv_relu(torch.cat(parts, dim=1))
    return self.last(x)


def _double_conv(cin, cout, padding, norm, bias):
  norm_layer = (lambda: nn.BatchNorm2d(cout)) if norm == "batch" else nn.Identity
  return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=padding, bias=bias), norm_layer(),
                       nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=padding, bias=bias),
                       norm_layer(), nn.ReLU())


def torch_twin(net: model.UNet) -> TorchUNet:
  """A ``TorchUNet`` holding exactly ``net``'s weights and BatchNorm statistics."""
  if net.ups[0].up is None:
    raise ValueError("torch_twin covers transposed up-sampling only, not bilinear")
  twin = TorchUNet(in_channels=net.in_channels, num_classes=net.num_classes,
                   features=net.features, encoder_padding=net.geometry.encoder_padding,
                   decoder_padding=net.geometry.decoder_padding,
                   norm="batch" if net.inc.norm1 is not None else None,
                   use_bias=net.inc.conv1.use_bias, concat_order=net.ups[0].concat_order,
                   dropout=net.dropout.rate if net.dropout is not None else 0.0)
  pure = nnx.to_pure_dict(nnx.state(net))
  pairs = [("layer1", pure["inc"], "double")]
  pairs += [(f"layer{k + 2}", down["conv"], "double") for k, down in pure["downs"].items()]
  for i, up in pure["ups"].items():
    prefix = f"decoder{twin.depth - i}"
    pairs += [(f"{prefix}.up", up["up"], "transpose"), (f"{prefix}.conv_relu", up["conv"],
                                                        "double")]
  pairs.append(("last", pure["head"], "conv"))
  state = {}
  for prefix, node, kind in pairs:
    layers = ([(f"{prefix}.0", node["conv1"], "conv"), (f"{prefix}.1", node.get("norm1"), "norm"),
               (f"{prefix}.3", node["conv2"], "conv"), (f"{prefix}.4", node.get("norm2"), "norm")]
              if kind == "double" else [(prefix, node, kind)])
    for name, params, layer_kind in layers:
      state.update(_torch_tensors(name, params, layer_kind))
  twin.load_state_dict(state, strict=False)
  missing = set(twin.state_dict()) - set(state)
  if any(not k.endswith("num_batches_tracked") for k in missing):
    raise RuntimeError(f"weights not copied to PyTorch: {sorted(missing)}")
  return twin


def _torch_tensors(name, params, kind):
  if params is None:
    return {}
  tensor = lambda a: torch.from_numpy(np.array(a, np.float32, order="C", copy=True))
  if kind == "norm":
    return {f"{name}.weight": tensor(params["scale"]), f"{name}.bias": tensor(params["bias"]),
            f"{name}.running_mean": tensor(params["mean"]),
            f"{name}.running_var": tensor(params["var"])}
  kernel = np.asarray(params["kernel"])  # HWIO; ConvTranspose2d wants (in, out, kH, kW) flipped
  kernel = kernel[::-1, ::-1].transpose(2, 3, 0, 1) if kind == "transpose" else kernel.transpose(
      3, 2, 0, 1)
  out = {f"{name}.weight": tensor(kernel)}
  if "bias" in params:
    out[f"{name}.bias"] = tensor(params["bias"])
  return out
