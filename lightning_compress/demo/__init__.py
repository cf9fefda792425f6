"""The embedded defaults: handwritten digits, the harder shapes workload, reference models and a classifier module."""

from lightning_compress.demo.data import DigitsDataModule, EpochSeededSampler
from lightning_compress.demo.models import MLP, BasicBlock, PlainCNN, ResidualCNN
from lightning_compress.demo.module import ClassifierModule
from lightning_compress.demo.shapes import ShapesDataModule

__all__ = ["MLP", "BasicBlock", "ClassifierModule", "DigitsDataModule", "EpochSeededSampler", "PlainCNN",
           "ResidualCNN", "ShapesDataModule"]
