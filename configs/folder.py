r"""Your own data: a folder of images and masks. Copy this file and edit it.

Command:  python train.py --config=configs/folder.py --config.data.folder.dir=DIR --workdir=runs/own
Variant:  --config=configs/folder.py:tiny   a seconds-long smoke run (used by the tests)
Hardware and time: as written (a 16 … 256 padded U-Net on 256×256 RGB tiles, batch 8), a
step took 3.2 s on a 2-core CPU busy with other jobs (benchmarks/pipeline_throughput.py), so
2,000 steps take one to two hours there; a GPU does a step in milliseconds. The result
depends on your data: this template has been run on test data only.

Layout (see unet_jax/data/folder.py for every rule):

  DIR/images/NAME.png|jpg|tif|…   any size; grey, RGB or RGBA (→ data.channels)
  DIR/masks/NAME.png|tif|…        one value per pixel: {0, 255}, palette indices or classes

Set for your data:
* data.folder.mask_values: entry k is the mask value (or a tuple of values) of class k. The
  default (0, 255) reads binary masks: 0 → class 0, 255 → class 1. A palette or integer mask
  with classes 0 … 3 is (0, 1, 2, 3); (0, (1, 2)) merges values 1 and 2 into class 1.
* data.folder.ignore_values: mask values that no loss or metric counts (e.g. (255,) for
  VOC-style "void" borders).
* data.class_names (one per class) and model.num_classes, which must agree with mask_values.
* multi-label data (classes that overlap): model.activation="sigmoid", and
  data.folder.class_masks=('cell','organelle'), one folder of binary masks per class:
  DIR/masks/cell/NAME.png, DIR/masks/organelle/NAME.png (see unet_jax/data/folder.py).
* a binary model with one output channel: model.num_classes=1 (a sigmoid head, trained with
  BCE or BCE + Dice); its masks are 0/255 or 0/1, read with mask_values=(0, 255) or (0, 1).
* data.channels and model.in_channels: 1 for grey, 3 for colour images.
* validation: a fraction of the pairs (data.folder.val_fraction, a fixed split_seed) or a
  second folder with the same layout (data.folder.val_dir).
* data.tile_size: a valid input size of the model (unet_jax.geometry); with the padded
  "milesial" preset any multiple of 16 works, and smaller images are padded, not resized.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  variants = {v for v in variant.split(",") if v}
  if variants - {"tiny"}:
    raise ValueError(f"unknown variant(s) {sorted(variants - {'tiny'})} of configs/folder.py; "
                     f"known: tiny")
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.preset = "milesial"  # padded convolutions + BatchNorm: output = input size
  config.model.in_channels = 3
  config.model.num_classes = 2
  config.model.features = (16, 32, 64, 128, 256)
  config.model.dropout = 0.0
  config.model.remat = False
  config.model.dtype = "float32"  # "bfloat16": bf16 compute, fp32 parameters
  # None: softmax; "sigmoid" for a binary (num_classes=1) or multi-label model (unet_jax.heads)
  config.model.activation = ml_collections.config_dict.placeholder(str)

  config.data = ml_collections.ConfigDict()
  config.data.source = "folder"
  config.data.folder = ml_collections.ConfigDict(dict(
      dir="",                 # holds images/ and masks/
      images="images", masks="masks",
      mask_suffix="",         # e.g. "_mask" when a.png's mask is a_mask.png
      mask_values=(0, 255),   # entry k: the mask value(s) of class k
      class_masks=(),         # multi-label: class names, one mask folder DIR/masks/<class> each
      ignore_values=(),       # mask values that become IGNORE
      val_dir="",             # a separate validation folder; "" = hold out val_fraction
      val_fraction=0.2,
      split_seed=0))
  config.data.seed = 0
  config.data.channels = 3
  config.data.class_names = ("background", "foreground")
  config.data.tile_size = (256, 256)
  # Images over this many pixels are refused before decoding; None: 178,956,970 (Pillow's).
  config.data.max_pixels = ml_collections.config_dict.placeholder(int)
  config.data.augment = ml_collections.ConfigDict(dict(
      flip=True, rotate=True, shift=16, elastic=True, elastic_sigma=10.0, elastic_grid=3,
      brightness=0.1, contrast=0.1))
  config.data.weight_map = ml_collections.ConfigDict(
      dict(enabled=False, w0=10.0, sigma=5.0, foreground=1))
  config.data.num_threads = 2
  config.data.num_workers = 0  # processes preparing tiles; 0 = threads only
  config.data.prefetch = 4

  config.loss = ml_collections.ConfigDict(dict(name="dice_ce", ce_weight=1.0, dice_weight=1.0))
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=100,
      momentum=0.9, weight_decay=0.0, grad_clip_norm=1.0))

  config.batch_size = 8
  config.num_steps = 2000
  config.log_every = 50
  config.eval_every = 250
  config.checkpoint = ml_collections.ConfigDict(dict(
      every=250, max_to_keep=2, keep_best=1, best_metric="mean_iou", best_mode="max",
      restore_step=ml_collections.config_dict.placeholder(int)))  # None: the latest, if any

  if "tiny" in variants:
    config.model.features = (4, 8, 16)
    config.data.tile_size = (32, 32)
    config.data.num_threads = 1
    config.batch_size, config.num_steps = 8, 2
    config.log_every, config.eval_every = 1, 2
    config.checkpoint.every = 2
  return config
