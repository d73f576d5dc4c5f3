"""Evaluation: mask reading and the command line against metrics computed directly."""

import json

import numpy as np
import pytest
import tifffile
from flax import nnx
from PIL import Image

from unet_jax import convert, evaluate, metrics, predict
from unet_jax.inference import images
from unet_jax.model import UNet


def test_mask_values_become_classes():
  binary = np.array([[0, 255], [255, 0]], np.uint8)
  np.testing.assert_array_equal(evaluate.mask_to_classes(binary, 2), [[0, 1], [1, 0]])
  ids = np.array([[0, 2], [1, 0]], np.uint8)
  np.testing.assert_array_equal(evaluate.mask_to_classes(ids, 3), ids)
  gray_rgb = np.repeat(binary[..., None], 3, -1)
  np.testing.assert_array_equal(evaluate.mask_to_classes(gray_rgb, 2), [[0, 1], [1, 0]])
  mapping = evaluate.parse_mask_map("0:0, 128:1,255:2")
  assert mapping == {0: 0, 128: 1, 255: 2}
  np.testing.assert_array_equal(
      evaluate.mask_to_classes(np.array([[255, 128, 0]], np.uint8), 3, mapping), [[2, 1, 0]])


@pytest.mark.parametrize("mask, classes, mapping, message", [
    (np.array([[0, 255]]), 3, None, "neither {0, 255} nor class ids below 3"),
    (np.array([[0, 7]]), 2, {0: 0, 255: 1}, "values 7 are not in the mask map"),
    (np.array([[0, 1]]), 2, {0: 0, 1: 2}, "classes must be in 0..1"),
    (np.dstack([[[0, 255]], [[255, 0]], [[0, 0]]]), 2, None, "colour masks"),
])
def test_bad_masks_are_explained(mask, classes, mapping, message):
  with pytest.raises(ValueError, match=message):
    evaluate.mask_to_classes(mask, classes, mapping, name="m.png")


def test_bad_mask_map_text():
  with pytest.raises(ValueError, match="value:class"):
    evaluate.parse_mask_map("0=0")


def test_command_line_scores_every_image_and_reports_missing_masks(tmp_path, capsys):
  net = UNet(1, 2, features=(4, 8, 16), encoder_padding="valid", decoder_padding="same",
             norm="batch", rngs=nnx.Rngs(0))
  net.eval()
  convert.save_flax(net, dict(in_channels=1, num_classes=2, features=[4, 8, 16],
                              encoder_padding="valid", decoder_padding="same", norm="batch",
                              concat_order="skip_up"), tmp_path / "model")
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (30, 41), dtype=np.uint8)
  a_mask = (rng.random((30, 41)) < 0.7).astype(np.uint8) * 255
  Image.fromarray(a).save(images / "a.png")
  Image.fromarray(a_mask).save(masks / "a.png")
  tifffile.imwrite(images / "b.tif", rng.integers(0, 256, (2, 16, 24), dtype=np.uint8))
  tifffile.imwrite(masks / "b.tif", rng.integers(0, 2, (2, 16, 24), dtype=np.uint8) * 255)
  Image.fromarray(a).save(images / "c.png")                    # no mask
  Image.fromarray(a).save(images / "d.png")
  Image.fromarray(a_mask[:10, :10]).save(masks / "d.png")      # wrong size
  status = evaluate.main(["--checkpoint", str(tmp_path / "model"), "--images", str(images),
                          "--masks", str(masks), "--output", str(tmp_path / "r.json")])
  assert status == 1
  out, err = capsys.readouterr()
  assert "no mask for c.png" in err and "d.png is 10×10 but" in err
  assert "total" in out and "b_page001" in out
  results = json.loads((tmp_path / "r.json").read_text())
  assert sorted(results["images"]) == ["a", "b_page000", "b_page001"]
  assert [name.rsplit("/", 1)[-1] for name in results["failed"]] == ["c.png", "d.png"]
  predicted = predict.predict_image(net, a).argmax(-1)
  expected = metrics.mask_metrics(predicted, a_mask // 255, num_classes=2)
  expected["rand_error"] = metrics.rand_error(predicted, a_mask // 255)
  assert results["images"]["a"] == pytest.approx(expected)
  pixels = 30 * 41 + 2 * 16 * 24
  errors = sum(results["images"][k]["pixel_error"] * n for k, n in
               [("a", 30 * 41), ("b_page000", 16 * 24), ("b_page001", 16 * 24)])
  assert results["total"]["pixel_error"] == pytest.approx(errors / pixels)


def test_palette_masks_are_read_as_their_indices(tmp_path):
  indices = np.array([[0, 1], [2, 1]], np.uint8)
  mask = Image.new("P", (2, 2))
  mask.putdata(indices.reshape(-1).tolist())
  mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
  mask.save(tmp_path / "m.png")
  (page,) = images.read_image(tmp_path / "m.png", mask=True)
  np.testing.assert_array_equal(evaluate.mask_to_classes(page, 3), indices)
  assert images.read_image(tmp_path / "m.png")[0].shape == (2, 2, 3)  # as an image: colours
