"""Interoperability: PyTorch checkpoints (``pth``: reading ``.pth`` files without running
their code; ``convert``: to and from Flax), export (``export``: StableHLO and ONNX) and
Hub-style folders (``hub``: ``config.json`` + ``model.safetensors``)."""
