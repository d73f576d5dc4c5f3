r"""ISBI 2012 EM segmentation with the paper's recipe (Ronneberger et al. 2015, Sec. 3).

Command:  python train.py --config=configs/isbi2012.py --workdir=runs/isbi2012
Variants: --config=configs/isbi2012.py:cpu     the best CPU recipe found (see "cpu" below)
          --config=configs/isbi2012.py:small   trains on a 2-core CPU (see "small" below)
          --config=configs/isbi2012.py:tiny    a seconds-long smoke run (used by the tests)

Data: the challenge's 30 labelled 512×512 slices, as PNG slices (train/image/N.png,
train/label/N.png) or as its TIFF stacks (train-volume.tif, train-labels.tif); see
unet_jax/data/isbi2012.py. The directory is data.isbi2012.dir: by default the environment
variable UNET_JAX_ISBI_DIR, else ../shared/data/isbi2012 beside this repository if it exists;
or pass --config.data.isbi2012.dir=DIR. Train on slices 0–24, validate on 25–29. Classes:
0 = membrane, 1 = cell. Training reports pixel_error and iou_membrane at the argmax; the
figures comparable with the paper's are the challenge's scores of the hold-out (best
threshold of the membrane probability: pixel and Rand error as 1 − maximal F-score, warping
error, V_rand and V_info thinned), printed by docs/make_results.py.

The paper's recipe: its network (all convolutions unpadded, no BatchNorm, dropout 0.5 at the
end of the contracting path, 64 … 1024 features), large 572×572 tiles (388×388 output) over a
large batch, so one tile per step; SGD with momentum 0.99; cross-entropy weighted by the
border weight map (w0 = 10, σ = 5 px) computed on each whole label; elastic deformation
(3×3 grid, σ = 10 px), flips, 90° rotations and grey-value jitter. The learning rate, the
number of steps and the gradient clipping are not in the paper; they are this file's choice.
Hardware and time: the full recipe needs a GPU (one step is a 572×572 tile through a
31M-parameter network); it has not been run on one yet. With N GPUs, set
--config.batch_size=N (the global batch must divide over the devices).

cpu: "small" with the paper's border weight map (w0 = 10, σ = 5 px) and 2,500 steps. Last run:
51 min 11 s wall on a 2-core AMD EPYC CPU (AVX2; jax 0.10.2), the test suite sharing the cores
for about half of it; the weight maps are computed on the host, so a step takes ~1.2 s there.
Hold-out slices 25–29 scored as the challenge scores (docs/results.md): pixel error 0.0473
(t = 0.9), foreground-restricted Rand error 0.0610 (t = 0.8), warping error 0.00130 (t = 0.3),
V_rand / V_info (thinned) 0.9768 / 0.9831; at the argmax: pixel error 0.1154, Rand error
0.2273, membrane IoU 0.6181 (its membranes are drawn thick, which the threshold undoes).

small: a narrow padded network with BatchNorm (the milesial preset, 16 … 256, 1.9M
parameters) on 256×256 tiles, batch 4, Adam for 1,500 steps, plain cross-entropy (see the
comment at the variant for why). Last run (small): 23 min 24 s wall on a 2-core AMD EPYC CPU
(jax 0.10.2); hold-out slices 25–29, whole-slice overlap-tile prediction, at the argmax: pixel
error 0.0768, Rand error 0.1713, membrane IoU 0.6745. A re-run scored both ways
(docs/results.md): as the challenge scores, pixel error 0.0480, Rand error 0.0843, warping
error 0.00157, V_rand and V_info (thinned) 0.978 and 0.982; at the argmax 0.0770, 0.1503
and membrane IoU 0.6742.
"""

import os
import pathlib

import ml_collections

_REPO = pathlib.Path(__file__).resolve().parents[1]
_BESIDE_REPO = _REPO.parent / "shared" / "data" / "isbi2012"


def default_data_dir() -> str:
  """$UNET_JAX_ISBI_DIR, else ../shared/data/isbi2012 beside the repository, else ""."""
  return os.environ.get("UNET_JAX_ISBI_DIR") or (
      str(_BESIDE_REPO) if _BESIDE_REPO.is_dir() else "")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  variants = {v for v in variant.split(",") if v}
  if variants - {"cpu", "small", "tiny"}:
    raise ValueError(f"unknown variant(s) {sorted(variants - {'cpu', 'small', 'tiny'})} of "
                     f"configs/isbi2012.py; known: cpu, small, tiny")
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.preset = "paper"  # every convolution unpadded: 572×572 → 388×388
  config.model.in_channels = 1
  config.model.num_classes = 2
  config.model.features = (64, 128, 256, 512, 1024)
  config.model.dropout = 0.5
  config.model.remat = False
  config.model.dtype = "float32"  # "bfloat16": bf16 compute, fp32 parameters
  # None: softmax; "sigmoid" for a binary (num_classes=1) or multi-label model (unet_jax.heads)
  config.model.activation = ml_collections.config_dict.placeholder(str)

  config.data = ml_collections.ConfigDict()
  config.data.source = "isbi2012"
  config.data.isbi2012 = ml_collections.ConfigDict(dict(
      dir=default_data_dir(), file_format="auto",  # "png", "tiff" or "auto"
      train_slices=(0, 25), val_slices=(25, 30)))  # half-open slice ranges
  config.data.seed = 0
  config.data.channels = 1
  config.data.class_names = ("membrane", "cell")
  config.data.tile_size = (572, 572)  # a valid input of the model: see unet_jax.geometry
  config.data.augment = ml_collections.ConfigDict(dict(
      flip=True, rotate=True, shift=0, elastic=True, elastic_sigma=10.0, elastic_grid=3,
      brightness=0.1, contrast=0.1))
  config.data.weight_map = ml_collections.ConfigDict(
      dict(enabled=True, w0=10.0, sigma=5.0, foreground=1))
  config.data.num_threads = 2
  config.data.num_workers = 4  # processes preparing tiles; 0 = threads only
  config.data.prefetch = 8

  config.loss = ml_collections.ConfigDict(dict(name="cross_entropy", ce_weight=1.0,
                                               dice_weight=1.0))
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.01, schedule="constant", warmup_steps=0, momentum=0.99,
      weight_decay=0.0, grad_clip_norm=1.0))

  config.batch_size = 1  # global; one large tile per step, as in the paper
  config.num_steps = 20_000
  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint = ml_collections.ConfigDict(dict(
      every=1000, max_to_keep=2, keep_best=1, best_metric="iou_membrane", best_mode="max",
      restore_step=ml_collections.config_dict.placeholder(int)))  # None: the latest, if any

  if "cpu" in variants:
    variants |= {"small"}
  if "small" in variants:
    # Half an hour on a 2-core CPU: a narrow padded network with BatchNorm (every output pixel
    # is computed once, and BatchNorm lets Adam converge in ~1,500 steps), 256×256 tiles, and
    # the plain cross-entropy: the border weight map trades pixel error for separated cells,
    # and this budget is judged on pixel error first.
    config.model.preset = "milesial"
    config.model.features = (16, 32, 64, 128, 256)
    config.model.dropout = 0.0
    config.data.tile_size = (256, 256)
    config.data.weight_map.enabled = False
    config.data.num_threads = 1
    config.data.num_workers = 0
    config.data.prefetch = 4
    config.optimizer.update(name="adam", learning_rate=2e-3, schedule="warmup_cosine",
                            warmup_steps=100, grad_clip_norm=1.0)
    config.batch_size = 4
    config.num_steps = 1500
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint.every = 500
  if "cpu" in variants:
    # The border weight map separates touching cells (the Rand error) at the cost of thicker
    # membranes, which the challenge's threshold sweep takes back; it needs the longer run.
    config.data.weight_map.enabled = True
    config.num_steps = 2500
  if "tiny" in variants:
    config.model.features = (4, 8, 16)
    config.model.dropout = 0.0
    config.data.tile_size = (76, 76)  # → 36×36
    config.data.num_threads = 1
    config.data.num_workers = 0
    config.optimizer.update(name="adam", learning_rate=1e-3, schedule="constant")
    config.batch_size, config.num_steps = 8, 2
    config.log_every, config.eval_every = 1, 2
    config.checkpoint.every = 2
  return config
