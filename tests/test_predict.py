"""Overlap-tile prediction: exact tiling, blending, one compilation, TTA, devices, the CLI."""

import functools
import re

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from unet_jax import convert, predict
from unet_jax.inference import images
from unet_jax.model import UNet

FEATURES = (4, 8, 16)


def tiny(encoder="valid", decoder="valid", *, channels=1, classes=2, norm=None):
  net = UNet(channels, classes, features=FEATURES, encoder_padding=encoder,
             decoder_padding=decoder, norm=norm, rngs=nnx.Rngs(0))
  net.eval()
  return net


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(graphdef, state, x):
  return jax.nn.softmax(nnx.merge(graphdef, state)(x), axis=-1)


def run(net, x):
  """``softmax(net(x))``, jitted (much faster than eager here)."""
  graphdef, state = nnx.split(net)
  return np.asarray(_probabilities(graphdef, state, x))


def whole(net, image, pad):
  """Probabilities of one pass over ``image`` mirrored by ``pad`` pixels (a valid size)."""
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
  return run(net, padded[None])[0]


def test_mirror_indices_equal_np_pad_symmetric_of_any_width():
  for size in (1, 2, 5):
    row = np.arange(size)
    expected = np.pad(row, (13, 17), mode="symmetric")
    np.testing.assert_array_equal(row[predict._mirror(np.arange(-13, size + 17), size)], expected)


def test_unpadded_tiles_equal_one_pass_over_the_whole_image():
  net = tiny()
  g = net.geometry
  n = g.input_size_for(40)                     # 80 → 40 (depth 2: 40 px of context)
  shrink = n - g.output_size(n)
  # Mirror-padded by shrink / 2 on each side this image is one valid 80×96 input.
  image = np.random.default_rng(0).random((g.output_size(n), g.output_size(n + 16), 1),
                                          np.float32)
  expected = whole(net, image, shrink // 2)
  small = g.input_size_for(12)                 # 52 → 12: 4 × 5 tiles, stride 12
  assert len(predict.plan_axis(g, image.shape[0], small).starts) == 4
  for tile in (n, small, (g.input_size_for(20), n + 16)):
    np.testing.assert_allclose(predict.predict_image(net, image, tile_size=tile),
                               expected, atol=1e-5)


def receptive_radius(net, size):
  """How far (px) one input pixel moves the output: the reach of zero padding as well."""
  x = np.zeros((1, size, size, 1), np.float32)
  delta = x.copy()
  delta[0, size // 2, size // 2] = 1
  changed = np.nonzero(np.abs(run(net, delta) - run(net, x)).max(axis=(0, 2, 3)))[0]
  centre = size // 2 - (size - net.geometry.output_size(size)) // 2
  return int(max(centre - changed.min(), changed.max() - centre))


@pytest.mark.parametrize("encoder", ["same", "valid"])
def test_padded_tiles_blend_close_to_one_pass_and_exact_inside(encoder):
  net = tiny(encoder, "same", norm="batch")
  g = net.geometry
  radius = receptive_radius(net, g.input_size_for(120))      # 22 px for depth 2
  image = np.random.default_rng(1).random((152, 132, 1), np.float32)
  shrink = g.input_size_for(4) - g.output_size(g.input_size_for(4))
  expected = whole(net, image, 64 + shrink // 2)[64:64 + 152, 64:64 + 132]
  tile = g.input_size_for(96)
  got = predict.predict_image(net, image, tile_size=tile)
  # Pixels that every tile covering them sees at least `radius` px from its edges never
  # meet a tile's zero padding, so the blend of identical values is exact there.
  inside = []
  for size in image.shape[:2]:
    plan = predict.plan_axis(g, size, tile)
    pixel, start = np.arange(size)[:, None], np.array(plan.starts)[None]
    covers = (pixel >= start) & (pixel < start + plan.output_size)
    far = (pixel - start >= radius) & (start + plan.output_size - 1 - pixel >= radius)
    inside.append(np.all(~covers | far, axis=1))
  inside = inside[0][:, None] & inside[1][None]
  assert inside.sum() > 1000
  np.testing.assert_allclose(got[inside], expected[inside], atol=1e-5)
  # Elsewhere only tile borders differ, and the Gaussian window gives them little weight
  # (e^-8 of the centre at the edge); measured: 7.6e-4 (same) and 1.2e-4 (valid encoder).
  np.testing.assert_allclose(got, expected, atol=1e-2)


def test_any_image_size_compiles_once():
  net = tiny()
  tile = net.geometry.input_size_for(100)
  before = predict.predict_tiles._cache_size()
  for shape in [(1, 1), (3, 700), (50, 37), (700, 530)]:
    probabilities = predict.predict_image(net, np.random.rand(*shape), tile_size=tile)
    assert probabilities.shape == (*shape, 2)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
  assert predict.predict_tiles._cache_size() - before == 1


def test_default_tiles_come_from_a_short_ladder():
  g = tiny().geometry
  assert predict.default_tile_size(g, 1) == g.input_size_for(64)
  assert predict.default_tile_size(g, 200) == g.input_size_for(256)
  assert predict.default_tile_size(g, 5000) == g.input_size_for(388)


@pytest.mark.parametrize("shape", [(40, 40), (40, 56)])
def test_tta_averages_the_transformed_predictions(shape):
  net = tiny()
  image = np.random.default_rng(2).random((*shape, 1), np.float32)
  tile = tuple(net.geometry.input_size_for(n) for n in shape)  # one tile, no overlap
  turns = (0, 1, 2, 3) if shape[0] == shape[1] else (0, 2)
  expected = []
  for k in turns:
    for flip in (False, True):
      x = np.rot90(image, k)
      x = x[:, ::-1] if flip else x
      one_tile = [net.geometry.input_size_for(n) for n in x.shape[:2]]
      y = predict.predict_image(net, np.ascontiguousarray(x), tile_size=one_tile)
      expected.append(np.rot90(y[:, ::-1] if flip else y, -k))
  got = predict.predict_image(net, image, tile_size=tile, tta=True)
  np.testing.assert_allclose(got, np.mean(expected, axis=0), atol=1e-5)
  assert np.abs(got - predict.predict_image(net, image, tile_size=tile)).max() > 1e-4


def test_eight_devices_agree_with_one():
  assert jax.device_count() == 8
  net = tiny("valid", "same", norm="batch")
  image = np.random.default_rng(3).random((90, 70, 1), np.float32)
  tile = net.geometry.input_size_for(32)
  many = predict.predict_image(net, image, tile_size=tile, batch_size=3)  # rounded up to 8
  one = predict.predict_image(net, image, tile_size=tile, batch_size=3,
                              devices=jax.devices()[:1])
  np.testing.assert_allclose(many, one, atol=1e-6)


def test_uint8_is_scaled_like_the_training_data_and_the_model_is_left_alone():
  net = UNet(1, 2, features=FEATURES, norm="batch", rngs=nnx.Rngs(0))  # training mode
  image = np.random.default_rng(4).integers(0, 256, (30, 20), dtype=np.uint8)
  np.testing.assert_array_equal(predict.predict_image(net, image),
                                predict.predict_image(net, image / np.float32(255)))
  assert not net.inc.norm1.use_running_average


def test_bad_images_and_tiles_are_explained():
  net = tiny()
  image = np.zeros((20, 20), np.float32)
  image[3, 4] = np.nan
  with pytest.raises(ValueError, match="1 NaN or infinite"):
    predict.predict_image(net, image)
  with pytest.raises(ValueError, match="takes 1 channel"):
    predict.predict_image(net, np.zeros((20, 20, 3)))
  with pytest.raises(ValueError, match="tile_size 81: .*nearest valid sizes 80, 84"):
    predict.predict_image(net, np.zeros((20, 20)), tile_size=81)
  with pytest.raises(ValueError, match="4-pixel output, too small .* at least 8 pixels"):
    predict.predict_image(tiny("same", "same"), np.zeros((20, 20)), tile_size=4)
  with pytest.raises(ValueError, match="unsupported pixel type int32"):
    predict.predict_image(net, np.zeros((20, 20), np.int32))


def test_channel_conversion():
  rgba = np.random.rand(5, 6, 4).astype(np.float32)
  np.testing.assert_array_equal(images.match_channels(rgba, 3), rgba[..., :3])
  gray = images.match_channels(rgba[..., :3], 1)
  np.testing.assert_allclose(gray[..., 0], rgba[..., :3] @ [0.299, 0.587, 0.114], rtol=1e-6)
  np.testing.assert_array_equal(images.match_channels(rgba[..., 0], 3),
                                np.repeat(rgba[..., :1], 3, -1))
  with pytest.raises(ValueError, match="x.tif has 5 channel"):
    images.match_channels(np.zeros((2, 2, 5)), 3, name="x.tif")


def write_inputs(folder):
  import tifffile
  rng = np.random.default_rng(5)
  folder.mkdir()
  Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8)).save(folder / "gray.png")
  Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
  Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)).save(folder / "rgba.png")
  Image.fromarray(rng.integers(0, 256, (1, 1), dtype=np.uint8)).save(folder / "dot.bmp")
  tifffile.imwrite(folder / "stack.tif", rng.integers(0, 256, (2, 16, 24), dtype=np.uint8))
  tifffile.imwrite(folder / "five.tif", rng.random((8, 8, 5), dtype=np.float32),
                   planarconfig="contig")
  (folder / "broken.png").write_bytes(b"not a png")
  (folder / "notes.txt").write_text("hello")


def test_command_line_writes_masks_and_reports_bad_files(tmp_path, capsys):
  net = tiny()
  config = dict(in_channels=1, num_classes=2, features=list(FEATURES),
                encoder_padding="valid", decoder_padding="valid", layout="walkthrough")
  convert.save_flax(net, config, tmp_path / "model")
  write_inputs(tmp_path / "in")
  out = tmp_path / "out"
  status = predict.main(["--checkpoint", str(tmp_path / "model"), "--input",
                         str(tmp_path / "in"), "--output", str(out), "--save-probabilities",
                         "--tile-size", "80"])
  assert status == 1
  errors = capsys.readouterr().err
  for bad in ("broken.png", "notes.txt", "five.tif has 5 channel"):
    assert bad in errors
  assert "3 file(s) failed" in errors
  for stem, shape in [("gray", (37, 53)), ("rgb", (20, 30)), ("rgba", (9, 7)), ("dot", (1, 1)),
                      ("stack_page000", (16, 24)), ("stack_page001", (16, 24))]:
    mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
    assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(out / f"{stem}_overlay.png")).shape == (*shape, 3)
    probabilities = np.load(out / f"{stem}_probabilities.npy")
    np.testing.assert_array_equal(mask == 255, probabilities.argmax(-1) == 1)
  gray = np.asarray(Image.open(tmp_path / "in" / "gray.png"))
  np.testing.assert_allclose(np.load(out / "gray_probabilities.npy"),
                             predict.predict_image(net, gray, tile_size=80), atol=1e-6)


def test_command_line_on_a_pytorch_checkpoint(tmp_path):
  torch = pytest.importorskip("torch", reason="needs PyTorch to write a .pth file")
  import torch_models
  torch.manual_seed(0)
  torch.save(torch_models.Walkthrough(1, 2, FEATURES).state_dict(), tmp_path / "net.pth")
  image = np.random.default_rng(6).integers(0, 256, (45, 61), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / "a.png")
  assert predict.main(["--checkpoint", str(tmp_path / "net.pth"), "--input",
                       str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]) == 0
  net, _ = convert.load_pytorch(tmp_path / "net.pth")
  expected = predict.predict_image(net, image).argmax(-1) * 255
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "a_mask.png")),
                                expected)


@pytest.mark.parametrize("checkpoint, message", [
    ("missing", "cannot load the checkpoint .*missing.*does not exist"),
    (".", "cannot load the checkpoint .*neither a training workdir"),
    ("bad.pth", "cannot load the checkpoint .*bad.pth"),
])
def test_bad_checkpoints_are_named(tmp_path, capsys, checkpoint, message):
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
  (tmp_path / "bad.pth").write_bytes(b"junk")
  with pytest.raises(SystemExit) as exit_:
    predict.main(["--checkpoint", str(tmp_path / checkpoint), "--input",
                  str(tmp_path / "a.png"), "--output", str(tmp_path / "out")])
  assert exit_.value.code == 2
  assert re.search(message, capsys.readouterr().err)


def test_empty_folder_and_unsupported_file_are_refused(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  (tmp_path / "a.gif").write_bytes(b"GIF89a")
  for target, message in [(tmp_path / "empty", "no images"), (tmp_path / "a.gif", "a.gif")]:
    with pytest.raises(SystemExit) as exit_:
      predict.main(["--checkpoint", str(tmp_path), "--input", str(target),
                    "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
