"""Segmentation losses for U-Net: weighted pixel-wise cross-entropy, soft Dice, and their sum.

All losses take raw network outputs ``logits`` of shape ``[..., H, W, C]`` and integer
``labels`` of shape ``[..., H, W]`` with values in ``[0, C)``; the leading ``...`` (batch)
dimensions are arbitrary and may be empty. Volumes (``[..., D, H, W, C]``) work alike: the
cross-entropy is a mean over every voxel, and Dice, which is computed per example, takes
``spatial_dims=3`` to sum over the three spatial axes. Each returns a scalar, is jit-able and
differentiable with respect to ``logits``.

``activation`` (``"softmax"``, the default, or ``"sigmoid"``) is the model's
(``unet_jax.heads``): with ``"sigmoid"`` the cross-entropy is the binary cross-entropy of each
channel (averaged over channels), Dice is computed from sigmoid probabilities, and labels are
0/1 for a one-channel (binary) model and bit sets (``heads.pack``) for a multi-label one.

Labels outside ``[0, C)`` that are not ``ignore_index`` are a caller error: their one-hot
encoding is all zeros, so in the Dice loss they count as predicted mass with no target;
in the cross-entropy, labels ``>= C`` give ``nan`` (out-of-bounds gather) and negative labels
wrap around to class ``C + label``. Mark such pixels with ``ignore_index`` instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from unet_jax import heads


def _valid_pixels(labels: jax.Array, ignore_index: int | None) -> tuple[jax.Array, jax.Array]:
  """Returns ``(labels, mask)``: ignored labels replaced by 0, and ``1.`` where not ignored."""
  if ignore_index is None:
    return labels, jnp.ones(labels.shape, jnp.float32)
  valid = labels != ignore_index
  # The ignored value may be out of range (e.g. 255); class 0 keeps the gather finite, and the
  # mask then removes its contribution. Multiplying a nan by 0 would not.
  return jnp.where(valid, labels, 0), valid.astype(jnp.float32)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """``numerator / denominator``, and 0 (with zero gradient) where ``denominator == 0``."""
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def _check_shapes(logits: jax.Array, labels: jax.Array, spatial_dims: int = 2) -> None:
  if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
    raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
  axes = "D, H, W" if spatial_dims == 3 else "H, W"
  if logits.ndim < spatial_dims + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(
        f"expected logits [..., {axes}, C] and labels [..., {axes}]; got logits "
        f"{logits.shape} and labels {labels.shape}"
    )


def weighted_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    ignore_index: int | None = None,
    activation: str = "softmax",
) -> jax.Array:
  r"""Pixel-wise softmax cross-entropy, weighted by a per-pixel map (U-Net eq. 1).

  .. math::
    \mathrm{ce}(x) = -\log \operatorname{softmax}(z(x))_{\ell(x)}, \qquad
    L = \frac{\sum_x m(x)\, w(x)\, \mathrm{ce}(x)}{\sum_x m(x)\, w(x)}

  summed over every pixel :math:`x` of every example, where :math:`w` is ``weights``
  (1 if ``None``) and :math:`m(x) = [\ell(x) \ne \text{ignore\_index}]`. The paper's energy
  is the weighted sum; dividing by :math:`\sum w` makes the loss a weighted *mean*, so its
  scale, and hence the learning rate, does not depend on image size or on the overall level of
  the weight map. With ``weights=None`` this is the plain mean over non-ignored pixels. If
  :math:`\sum m w = 0` (everything ignored or zero-weighted) the loss is 0, with zero gradient.

  Args:
    logits: ``[..., H, W, C]`` unnormalised class scores.
    labels: ``[..., H, W]`` integer class ids in ``[0, C)``.
    weights: optional ``[..., H, W]`` non-negative per-pixel weights, e.g. from
      :func:`unet_jax.weight_map.weight_map`.
    ignore_index: label value whose pixels contribute nothing; may lie outside ``[0, C)``.
    activation: ``"softmax"`` or ``"sigmoid"`` (binary cross-entropy per channel).

  Returns:
    Scalar loss.

  References:
    Ronneberger, Fischer, Brox. "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", MICCAI 2015, Section 3, eq. 1.
  """
  _check_shapes(logits, labels)
  labels, mask = _valid_pixels(labels, ignore_index)
  if activation == "softmax":
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [..., H, W]
  else:
    t = heads.targets(labels, logits.shape[-1], activation, logits.dtype)
    ce = optax.sigmoid_binary_cross_entropy(logits, t).mean(axis=-1)
  w = mask if weights is None else mask * jnp.broadcast_to(weights, mask.shape)
  return _safe_divide(jnp.sum(w * ce), jnp.sum(w))


def dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    smooth: float = 1.0,
    ignore_index: int | None = None,
    activation: str = "softmax",
    spatial_dims: int = 2,
) -> jax.Array:
  r"""Soft Dice loss from softmax probabilities, averaged over classes and examples.

  For each example and each class :math:`c`, with :math:`p_c(x) = \operatorname{softmax}(z(x))_c`,
  :math:`t_c(x) = [\ell(x) = c]` and sums over the example's non-ignored pixels,

  .. math::
    D_c = 1 - \frac{2 \sum_x p_c(x)\, t_c(x) + s}{\sum_x p_c(x) + \sum_x t_c(x) + s}

  and the loss is the mean of :math:`D_c` over the ``C`` classes and the leading ``...``
  dimensions. The smoothing :math:`s` keeps the ratio defined for a class that is absent from
  both prediction and target (then :math:`D_c = 0`) and softens the gradient of small classes.
  Every class counts equally, whatever its pixel frequency. Dice is computed per example
  (summing over ``H, W`` only, or ``D, H, W`` for volumes), so one image's large cells do not
  mask another's errors.

  ``optax.losses.dice_loss`` computes the same quantity with smoothing ``s / 2`` but cannot drop
  ignored pixels under ``jit``: masking needs probabilities as input, and its probability path
  validates them with a host-side check on traced values.

  Args:
    logits: ``[..., H, W, C]`` unnormalised class scores, ``C >= 1``.
    labels: ``[..., H, W]`` integer class ids in ``[0, C)``.
    smooth: the smoothing term :math:`s > 0`.
    ignore_index: label value whose pixels are left out of every sum.
    activation: ``"softmax"``, or ``"sigmoid"``: :math:`p_c` is then the sigmoid of channel
      :math:`c` and :math:`t_c` its 0/1 target (a binary model's one channel is the foreground).
    spatial_dims: 2 for images ``[..., H, W, C]``, 3 for volumes ``[..., D, H, W, C]``.

  Returns:
    Scalar loss in ``[0, 1]``.

  References:
    Milletari, Navab, Ahmadi. "V-Net: Fully Convolutional Neural Networks for Volumetric Medical
    Image Segmentation", 3DV 2016.
  """
  _check_shapes(logits, labels, spatial_dims)
  num_classes = logits.shape[-1]
  labels, mask = _valid_pixels(labels, ignore_index)
  p = heads.probabilities(logits, activation) * mask[..., None]  # [..., H, W, C]
  t = heads.targets(labels, num_classes, activation, p.dtype) * mask[..., None]
  spatial = tuple(range(-1 - spatial_dims, -1))
  intersection = jnp.sum(p * t, axis=spatial)  # [..., C]
  dice = (2.0 * intersection + smooth) / (
      jnp.sum(p, axis=spatial) + jnp.sum(t, axis=spatial) + smooth
  )
  return jnp.mean(1.0 - dice)


def dice_ce_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    ignore_index: int | None = None,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    smooth: float = 1.0,
    activation: str = "softmax",
    spatial_dims: int = 2,
) -> jax.Array:
  r"""Weighted cross-entropy plus soft Dice.

  .. math::
    L = \lambda_{ce}\, L_{ce}(z, \ell; w) + \lambda_{dice}\, L_{dice}(z, \ell)

  with :math:`L_{ce}` from :func:`weighted_cross_entropy` and :math:`L_{dice}` from
  :func:`dice_loss`. The pixel weights ``weights`` apply to the cross-entropy only: Dice is
  already balanced across classes, and the border emphasis is a per-pixel notion.

  Args:
    logits: ``[..., H, W, C]`` unnormalised class scores.
    labels: ``[..., H, W]`` integer class ids in ``[0, C)``.
    weights: optional ``[..., H, W]`` per-pixel weights for the cross-entropy term.
    ignore_index: label value left out of both terms.
    ce_weight: :math:`\lambda_{ce}`.
    dice_weight: :math:`\lambda_{dice}`.
    smooth: Dice smoothing term.
    activation: ``"softmax"`` or ``"sigmoid"`` (see the module docstring).
    spatial_dims: 2 for images, 3 for volumes (the axes Dice sums over).

  Returns:
    Scalar loss.
  """
  ce = weighted_cross_entropy(logits, labels, weights=weights, ignore_index=ignore_index,
                              activation=activation)
  dice = dice_loss(logits, labels, smooth=smooth, ignore_index=ignore_index,
                   activation=activation, spatial_dims=spatial_dims)
  return ce_weight * ce + dice_weight * dice
