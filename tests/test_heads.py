"""Heads: softmax, binary sigmoid and multi-label sigmoid models, from the loss to the CLI."""

import json
import pathlib
import sys

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from unet_jax import heads, losses, metrics
from unet_jax.inference import evaluate, predict
from unet_jax.interop import convert
from unet_jax.model import UNet, config_of, milesial

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from configs import default  # noqa: E402


def test_resolve_defaults_and_refusals():
  assert heads.resolve(None, 1) == "sigmoid"
  assert heads.resolve(None, 3) == "softmax"
  assert heads.resolve("sigmoid", 4) == "sigmoid"
  with pytest.raises(ValueError, match="one output channel is always 1"):
    heads.resolve("softmax", 1)
  with pytest.raises(ValueError, match="must be one of"):
    heads.resolve("tanh", 2)
  with pytest.raises(ValueError, match="at most 30"):
    heads.resolve("sigmoid", 31)


def test_model_config_carries_the_head():
  model = UNet(1, 1, features=(4, 8), encoder_padding="same", decoder_padding="same",
               rngs=nnx.Rngs(0))
  assert model.activation == "sigmoid" and config_of(model)["activation"] == "sigmoid"
  again = UNet(**config_of(model), rngs=nnx.Rngs(0))
  assert again.activation == "sigmoid"
  assert UNet(1, 2, features=(4, 8), rngs=nnx.Rngs(0)).activation == "softmax"


def test_pack_unpack_round_trip():
  rng = np.random.default_rng(0)
  masks = rng.random((5, 7, 3)) > 0.5
  labels = heads.pack(masks)
  assert labels.dtype == np.int32 and labels.max() < 8
  np.testing.assert_array_equal(heads.unpack(labels, 3), masks)
  np.testing.assert_array_equal(np.asarray(heads.unpack(jnp.asarray(labels), 3)), masks)


def test_binary_losses_are_bce_and_foreground_dice():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 6, 5, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 2, size=(2, 6, 5)), jnp.int32)
  expected = optax.sigmoid_binary_cross_entropy(logits[..., 0], labels.astype(jnp.float32))
  got = losses.weighted_cross_entropy(logits, labels, activation="sigmoid")
  np.testing.assert_allclose(got, expected.mean(), rtol=1e-6)
  p, t = jax.nn.sigmoid(logits[..., 0]), labels.astype(jnp.float32)
  dice = (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)
  np.testing.assert_allclose(losses.dice_loss(logits, labels, activation="sigmoid"),
                             (1 - dice).mean(), rtol=1e-6)


def test_multilabel_loss_ignores_pixels_and_reads_bits():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(1, 4, 4, 2)), jnp.float32)
  masks = rng.random((1, 4, 4, 2)) > 0.5
  labels = heads.pack(masks)
  labels[0, 0, 0] = -1
  got = losses.weighted_cross_entropy(logits, jnp.asarray(labels), ignore_index=-1,
                                      activation="sigmoid")
  per_pixel = optax.sigmoid_binary_cross_entropy(logits, masks.astype(np.float32)).mean(-1)
  keep = np.ones((1, 4, 4), bool)
  keep[0, 0, 0] = False
  np.testing.assert_allclose(got, per_pixel[keep].mean(), rtol=1e-6)


def test_confusion_for_binary_and_multilabel_heads():
  logits = jnp.asarray([[[[2.0], [-1.0]], [[0.5], [-3.0]]]])  # [1, 2, 2, 1]
  labels = jnp.asarray([[[1, 1], [0, -1]]])
  confusion = metrics.confusion_matrix(logits, labels, num_classes=2, ignore_index=-1,
                                       activation="sigmoid")
  np.testing.assert_array_equal(confusion, [[0, 1], [1, 1]])

  ml_logits = jnp.asarray([[[[1.0, -1.0], [1.0, 1.0]]]])  # [1, 1, 2, 2]: two pixels
  ml_labels = jnp.asarray([[[1, 2]]])  # pixel 0: class 0; pixel 1: class 1
  confusion = metrics.confusion_matrix(ml_logits, ml_labels, num_classes=2,
                                       activation="sigmoid")
  # class 0: pixel 0 TP, pixel 1 FP; class 1: pixel 0 TN, pixel 1 TP
  np.testing.assert_array_equal(confusion, [[[0, 1], [0, 1]], [[1, 0], [0, 1]]])
  summary = metrics.summarize(np.asarray(confusion), class_names=("a", "b"))
  assert summary["iou_a"] == pytest.approx(0.5) and summary["iou_b"] == 1.0
  assert summary["pixel_error"] == pytest.approx(0.25)


def test_summary_names_foreground_dice():
  summary = metrics.summarize(np.array([[8, 2], [1, 9]]), class_names=("membrane", "cell"))
  assert summary["foreground_dice"] == summary["dice_cell"] == pytest.approx(18 / 21)
  assert summary["mean_dice"] == pytest.approx((summary["dice_membrane"] + 18 / 21) / 2)


def _binary_checkpoint(tmp_path):
  torch = pytest.importorskip("torch", reason="the milesial comparison needs PyTorch")
  import torch_models
  torch.manual_seed(0)
  net = torch_models.Milesial(3, 1, True, (4, 8, 16, 32, 64))
  net = torch_models.randomize_batch_norm(net, torch.randn(2, 3, 40, 52), 0).eval()
  with torch.no_grad():  # centre the logits so that both classes appear
    calibration = torch.rand(1, 3, 75, 101, generator=torch.Generator().manual_seed(1))
    net.outc.conv.bias -= net(calibration).median()
  state = dict(net.state_dict())
  state["mask_values"] = [0, 1]
  torch.save(state, tmp_path / "binary.pth")
  return torch, net.eval()


def test_converted_binary_milesial_predicts_its_mask_exactly(tmp_path):
  """milesial's predict: mask = sigmoid(logit) > 0.5, written through mask_values [0, 1]."""
  torch, net = _binary_checkpoint(tmp_path)
  image = (np.random.default_rng(3).random((75, 101, 3)) * 255).astype(np.uint8)
  (tmp_path / "in").mkdir()
  Image.fromarray(image).save(tmp_path / "in" / "photo.png")
  with torch.no_grad():
    x = torch.from_numpy(image.astype(np.float32).transpose(2, 0, 1)[None] / 255)
    expected = (torch.sigmoid(net(x))[0, 0] > 0.5).numpy()
  assert 0.05 < expected.mean() < 0.95  # both classes present: a meaningful comparison
  assert predict.main(["--checkpoint", str(tmp_path / "binary.pth"), "--input",
                       str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--cpu-layer", "off"]) == 0
  mask = np.asarray(Image.open(tmp_path / "out" / "photo_mask.png"))
  np.testing.assert_array_equal(mask, expected.astype(np.uint8) * 255)


def test_binary_checkpoint_evaluates_as_background_and_foreground(tmp_path, capsys):
  torch, net = _binary_checkpoint(tmp_path)
  model, config = convert.load_pytorch(tmp_path / "binary.pth")
  assert config["activation"] == "sigmoid" and config["mask_values"] == [0, 1]
  for folder in ("images", "masks"):
    (tmp_path / folder).mkdir()
  image = (np.random.default_rng(4).random((48, 64, 3)) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / "images" / "a.png")
  probabilities = predict.predict_image(model, image)
  mask = (probabilities[..., 0] > 0.5).astype(np.uint8) * 255
  Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
  assert evaluate.main(["--checkpoint", str(tmp_path / "binary.pth"), "--images",
                        str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
                        "--output", str(tmp_path / "r.json"), "--cpu-layer", "off"]) == 0
  total = json.loads((tmp_path / "r.json").read_text())["total"]
  assert total["pixel_error"] == 0 and total["foreground_dice"] == 1.0
  assert "dice_1" in capsys.readouterr().out


def test_multilabel_prediction_writes_a_mask_per_class(tmp_path):
  model = milesial(1, 2, features=(4, 8), activation="sigmoid", rngs=nnx.Rngs(0))
  model.eval()
  image = np.random.default_rng(5).random((20, 24)).astype(np.float32)
  probabilities = predict.predict_image(model, image)
  assert probabilities.shape == (20, 24, 2)
  logits = np.asarray(model(jnp.asarray(image)[None, ..., None]))[0]
  np.testing.assert_allclose(probabilities, jax.nn.sigmoid(logits), atol=1e-5)
  files = predict.write_prediction(probabilities, image[..., None], tmp_path, "x",
                                   activation="sigmoid", class_names=("cell", "organelle"))
  for c, name in enumerate(("cell", "organelle")):
    written = np.asarray(Image.open(files[f"mask_{name}"]))
    np.testing.assert_array_equal(written, (probabilities[..., c] > 0.5) * 255)


def _config(**overrides):
  config = default.get_config("multilabel")
  config.model.features = (8, 16, 32)
  config.data.num_train, config.data.num_val = 64, 8
  config.data.image_size = config.data.tile_size = (64, 64)
  config.data.num_threads = 1
  config.num_steps, config.log_every, config.eval_every = 120, 40, 120
  config.checkpoint.every = 120
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.mark.slow
def test_multilabel_synthetic_trains(tmp_path):
  """Overlapping classes (cell ⊃ organelle), one sigmoid each, Dice + BCE: 120 steps of a
  small network reach IoU ≥ 0.8 on cells and ≥ 0.25 on the rare organelles (2 % of the
  pixels). Measured: 0.875 and 0.389 (jax 0.10.2, 8 simulated CPU devices)."""
  from unet_jax.training import train_and_evaluate
  final = train_and_evaluate(_config(), str(tmp_path / "run"))
  assert final["iou_cell"] >= 0.8, final
  assert final["iou_organelle"] >= 0.25, final
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert any("iou_organelle" in row for row in rows if row["split"] == "train")


RELEASES = [  # milesial/Pytorch-UNet's published checkpoints: (name, classes, bilinear, extras)
    ("v1.0", 1, True, {}),
    ("v2.0", 2, True, {}),
    ("v3.0", 2, False, {"mask_values": [0, 1]}),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,classes,bilinear,extras", RELEASES)
def test_milesial_release_shapes_convert_predict_and_export_back(tmp_path, name, classes,
                                                                 bilinear, extras):
  """Same-shaped random stand-ins for the released Carvana checkpoints (full width, 3
  channels in): each converts, predicts a photo as milesial does, and converts back to the
  very same tensors. v1.0 predicts a 479×320 photo (milesial's scale 0.25 of 1918×1280: odd
  widths at every level, as at scale 0.5) against milesial's forward pass; the others a
  239×160 photo, which takes the same code path."""
  torch = pytest.importorskip("torch", reason="building the stand-ins needs PyTorch")
  import torch_models
  torch.manual_seed(0)
  net = torch_models.Milesial(3, classes, bilinear).eval()
  state = {**net.state_dict(), **extras}
  torch.save(state, tmp_path / f"{name}.pth")
  assert convert.main([str(tmp_path / f"{name}.pth"), str(tmp_path / "flax")]) is None
  from unet_jax.training.checkpoint import load_model
  model, config = load_model(tmp_path / "flax")
  assert config["skip_fit"] == "pad"
  assert config["activation"] == ("sigmoid" if classes == 1 else "softmax")
  assert config.get("mask_values") == extras.get("mask_values")

  height, width = (320, 479) if name == "v1.0" else (160, 239)
  image = np.random.default_rng(6).random((height, width, 3)).astype(np.float32)
  probabilities = predict.predict_image(model, image)
  assert probabilities.shape == (height, width, classes)
  if name == "v1.0":  # the binary one, against milesial's own forward pass
    with torch.no_grad():
      logits = net(torch.from_numpy(image.transpose(2, 0, 1)[None].copy()))[0, 0].numpy()
    clear = np.abs(logits) > 1e-4
    np.testing.assert_array_equal((probabilities[..., 0] > 0.5)[clear], (logits > 0)[clear])

  back = convert.to_pytorch(model, "milesial")
  for key, value in net.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_folder_source_reads_one_mask_folder_per_class(tmp_path):
  from unet_jax.data import folder
  rng = np.random.default_rng(7)
  for sub in ("images", "masks/cell", "masks/organelle"):
    (tmp_path / sub).mkdir(parents=True)
  cell = rng.random((12, 10)) > 0.4
  organelle = cell & (rng.random((12, 10)) > 0.6)
  for stem in ("a", "b"):
    Image.fromarray((rng.random((12, 10)) * 255).astype(np.uint8)).save(
        tmp_path / "images" / f"{stem}.png")
    Image.fromarray(cell.astype(np.uint8) * 255).save(tmp_path / "masks/cell" / f"{stem}.png")
    organelle_mask = organelle.astype(np.uint8) * 255
    organelle_mask[0, 0] = 7  # an ignore value
    Image.fromarray(organelle_mask).save(tmp_path / "masks/organelle" / f"{stem}.png")
  config = ml_collections.ConfigDict(dict(
      dir=str(tmp_path), images="images", masks="masks", mask_suffix="", mask_values=(0, 255),
      ignore_values=(7,), val_dir=str(tmp_path), val_fraction=0.5, split_seed=0,
      class_masks=("cell", "organelle")))
  source = folder.from_config(config, "train", channels=1)
  label = source[0]["label"]
  expected = heads.pack(np.stack([cell, organelle], -1))
  expected[0, 0] = -1
  np.testing.assert_array_equal(label, expected)


def test_config_checks_know_the_heads():
  from unet_jax.training.config_checks import check_config
  config = default.get_config("multilabel")
  check_config(config)
  config.data.weight_map.enabled = True
  with pytest.raises(ValueError, match="not defined for multi-label"):
    check_config(config)
  binary = default.get_config()
  binary.model.num_classes = 1
  binary.data.class_names = ("cell",)
  with pytest.raises(ValueError, match="scored as two classes"):
    check_config(binary)
  binary.data.class_names = ("membrane", "cell")
  check_config(binary)
  binary.model.activation = "relu"
  with pytest.raises(ValueError, match="model.activation"):
    check_config(binary)


def test_predict_and_evaluate_choose_a_step_and_stay_quiet(tmp_path, capfd):
  """--step and --best pick among a run's checkpoints; a healthy checkpoint loads without
  warnings; something inside a workdir is answered with the workdir to pass."""
  from unet_jax.training import train_and_evaluate
  config = default.get_config("tiny")
  workdir = tmp_path / "run"
  train_and_evaluate(config, str(workdir))
  for folder in ("images", "masks"):
    (tmp_path / folder).mkdir()
  image = (np.random.default_rng(8).random((32, 32)) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / "images" / "a.png")
  Image.fromarray((image > 128).astype(np.uint8) * 255).save(tmp_path / "masks" / "a.png")
  capfd.readouterr()
  common = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
            "--cpu-layer", "off"]
  assert evaluate.main(["--checkpoint", str(workdir), "--step", "2", *common]) == 0
  out, err = capfd.readouterr()
  assert "at step 2" in err and "iou_membrane" in out and "dice_cell" in out
  assert "WARNING" not in err and "Metadata file does not exist" not in err
  assert evaluate.main(["--checkpoint", str(workdir), "--best", *common]) == 0
  assert "(best)" in capfd.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    predict.main(["--checkpoint", str(workdir / "checkpoints" / "4"), "--input",
                  str(tmp_path / "images"), "--output", str(tmp_path / "out")])
  assert exit_info.value.code == 2
  assert f"inside the training workdir {workdir}" in capfd.readouterr().err
  with pytest.raises(SystemExit):
    predict.main(["--checkpoint", str(workdir), "--step", "3", "--input",
                  str(tmp_path / "images"), "--output", str(tmp_path / "out")])
  assert "at step 3" in capfd.readouterr().err
