"""predict and evaluate fail early and lose nothing: outputs checked before compute, bad
flags refused, non-finite weights and oversized images refused, results written before they
are printed, file names printed in any locale."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from unet_jax.inference import evaluate, predict
from unet_jax.interop import convert, pth
from unet_jax.model import milesial

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture
def checkpoint(tmp_path):
  net = milesial(1, 2, features=(4, 8), rngs=nnx.Rngs(0))
  path = tmp_path / "model.safetensors"
  pth.save_safetensors(convert.to_pytorch(net, "milesial"), path)
  return path


@pytest.fixture
def folders(tmp_path):
  for folder in ("images", "masks"):
    (tmp_path / folder).mkdir()
  image = (np.random.default_rng(0).random((20, 24)) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / "images" / "a.png")
  Image.fromarray((image > 128).astype(np.uint8) * 255).save(tmp_path / "masks" / "a.png")
  return tmp_path


def _exit_code(main, argv) -> int:
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  return exit_info.value.code


def test_predict_output_that_is_a_file_fails_before_loading(tmp_path, folders, capsys):
  blocker = tmp_path / "taken"
  blocker.write_text("")
  code = _exit_code(predict.main, ["--checkpoint", str(tmp_path / "absent.pth"), "--input",
                                   str(folders / "images"), "--output", str(blocker)])
  assert code == 2
  err = capsys.readouterr().err
  assert "exists and is not a folder" in err and "cannot load" not in err


@pytest.mark.parametrize("value", ["-5", "0", "two"])
def test_predict_batch_size_must_be_positive(folders, checkpoint, value, capsys):
  code = _exit_code(predict.main, ["--checkpoint", str(checkpoint), "--input",
                                   str(folders / "images"), "--output",
                                   str(folders / "out"), "--batch-size", value])
  assert code == 2 and "--batch-size" in capsys.readouterr().err


def test_predict_image_refuses_a_bad_batch_size():
  net = milesial(1, 2, features=(4, 8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="batch_size must be a positive integer, got -5"):
    predict.predict_image(net, np.zeros((16, 16), np.float32), batch_size=-5)


def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, folders):
  net = milesial(1, 2, features=(4, 8), rngs=nnx.Rngs(0))
  state = convert.to_pytorch(net, "milesial")
  state["outc.conv.weight"][0, 0, 0, 0] = np.nan
  path = tmp_path / "nan.safetensors"
  pth.save_safetensors(state, path)
  args = ["--checkpoint", str(path), "--input", str(folders / "images"), "--cpu-layer", "off"]
  result = subprocess.run([sys.executable, "-m", "unet_jax.predict", *args, "--output",
                           str(tmp_path / "refused")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
  assert result.returncode == 2, result.stderr
  assert "outc.conv.weight" in result.stderr and "--allow-nonfinite" in result.stderr
  assert not list((tmp_path / "refused").glob("*_mask.png"))
  assert predict.main([*args, "--output", str(tmp_path / "allowed"), "--allow-nonfinite"]) == 0
  assert (tmp_path / "allowed" / "a_mask.png").is_file()


def test_max_pixels_refuses_large_images_and_goes_on(tmp_path, folders, checkpoint, capsys):
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(folders / "images" / "small.png")
  code = predict.main(["--checkpoint", str(checkpoint), "--input", str(folders / "images"),
                       "--output", str(tmp_path / "out"), "--max-pixels", "100",
                       "--cpu-layer", "off"])
  assert code == 1
  assert "a.png" in capsys.readouterr().err  # 480 pixels: refused, reported
  assert (tmp_path / "out" / "small_mask.png").is_file()  # 64 pixels: predicted
  from unet_jax.data import decode
  decode.set_max_pixels(decode.MAX_PIXELS)


def test_evaluate_output_folder_fails_before_compute(tmp_path, folders, checkpoint, capsys):
  code = _exit_code(evaluate.main, ["--checkpoint", str(checkpoint), "--images",
                                    str(folders / "images"), "--masks", str(folders / "masks"),
                                    "--output", str(tmp_path)])
  assert code == 2
  assert "is a folder" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="non-UTF-8 file names: a Linux file system")
def test_evaluate_writes_results_and_prints_any_file_name(tmp_path, folders, checkpoint):
  odd = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: not valid UTF-8
  for folder in ("images", "masks"):
    os.rename(folders / folder / "a.png", folders / folder / f"{odd}.png")
  out = tmp_path / "results.json"
  env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
  result = subprocess.run(
      [sys.executable, "-m", "unet_jax.evaluate", "--checkpoint", str(checkpoint), "--images",
       str(folders / "images"), "--masks", str(folders / "masks"), "--output", str(out),
       "--cpu-layer", "off"], capture_output=True, env=env, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr.decode(errors="replace")
  assert b"caf" in result.stdout and b"total" in result.stdout
  assert len(json.loads(out.read_text())["images"]) == 1
