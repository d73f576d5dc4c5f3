"""The benchmark scripts: the PyTorch twin they time, and each script end to end at tiny sizes."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unet_jax import convert, model

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

TINY = dict(in_channels=1, num_classes=2, features=(4, 8, 16))


def _run(script: str, *args: str, tmp_path: pathlib.Path) -> dict:
  output = tmp_path / f"{script}.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *args, "--output",
                           str(output)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| --- |" in result.stdout  # the markdown table
  return json.loads(output.read_text())


def test_twin_has_the_flax_weights_and_gives_the_same_logits():
  torch = pytest.importorskip("torch")
  from torch_unet import torch_twin

  rng = np.random.default_rng(0)
  image = rng.standard_normal((2, 60, 44, 1), dtype=np.float32)
  for preset in ("walkthrough", "paper"):
    net = model.PRESETS[preset](**TINY, rngs=nnx.Rngs(0))
    net.train()
    net(jnp.asarray(image), rngs=nnx.Rngs(dropout=0))  # non-trivial BatchNorm statistics
    twin = torch_twin(net).eval()
    if preset == "walkthrough":  # the package's converter writes the same state dict
      expected = convert.to_pytorch(net, "walkthrough")
      got = twin.state_dict()
      assert set(got) == set(expected)
      for key, value in expected.items():
        np.testing.assert_array_equal(got[key].numpy(), value, err_msg=key)
    net.eval()
    ours = np.asarray(net(jnp.asarray(image)))
    with torch.no_grad():
      theirs = twin(torch.from_numpy(image.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(ours, theirs.transpose(0, 2, 3, 1), atol=1e-4, err_msg=preset)


def test_peak_table_and_override():
  from gpu import peak_tflops

  assert peak_tflops("NVIDIA H100 80GB HBM3", None)["bf16"] == 989
  assert peak_tflops("NVIDIA H100 PCIe", None)["bf16"] == 756
  assert peak_tflops("cpu", None) == {}
  assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16=900,fp8=1979") == {
      "bf16": 900, "tf32": 495, "fp32": 67, "fp8": 1979}


@pytest.mark.slow
def test_compare_pytorch_end_to_end(tmp_path):
  pytest.importorskip("torch")
  report = _run("compare_pytorch", "--presets", "paper", "--widths", "4",
                "--depth", "2", "--size", "44", "--batch", "2", "--repeats", "2",
                "--warmup", "1", tmp_path=tmp_path)
  assert report["environment"]["torch_threads"] >= 1
  layer = report["environment"]["cpu_layer"]
  assert layer["ops"] == "cpu" and layer["why"]  # on a CPU the layer is on by default
  assert isinstance(layer["settings"], list)
  assert [case["preset"] for case in report["results"]] == ["paper"]
  for case in report["results"]:
    assert case["features"] == [4, 8, 16] and case["input"] == [44, 44]
    assert case["parity_max_abs_diff"] < 1e-4
    assert case["gflop"]["train_step"] == pytest.approx(3 * case["gflop"]["inference"])
    for name in ("jax", "jax_stock", "torch"):
      out = case[name]
      assert len(out["train_step_all_s"]) == len(out["inference_all_s"]) == 2
      for key in ("train_step_s", "inference_s", "first_call_s", "train_step_gflops_per_s"):
        assert out[key] > 0, (name, key)
      assert out["train_step_peak_bytes"] is None or out["train_step_peak_bytes"] >= 0
      if os.path.exists("/proc/self/stat"):
        assert out["train_step_page_faults_per_call"] >= 0
    assert case["jax"]["xla_temp_bytes"] > 0 and case["jax"]["compile_s"] >= 0
    assert len(case["core_round_trip_ns"]) == 2  # one per turn; None where no probe runs
    for key in ("train_step", "inference"):
      assert case["ratio"][key] == pytest.approx(case["jax"][f"{key}_s"]
                                                 / case["torch"][f"{key}_s"])


@pytest.mark.slow
def test_gpu_script_smoke_on_cpu(tmp_path):
  report = _run("gpu", "--smoke", "--batches", "2", "--steps", "1", tmp_path=tmp_path)
  env = report["environment"]
  torch_ran = env["torch_skipped"] is None
  assert [(c["framework"], c["dtype"]) for c in report["results"]] == (
      [("jax", "fp32"), ("jax", "bf16")] + ([("torch", "bf16")] if torch_ran else []))
  for case in report["results"]:
    assert "error" not in case, case
    assert case["batch"] == 2 and case["step_s"] > 0
    assert case["images_per_s"] == pytest.approx(2 / case["step_s"])
    assert case["tflops_per_s"] > 0
    assert case["mfu"] is None  # no peak known for a CPU
  first = report["results"][0]
  assert first["compile_s"] > 0 and first["peak_memory_bytes"] > first["xla_temp_bytes"] > 0


@pytest.mark.slow
def test_memory_script_finds_the_largest_batch(tmp_path):
  report = _run("memory", "--size", "44", "--width", "4", "--depth", "2", "--variants",
                "off-fp32", "--budget-gb", "0.005", tmp_path=tmp_path)
  (entry,) = report["results"]
  one, fit = entry["batch_1"], entry["largest_batch"]
  assert one["temp"] > 0 and one["peak_bytes"] >= one["temp"]
  assert fit["budget_bytes"] == int(0.005 * 2**30)
  assert fit["batch"] >= 1 and fit["peak_bytes"] <= fit["budget_bytes"]
  # The next batch up was compiled and does not fit.
  assert fit["next_peak_bytes"] > fit["budget_bytes"]


@pytest.mark.slow
def test_export_inference_times_onnxruntime_beside_jax(tmp_path):
  pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install -e '.[onnx]')")
  pytest.importorskip("jax2onnx", reason="needs jax2onnx (see the README)")
  report = _run("export_inference", "--width", "2", "--depth", "2", "--size", "44",
                "--repeats", "2", "--iters", "1", tmp_path=tmp_path)
  assert set(report["seconds"]) == {"jax", "jax_stablehlo", "onnxruntime"}
  assert report["ratio_to_jax"]["jax"] == 1.0
  assert all(v < 1e-4 for v in report["max_abs_difference_to_jax"].values())


def test_memory_script_times_a_3d_step(tmp_path):
  report = _run("memory", "--spatial-dims", "3", "--size", "20", "--width", "4", "--depth", "1",
                "--variants", "off-fp32", "--time", "1", tmp_path=tmp_path)
  assert report["preset"] == "cicek3d" and report["size"] == [20, 20, 20]
  assert (report["in_channels"], report["num_classes"]) == (3, 3)
  (entry,) = report["results"]
  one = entry["batch_1"]
  # 20 → 16 | 8 → 4, up 8 → 4 per axis.
  assert one["output_size"] == [4, 4, 4] and len(one["step_all_s"]) == 1
  assert one["temp"] > 0 and one["peak_bytes"] >= one["temp"]
  assert one["voxels_per_s"] == pytest.approx(4**3 / one["step_s"])
