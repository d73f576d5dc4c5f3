"""PyTorch ⇄ Flax parity: eval logits, one training step, and the export round trip, with stock
JAX operations (the default) and with the CPU layer's (``unet_jax.cpu``)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unet_jax import convert, cpu
from unet_jax.interop import pth

torch = pytest.importorskip("torch", reason="parity tests need PyTorch (pip install '.[test]')")
import torch_models  # noqa: E402  (needs torch)

SMALL = (4, 8, 16, 32, 64)


def _torch_model(layout, *, features=SMALL, bilinear=False, in_channels=1, classes=2, seed=0,
                 calibration_hw=(156, 172)):
  torch.manual_seed(seed)
  if layout == "walkthrough":
    model = torch_models.Walkthrough(in_channels, classes, features)
  else:
    model = torch_models.Milesial(in_channels, classes, bilinear, features)
  x = torch.randn(2, in_channels, *calibration_hw, generator=torch.Generator().manual_seed(seed))
  return torch_models.randomize_batch_norm(model, x, seed)


def _logits_both(torch_model, flax_model, x_nchw):
  with torch.no_grad():
    expected = torch_model.eval()(torch.from_numpy(x_nchw)).numpy()
  flax_model.eval()
  got = np.asarray(flax_model(jnp.asarray(x_nchw.transpose(0, 2, 3, 1))))
  return got.transpose(0, 3, 1, 2), expected


def _through_file(torch_model, tmp_path, name="model.pth"):
  path = tmp_path / name
  torch.save(torch_model.state_dict(), path)
  return convert.load_pytorch(path)


CASES = [
    # layout, bilinear, input channels, (H, W)
    ("walkthrough", False, 1, (188, 188)),
    ("walkthrough", False, 3, (156, 220)),   # non-square
    ("milesial", False, 3, (64, 64)),
    ("milesial", False, 1, (48, 80)),        # non-square
    ("milesial", True, 3, (64, 64)),
    ("milesial", True, 3, (80, 48)),         # non-square
    ("milesial", False, 3, (75, 101)),       # odd: floor-pooling and pad-to-skip
    ("milesial", True, 1, (75, 101)),
]


def _with_layer(flax_model, layer):
  return cpu.enable(flax_model) if layer == "cpu" else flax_model


@pytest.mark.parametrize("layer", ["stock", "cpu"])
@pytest.mark.parametrize("layout,bilinear,channels,hw", CASES)
def test_eval_logits_match_through_pth_file(tmp_path, layout, bilinear, channels, hw, layer):
  torch_model = _torch_model(layout, bilinear=bilinear, in_channels=channels, classes=3,
                             calibration_hw=hw)
  flax_model, config = _through_file(torch_model, tmp_path)
  flax_model = _with_layer(flax_model, layer)
  assert config["layout"] == layout
  assert config["upsample"] == ("bilinear" if bilinear else "transpose")
  assert config["features"] == list(SMALL)
  x = np.random.default_rng(1).normal(size=(2, channels, *hw)).astype(np.float32)
  got, expected = _logits_both(torch_model, flax_model, x)
  assert got.shape == expected.shape
  assert np.abs(expected).max() > 0.1  # a meaningful comparison, not all zeros
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("bilinear", [False, True])
def test_milesial_at_carvana_size(tmp_path, bilinear):
  """milesial's Carvana checkpoints run at scale 0.5 on 1918×1280 photos: 959×640 inputs,
  which pool to odd sizes and pad up-sampled maps back to their skips."""
  torch_model = _torch_model("milesial", bilinear=bilinear, in_channels=3, classes=2,
                             calibration_hw=(75, 101))
  flax_model, config = _through_file(torch_model, tmp_path)
  assert config["skip_fit"] == "pad"
  x = np.random.default_rng(4).normal(size=(1, 3, 640, 959)).astype(np.float32)
  got, expected = _logits_both(torch_model, flax_model, x)
  assert got.shape == expected.shape == (1, 2, 640, 959)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_full_size_walkthrough_572(tmp_path):
  """The walkthrough's own model and input: 31,042,434 parameters, 572×572 → 448×448."""
  torch_model = _torch_model("walkthrough", features=(64, 128, 256, 512, 1024),
                             calibration_hw=(188, 188))
  flax_model, _ = _through_file(torch_model, tmp_path)
  x = np.random.default_rng(2).normal(size=(1, 1, 572, 572)).astype(np.float32)
  got, expected = _logits_both(torch_model, flax_model, x)
  assert got.shape == (1, 2, 448, 448)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout,bilinear,layer", [
    ("walkthrough", False, "stock"), ("milesial", False, "stock"), ("milesial", True, "stock"),
    ("walkthrough", False, "cpu"), ("milesial", True, "cpu")])
def test_one_sgd_step_matches(layout, bilinear, layer):
  """Identical weights and data → identical weights and BatchNorm statistics after a step.

  Tolerance: gradients of a ~20-layer network summed in a different order in fp32 differ by
  ~1e-6 relative; with learning rate 0.1 the updated weights agree to ~1e-7 absolute, so
  atol=1e-5 (weights are O(0.1)) leaves a wide margin while a wrong sign, a missing factor
  or a biased-vs-unbiased variance (3 % at these sizes) would fail it.
  """
  hw = (156, 172) if layout == "walkthrough" else (64, 48)
  torch_model = _torch_model(layout, bilinear=bilinear, in_channels=1, classes=3,
                             calibration_hw=hw)
  flax_model, _ = convert.from_pytorch(
      {k: v.numpy() for k, v in torch_model.state_dict().items()})
  flax_model = _with_layer(flax_model, layer)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 1, *hw)).astype(np.float32)
  out_hw = torch_model.eval()(torch.from_numpy(x)).shape[2:]
  labels = rng.integers(0, 3, size=(2, *out_hw))
  lr = 0.1

  torch_model.train()
  optimizer = torch.optim.SGD(torch_model.parameters(), lr=lr)
  loss = torch.nn.functional.cross_entropy(torch_model(torch.from_numpy(x)),
                                           torch.from_numpy(labels))
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()

  flax_model.train()

  def loss_fn(model):
    logits = model(jnp.asarray(x.transpose(0, 2, 3, 1)))
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()

  flax_loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(flax_model)
  params = nnx.state(flax_model, nnx.Param)
  nnx.update(flax_model, jax.tree.map(lambda p, g: p - lr * g, params, grads))
  assert abs(float(flax_loss) - loss.item()) < 1e-5

  exported = convert.to_pytorch(flax_model, layout)
  for key, value in torch_model.state_dict().items():
    if key.endswith("num_batches_tracked"):
      continue
    np.testing.assert_allclose(exported[key], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("layout,bilinear", [("walkthrough", False), ("milesial", True)])
def test_export_round_trip_is_exact(tmp_path, layout, bilinear):
  torch_model = _torch_model(layout, bilinear=bilinear)
  original = torch_model.state_dict()
  flax_model, _ = convert.from_pytorch({k: v.numpy() for k, v in original.items()})
  exported = convert.to_pytorch(flax_model, layout)
  assert set(exported) == set(original)
  for key, value in original.items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
  # And PyTorch accepts it strictly, from a file written without torch.
  pth.save_safetensors(exported, tmp_path / "model.safetensors")
  reloaded = pth.load_state_dict(tmp_path / "model.safetensors")
  torch_model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in reloaded.items()},
                              strict=True)


def test_milesial_training_checkpoint_extras_are_dropped(tmp_path):
  torch_model = _torch_model("milesial", bilinear=True)
  state = dict(torch_model.state_dict(), mask_values=[0, 1])
  torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()},
              "epoch": 3}, tmp_path / "ckpt.pth")
  flax_model, config = convert.load_pytorch(tmp_path / "ckpt.pth")
  assert config["layout"] == "milesial" and config["upsample"] == "bilinear"
  x = np.random.default_rng(4).normal(size=(1, 1, 32, 48)).astype(np.float32)
  got, expected = _logits_both(torch_model, flax_model, x)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_bad_state_dict_lists_every_problem():
  state = {k: v.numpy() for k, v in _torch_model("walkthrough").state_dict().items()}
  del state["decoder2.up.weight"]
  del state["layer3.1.running_var"]
  state["extra.weight"] = np.zeros(3, np.float32)
  state["last.bias"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError) as error:
    convert.from_pytorch(state)
  message = str(error.value)
  for expected in ("missing (2)", "decoder2.up.weight", "layer3.1.running_var",
                   "unexpected (1)", "extra.weight", "mis-shaped (1)", "last.bias"):
    assert expected in message


def test_unknown_layout_is_refused():
  with pytest.raises(ValueError, match="unrecognised checkpoint layout.*known layouts"):
    convert.from_pytorch({"encoder.weight": np.zeros((3, 3), np.float32)})


def test_command_line_both_directions(tmp_path):
  torch_model = _torch_model("walkthrough")
  torch.save(torch_model.state_dict(), tmp_path / "model.pth")
  run = lambda *args: subprocess.run([sys.executable, "-m", "unet_jax.convert", *map(str, args)],
                                     capture_output=True, text=True, timeout=300)
  result = run(tmp_path / "model.pth", tmp_path / "flax")
  assert result.returncode == 0, result.stderr
  assert "walkthrough layout" in result.stdout
  config = json.loads((tmp_path / "flax" / "config.json").read_text())
  assert config["features"] == list(SMALL) and config["decoder_padding"] == "same"
  result = run(tmp_path / "flax", tmp_path / "back", "--to-pytorch")
  assert result.returncode == 0, result.stderr
  back = pth.load_state_dict(tmp_path / "back" / "model.pth")
  for key, value in torch_model.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  result = run(tmp_path / "missing.pth", tmp_path / "out")
  assert result.returncode == 2 and "missing.pth" in result.stderr


def test_walkthrough_layout_without_batch_norm_round_trips():
  from unet_jax.model import UNet
  net = UNet(1, 2, features=SMALL, encoder_padding="valid", decoder_padding="same",
             concat_order="up_skip", rngs=nnx.Rngs(0))
  state = convert.to_pytorch(net, "walkthrough")
  assert not any("running_mean" in k or "num_batches_tracked" in k for k in state)
  back, config = convert.from_pytorch(state)
  assert config["norm"] is None
  for key, value in convert.to_pytorch(back, "walkthrough").items():
    np.testing.assert_array_equal(value, state[key], err_msg=key)
