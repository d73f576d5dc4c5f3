"""The inputs users get wrong, fed to every entry point: 32 cases.

Model call (4), overlap-tile prediction (7), converter (4), training configuration and data
(10), training.py flags (2), multi-process start-up (2), predict and evaluate command lines (3).
Each must end in a clear error that says what was wrong (or in documented handling), and
never leave a corrupted workdir behind.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from unet_jax import convert, evaluate, predict, training
from unet_jax.training import distributed
from unet_jax.model import milesial, paper, walkthrough

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from test_train import tiny_config as _tiny  # noqa: E402

TINY = dict(features=(4, 8, 16))


@pytest.fixture(scope="module")
def small_paper():
  net = paper(1, 2, **TINY, rngs=nnx.Rngs(0))
  net.eval()
  return net


@pytest.fixture(scope="module")
def small_milesial():
  net = milesial(1, 2, **TINY, rngs=nnx.Rngs(0))
  net.eval()
  return net


# Model call ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,message", [
    ((1, 573, 188, 1), r"573×188 is not a valid input.*nearest valid sizes"),
    ((1, 188, 188, 3), r"takes 1 input channel\(s\), got an input of shape \(1, 188, 188, 3\)"),
    ((188, 188, 1), r"expected images of shape \[N, H, W, 1\].*x\[None\]"),
    ((1, 0, 0, 1), r"0×0 is not a valid input"),
])
def test_model_call(shape, message):
  net = walkthrough(1, 2, features=(4, 8, 16, 32, 64), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=message):
    net(jnp.zeros(shape))


# Overlap-tile prediction ---------------------------------------------------------------------

@pytest.mark.parametrize("image,message", [
    (np.full((20, 20), np.nan, np.float32), r"NaN or infinite"),
    (np.full((20, 20), np.inf, np.float32), r"NaN or infinite"),
    (np.zeros((20, 20), np.complex64), r"unsupported pixel type complex64"),
    (np.zeros((20, 20, 5), np.float32), r"takes 1 channel\(s\), the image has 5"),
    (np.zeros((0, 20), np.float32), r"the image is empty \(shape \(0, 20, 1\)\)"),
])
def test_predict_image_refuses(small_paper, image, message):
  with pytest.raises(ValueError, match=message):
    predict.predict_image(small_paper, image)


def test_predict_image_invalid_tile_size_names_valid_ones(small_paper):
  with pytest.raises(ValueError, match=r"nearest valid"):
    predict.predict_image(small_paper, np.zeros((40, 40), np.float32), tile_size=45)


def test_predict_image_handles_a_very_long_thin_image(small_milesial):
  """Documented handling: any size works, by tiling (here 1×3000)."""
  probabilities = predict.predict_image(small_milesial, np.random.rand(1, 3000).astype(np.float32))
  assert probabilities.shape == (1, 3000, 2) and np.isfinite(probabilities).all()


# Converter ------------------------------------------------------------------------------------

def test_converter_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
  path = tmp_path / "notes.pth"
  path.write_text("these are my notes")
  with pytest.raises(ValueError, match=r"notes\.pth"):
    convert.load_pytorch(path)


def test_converter_refuses_a_missing_file(tmp_path):
  with pytest.raises(ValueError, match=r"missing\.pth"):
    convert.load_pytorch(tmp_path / "missing.pth")


def test_converter_refuses_a_state_dict_of_another_network():
  with pytest.raises(ValueError, match=r"unrecognised checkpoint layout"):
    convert.from_pytorch({"fc.weight": np.zeros((10, 5), np.float32)})


def test_converter_cli_reports_an_unwritable_output(tmp_path):
  net = walkthrough(1, 2, features=(4, 8, 16, 32, 64), rngs=nnx.Rngs(0))
  from unet_jax.interop import pth
  pth.save_safetensors(convert.to_pytorch(net, "walkthrough"), tmp_path / "m.safetensors")
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(SystemExit) as exit_info:
    convert.main([str(tmp_path / "m.safetensors"), str(blocker / "out")])
  assert exit_info.value.code == 2


# Training configuration and data --------------------------------------------------------------

def _no_partial_checkpoints(workdir):
  checkpoints = pathlib.Path(workdir) / "checkpoints"
  assert not checkpoints.exists() or not [p for p in checkpoints.iterdir() if p.name[0].isdigit()]


@pytest.mark.parametrize("changes,error,message", [
    ({"data.source": "imagenet"}, ValueError, r"unknown data source 'imagenet'; known sources"),
    ({"model.preset": "resnet"}, ValueError, r"unknown model preset 'resnet'"),
    ({"optimizer.name": "lion"}, ValueError, r"unknown optimizer 'lion'"),
    ({"optimizer.schedule": "linear"}, ValueError, r"unknown schedule 'linear'"),
    ({"loss.name": "focal"}, ValueError, r"unknown loss 'focal'"),
    ({"batch_size": 6}, ValueError, r"batch size 6 does not divide evenly over 8 devices"),
    ({"data.tile_size": (3, 3)}, ValueError, r"tile_size|nearest valid"),
    ({"data.synthetic_labels": "multilabel"}, ValueError,
     r"label values \[3\] are outside the model's classes"),
    ({"model.activation": "softmax", "model.num_classes": 1}, ValueError,
     r"one output channel is always 1"),
    ({"data.channels": 3}, ValueError, r"3 channel\(s\) but the model takes 1"),
])
def test_training_configuration(tmp_path, changes, error, message):
  with pytest.raises(error, match=message):
    training.train_and_evaluate(_tiny(**changes), str(tmp_path))
  _no_partial_checkpoints(tmp_path)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=r"workdir .* cannot be written"):
    training.train_and_evaluate(_tiny(), str(blocker / "run"))


# training.py flags -------------------------------------------------------------------------------

def _train_py(*args):
  return subprocess.run([sys.executable, str(ROOT / "train.py"),
                         f"--config={ROOT}/configs/default.py:tiny", *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_nonsense_flag_value(tmp_path):
  result = _train_py("--config.num_steps=many", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "num_steps" in result.stderr
  _no_partial_checkpoints(tmp_path)


def test_workdir_that_cannot_be_written_from_the_command_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  result = _train_py(f"--workdir={blocker}/run")
  assert result.returncode == 1
  assert "error: the workdir" in result.stderr and "Traceback" not in result.stderr


# Multi-process start-up -----------------------------------------------------------------------

def test_multi_process_needs_every_coordinate():
  with pytest.raises(ValueError, match=r"missing: coordinator_address"):
    distributed.initialize(None, 2, 0)


def test_process_id_out_of_range():
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 5"):
    distributed.initialize("127.0.0.1:1", 2, 5)


# predict and evaluate command lines -----------------------------------------------------------

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, small_milesial):
  directory = tmp_path_factory.mktemp("model")
  config = {"layout": "milesial", "in_channels": 1, "num_classes": 2, "features": [4, 8, 16],
            "encoder_padding": "same", "decoder_padding": "same", "norm": "batch",
            "use_bias": False, "concat_order": "skip_up"}
  convert.save_flax(small_milesial, config, directory)
  return directory


def test_predict_cli_missing_checkpoint_and_empty_folder(tmp_path, saved_model):
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit) as missing:
    predict.main(["--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path / "empty"),
                  "--output", str(tmp_path / "out")])
  with pytest.raises(SystemExit) as empty:
    predict.main(["--checkpoint", str(saved_model), "--input", str(tmp_path / "empty"),
                  "--output", str(tmp_path / "out")])
  assert missing.value.code == 2 and empty.value.code == 2


def test_predict_cli_one_bad_file_does_not_stop_the_others(tmp_path, saved_model, capsys):
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.zeros((30, 40), np.uint8)).save(images / "good.png")
  (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  (images / "notes.docx").write_text("not an image")
  status = predict.main(["--checkpoint", str(saved_model), "--input", str(images),
                         "--output", str(tmp_path / "out")])
  assert status == 1
  assert (tmp_path / "out" / "good_mask.png").is_file()
  err = capsys.readouterr().err
  assert "broken.png" in err and "notes.docx" in err


def test_evaluate_cli_image_without_mask(tmp_path, saved_model, capsys):
  for folder in ("images", "masks"):
    (tmp_path / folder).mkdir()
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "images" / "a.png")
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "images" / "b.png")
  Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "masks" / "a.png")
  status = evaluate.main(["--checkpoint", str(saved_model), "--images", str(tmp_path / "images"),
                          "--masks", str(tmp_path / "masks"),
                          "--output", str(tmp_path / "results.json")])
  assert status == 1
  assert "b.png" in capsys.readouterr().err
  results = json.loads((tmp_path / "results.json").read_text())
  assert "a" in json.dumps(results)
