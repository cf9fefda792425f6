"""Knowledge distillation for the Lightning Trainer.

- :mod:`~lightning_compress.distillation.losses`: the knowledge, one module per kind (no Lightning): ``response``
  (soft and hard targets), ``feature`` (FitNets hints, attention, FSP), ``relation`` (similarity, RKD, pairwise),
  ``graph``, ``online`` (mutual learning), ``adversarial``, ``cross_modal``, ``data_free`` (DeepInversion terms);
- :class:`DistillationModule` (``module.py``, over ``base.py``): offline distillation from one or several frozen
  teachers; its public override points (``check_and_build``, ``active_terms``, ``compute_terms``, ``combine``,
  ``teacher_forward``, ``split_modalities``) are what the methods extend;
- :mod:`~lightning_compress.distillation.methods`: one module per method (mutual, self, adversarial, cross-modal,
  graph, lifelong, data-free, quantized, search);
- helpers: ``taps`` (forward-hook taps on named layers, the layer-pair check), ``terms`` (which feature terms
  exist, their checks), ``checks`` (argument checks), ``checkpoints`` (loading networks), ``students``
  (:func:`slim_copy`, :func:`born_again`).
"""

from lightning_compress.distillation import losses
from lightning_compress.distillation.checkpoints import load_network_weights
from lightning_compress.distillation.methods.adversarial import AdversarialDistillationModule
from lightning_compress.distillation.methods.cross_modal import CrossModalDistillationModule
from lightning_compress.distillation.methods.data_free import SyntheticDataModule
from lightning_compress.distillation.methods.deep_inversion import synthesize
from lightning_compress.distillation.methods.graph import GraphDistillationModule
from lightning_compress.distillation.methods.lifelong import LwFModule, TaskSplitDataModule, TwoHeadNetwork, lwf_loss
from lightning_compress.distillation.methods.mutual import MutualLearningModule
from lightning_compress.distillation.methods.quantized import quantized_distillation, quantized_teacher
from lightning_compress.distillation.methods.search import pareto_front, search_students
from lightning_compress.distillation.methods.self_distillation import ExitHead, SelfDistillationModule
from lightning_compress.distillation.module import DistillationModule
from lightning_compress.distillation.students import born_again, reinitialize, slim_copy
from lightning_compress.distillation.taps import FeatureTaps, LayerPair, check_layer_pairs, inspect_layer_pairs
from lightning_compress.distillation.transformer import TransformerKnowledge

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
    "TransformerKnowledge",
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
