"""lightning_compress: knowledge distillation, pruning and quantization for the PyTorch Lightning Trainer.

The floors, bottom up (each imports only the ones below it): ``utils`` (target, data, logging, DDP, checkpoints),
``graph`` (tracing, dependency groups, compaction, layer discovery), ``demo`` (digits data and reference models),
``quantization``, ``export`` (int8 and its checks), ``measure``, ``pruning``, ``distillation``, ``report``,
``references``, ``cli``. See the README's "Architecture" section.
"""

from lightning_compress import _compat

_compat.install()  # old module paths (before the graph / export split) keep importing, with a deprecation warning

# ruff: noqa: E402

from lightning_compress.distillation.methods.mutual import MutualLearningModule
from lightning_compress.distillation.methods.self_distillation import SelfDistillationModule
from lightning_compress.distillation.module import DistillationModule
from lightning_compress.export.int8_callback import Int8Export
from lightning_compress.export.onnx import export_onnx, export_program
from lightning_compress.export.onnx_callback import OnnxExport
from lightning_compress.loading import load_compressed
from lightning_compress.pruning.dynamic_callback import DynamicChannelPruning
from lightning_compress.pruning.filter_callback import FilterPruning
from lightning_compress.pruning.head_callback import HeadPruning
from lightning_compress.pruning.layer_callback import LayerPruning
from lightning_compress.pruning.magnitude_callback import MagnitudePruning
from lightning_compress.quantization.qat_callback import PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.report import CompressionReport

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "DistillationModule",
    "DynamicChannelPruning",
    "FilterPruning",
    "HeadPruning",
    "Int8Export",
    "LayerPruning",
    "MagnitudePruning",
    "MutualLearningModule",
    "OnnxExport",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "SelfDistillationModule",
    "__version__",
    "export_onnx",
    "export_program",
    "load_compressed",
]
