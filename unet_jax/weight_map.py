r"""The U-Net border weight map (Ronneberger et al. 2015, eq. 2), computed host-side.

The paper pre-computes, for every ground-truth mask, a per-pixel weight

.. math::
  w(x) = w_c(x) + w_0 \cdot \exp\left(-\frac{(d_1(x) + d_2(x))^2}{2\sigma^2}\right)

where :math:`w_c` balances the class frequencies and :math:`d_1`, :math:`d_2` are the distances
from :math:`x` to the border of the nearest and the second-nearest cell. The second term makes
the thin background gaps between touching cells expensive to get wrong, which is what lets the
network separate them. The paper uses :math:`w_0 = 10` and :math:`\sigma \approx 5` px.

The map is a training-data constant, so it is computed once per mask with numpy/scipy and fed to
:func:`unet_jax.losses.weighted_cross_entropy` as ``weights``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# The border term is dropped once it falls below this fraction of w0; see `border_cutoff`.
_BORDER_TOLERANCE = 1e-6


def border_cutoff(sigma: float, *, tolerance: float = _BORDER_TOLERANCE) -> float:
  r"""Distance beyond which the border term is negligible.

  .. math::
    r = \sigma \sqrt{2 \ln(1 / \text{tolerance})}

  Since :math:`d_1 \le d_2`, a pixel whose second-nearest cell is farther than :math:`r` has
  :math:`\exp(-(d_1 + d_2)^2 / 2\sigma^2) < \exp(-r^2 / 2\sigma^2) = \text{tolerance}`.
  For :math:`\sigma = 5` and the default tolerance :math:`10^{-6}`, :math:`r \approx 26.3` px.

  Args:
    sigma: the border term's length scale :math:`\sigma`, in pixels.
    tolerance: relative size of the border term at the cutoff, in ``(0, 1)``.

  Returns:
    The cutoff radius :math:`r` in pixels.
  """
  return sigma * math.sqrt(2.0 * math.log(1.0 / tolerance))


def _class_weight_map(
    label: np.ndarray, class_weights: Sequence[float] | None
) -> np.ndarray:
  """:math:`w_c(x)` as a float64 ``[H, W]`` array."""
  if class_weights is not None:
    table = np.asarray(class_weights, dtype=np.float64)
    if table.ndim != 1:
      raise ValueError(f"class_weights must be a flat sequence, got shape {table.shape}")
    low, high = int(label.min()), int(label.max())
    if low < 0 or high >= table.shape[0]:
      raise ValueError(
          f"class_weights has {table.shape[0]} entries, so label values must lie in "
          f"[0, {table.shape[0] - 1}]; got values in [{low}, {high}]"
      )
    return table[label]
  # Inverse frequency scaled so the most frequent class has weight 1: every class then carries
  # the same total weight, no pixel weighs less than 1, and w0 keeps the paper's scale.
  _, inverse, counts = np.unique(label, return_inverse=True, return_counts=True)
  table = counts.max() / counts.astype(np.float64)
  return table[inverse].reshape(label.shape)


def _nearest_two_cell_distances(
    cells: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
  r"""Distances :math:`d_1 \le d_2` to the nearest and second-nearest cell, ``inf`` past ``cutoff``.

  Each cell's Euclidean distance transform is computed only inside its bounding box grown by
  ``cutoff``: the nearest pixel of that cell always lies in the box, so the distances there are
  exact, and everywhere outside they exceed ``cutoff`` and count as infinite.
  """
  height, width = cells.shape
  margin = int(math.ceil(cutoff))
  d1 = np.full(cells.shape, np.inf)
  d2 = np.full(cells.shape, np.inf)
  for index, box in enumerate(ndimage.find_objects(cells), start=1):
    if box is None:
      continue
    rows, cols = box
    window = (
        slice(max(rows.start - margin, 0), min(rows.stop + margin, height)),
        slice(max(cols.start - margin, 0), min(cols.stop + margin, width)),
    )
    d = ndimage.distance_transform_edt(cells[window] != index)
    # Clip at the cutoff here too, so the result does not depend on the shape of the box.
    d[d > cutoff] = np.inf
    d1_window, d2_window = d1[window], d2[window]
    d2[window] = np.minimum(d2_window, np.maximum(d1_window, d))
    d1[window] = np.minimum(d1_window, d)
  return d1, d2


def weight_map(
    label: np.ndarray,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | None = None,
    foreground: int = 1,
) -> np.ndarray:
  r"""Per-pixel loss weights of Ronneberger et al. 2015, eq. 2.

  .. math::
    w(x) = w_c(x) + w_0 \cdot \exp\left(-\frac{(d_1(x) + d_2(x))^2}{2\sigma^2}\right)
           \cdot [\,\ell(x) \ne \text{foreground}\,]

  * **Class balance** :math:`w_c`. With ``class_weights`` given,
    :math:`w_c(x) = \text{class\_weights}[\ell(x)]`. Otherwise every label value :math:`k`
    present in this mask, with :math:`n_k` pixels, gets :math:`w_c = \max_j n_j / n_k`: the most
    frequent class weighs 1, rarer classes proportionally more, so each class contributes the
    same total weight and :math:`w_0` keeps the scale it has in the paper.
  * **Cells** are the 4-connected components of ``label == foreground``; a 1 px membrane line
    therefore separates two cells.
  * **Distances** :math:`d_1 \le d_2` are Euclidean distances to the nearest pixel of the
    nearest and second-nearest cell (0 inside a cell). Distances beyond
    :func:`border_cutoff` (:math:`\approx 26` px for :math:`\sigma = 5`) count as infinite;
    this changes the border term by less than :math:`10^{-6} w_0`.
  * **Where the border term applies**: only on pixels outside the cells (the membrane /
    background class), as in the paper's Fig. 3d, where the weight lights up the gaps between
    touching cells. Taken literally, eq. 2 would also raise the weight of cell pixels near a
    neighbour (their :math:`d_1 = 0`), which blurs the cell/background balance that
    :math:`w_c` sets up. With fewer than two cells the term is zero everywhere.

  A pixel midway across a 1 px gap between two cells has :math:`d_1 = d_2 = 1`, so
  :math:`w = w_c + w_0 e^{-2/\sigma^2} \approx w_c + 0.92\,w_0` for :math:`\sigma = 5`.

  Args:
    label: ``[H, W]`` integer (or bool) ground-truth mask.
    w0: amplitude :math:`w_0` of the border term, ``>= 0`` (paper: 10).
    sigma: length scale :math:`\sigma` of the border term in pixels, ``> 0`` (paper: ~5).
    class_weights: optional table of :math:`w_c` indexed by label value; must cover every value
      in ``label``. ``None`` balances the classes of this mask as described above.
    foreground: the label value of cell interiors.

  Returns:
    ``[H, W]`` float32 weights, all ``>= min w_c``.

  Raises:
    ValueError: if ``label`` is not a 2-D integer array, ``w0 < 0``, ``sigma <= 0``, or
      ``class_weights`` does not cover the label values.

  References:
    Ronneberger, Fischer, Brox. "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", MICCAI 2015, Section 3, eq. 2.
  """
  label = np.asarray(label)
  if label.ndim != 2:
    raise ValueError(f"label must be a 2-D [H, W] mask, got shape {label.shape}")
  if not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
    raise ValueError(f"label must hold integer class ids, got dtype {label.dtype}")
  if label.dtype == np.bool_:
    label = label.astype(np.int32)
  if not w0 >= 0:
    raise ValueError(f"w0 must be >= 0, got {w0!r}")
  if not (sigma > 0 and math.isfinite(sigma)):
    raise ValueError(f"sigma must be a positive finite number of pixels, got {sigma!r}")

  w_c = _class_weight_map(label, class_weights)
  inside = label == foreground
  cells, num_cells = ndimage.label(inside)
  if num_cells < 2 or w0 == 0:
    return w_c.astype(np.float32)

  d1, d2 = _nearest_two_cell_distances(cells, border_cutoff(sigma))
  border = w0 * np.exp(-np.square(d1 + d2) / (2.0 * sigma**2))
  return np.where(inside, w_c, w_c + border).astype(np.float32)
