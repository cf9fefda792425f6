"""lightning_compress: knowledge distillation, pruning and quantization for the PyTorch Lightning Trainer."""

from lightning_compress.distillation.module import DistillationModule
from lightning_compress.distillation.mutual import MutualLearningModule
from lightning_compress.distillation.self_distillation import SelfDistillationModule
from lightning_compress.pruning.dynamic_callback import DynamicChannelPruning
from lightning_compress.pruning.filter_callback import FilterPruning
from lightning_compress.pruning.layer_callback import LayerPruning
from lightning_compress.pruning.magnitude_callback import MagnitudePruning
from lightning_compress.quantization.callbacks import PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.quantization.export_callback import Int8Export
from lightning_compress.report import CompressionReport

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "DistillationModule",
    "DynamicChannelPruning",
    "FilterPruning",
    "Int8Export",
    "LayerPruning",
    "MagnitudePruning",
    "MutualLearningModule",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "SelfDistillationModule",
    "__version__",
]
