r"""Volumes: the 3-D U-Net (Çiçek et al., MICCAI 2016) on synthetic cells, or on your volumes.

Command:  python train.py --config=configs/volume.py:cpu --workdir=workdir/volume
          a small padded 3-D U-Net on synthetic cell volumes (unet_jax.data.synthetic3d), on a
          CPU. Last run (2-core AVX2 CPU, jax 0.10.2): cell IoU 0.945, foreground Dice 0.972,
          voxel error 0.043 on the 4 validation volumes after 200 steps, 7 min 48 s wall
          with compilation.
Variant:  --config=configs/volume.py          the paper's network (preset cicek3d: 3×3×3
          unpadded convolutions, BatchNorm, 2×2×2 pooling, 132×132×116 → 44×44×28 tiles) on the
          same synthetic volumes, for GPUs: tiles (116, 132, 132) (depth, height, width),
          weighted cross-entropy with the background down-weighted, the paper's augmentation
          (a smooth deformation on a 32-voxel grid with σ = 4 voxels, flips, in-plane 90°
          turns, grey-value changes). Its optimiser and number of steps are ours, not the
          paper's. Not measured yet on a GPU.
Variant:  :sparse   trains on every 4th depth slice's labels only (data.sparse_labels), the
          paper's sparse annotation; validation stays dense.
Variant:  :folder   your volumes: --config.data.volumes.dir=DIR with DIR/images/NAME.{tif,
          nii.gz,npy} and DIR/labels/NAME.* (unet_jax.data.volumes; needs
          pip install "unet-jax[volumes]" for NIfTI). Set --config.model.in_channels,
          --config.model.num_classes and --config.data.class_names to your data.
Variants combine: --config=configs/volume.py:cpu,sparse.

The synthetic volumes are a 3-D tissue: Voronoi cells packed edge to edge with dark membranes
between them; label 1 = cell interior (the foreground), 0 = membrane.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  variants = set(filter(None, variant.split(",")))
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.preset = "cicek3d"
  config.model.spatial_dims = 3
  config.model.in_channels = 1
  config.model.num_classes = 2
  config.model.features = (64, 128, 256, 512)  # the paper's 32 → 64, ..., 256 → 512
  config.model.dropout = 0.0
  config.model.remat = False
  config.model.dtype = "float32"  # "bfloat16": bf16 compute, fp32 parameters
  config.model.activation = ml_collections.config_dict.placeholder(str)

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic3d"
  config.data.seed = 0
  config.data.channels = 1
  config.data.synthetic3d = ml_collections.ConfigDict(dict(
      num_train=64, num_val=4, size=(116, 160, 160), seed=0, cell_size=22.0))
  config.data.class_names = ("membrane", "cell")
  config.data.tile_size = (116, 132, 132)  # (depth, height, width) → (28, 44, 44)
  config.data.augment = ml_collections.ConfigDict(dict(
      flip=True, rotate=True, shift=0, elastic=True, elastic_sigma=4.0, elastic_grid=3,
      elastic_spacing=32.0, brightness=0.1, contrast=0.1))
  config.data.weight_map = ml_collections.ConfigDict(dict(enabled=False))
  config.data.sparse_labels = ml_collections.ConfigDict(dict(every=0, axis=0, offset=0))
  config.data.cache_mb = 4096  # whole synthetic volumes drawn once, kept in memory
  config.data.num_threads = 4
  config.data.prefetch = 4

  # Background (class 0, the membranes here) down-weighted, as Çiçek et al. do.
  config.loss = ml_collections.ConfigDict(dict(name="cross_entropy", ce_weight=1.0,
                                               dice_weight=1.0, class_weights=(0.5, 1.0)))
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=200,
      momentum=0.99, weight_decay=1e-4, grad_clip_norm=1.0))

  config.batch_size = 8  # global: split over every device of every host
  config.num_steps = 20_000
  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint = ml_collections.ConfigDict(dict(
      every=1000, max_to_keep=2, keep_best=1, best_metric="iou_cell", best_mode="max",
      restore_step=ml_collections.config_dict.placeholder(int)))

  if "cpu" in variants:
    config.model.preset = "milesial"  # padded: the output is the whole tile
    config.model.features = (8, 16, 32)
    config.model.upsample = "transpose"
    config.data.synthetic3d.size = (48, 48, 48)
    config.data.synthetic3d.num_train = 32
    config.data.synthetic3d.num_val = 4
    config.data.tile_size = (32, 32, 32)
    config.data.augment.elastic = False
    config.data.num_threads = 2
    config.loss.class_weights = None
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 20
    config.batch_size = 4
    config.num_steps = 200
    config.log_every = 25
    config.eval_every = 100
    config.checkpoint.every = 100
  if "sparse" in variants:
    config.data.sparse_labels.every = 4
  if "folder" in variants:
    config.data.source = "volumes"
    config.data.volumes = ml_collections.ConfigDict(dict(
        dir=ml_collections.config_dict.placeholder(str), images="images", labels="labels",
        mask_values=None, ignore_values=(), val_dir=None, val_fraction=0.2, split_seed=0,
        intensity="auto"))
  unknown = variants - {"cpu", "sparse", "folder"}
  if unknown:
    raise ValueError(f"unknown variant(s) {sorted(unknown)} of configs/volume.py; known: cpu, "
                     f"sparse, folder")
  return config
