r"""Oxford-IIIT Pet segmentation (Parkhi et al. 2012) from TFDS: RGB photos, 3 classes.

Command:  python train.py --config=configs/oxford_pets.py --workdir=runs/oxford_pets
Variant:  --config=configs/oxford_pets.py:tiny   a seconds-long smoke run (used by the tests,
          on TFDS's mock data)

Prepare the data once (needs TensorFlow and a download of about 800 MB; training itself reads
the prepared files with numpy only and never downloads):

  pip install -e ".[tf]"
  python -c "import tensorflow_datasets as tfds; tfds.data_source('oxford_iiit_pet')"

(add data_dir='DIR' there and --config.data.tfds.data_dir=DIR here to keep it elsewhere than
$TFDS_DATA_DIR or ~/tensorflow_datasets).

Classes: the trimap's 1 = pet, 2 = background, 3 = border become 0 = background, 1 = pet,
2 = border (data.tfds.mask_values = (2, 1, 3), the preset in unet_jax/data/tfds_source.py);
for pet vs background only, set --config.model.num_classes=2,
--config.data.tfds.mask_values="(2, 1)", --config.data.tfds.ignore_values="(3,)" and
--config.data.class_names="('background', 'pet')".

Model: padded convolutions with BatchNorm (the "milesial" preset), so 256×256 tiles give
256×256 outputs; the photos (about 500×375) are tiled, not resized. Validation: the first
500 images of the test split, every pixel of them (tiles covering each image).
Hardware and time: meant for one GPU (3,680 training images, 8,000 steps of 16 tiles); it has
not been run yet. On a 2-core CPU one step takes seconds: use it for a look, not a result.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  variants = {v for v in variant.split(",") if v}
  if variants - {"tiny"}:
    raise ValueError(f"unknown variant(s) {sorted(variants - {'tiny'})} of "
                     f"configs/oxford_pets.py; known: tiny")
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.preset = "milesial"
  config.model.in_channels = 3
  config.model.num_classes = 3
  config.model.features = (32, 64, 128, 256, 512)
  config.model.dropout = 0.0
  config.model.remat = False
  config.model.dtype = "float32"  # "bfloat16" on GPUs and TPUs
  # None: softmax; "sigmoid" for a binary (num_classes=1) or multi-label model (unet_jax.heads)
  config.model.activation = ml_collections.config_dict.placeholder(str)

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"
  config.data.tfds = ml_collections.ConfigDict(dict(
      name="oxford_iiit_pet",
      data_dir="",            # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
      train_split="train", val_split="test[:500]",
      image_key="", mask_key="",  # "" = the preset's: "image", "segmentation_mask"
      mask_values=(2, 1, 3),  # trimap value of class 0 (background), 1 (pet), 2 (border)
      ignore_values=()))
  config.data.seed = 0
  config.data.channels = 3
  config.data.class_names = ("background", "pet", "border")
  config.data.tile_size = (256, 256)
  config.data.augment = ml_collections.ConfigDict(dict(
      flip=True, rotate=False, shift=16, elastic=True, elastic_sigma=10.0, elastic_grid=3,
      brightness=0.1, contrast=0.1))  # photos have an "up": mirror, do not rotate
  config.data.weight_map = ml_collections.ConfigDict(
      dict(enabled=False, w0=10.0, sigma=5.0, foreground=1))
  config.data.num_threads = 4
  config.data.num_workers = 4  # processes decoding and augmenting; 0 = threads only
  config.data.prefetch = 8

  config.loss = ml_collections.ConfigDict(dict(name="dice_ce", ce_weight=1.0, dice_weight=1.0))
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=500,
      momentum=0.9, weight_decay=1e-4, grad_clip_norm=1.0))

  config.batch_size = 16
  config.num_steps = 8000
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint = ml_collections.ConfigDict(dict(
      every=1000, max_to_keep=2, keep_best=1, best_metric="iou_pet", best_mode="max",
      restore_step=ml_collections.config_dict.placeholder(int)))  # None: the latest, if any

  if "tiny" in variants:
    config.model.features = (4, 8, 16)
    config.data.tile_size = (32, 32)
    config.data.num_threads = 1
    config.data.num_workers = 0
    config.batch_size, config.num_steps = 8, 2
    config.log_every, config.eval_every = 1, 2
    config.checkpoint.every = 2
  return config
