"""What a U-Net's logits mean: one softmax over the classes, or one sigmoid per channel.

A model's ``activation`` (``UNet(activation=...)``, carried in every config and checkpoint)
says how its ``C`` output channels become probabilities and decisions. Everything that turns
logits into a probability or a class reads it from here: the losses, the metrics, the train
and eval steps, prediction (masks, probability files, test-time augmentation, blending) and
evaluation.

=================  =====================  ==========================  =====================
kind               ``activation``, ``C``  probabilities               a pixel's decision
=================  =====================  ==========================  =====================
multi-class        softmax, C ≥ 2         ``softmax`` over channels   the argmax class
binary             sigmoid, C = 1         ``sigmoid`` (foreground)    class 1 where p > 0.5
multi-label        sigmoid, C ≥ 2         ``sigmoid`` per channel     class c where p_c > 0.5
=================  =====================  ==========================  =====================

Labels are integer maps ``[..., H, W]`` for all three, so the data pipeline (crops, flips,
elastic warps, the ignore value) treats them alike: a class id for multi-class, 0/1 for binary,
and for multi-label the classes a pixel belongs to as bits, ``sum(2**c)`` (``pack`` and
``unpack``; up to 30 classes).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Activation = Literal["softmax", "sigmoid"]
ACTIVATIONS = ("softmax", "sigmoid")
MAX_LABELS = 30  # multi-label classes that fit the bits of an int32 label


def resolve(activation: str | None, num_classes: int) -> str:
  """``activation``, or the usual one for ``num_classes`` when ``None`` (sigmoid for one
  class, softmax otherwise); ``ValueError`` for combinations that mean nothing."""
  if activation is None:
    return "sigmoid" if num_classes == 1 else "softmax"
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS} (or None to choose from the "
                     f"number of classes), got {activation!r}")
  if activation == "softmax" and num_classes == 1:
    raise ValueError("a softmax over one output channel is always 1: a one-class model is "
                     "binary and needs activation='sigmoid' (or None)")
  if activation == "sigmoid" and num_classes > MAX_LABELS:
    raise ValueError(f"a multi-label model has at most {MAX_LABELS} classes (one bit each "
                     f"in an int32 label), got {num_classes}")
  return activation


def is_multilabel(activation: str, num_classes: int) -> bool:
  return activation == "sigmoid" and num_classes > 1


def metric_classes(activation: str, num_classes: int) -> int:
  """Classes of a pixel's decision, as metrics count them: a binary model decides between
  background (0) and foreground (1); multi-label models are scored per class."""
  return 2 if activation == "sigmoid" and num_classes == 1 else num_classes


def label_limit(activation: str, num_classes: int) -> int:
  """Valid labels (ignore value aside) lie in ``[0, label_limit)``."""
  if is_multilabel(activation, num_classes):
    return 2**num_classes
  return metric_classes(activation, num_classes)


def probabilities(logits: jax.Array, activation: str) -> jax.Array:
  """``[..., C]`` probabilities of ``[..., C]`` logits."""
  if activation == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  return jax.nn.sigmoid(logits)


def targets(labels: jax.Array, num_classes: int, activation: str, dtype=jnp.float32
            ) -> jax.Array:
  """``[..., H, W, C]`` 0/1 targets, channel for channel with the logits, of valid labels."""
  labels = labels.astype(jnp.int32)
  if activation == "softmax":
    return jax.nn.one_hot(labels, num_classes, dtype=dtype)
  if num_classes == 1:
    return (labels == 1).astype(dtype)[..., None]
  return unpack(labels, num_classes).astype(dtype)


def decide(probs, activation: str, *, threshold: float = 0.5):
  """A pixel's decision from ``[..., C]`` probabilities (jax or numpy): ``[...]`` class ids
  for multi-class and binary models, ``[..., C]`` booleans for multi-label ones."""
  xp = jnp if isinstance(probs, jax.Array) else np
  if activation == "softmax":
    return xp.argmax(probs, axis=-1).astype(xp.int32)
  if probs.shape[-1] == 1:
    return (probs[..., 0] > threshold).astype(xp.int32)
  return probs > threshold


def pack(masks) -> np.ndarray:
  """``[..., C]`` booleans → ``[...]`` int32 labels with bit ``c`` set for class ``c``."""
  masks = np.asarray(masks).astype(bool)
  if masks.shape[-1] > MAX_LABELS:
    raise ValueError(f"at most {MAX_LABELS} multi-label classes, got {masks.shape[-1]}")
  bits = (1 << np.arange(masks.shape[-1], dtype=np.int64))
  return (masks * bits).sum(axis=-1).astype(np.int32)


def unpack(labels, num_classes: int):
  """``[...]`` int labels → ``[..., C]`` booleans (jax or numpy, as given)."""
  xp = jnp if isinstance(labels, jax.Array) else np
  bits = xp.arange(num_classes, dtype=xp.int32)
  return ((labels[..., None].astype(xp.int32) >> bits) & 1).astype(bool)
