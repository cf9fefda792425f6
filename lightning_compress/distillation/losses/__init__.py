"""Pure distillation losses (no Lightning): the public import place ``lightning_compress.distillation.losses``.

Response: :func:`soft_target_loss`, :func:`hard_target_loss`, :func:`multi_teacher_soft_target_loss`,
:func:`distillation_loss`. Features: :func:`hint_loss` with :class:`HintRegressor`, :func:`attention_map`,
:func:`attention_loss`, :func:`fsp_matrix`, :func:`fsp_loss`. Relations and structure:
:func:`similarity_preserving_loss`, :func:`rkd_distance_loss`, :func:`rkd_angle_loss`,
:func:`pairwise_similarity_loss`. Online and self: :func:`mutual_learning_loss`, :func:`be_your_own_teacher_loss`,
:func:`be_your_own_teacher_terms`. Adversarial: :func:`discriminator_loss`, :func:`generator_loss`,
:func:`gradient_penalty`, :func:`discriminator_accuracy`. Transformers: :func:`hidden_state_loss` with
:class:`HiddenProjection`, :func:`attention_distribution_loss`, :func:`value_relation_loss`, :func:`layer_mapping`.
"""

from lightning_compress.distillation.losses.adversarial import (
    discriminator_accuracy,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)
from lightning_compress.distillation.losses.feature import (
    HintRegressor,
    attention_loss,
    attention_map,
    fsp_loss,
    fsp_matrix,
    hint_loss,
    hint_regressors_from_state,
)
from lightning_compress.distillation.losses.online import (
    be_your_own_teacher_loss,
    be_your_own_teacher_terms,
    mutual_learning_loss,
)
from lightning_compress.distillation.losses.relation import (
    batch_similarity,
    pairwise_similarity_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
    spatial_similarity,
)
from lightning_compress.distillation.losses.response import (
    distillation_loss,
    hard_target_loss,
    multi_teacher_soft_target_loss,
    soft_target_loss,
)
from lightning_compress.distillation.losses.transformer import (
    HiddenProjection,
    attention_distribution_loss,
    hidden_state_loss,
    layer_mapping,
    value_relation,
    value_relation_loss,
)

__all__ = [
    "HiddenProjection",
    "HintRegressor",
    "attention_distribution_loss",
    "attention_loss",
    "attention_map",
    "batch_similarity",
    "be_your_own_teacher_loss",
    "be_your_own_teacher_terms",
    "discriminator_accuracy",
    "discriminator_loss",
    "distillation_loss",
    "fsp_loss",
    "fsp_matrix",
    "generator_loss",
    "gradient_penalty",
    "hard_target_loss",
    "hidden_state_loss",
    "hint_loss",
    "hint_regressors_from_state",
    "layer_mapping",
    "multi_teacher_soft_target_loss",
    "mutual_learning_loss",
    "pairwise_similarity_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
    "soft_target_loss",
    "spatial_similarity",
    "value_relation",
    "value_relation_loss",
]
