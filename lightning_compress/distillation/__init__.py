"""Knowledge distillation for the Lightning Trainer.

- :mod:`~lightning_compress.distillation.losses`: the pure loss functions (no Lightning).
- :mod:`~lightning_compress.distillation.features`: forward-hook taps on named layers and the layer-pair check.
- :class:`DistillationModule`: offline (one or several frozen teachers; response, feature and relation knowledge).
- :class:`MutualLearningModule`: online (Deep Mutual Learning peers).
- :class:`SelfDistillationModule`: self-distillation (Be Your Own Teacher exit heads).
- :func:`slim_copy`, :func:`born_again`: students built from a reference model.
"""

from lightning_compress.distillation import losses
from lightning_compress.distillation.adversarial import AdversarialDistillationModule
from lightning_compress.distillation.checkpoints import load_network_weights
from lightning_compress.distillation.cross_modal import CrossModalDistillationModule
from lightning_compress.distillation.data_free import SyntheticDataModule
from lightning_compress.distillation.deep_inversion import synthesize
from lightning_compress.distillation.features import FeatureTaps, LayerPair, check_layer_pairs, inspect_layer_pairs
from lightning_compress.distillation.graph import GraphDistillationModule
from lightning_compress.distillation.lifelong import LwFModule, TaskSplitDataModule, TwoHeadNetwork, lwf_loss
from lightning_compress.distillation.module import DistillationModule
from lightning_compress.distillation.mutual import MutualLearningModule
from lightning_compress.distillation.quantized import quantized_distillation, quantized_teacher
from lightning_compress.distillation.search import pareto_front, search_students
from lightning_compress.distillation.self_distillation import ExitHead, SelfDistillationModule
from lightning_compress.distillation.students import born_again, reinitialize, slim_copy

__all__ = [
    "AdversarialDistillationModule",
    "CrossModalDistillationModule",
    "DistillationModule",
    "ExitHead",
    "FeatureTaps",
    "GraphDistillationModule",
    "LayerPair",
    "LwFModule",
    "MutualLearningModule",
    "SelfDistillationModule",
    "SyntheticDataModule",
    "TaskSplitDataModule",
    "TwoHeadNetwork",
    "born_again",
    "check_layer_pairs",
    "inspect_layer_pairs",
    "load_network_weights",
    "losses",
    "lwf_loss",
    "pareto_front",
    "quantized_distillation",
    "quantized_teacher",
    "reinitialize",
    "search_students",
    "slim_copy",
    "synthesize",
]
