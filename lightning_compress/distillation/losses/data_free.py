"""Data-free knowledge (DeepInversion, Yin et al., CVPR 2020), pure functions: the BatchNorm-statistics loss that
makes synthetic inputs look like the teacher's training data to the teacher, the total-variation image prior, the
Adaptive DeepInversion competition term, and the hooks that read every BatchNorm's input statistics."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

__all__ = ["BNStatisticsHooks", "bn_statistics_loss", "competition_loss", "total_variation"]


def bn_statistics_loss(
    features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    """DeepInversion's feature-distribution term for one BatchNorm layer.

    ``||mean(features) - running_mean||_2 + ||var(features) - running_var||_2`` with the mean and the biased
    variance taken per channel (dimension 1) over the batch and every spatial position, as BatchNorm computes them.

    Args:
        features: the BatchNorm layer's input, ``(B, C, *)`` with at least 2 values per channel.
        running_mean: the layer's ``running_mean``, ``(C,)``.
        running_var: the layer's ``running_var``, ``(C,)``.

    Raises:
        ValueError: for fewer than 2 dimensions, a channel count other than the statistics', or a single value per
            channel.

    >>> x = torch.tensor([[[1.0]], [[3.0]]])  # (B=2, C=1, L=1): mean 2, variance 1
    >>> bn_statistics_loss(x, torch.tensor([2.0]), torch.tensor([1.0]))
    tensor(0.)
    >>> bn_statistics_loss(x, torch.tensor([0.0]), torch.tensor([4.0]))
    tensor(5.)
    """
    if features.dim() < 2:
        raise ValueError(f"features must be (batch, channels, ...), got shape {tuple(features.shape)}.")
    channels = features.shape[1]
    if running_mean.shape != (channels,) or running_var.shape != (channels,):
        raise ValueError(
            f"features have {channels} channels but the running statistics have shapes "
            f"{tuple(running_mean.shape)} and {tuple(running_var.shape)}."
        )
    flat = features.transpose(0, 1).reshape(channels, -1)
    if flat.shape[1] < 2:
        raise ValueError(f"batch statistics need at least 2 values per channel, got shape {tuple(features.shape)}.")
    mean = flat.mean(dim=1)
    var = flat.var(dim=1, unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between horizontally and vertically neighbouring pixels of ``(B, C, H, W)`` images
    (the L2 total-variation prior; 0 for a constant image).

    >>> total_variation(torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]))  # horizontal steps of 1, no vertical change
    tensor(1.)
    """
    if images.dim() != 4:
        raise ValueError(f"total_variation needs (batch, channels, height, width) images, got {tuple(images.shape)}.")
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).pow(2).mean() if images.shape[-1] > 1 else 0.0
    vertical = (images[..., 1:, :] - images[..., :-1, :]).pow(2).mean() if images.shape[-2] > 1 else 0.0
    return images.new_tensor(0.0) + horizontal + vertical


def competition_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 3.0
                     ) -> torch.Tensor:
    """Adaptive DeepInversion's competition term: ``1 - JS(p_teacher || p_student)`` at ``temperature``,
    probabilities clamped to [0.01, 0.99] and the divergence to [0, 1] as in the official code. Low when the
    student disagrees with the teacher, so minimising it drives the synthesis towards such inputs.

    >>> logits = torch.tensor([[4.0, 0.0]])
    >>> competition_loss(logits, logits)
    tensor(1.)
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher and student logits must have the same shape, got {tuple(teacher_logits.shape)} and "
            f"{tuple(student_logits.shape)}."
        )
    p = F.softmax(teacher_logits / temperature, dim=1)
    q = F.softmax(student_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")
    return 1.0 - js.clamp(0.0, 1.0)


class BNStatisticsHooks:
    """Forward hooks on every BatchNorm layer of ``model`` (with running statistics) that compute
    :func:`bn_statistics_loss` of the layer's input during each forward; removable, usable as a context manager.

    ``losses`` holds one term per hooked layer, in forward order, for the last forward (:meth:`clear` empties it).

    Raises:
        ValueError: when ``model`` has no BatchNorm layer that tracks running statistics.

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    >>> with BNStatisticsHooks(net.eval()) as hooks:
    ...     _ = net(torch.randn(4, 1, 5, 5))
    ...     hooks.names, len(hooks.losses)
    (['1'], 1)
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = [name for name, module in model.named_modules()
                      if isinstance(module, _BatchNorm) and module.running_mean is not None]
        if not self.names:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm layer with running statistics; DeepInversion's BN term "
                "needs them (set bn_weight=0 to synthesise from the class target and the priors alone)."
            )
        modules = dict(model.named_modules())
        self.losses: list[torch.Tensor] = []
        self._handles: list[RemovableHandle] = [modules[name].register_forward_hook(self._hook) for name in self.names]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        self.losses.append(bn_statistics_loss(inputs[0], module.running_mean, module.running_var))  # type: ignore

    def weighted_sum(self, first_weight: float = 1.0) -> torch.Tensor:
        """Sum of the collected terms, the first (in forward order) multiplied by ``first_weight``."""
        if not self.losses:
            raise RuntimeError("No BatchNorm term was collected: run a forward pass of the hooked model first.")
        return first_weight * self.losses[0] + sum(self.losses[1:], torch.zeros_like(self.losses[0]))

    def clear(self) -> None:
        self.losses = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> BNStatisticsHooks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.remove()


