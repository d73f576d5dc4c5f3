"""Tests for the U-Net geometry: valid sizes, output sizes and center crops."""

import numpy as np
import pytest

from unet_jax.geometry import Geometry, center_crop, crop_offsets

PAPER = Geometry(4, "valid", "valid")
WALKTHROUGH = Geometry(4, "valid", "same")
SAME = Geometry(4, "same", "same")


def test_output_sizes():
  assert PAPER.output_size(572) == 388  # the paper's Figure 1
  assert WALKTHROUGH.output_size(572) == 448
  assert SAME.output_size(64) == 64


def test_paper_trace_matches_figure_1():
  # Figure 1, one side of the 572×572 tile: two unpadded 3×3 convolutions (−2 px each) per
  # level, 2×2 max-pools (÷2) between levels, 2×2 up-convolutions (×2) on the way up.
  down = [[572, 570, 568], [284, 282, 280], [140, 138, 136], [68, 66, 64], [32, 30, 28]]
  up = [[56, 54, 52], [104, 102, 100], [200, 198, 196], [392, 390, 388]]
  for level in down + up:
    assert level[1] == level[0] - 2 and level[2] == level[1] - 2
  for above, below in zip(down, down[1:]):
    assert below[0] == above[2] // 2
  for lower, upper in zip([down[-1]] + up, up):
    assert upper[0] == 2 * lower[2]
  assert PAPER.trace(572) == {
      "skips": [level[2] for level in down[:-1]],  # 568, 280, 136, 64
      "bottleneck": [down[-1][2]],  # 28
      "ups": [level[0] for level in up],  # 56, 104, 200, 392
      "decoder": [level[2] for level in up],  # 52, 100, 196, 388
  }


def test_walkthrough_trace():
  # The same unpadded encoder; padded decoder convolutions keep each up-sampled size.
  assert WALKTHROUGH.trace(572) == {
      "skips": [568, 280, 136, 64], "bottleneck": [28],
      "ups": [56, 112, 224, 448], "decoder": [56, 112, 224, 448]}


def test_same_trace():
  assert SAME.trace(64) == {
      "skips": [64, 32, 16, 8], "bottleneck": [4], "ups": [8, 16, 32, 64],
      "decoder": [8, 16, 32, 64]}


def test_is_valid_and_nearest_valid():
  assert PAPER.is_valid(572)
  assert not PAPER.is_valid(573)
  assert not PAPER.is_valid(574)  # 570 is even but 285 after the first pool is odd
  assert PAPER.nearest_valid(573) == (572, 588)
  assert PAPER.nearest_valid(572) == (572, 572)
  assert PAPER.nearest_valid(100) == (None, 188)  # nothing valid below the minimum
  assert SAME.nearest_valid(65) == (64, 80)


@pytest.mark.parametrize("geometry", [PAPER, WALKTHROUGH, SAME])
def test_valid_sizes_are_spaced_by_two_to_the_depth(geometry):
  sizes = geometry.valid_sizes(1, 700)
  assert len(sizes) > 10
  assert sizes[0] == geometry.min_input_size()
  assert set(np.diff(sizes)) == {16}


def test_min_input_size():
  # Paper: the smallest bottleneck whose decoder stays positive is 4 (8 → 4 per level), and
  # going back up through the encoder gives 4 → 8 → 16 → 20 → 40 → 44 → 88 → 92 → 184 → 188.
  assert PAPER.min_input_size() == 188
  assert PAPER.output_size(188) == 4
  # Walkthrough: a 1 px bottleneck is enough since the decoder is padded:
  # 1 → 5 → 10 → 14 → 28 → 32 → 64 → 68 → 136 → 140.
  assert WALKTHROUGH.min_input_size() == 140
  assert WALKTHROUGH.output_size(140) == 16
  assert SAME.min_input_size() == 16
  assert Geometry(2, "same", "same").min_input_size() == 4


def test_input_size_for():
  assert PAPER.input_size_for(388) == 572
  assert PAPER.input_size_for(389) == 588
  assert PAPER.output_size(588) == 404
  assert PAPER.input_size_for(1) == 188
  assert WALKTHROUGH.input_size_for(448) == 572
  assert SAME.input_size_for(65) == 80


def test_check_shape_error_names_the_shape_and_nearest_sizes():
  with pytest.raises(ValueError) as info:
    PAPER.check_shape(573, 573)
  message = str(info.value)
  assert "573×573 is not a valid input" in message
  assert "572, 588" in message
  assert "height 573" in message and "width 573" in message


def test_check_shape_names_only_the_bad_dimension():
  with pytest.raises(ValueError) as info:
    PAPER.check_shape(572, 573)
  message = str(info.value)
  assert "572×573" in message
  assert "width 573" in message and "height" not in message


def test_check_shape_non_square():
  assert PAPER.check_shape(572, 588) == (388, 404)
  assert WALKTHROUGH.check_shape(588, 572) == (464, 448)
  assert SAME.check_shape(16, 48) == (16, 48)


@pytest.mark.parametrize("size", [0, -1, -572])
def test_zero_and_negative_sizes_raise_value_error(size):
  assert not PAPER.is_valid(size)
  with pytest.raises(ValueError, match="188"):  # the nearest valid size is the minimum
    PAPER.check_shape(size, 572)
  with pytest.raises(ValueError, match="not a valid input size"):
    PAPER.output_size(size)


def test_output_size_error_names_nearest_sizes():
  with pytest.raises(ValueError, match="nearest valid sizes: 572, 588"):
    PAPER.output_size(573)


@pytest.mark.parametrize("kwargs", [
    dict(depth=0), dict(depth=-1), dict(depth=2.0), dict(encoder_padding="full"),
    dict(decoder_padding="full"), dict(decoder_padding="SAME")])
def test_bad_constructor_arguments(kwargs):
  with pytest.raises(ValueError):
    Geometry(**kwargs)


def test_crop_offsets():
  assert crop_offsets(7, 4) == (1, 2)  # the extra pixel goes after
  assert crop_offsets(8, 4) == (2, 2)
  assert crop_offsets(4, 4) == (0, 0)
  assert crop_offsets(568, 392) == (88, 88)  # the paper's top skip


def test_crop_offsets_target_larger_raises():
  with pytest.raises(ValueError, match="larger"):
    crop_offsets(4, 5)


def test_center_crop_non_square_odd_differences():
  x = np.arange(2 * 9 * 12 * 3).reshape(2, 9, 12, 3)
  # Height 9 → 4: offsets (2, 3); width 12 → 7: offsets (2, 3).
  np.testing.assert_array_equal(center_crop(x, 4, 7), x[:, 2:6, 2:9, :])
  # Height 9 → 6: offsets (1, 2); width 12 → 3: offsets (4, 5).
  np.testing.assert_array_equal(center_crop(x, 6, 3), x[:, 1:7, 4:7, :])
  # Without a batch axis.
  np.testing.assert_array_equal(center_crop(x[0], 8, 11), x[0, 0:8, 0:11, :])
  np.testing.assert_array_equal(center_crop(x, 9, 12), x)


def test_numpy_integer_sizes_are_accepted():
  assert Geometry().is_valid(np.int64(572))
  assert Geometry().check_shape(np.int64(572), 572) == (388, 388)
