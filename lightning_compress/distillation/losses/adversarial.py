"""Adversarial distillation losses (pure functions, no Lightning): discriminator and generator losses (binary
cross-entropy or Wasserstein), the WGAN-GP gradient penalty, discriminator accuracy, pooled features, and a small
discriminator network. :class:`~lightning_compress.distillation.methods.adversarial.AdversarialDistillationModule`
uses them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

ADVERSARIAL_LOSSES = ("bce", "wasserstein")



def _check_loss(kind: str) -> None:
    if kind not in ADVERSARIAL_LOSSES:
        raise ValueError(f"adversarial_loss must be one of {ADVERSARIAL_LOSSES}, got {kind!r}.")


def discriminator_loss(teacher_scores: torch.Tensor, student_scores: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """What the discriminator minimises, from its scores ``(B,)`` on teacher ("real") and student ("fake") outputs.

    ``"bce"`` (Goodfellow et al. 2014): ``mean(softplus(-d_t)) + mean(softplus(d_s))``, the cross-entropy of
    calling teacher outputs 1 and student outputs 0 (scores are logits). ``"wasserstein"`` (Arjovsky et al. 2017,
    as the holistic loss of Liu et al. 2019): ``mean(d_s) - mean(d_t)``, the negated Wasserstein estimate; add
    :func:`gradient_penalty` to keep the critic 1-Lipschitz.

    >>> discriminator_loss(torch.zeros(2), torch.zeros(2))  # 2 ln 2: a discriminator that cannot tell
    tensor(1.3863)
    >>> discriminator_loss(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.0]), "wasserstein")
    tensor(-2.)
    """
    _check_loss(kind)
    if kind == "bce":
        return F.softplus(-teacher_scores).mean() + F.softplus(student_scores).mean()
    return student_scores.mean() - teacher_scores.mean()


def generator_loss(student_scores: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """What the student (the generator) minimises, from the discriminator's scores ``(B,)`` on its outputs.

    ``"bce"``: the non-saturating ``mean(softplus(-d_s))`` (Goodfellow et al. 2014), the cross-entropy of having
    its outputs called teacher outputs; ``"wasserstein"``: ``-mean(d_s)`` (Liu et al. 2019's holistic loss, up to the
    teacher's term, which does not depend on the student).

    >>> generator_loss(torch.zeros(3))
    tensor(0.6931)
    >>> generator_loss(torch.tensor([-1.0, 0.0]), "wasserstein")
    tensor(0.5000)
    """
    _check_loss(kind)
    if kind == "bce":
        return F.softplus(-student_scores).mean()
    return -student_scores.mean()


def discriminator_accuracy(
    teacher_scores: torch.Tensor, student_scores: torch.Tensor, kind: str = "bce"
) -> torch.Tensor:
    """How well the discriminator tells teacher from student (0.5: chance).

    ``"bce"``: the fraction of the ``2B`` outputs on the right side of 0 (teacher ``> 0``, student ``< 0``).
    ``"wasserstein"`` (a critic has no threshold): the fraction of samples whose teacher output scores above the
    student's output for the same input. A critic ranks well long before the two distributions are far apart, so
    there an accuracy near 1 is common; the Wasserstein estimate (``-discriminator_loss``) says how far they are.

    >>> discriminator_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.0]))
    tensor(0.7500)
    >>> discriminator_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), "wasserstein")
    tensor(0.5000)
    """
    _check_loss(kind)
    if kind == "bce":
        return torch.cat([teacher_scores > 0, student_scores < 0]).float().mean()
    return (teacher_scores > student_scores).float().mean()


def gradient_penalty(
    critic: nn.Module, teacher_inputs: torch.Tensor, student_inputs: torch.Tensor, mix: torch.Tensor
) -> torch.Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017): ``mean((||grad_x critic(x)||_2 - 1)^2)`` at ``x = mix * teacher +
    (1 - mix) * student``, per sample, with ``mix`` of shape ``(B, 1)`` drawn from U(0, 1) by the caller. Built with
    ``create_graph=True`` so that it trains the critic; the inputs should be detached.

    >>> critic = nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
    >>> gradient_penalty(critic, torch.ones(2, 2), torch.zeros(2, 2), torch.rand(2, 1))  # (|(3, 4)| - 1)^2
    tensor(16., grad_fn=<MeanBackward0>)
    """
    if teacher_inputs.shape != student_inputs.shape:
        raise ValueError(
            f"teacher and student inputs of the critic must have the same shape, got {tuple(teacher_inputs.shape)} "
            f"and {tuple(student_inputs.shape)}."
        )
    points = (mix * teacher_inputs + (1 - mix) * student_inputs).requires_grad_(True)
    scores = critic(points)
    (gradients,) = torch.autograd.grad(scores.sum(), points, create_graph=True)
    return (gradients.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def pooled_features(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global average of each ``(B, C, *spatial)`` map (a ``(B, C)`` tensor is kept), concatenated: ``(B, sum C)``.

    >>> pooled_features([torch.ones(2, 3, 4, 4), torch.zeros(2, 5)]).shape
    torch.Size([2, 8])
    """
    return torch.cat([f.flatten(2).mean(dim=2) if f.dim() > 2 else f.flatten(1) for f in features], dim=1)


class Discriminator(nn.Module):
    """A small MLP that scores a ``(B, in_features)`` batch: ``(B,)`` logits (or critic values), high = teacher.

    ``Linear -> LeakyReLU(0.2)`` per hidden width, then ``Linear(., 1)``; no normalisation layers (batch norm
    would couple the samples that the gradient penalty treats one by one).

    Args:
        in_features: width of the input vectors.
        hidden: widths of the hidden layers.

    >>> Discriminator(10, [16])(torch.zeros(4, 10)).shape
    torch.Size([4])
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for out in hidden:
            layers += [nn.Linear(width, out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(1)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s parameters do not require grad (a graph built there gives them no gradient);
    the previous flags are restored on exit."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)
