"""Overlap-tile prediction of volumes: exact tiling, blending, devices, TTA, lazy tiles, CLI."""

import functools
import tracemalloc

import jax
import numpy as np
import pytest
from flax import nnx

from unet_jax import predict
from unet_jax.geometry import center_crop
from unet_jax.inference import tiling
from unet_jax.model import UNet

ONE = jax.devices()[:1]  # where the device count does not matter: 1 tile per call, not 8


def tiny3d(padding="valid", *, features=(4, 8), channels=1, classes=2, norm=None):
  net = UNet(channels, classes, features=features, encoder_padding=padding,
             decoder_padding=padding, norm=norm, spatial_dims=3, rngs=nnx.Rngs(0))
  net.eval()
  return net


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(graphdef, state, x):
  return jax.nn.softmax(nnx.merge(graphdef, state)(x), axis=-1)


def whole(net, volume, pad):
  """Probabilities of one pass over ``volume`` ``[D, H, W, C]`` mirrored by ``pad`` voxels."""
  padded = np.pad(volume, [(pad, pad)] * 3 + [(0, 0)], mode="symmetric")
  return np.asarray(_probabilities(*nnx.split(net), padded[None]))[0]


def test_unpadded_tiles_equal_one_pass_over_the_whole_volume():
  net = tiny3d()                                   # depth 1: 16 voxels of context, grid 2
  g = net.geometry
  volume = np.random.default_rng(0).random((20, 26, 30, 1), np.float32)
  expected = whole(net, volume, 8)                 # 36×42×46, one valid input
  tile = (g.input_size_for(12), g.input_size_for(10), g.input_size_for(16))  # 2×3×2 tiles
  assert [len(tiling.plan_axis(g, n, t).starts) for n, t in zip(volume.shape, tile)] == [2, 3, 2]
  np.testing.assert_allclose(predict.predict_volume(net, volume, tile_size=tile), expected,
                             atol=1e-5)
  # The default tile (an output of 32 per axis, from the ladder) covers it in one tile.
  np.testing.assert_allclose(predict.predict_volume(net, volume[..., 0], devices=ONE),
                             expected, atol=1e-5)


def test_padded_tiles_blend_close_to_one_pass():
  net = tiny3d("same", norm="batch")
  volume = np.random.default_rng(1).random((20, 26, 30), np.float32)
  expected = whole(net, volume[..., None], 16)[16:36, 16:42, 16:46]
  got = predict.predict_volume(net, volume, tile_size=32, devices=ONE)  # stride 16: 2×2×2
  assert got.shape == (20, 26, 30, 2)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  # Only voxels near tile edges see the tiles' zero padding, and the Gaussian window gives
  # them little weight. Measured: 1.2e-2 at most, 1.2e-3 on average.
  difference = np.abs(got - expected)
  assert difference.max() < 2e-2 and difference.mean() < 2e-3


def test_batch_size_and_device_count_do_not_change_the_result():
  assert jax.device_count() == 8
  net = tiny3d("same", norm="batch")
  volume = np.random.default_rng(2).random((12, 20, 18), np.float32)
  many = predict.predict_volume(net, volume, tile_size=8, batch_size=3)   # rounded up to 8
  one = predict.predict_volume(net, volume, tile_size=8, batch_size=1, devices=jax.devices()[:1])
  two = predict.predict_volume(net, volume, tile_size=8, batch_size=5, devices=jax.devices()[:2])
  np.testing.assert_allclose(many, one, atol=1e-6)
  np.testing.assert_allclose(two, one, atol=1e-6)


def test_tta_averages_the_eight_flips():
  net = tiny3d()
  volume = np.random.default_rng(3).random((6, 8, 10, 1), np.float32)
  tile = [net.geometry.input_size_for(n) for n in volume.shape[:3]]   # one tile, output = size
  expected = []
  for flips in ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)):
    flipped = np.ascontiguousarray(np.flip(volume, flips))
    expected.append(np.flip(predict.predict_volume(net, flipped, tile_size=tile, devices=ONE),
                            flips))
  got = predict.predict_volume(net, volume, tile_size=tile, tta=True, devices=ONE)
  assert got.shape == (6, 8, 10, 2)
  np.testing.assert_allclose(got, np.mean(expected, axis=0), atol=1e-5)
  assert np.abs(got - expected[0]).max() > 1e-4


def test_bad_volumes_tiles_and_models_are_explained():
  net = tiny3d()
  with pytest.raises(ValueError, match=r"expected a volume \[D, H, W\].*shape \(20, 30\).*"
                     "use predict_image"):
    predict.predict_volume(net, np.zeros((20, 30)))
  with pytest.raises(ValueError, match=r"takes 1 channel\(s\), the volume has 3"):
    predict.predict_volume(net, np.zeros((8, 8, 8, 3)))
  with pytest.raises(ValueError, match="tile_size 19: .*depth 19 .*nearest valid sizes 18, 20"):
    predict.predict_volume(net, np.zeros((8, 8, 8)), tile_size=19)
  with pytest.raises(ValueError, match=r"tile_size must be an int or \(depth, height, width\), "
                     r"got \(20, 20\)"):
    predict.predict_volume(net, np.zeros((8, 8, 8)), tile_size=(20, 20))
  with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
    predict.predict_volume(net, np.zeros((8, 8, 8)), batch_size=0)
  bad = np.zeros((8, 8, 8), np.float32)
  bad[1, 2, 3] = np.nan
  with pytest.raises(ValueError, match="volume has 1 NaN"):
    predict.predict_volume(net, bad)
  with pytest.raises(ValueError, match="predict_image needs a 2-D U-Net.*spatial_dims=3: use "
                     "predict_volume"):
    predict.predict_image(net, np.zeros((8, 8)))
  flat = UNet(1, 2, features=(4, 8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="predict_volume needs a 3-D U-Net.*spatial_dims=2: use "
                     "predict_image"):
    predict.predict_volume(flat, np.zeros((8, 8, 8)))


def test_default_volume_tiles_come_from_a_short_ladder():
  g = tiny3d().geometry
  assert tiling.default_tile_size(g, 1, spatial_dims=3) == g.input_size_for(16)
  assert tiling.default_tile_size(g, 20, spatial_dims=3) == g.input_size_for(32)
  assert tiling.default_tile_size(g, 512, spatial_dims=3) == g.input_size_for(64)


def test_gaussian_window_in_two_and_three_dimensions():
  window = predict.gaussian_window(5, 7, 9)
  assert window.shape == (5, 7, 9) and window.dtype == np.float32
  np.testing.assert_allclose(window, predict.gaussian_window(5, 7)[..., None]
                             * predict.gaussian_window(1, 9)[0], rtol=1e-6)
  assert window.max() == window[2, 3, 4] == 1.0   # peak 1 in the centre
  np.testing.assert_allclose(window, window[::-1, ::-1, ::-1])


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_tiles_are_cut_lazily_one_fixed_batch_at_a_time(monkeypatch, padding):
  """A stand-in network that returns the centre of each tile must give the volume back: the
  mirrored index arithmetic and the stitching are exact. Every device call sees one batch of
  the tile's shape, and the host holds no padded copy of the volume."""
  net = tiny3d(padding, classes=1)
  volume = np.random.default_rng(4).random((64, 72, 80, 1), np.float32)
  tile = 24 if padding == "valid" else 16
  output = net.geometry.output_size(tile)
  shapes = []

  def centre(graphdef, state, tiles, *, tta=False):
    shapes.append(tiles.shape)
    return center_crop(np.asarray(tiles), output, output, output)

  monkeypatch.setattr(tiling, "predict_tiles", centre)
  calls = []
  tracemalloc.start()
  got = predict.predict_volume(net, volume, tile_size=tile, batch_size=4, overlap=0.0,
                               devices=ONE, progress=lambda *counts: calls.append(counts))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  np.testing.assert_allclose(got, volume, rtol=1e-6)  # blending: w·x / w
  assert set(shapes) == {(4, tile, tile, tile, 1)}
  total = np.prod([len(tiling.plan_axis(net.geometry, n, tile, overlap=0.0).starts)
                   for n in volume.shape[:3]])
  assert calls[-1] == (total, total) and len(calls) == len(shapes) == -(-total // 4)
  # The float32 copy of the volume, the result and (blending) the weights, plus a few batches;
  # a mirrored copy of the volume would add more than a volume's worth.
  needed = volume.nbytes * (3 if padding == "same" else 2) + 4 * shapes[0][0] * tile**3 * 4
  assert peak < needed + volume.nbytes // 2, (peak, needed)


def test_command_line_predicts_volumes_in_their_own_format(tmp_path, capsys):
  nibabel = pytest.importorskip("nibabel")
  import tifffile
  from PIL import Image

  from unet_jax.data import volumes
  from unet_jax.interop import convert
  from unet_jax.model import config_of
  net = tiny3d()
  convert.save_flax(net, config_of(net), tmp_path / "model")
  rng = np.random.default_rng(5)
  inputs = tmp_path / "in"
  inputs.mkdir()
  np.save(inputs / "a.npy", rng.integers(0, 256, (10, 12, 14), dtype=np.uint8))
  tifffile.imwrite(inputs / "b.tif", rng.integers(0, 256, (6, 9, 11), dtype=np.uint8))
  affine = np.diag([0.5, 0.7, 2.0, 1.0])
  affine[:3, 3] = (10, -20, 30)
  nibabel.save(nibabel.Nifti1Image(rng.random((9, 8, 7), dtype=np.float32), affine),
               inputs / "c.nii.gz")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(inputs / "d.png")
  out = tmp_path / "out"
  status = predict.main(["--checkpoint", str(tmp_path / "model"), "--input", str(inputs),
                         "--output", str(out), "--save-probabilities"])
  captured = capsys.readouterr()
  assert status == 1 and "wrote 3 of 4 volume file(s)" in captured.out
  assert "d.png: ValueError: an image file, but this U-Net is 3-D" in captured.err
  for name, suffix in [("a", ".npy"), ("b", ".tif"), ("c", ".nii.gz")]:
    voxels = volumes.read_volume(inputs / f"{name}{suffix}")
    expected = predict.predict_volume(net, volumes.to_unit_volume(voxels, 1, name=name),
                                      devices=ONE)
    mask = volumes.read_volume(out / f"{name}_mask{suffix}")
    np.testing.assert_array_equal(mask, expected.argmax(-1))
    np.testing.assert_allclose(volumes.read_volume(out / f"{name}_probabilities{suffix}"),
                               expected, atol=1e-6)
  np.testing.assert_allclose(nibabel.load(out / "c_mask.nii.gz").affine, affine)


def test_command_line_refuses_volumes_for_a_two_d_model(tmp_path, capsys):
  from unet_jax.interop import convert
  from unet_jax.model import config_of
  net = UNet(1, 2, features=(4, 8), rngs=nnx.Rngs(0))
  convert.save_flax(net, config_of(net), tmp_path / "model")
  np.save(tmp_path / "v.npy", np.zeros((4, 20, 20), np.uint8))
  assert predict.main(["--checkpoint", str(tmp_path / "model"), "--input",
                       str(tmp_path / "v.npy"), "--output", str(tmp_path / "out")]) == 1
  assert ("v.npy: ValueError: a volume file, but this U-Net is 2-D and predicts images"
          in capsys.readouterr().err)


def test_evaluate_scores_volumes_against_label_volumes(tmp_path, capsys):
  """The evaluate command line with a 3-D checkpoint: each volume is predicted with
  overlap-tile and scored against the label volume of its stem (any volume format); the
  scores equal a confusion matrix of the prediction computed here; sparse (negative) labels
  are not counted; images and unlabelled volumes fail alone, with a reason."""
  import json

  import tifffile
  from PIL import Image

  from unet_jax import metrics
  from unet_jax.data import volumes
  from unet_jax.inference import evaluate
  from unet_jax.interop import convert
  from unet_jax.model import config_of
  net = tiny3d()
  convert.save_flax(net, config_of(net), tmp_path / "model")
  rng = np.random.default_rng(8)
  inputs, labels = tmp_path / "images", tmp_path / "labels"
  inputs.mkdir(), labels.mkdir()
  a = rng.integers(0, 256, (10, 12, 14), dtype=np.uint8)
  b = rng.integers(0, 256, (6, 9, 11), dtype=np.uint8)
  np.save(inputs / "a.npy", a)
  tifffile.imwrite(inputs / "b.tif", b)
  np.save(inputs / "unlabelled.npy", a)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(inputs / "d.png")
  label_a = (rng.random(a.shape) > 0.5).astype(np.int16)
  label_a[::2] = -1  # sparse: every other slice unlabelled
  label_b = np.where(rng.random(b.shape) > 0.5, 255, 0).astype(np.uint8)  # {0, 255}
  tifffile.imwrite(labels / "a.tif", label_a)
  np.save(labels / "b.npy", label_b)
  output = tmp_path / "scores.json"
  status = evaluate.main(["--checkpoint", str(tmp_path / "model"), "--images", str(inputs),
                          "--masks", str(labels), "--output", str(output)])
  captured = capsys.readouterr()
  assert status == 1, captured
  results = json.loads(output.read_text())
  assert set(results["images"]) == {"a", "b"}
  assert "no label volume for unlabelled.npy" in results["failed"][str(inputs / "unlabelled.npy")]
  assert "volume file is needed" in results["failed"][str(inputs / "d.png")]
  total = np.zeros((2, 2), np.int64)
  for name, voxels, label in [("a", a, label_a), ("b", b, label_b // 255)]:
    decisions = predict.predict_volume(
        net, volumes.to_unit_volume(voxels, 1, name=name)).argmax(-1)
    confusion = metrics.mask_confusion_matrix(decisions, label, num_classes=2)
    total += confusion
    assert confusion.sum() == (label >= 0).sum()
    expected = metrics.summarize(confusion, class_names=("0", "1"))
    assert results["images"][name]["pixel_error"] == pytest.approx(expected["pixel_error"])
    assert results["images"][name]["iou_1"] == pytest.approx(expected["iou_1"])
  assert results["total"]["pixel_error"] == pytest.approx(
      metrics.summarize(total, class_names=("0", "1"))["pixel_error"])
  assert "rand_error" in results["images"]["a"]
  assert "total" in captured.out
