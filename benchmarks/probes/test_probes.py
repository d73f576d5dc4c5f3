"""The investigation probes: each script end to end at tiny sizes.

Not part of the package's test run; run them with ``pytest benchmarks/probes``.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

PROBES = pathlib.Path(__file__).resolve().parent
ROOT = PROBES.parents[1]
sys.path.insert(0, str(PROBES))


def _run(script: str, *args: str, tmp_path: pathlib.Path) -> dict:
  output = tmp_path / f"{script}.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, str(PROBES / f"{script}.py"), *args, "--output",
                           str(output)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| --- |" in result.stdout  # the markdown table
  return json.loads(output.read_text())


def _two_cpus():
  return len(os.sched_getaffinity(0)) >= 2 if hasattr(os, "sched_getaffinity") else False


def test_core_latency_probe_measures_two_cores_and_refuses_bad_ones():
  import core_latency

  if not (sys.platform.startswith("linux") and _two_cpus() and core_latency._compiler()):
    pytest.skip("the probe needs Linux, two CPUs to pin to and a C compiler")
  trips = core_latency.round_trips_ns(0.05)
  assert trips and all(0 < t < 1e6 for t in trips)
  assert 0 < core_latency.round_trip_ns(0.05) < 1e6
  first = sorted(os.sched_getaffinity(0))[0]
  assert core_latency.round_trips_ns(0.05, cpus=(first, 4096)) == []  # no such CPU to pin to
  with pytest.raises(SystemExit, match="two CPU numbers"):
    core_latency.main(["--cpus", "0"])
  with pytest.raises(SystemExit, match="not both among the CPUs"):
    core_latency.main(["--cpus", f"{first},4096"])


def test_cpu_ops_script_checks_and_times_each_op(tmp_path):
  result = _run("cpu_ops", "--tiny", "--repeats", "2", tmp_path=tmp_path)
  ops_timed = {row["op"] for row in result["rows"]}
  assert len(ops_timed) == 9
  assert all(row["lax_ms"] > 0 and row["unet_jax_ms"] > 0 for row in result["rows"])


def test_conv_layers_finds_every_convolution_of_the_model():
  from conv_layers import conv_layers

  layers = conv_layers("walkthrough", 4, 2, 44, 2, 1)
  # Two per level on the way down (3 levels) and two per level on the way up (2 levels).
  assert len(layers) == 10
  assert layers[0] == {"input": [2, 44, 44, 1], "kernel": [3, 3, 1, 4],
                       "padding": [[0, 0], [0, 0]]}
  assert layers[4]["input"] == [2, 8, 8, 8] and layers[4]["kernel"] == [3, 3, 8, 16]
  # The walkthrough pads its decoder: "SAME" arrives as a string and is resolved.
  assert all(layer["padding"] == [[1, 1], [1, 1]] for layer in layers[6:])
  paper = conv_layers("paper", 4, 2, 60, 1, 3)
  assert len(paper) == 10 and paper[-1]["input"] == [1, 22, 22, 4]  # 60 → … → 20
  assert all(layer["padding"] == [[0, 0], [0, 0]] for layer in paper)


def test_conv_layers_script_times_both_frameworks(tmp_path):
  pytest.importorskip("torch")
  report = _run("conv_layers", "--width", "4", "--depth", "1", "--size", "24", "--repeats",
                "2", tmp_path=tmp_path)
  assert len(report["layers"]) == 6
  for row in report["layers"]:
    for side in ("jax", "torch"):
      assert all(row[side][name] > 0 for name in ("forward", "input_grad", "weight_grad"))
  assert report["totals"]["jax"]["forward"] == pytest.approx(
      sum(row["jax"]["forward"] for row in report["layers"]))
