"""PyTorch reference U-Nets with the module names of the two checkpoint layouts we load.

Written for the parity tests, not taken from either project: ``Walkthrough`` has the
walkthrough's names (``layer1..``, ``decoder..``, ``last``) with its crop done correctly
(height and width separately, odd differences allowed); ``Milesial`` has
milesial/Pytorch-UNet's names and forward pass (pad the up-sampled map, ``[skip, up]``,
``align_corners=True`` bilinear mode).
"""

import torch
import torch.nn.functional as F
from torch import nn


def double_conv(cin, cout, *, padding, bias=True, mid=None):
  mid = mid or cout
  return nn.Sequential(
      nn.Conv2d(cin, mid, 3, padding=padding, bias=bias), nn.BatchNorm2d(mid), nn.ReLU(),
      nn.Conv2d(mid, cout, 3, padding=padding, bias=bias), nn.BatchNorm2d(cout), nn.ReLU())


def center_crop(x, height, width):
  top = (x.shape[2] - height) // 2
  left = (x.shape[3] - width) // 2
  return x[:, :, top:top + height, left:left + width]


class WalkthroughDecoder(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.up = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
    self.conv_relu = double_conv(cin, cout, padding=1)

  def forward(self, high, low):
    up = self.up(high)
    low = center_crop(low, up.shape[2], up.shape[3])
    return self.conv_relu(torch.cat([up, low], dim=1))


class Walkthrough(nn.Module):

  def __init__(self, in_channels=1, n_class=2, features=(64, 128, 256, 512, 1024)):
    super().__init__()
    self.depth = len(features) - 1
    widths = [in_channels, *features]
    for k in range(self.depth + 1):
      setattr(self, f"layer{k + 1}", double_conv(widths[k], widths[k + 1], padding=0))
    for k in range(self.depth, 0, -1):
      setattr(self, f"decoder{k}", WalkthroughDecoder(features[k], features[k - 1]))
    self.last = nn.Conv2d(features[0], n_class, 1)

  def forward(self, x):
    skips = []
    for k in range(1, self.depth + 1):
      x = getattr(self, f"layer{k}")(x)
      skips.append(x)
      x = F.max_pool2d(x, 2)
    x = getattr(self, f"layer{self.depth + 1}")(x)
    for k in range(self.depth, 0, -1):
      x = getattr(self, f"decoder{k}")(x, skips.pop())
    return self.last(x)


class DoubleConv(nn.Module):

  def __init__(self, cin, cout, mid=None):
    super().__init__()
    self.double_conv = double_conv(cin, cout, padding=1, bias=False, mid=mid)

  def forward(self, x):
    return self.double_conv(x)


class Down(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout))

  def forward(self, x):
    return self.maxpool_conv(x)


class Up(nn.Module):

  def __init__(self, cin, cout, bilinear):
    super().__init__()
    if bilinear:
      self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
      self.conv = DoubleConv(cin, cout, cin // 2)
    else:
      self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
      self.conv = DoubleConv(cin, cout)

  def forward(self, x1, x2):
    x1 = self.up(x1)
    dy, dx = x2.shape[2] - x1.shape[2], x2.shape[3] - x1.shape[3]
    x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
    return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel_size=1)

  def forward(self, x):
    return self.conv(x)


class Milesial(nn.Module):

  def __init__(self, n_channels=3, n_classes=2, bilinear=False, features=(64, 128, 256, 512, 1024)):
    super().__init__()
    factor = 2 if bilinear else 1
    self.depth = len(features) - 1
    self.inc = DoubleConv(n_channels, features[0])
    for k in range(1, self.depth + 1):
      cout = features[k] // factor if k == self.depth else features[k]
      setattr(self, f"down{k}", Down(features[k - 1], cout))
    for i in range(self.depth):
      k = self.depth - i
      cout = features[k - 1] if i == self.depth - 1 else features[k - 1] // factor
      setattr(self, f"up{i + 1}", Up(features[k], cout, bilinear))
    self.outc = OutConv(features[0], n_classes)

  def forward(self, x):
    x = self.inc(x)
    skips = []
    for k in range(1, self.depth + 1):
      skips.append(x)
      x = getattr(self, f"down{k}")(x)
    for i in range(self.depth):
      x = getattr(self, f"up{i + 1}")(x, skips.pop())
    return self.outc(x)


def randomize_batch_norm(model, x, seed=0):
  """Give every BatchNorm realistic, non-trivial running statistics and affine parameters."""
  generator = torch.Generator().manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  for m in norms:
    m.momentum = None  # cumulative average over the calibration passes
    m.reset_running_stats()
  model.train()
  with torch.no_grad():
    for scale in (1.0, 0.5):
      model(x * scale)
    for m in norms:
      m.momentum = 0.1
      m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=generator))
      m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=generator))
      m.running_mean.add_(0.05 * torch.randn(m.running_mean.shape, generator=generator))
  model.eval()
  return model
