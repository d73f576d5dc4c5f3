"""The ISBI 2012 challenge's warping error, splits and mergers only (Jain et al., CVPR 2010).

The true cell mask is warped toward the predicted one: pixels where the two disagree are
flipped, one at a time, when the flip changes no topology (simple points, with 4-connected
cells and 8-connected background). Disagreement that is left is topological; each such pixel
is classified by its neighbourhood in the warped mask, and those that mark a split or a merger
of cells are counted. The error is their number over the pixels of the stack, at the threshold
that minimises it. This follows the organisers' Fiji implementation
(trainableSegmentation.metrics.WarpingError, ``getMinimumSplitsAndMergersErrorValue`` with
mismatches classified by type over the whole image): the order of flips (most confident
prediction first, then column by column), the passes until one flips nothing, and the
classification rules. Their simple-point test runs in 3-D on the patch laid in a plane
(Bertrand & Malandain 1994); in a plane it reduces to the 2-D test here (``is_simple``, checked
against the textbook definition in the tests). Which variant produced the 2012 leaderboard's
figures is not stated in the sources; the organisers' batch scripts also offer a
classification within a 20-pixel window, which can count a few more splits.
"""

from __future__ import annotations

import functools

import numpy as np

# The 8-neighbourhood walked around the centre; consecutive pixels are 4-adjacent.
_RING = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def is_simple(ring: int) -> bool:
  """Whether flipping the centre of a 3×3 patch keeps its topology (a simple point).

  ``ring`` has bit k set when the k-th pixel of the walk N, NE, E, SE, S, SW, W, NW is a cell.
  With 4-connected cells and 8-connected background the centre is simple when exactly one
  4-connected run of cells around it touches it by an edge and some neighbour is background.
  """
  cells = [bool(ring >> k & 1) for k in range(8)]
  if all(cells):
    return False
  start = cells.index(False)  # walk from a background pixel so no run wraps around
  runs, touching = 0, False
  for k in range(start, start + 9):
    if k < start + 8 and cells[k % 8]:
      touching |= k % 2 == 0  # N, E, S, W are the even positions
    elif touching:
      runs, touching = runs + 1, False
  return runs == 1


@functools.cache
def _simple_table() -> tuple[bool, ...]:
  return tuple(is_simple(ring) for ring in range(256))


def warp(true_cells: np.ndarray, cells: np.ndarray, priority: np.ndarray) -> np.ndarray:
  """``true_cells`` ``[H, W]`` (bool) warped toward ``cells`` by simple-point flips.

  In each pass the disagreeing pixels are visited by decreasing ``priority`` (``[H, W]``, the
  prediction's confidence; ties column by column) and flipped when simple in the mask as it
  stands; passes repeat until one flips nothing. Outside the image is background.
  """
  height, width = true_cells.shape
  stride = width + 2
  source = np.pad(np.asarray(true_cells, np.uint8), 1).ravel().tolist()
  target = np.pad(np.asarray(cells, np.uint8), 1).ravel()
  rows, columns = np.meshgrid(np.arange(1, height + 1), np.arange(1, width + 1), indexing="ij")
  positions = (rows * stride + columns).ravel(order="F")  # column by column
  priority = np.asarray(priority, np.float32).ravel(order="F")
  offsets = [dy * stride + dx for dy, dx in _RING]
  simple = _simple_table()
  left = None
  while True:
    disagree = np.asarray(source, np.uint8)[positions] != target[positions]
    if not disagree.any() or np.count_nonzero(disagree) == left:
      break
    left = np.count_nonzero(disagree)
    order = np.argsort(-priority[disagree], kind="stable")
    for index in positions[disagree][order].tolist():
      ring = 0
      for bit, offset in enumerate(offsets):
        ring |= source[index + offset] << bit
      if simple[ring]:
        source[index] ^= 1
  return np.asarray(source, bool).reshape(height + 2, stride)[1:-1, 1:-1]


def splits_and_mergers(warped: np.ndarray, cells: np.ndarray) -> tuple[int, int]:
  """Pixels left disagreeing after ``warp`` that mark a split or a merger of cells.

  Each is judged by the 4-connected cells of the warped mask among its 8 neighbours: with two
  or more cells there, a predicted cell pixel splits them and a predicted boundary pixel merges
  them; with one cell and background, a true cell pixel splits when removing it cuts its cell
  apart. Other leftovers (objects or holes added or deleted) are not counted.
  """
  from scipy import ndimage
  from skimage.measure import label as connected_regions

  components = connected_regions(warped, connectivity=1)
  boxes = ndimage.find_objects(components)
  splits = mergers = 0
  for y, x in np.argwhere(warped != cells).tolist():
    around, centre = _neighbour_ids(components, y, x), int(components[y, x])
    if len(around) == 2:  # a cell and background: a split only if the pixel holds it together
      splits += bool(centre) and _cuts(components, boxes[centre - 1], centre, y, x)
    elif len(around) != 1:  # two cells or more (one cell or only background: not counted)
      splits += bool(centre)
      mergers += not centre
  return splits, mergers


def _neighbour_ids(components: np.ndarray, y: int, x: int) -> set[int]:
  height, width = components.shape
  return {int(components[y + dy, x + dx]) for dy, dx in _RING
          if 0 <= y + dy < height and 0 <= x + dx < width}


def _cuts(components, box, cell, y, x) -> bool:
  """Whether removing pixel (y, x) cuts ``cell`` into pieces that touch (y, x)."""
  from skimage.measure import label as connected_regions
  region = components[box] == cell
  y0, x0 = y - box[0].start, x - box[1].start
  region[y0, x0] = False
  pieces = connected_regions(region, connectivity=1)
  touching = {int(pieces[y0 + dy, x0 + dx]) for dy, dx in _RING
              if 0 <= y0 + dy < region.shape[0] and 0 <= x0 + dx < region.shape[1]}
  return len(touching - {0}) > 1


def warping_errors(membrane_probability: np.ndarray, label: np.ndarray, *,
                   thresholds) -> np.ndarray:
  """The splits-and-mergers warping error ``[T]`` at each threshold, pooled over a stack.

  Args:
    membrane_probability: ``[H, W]`` or ``[N, H, W]`` in [0, 1]; at threshold t, the cells
      are the pixels below t (see ``unet_jax.metrics.challenge_sweep``).
    label: the same shape, 0 = membrane, 1 = cell.
    thresholds: ``[T]`` values in (0, 1]; 0 leaves no cell, and a true cell warped onto
      nothing shrinks to a pixel that counts as neither split nor merger.

  Returns:
    For each threshold, (splits + mergers) summed over the slices / all pixels of the stack.
  """
  from unet_jax import metrics

  probability, label, thresholds = metrics._challenge_inputs(
      membrane_probability, label, thresholds)
  errors = []
  for threshold in thresholds:
    count = 0
    for slice_probability, slice_label in zip(probability, label):
      cells = slice_probability < threshold
      warped = warp(slice_label == 1, cells, np.abs(slice_probability - threshold))
      count += sum(splits_and_mergers(warped, cells))
    errors.append(count / probability.size)
  return np.asarray(errors, np.float64)
