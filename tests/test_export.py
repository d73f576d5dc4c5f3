"""Export (StableHLO through ``jax.export``, ONNX through ``jax2onnx``) and Hub-style folders:
each artefact gives the live model's numbers."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unet_jax import cpu, export, model as unet
from unet_jax.interop import hub

ROOT = pathlib.Path(__file__).parents[1]
FEATURES = (2, 4, 8)


def _model(preset, *, upsample="transpose", in_channels=1, num_classes=2, seed=0):
  net = preset(in_channels, num_classes, features=FEATURES, upsample=upsample,
               rngs=nnx.Rngs(seed))
  # Non-trivial BatchNorm statistics, so that evaluation mode is really exercised.
  for _, module in nnx.iter_modules(net):
    if isinstance(module, unet.BatchNorm):
      k = jax.random.key(seed + module.mean.shape[0])
      module.mean[...] = 0.1 * jax.random.normal(k, module.mean.shape)
      module.var[...] = 1.0 + 0.5 * jax.random.uniform(k, module.var.shape)
  net.eval()
  return net


def _images(batch, h, w, channels=1, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (batch, h, w, channels)),
                     jnp.float32)


def _export_cli(net, tmp_path, *args):
  """``python -m unet_jax.export`` of ``net`` (saved as a pretrained folder) into tmp/out."""
  result = subprocess.run(
      [sys.executable, "-m", "unet_jax.export", "--checkpoint", str(_saved(net, tmp_path)),
       "--output", str(tmp_path / "out"), *args], capture_output=True, text=True, cwd=ROOT,
      timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]


MILESIAL = [pytest.param("transpose", id="transpose"), pytest.param("bilinear", id="bilinear")]


@pytest.mark.parametrize("upsample", MILESIAL)
def test_stablehlo_of_a_padded_model_takes_any_batch_and_multiple_of_16(tmp_path, upsample):
  net = _model(unet.milesial, upsample=upsample, in_channels=3)
  (spec, exported), = export.export_stablehlo(net).items()
  assert spec == "b, 4*h, 4*w, 3" and exported.platforms == ("cpu", "cuda", "tpu")
  path = tmp_path / "model.stablehlo"
  path.write_bytes(exported.serialize())
  run = export.load(path)
  for batch, (h, w) in [(1, (16, 24)), (3, (32, 8))]:
    x = _images(batch, h, w, 3, seed=batch)
    np.testing.assert_allclose(run(x), net(x), rtol=1e-6, atol=1e-6)


def test_stablehlo_of_an_unpadded_model_has_one_file_per_size_and_says_which(tmp_path):
  net = _model(unet.walkthrough)
  _export_cli(net, tmp_path, "--sizes", "44x44,60x44", "--platforms", "cpu")
  info = json.loads((tmp_path / "out" / "export.json").read_text())
  assert info["files"] == {"b, 44, 44, 1": "model-44x44.stablehlo",
                           "b, 60, 44, 1": "model-60x44.stablehlo"}
  assert info["platforms"] == ["cpu"] and info["input"]["sizes"].startswith("the fixed")
  assert info["input"]["layout"] == "NHWC" and info["output"]["class_names"] == [
      "background", "foreground"]
  run = export.load(tmp_path / "out")
  for batch, (h, w) in [(1, (44, 44)), (2, (60, 44))]:
    x = _images(batch, h, w, seed=batch)
    np.testing.assert_allclose(run(x), net(x), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"no exported size matches images of 52×52; this "
                                       r"export takes 44×44, 60×44"):
    run(_images(1, 52, 52))


def test_invalid_sizes_are_refused_naming_valid_ones():
  with pytest.raises(ValueError, match=r"nearest valid"):
    export.export_stablehlo(_model(unet.walkthrough), sizes=[(45, 45)])


def test_a_model_on_the_cpu_layer_exports_with_stock_operations(tmp_path):
  net = cpu.enable(_model(unet.milesial))
  (_, exported), = export.export_stablehlo(net, platforms=("cpu", "cuda")).items()
  assert "unet_jax_conv" not in exported.mlir_module()
  x = _images(2, 16, 16)
  np.testing.assert_allclose(jax.export.deserialize(exported.serialize()).call(x), net(x),
                             rtol=1e-6, atol=1e-6)




def _ort_session(path):
  ort = pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime "
                            "(pip install -e '.[onnx]')")
  return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("preset,upsample,size", [
    (unet.walkthrough, "transpose", (44, 60)),
    (unet.milesial, "transpose", (32, 48)),
    (unet.milesial, "bilinear", (48, 32)),
], ids=["walkthrough", "milesial", "milesial-bilinear"])
def test_onnx_matches_jax_in_onnxruntime(tmp_path, preset, upsample, size):
  pytest.importorskip("jax2onnx", reason="ONNX export needs jax2onnx (see the README)")
  net = _model(preset, upsample=upsample)
  path = export.export_onnx(net, tmp_path / "model.onnx", size=size)
  session = _ort_session(path)
  (image,), (logits,) = session.get_inputs(), session.get_outputs()
  assert (image.name, logits.name) == ("image", "logits")
  assert isinstance(image.shape[0], str) and image.shape[1:] == [*size, 1]  # dynamic batch
  for batch in (1, 3):
    x = _images(batch, *size, seed=batch)
    got = session.run(["logits"], {"image": np.asarray(x)})[0]
    np.testing.assert_allclose(got, net(x), rtol=0, atol=1e-4)


def _saved(net, tmp_path) -> pathlib.Path:
  return hub.save_pretrained(net, tmp_path / "pretrained")


@pytest.mark.parametrize("preset,kwargs", [
    (unet.paper, {}), (unet.walkthrough, {}), (unet.milesial, {"upsample": "bilinear"}),
    (unet.milesial, {"dtype": jnp.bfloat16}),
], ids=["paper", "walkthrough", "milesial-bilinear", "milesial-bf16"])
def test_pretrained_folders_round_trip_exactly(tmp_path, preset, kwargs):
  net = preset(3, 4, features=FEATURES, rngs=nnx.Rngs(1), **kwargs)
  net.eval()
  hub.save_pretrained(net, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
  back = hub.from_pretrained(tmp_path)
  for a, b in zip(jax.tree.leaves(nnx.state(net)), jax.tree.leaves(nnx.state(back)),
                  strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert unet.config_of(back) == unet.config_of(net)
  x = _images(1, 44, 44, 3)
  np.testing.assert_array_equal(back(x), net(x))


def test_a_pretrained_folder_loads_with_the_model_class_alone(tmp_path):
  from safetensors.numpy import load_file
  net = _model(unet.milesial)
  hub.save_pretrained(net, tmp_path)
  # Only json, safetensors and UNet: what a user who never saw this package's loader writes.
  config = json.loads((tmp_path / "config.json").read_text())
  model = unet.UNet(**config, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  for name, array in load_file(str(tmp_path / "model.safetensors")).items():
    node = state
    for part in name.split("."):
      node = node[int(part) if part.isdigit() else part]
    node[...] = array
  nnx.update(model, state)
  model.eval()
  x = _images(2, 16, 16)
  np.testing.assert_array_equal(model(x), net(x))


def test_pretrained_folder_errors_say_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match="nor a Hub repository id"):
    hub.from_pretrained(tmp_path / "missing" / "deep")
  net = _model(unet.milesial)
  hub.save_pretrained(net, tmp_path / "a")
  config = json.loads((tmp_path / "a" / "config.json").read_text())
  config["features"] = [2, 4, 16]
  (tmp_path / "a" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"has shape .* the config needs"):
    hub.from_pretrained(tmp_path / "a")


def test_a_pretrained_folder_is_a_checkpoint_for_predict(tmp_path):
  from unet_jax.checkpoint import load_model
  net = _model(unet.milesial)
  folder = _saved(net, tmp_path)
  loaded, config = load_model(folder)
  assert config == unet.config_of(net)
  x = _images(1, 16, 16)
  np.testing.assert_array_equal(loaded(x), net(x))


def test_a_repository_id_goes_to_the_hub(tmp_path, monkeypatch):
  net = _model(unet.milesial)
  folder = _saved(net, tmp_path)
  asked = []
  monkeypatch.setattr(hub, "_download", lambda repo_id, **kw: asked.append(repo_id) or folder)
  back = hub.from_pretrained("someone/unet-em")
  assert asked == ["someone/unet-em"]
  np.testing.assert_array_equal(back(_images(1, 16, 16)), net(_images(1, 16, 16)))


def test_without_huggingface_hub_a_repository_id_says_what_to_install():
  try:
    import huggingface_hub  # noqa: F401
    pytest.skip("huggingface_hub is installed (this checks the message without it)")
  except ImportError:
    pass
  with pytest.raises(FileNotFoundError, match="pip install huggingface_hub"):
    hub.from_pretrained("someone/unet-em")


def test_the_command_line_writes_onnx_and_its_manifest(tmp_path):
  pytest.importorskip("jax2onnx", reason="ONNX export needs jax2onnx (see the README)")
  net = _model(unet.milesial, in_channels=3, num_classes=4)
  _export_cli(net, tmp_path, "--format", "onnx", "--sizes", "16x24")
  info = json.loads((tmp_path / "out" / "export.json").read_text())
  assert info["format"] == "onnx" and info["onnx_opset"] == export.OPSET
  assert info["files"] == {"batch, 16, 24, 3": "model-16x24.onnx"}
  assert info["output"]["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
  session = _ort_session(tmp_path / "out" / "model-16x24.onnx")
  x = _images(2, 16, 24, 3)
  np.testing.assert_allclose(session.run(["logits"], {"image": np.asarray(x)})[0], net(x),
                             rtol=0, atol=1e-4)


def test_best_step_follows_the_runs_metric_among_checkpoints_on_disk(tmp_path):
  from unet_jax.training.checkpoint import best_step
  (tmp_path / "config.json").write_text(json.dumps(
      {"train": {"checkpoint": {"best_metric": "iou_cell", "best_mode": "max"}}}))
  for step in (10, 20, 30):
    (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
  rows = [{"step": 5, "split": "eval", "iou_cell": 0.99},  # its checkpoint is gone
          {"step": 10, "split": "eval", "iou_cell": 0.5},
          {"step": 20, "split": "train", "iou_cell": 0.95},  # a training row: not a score
          {"step": 20, "split": "eval", "iou_cell": 0.8},
          {"step": 30, "split": "eval", "iou_cell": 0.7}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert best_step(tmp_path) == 20
  (tmp_path / "config.json").write_text(json.dumps({"train": {"checkpoint": {}}}))
  with pytest.raises(ValueError, match="no best checkpoint to choose"):
    best_step(tmp_path)


def test_volumes_are_refused_with_a_clear_error():
  from unet_jax.interop import export as export_lib
  net = unet.UNet(1, 2, features=(4, 8), spatial_dims=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="export covers 2-D U-Nets"):
    export_lib.export_stablehlo(net)
