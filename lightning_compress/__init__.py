"""lightning_compress: knowledge distillation, pruning and quantization for the PyTorch Lightning Trainer."""

from lightning_compress.report import CompressionReport

__version__ = "0.1.0"

__all__ = ["CompressionReport", "__version__"]
