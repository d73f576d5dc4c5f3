"""Inference: overlap-tile prediction (``predict``), evaluation against masks (``evaluate``),
image reading and writing (``images``)."""
