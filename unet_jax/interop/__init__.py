"""Interoperability: PyTorch checkpoints (``pth``: reading ``.pth`` files without running
their code; ``convert``: to and from Flax)."""
