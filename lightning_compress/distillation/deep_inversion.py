"""DeepInversion (Yin et al., CVPR 2020) without Lightning: the BatchNorm-statistics, total-variation and
competition terms, and ``synthesize``, which optimises inputs from noise until a trained teacher sees its own
statistics and the sampled classes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from lightning_compress.distillation._checks import check_count, check_nonnegative

#: Names of the synthesis terms, as passed to ``on_step`` and logged by :class:`SyntheticDataModule`.

#: Names of the synthesis terms, as passed to ``on_step`` and logged by ``SyntheticDataModule``.
TERMS = ("class", "bn", "tv", "l2", "competition", "total")


# ---------------------------------------------------------------------------------------------------- the terms


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


# ---------------------------------------------------------------------------------------------------- synthesis


def _check_synthesis_arguments(num_samples: int, input_shape: Sequence[int], num_classes: int, steps: int,
                               lr: float, batch_size: int, weights: dict[str, float], jitter: int,
                               input_range: tuple[float, float] | None) -> None:
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 (batch statistics), got {num_samples!r}.")
    if len(input_shape) < 1 or any(int(size) < 1 for size in input_shape):
        raise ValueError(f"input_shape must list positive sizes without the batch dimension, got {input_shape!r}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes!r}.")
    check_count(steps, "steps")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (batch statistics), got {batch_size!r}.")
    for name, value in weights.items():
        check_nonnegative(value, name)
    check_nonnegative(jitter, "jitter")
    if jitter > 0 and len(input_shape) != 3:
        raise ValueError(
            f"jitter shifts images: it needs a (channels, height, width) input_shape, got {input_shape!r}."
        )
    if input_range is not None and not input_range[0] < input_range[1]:
        raise ValueError(f"input_range must be (low, high) with low < high, got {input_range!r}.")


def balanced_labels(num_samples: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``num_samples`` labels cycling through the classes (counts differ by at most one), shuffled.

    >>> balanced_labels(5, 2, torch.Generator().manual_seed(0)).sort().values
    tensor([0, 0, 0, 1, 1])
    """
    labels = torch.arange(num_samples) % num_classes
    return labels[torch.randperm(num_samples, generator=generator)]


def synthesize(
    teacher: nn.Module,
    num_samples: int,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    steps: int = 2000,
    lr: float = 0.1,
    bn_weight: float = 0.01,
    first_bn_weight: float = 10.0,
    tv_weight: float = 1e-4,
    l2_weight: float = 1e-5,
    seed: int = 0,
    batch_size: int = 256,
    jitter: int = 0,
    input_range: tuple[float, float] | None = None,
    labels: torch.Tensor | None = None,
    student: nn.Module | None = None,
    competition_weight: float = 0.0,
    competition_temperature: float = 3.0,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthesise ``num_samples`` inputs from ``teacher`` by DeepInversion (Yin et al., CVPR 2020); see the module
    docstring for the loss.

    The samples are optimised in independent batches of at most ``batch_size`` (:func:`batch_indices`: nearly
    equal sizes; the BN term compares *batch* statistics, so batches should be large enough for them to mean
    something), each for ``steps`` Adam steps (betas (0.5, 0.9), cosine learning rate from ``lr`` to 0), starting
    from standard normal noise. The defaults follow the official ImageNet setting in spirit (BN weight 0.01, first
    BN layer x10, small priors); the weights depend on the network and the input size (on 8x8 digits with a small
    ResNet, ``bn_weight=5`` gave the best students: see ``examples/data_free_distill_digits.py``). The teacher is
    run in eval mode
    with ``requires_grad`` off; its training flags, ``requires_grad`` flags, weights and BN running statistics are
    exactly as before on return (also on error), and no hook is left behind. The same seed gives the same result
    (one torch ``Generator`` drives the noise, the labels and the jitter; the global random state is not used).

    Args:
        teacher: a trained network mapping ``(B, *input_shape)`` to ``(B, num_classes)`` logits.
        num_samples: number of inputs to synthesise.
        input_shape: shape of one input without the batch dimension, e.g. ``(1, 8, 8)``.
        num_classes: number of classes of the teacher.
        steps: optimisation steps per batch (0 returns the initial noise).
        lr: Adam's initial learning rate on the inputs.
        bn_weight: weight of the BatchNorm-statistics term (0: class target and priors only, no BN layer needed).
        first_bn_weight: multiplier of the first BatchNorm layer's term (the official code uses 10).
        tv_weight: weight of the total-variation prior.
        l2_weight: weight of the L2 prior (mean over samples of each sample's L2 norm).
        seed: seed of the noise, the labels and the jitter.
        batch_size: samples optimised together.
        jitter: largest random shift in pixels applied (circularly) to the batch before each step; 0 for none.
        input_range: ``(low, high)`` to clamp the inputs to after every step (the valid range of normalised
            images), or ``None``.
        labels: the target classes, ``(num_samples,)`` integers; default balanced classes in random order.
        student: a student for the Adaptive DeepInversion competition term (kept in eval mode, untouched).
        competition_weight: weight of that term; needs ``student`` when positive.
        competition_temperature: temperature of the competition term.
        on_step: called as ``on_step(batch_index, step, terms)`` after each step with the terms' float values
            (keys from :data:`TERMS`), e.g. to log the synthesis.

    Returns:
        ``(inputs, labels)``: ``(num_samples, *input_shape)`` float inputs (detached, on the teacher's device) and
        the ``(num_samples,)`` int64 labels they were optimised for.

    Raises:
        ValueError: for non-positive sizes, fewer than 2 samples or classes, a batch size below 2, negative steps
            or weights, a non-positive learning rate, jitter or ``tv_weight > 0`` on non-image inputs, an empty
            ``input_range``, labels of the wrong shape or outside ``[0, num_classes)``, a positive
            ``competition_weight`` without a student, a teacher without BatchNorm layers while ``bn_weight > 0``,
            or a teacher whose output is not ``(B, num_classes)``.

    >>> teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    >>> inputs, labels = synthesize(teacher, 6, (1, 4, 4), 3, steps=5, batch_size=3)
    >>> inputs.shape, sorted(labels.tolist())
    (torch.Size([6, 1, 4, 4]), [0, 0, 1, 1, 2, 2])
    """
    input_shape = tuple(int(size) for size in input_shape)
    weights = {"bn_weight": bn_weight, "first_bn_weight": first_bn_weight, "tv_weight": tv_weight,
               "l2_weight": l2_weight, "competition_weight": competition_weight}
    _check_synthesis_arguments(num_samples, input_shape, num_classes, steps, lr, batch_size, weights, jitter,
                               input_range)
    if competition_weight > 0 and student is None:
        raise ValueError(f"competition_weight={competition_weight!r} needs a student (Adaptive DeepInversion).")
    if not competition_temperature > 0:
        raise ValueError(f"competition_temperature must be positive, got {competition_temperature!r}.")
    if tv_weight > 0 and len(input_shape) != 3:
        raise ValueError(f"tv_weight > 0 needs (channels, height, width) images, got input_shape {input_shape!r}.")
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = balanced_labels(num_samples, num_classes, generator)
    else:
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (num_samples,):
            raise ValueError(f"labels must have shape ({num_samples},), got {tuple(labels.shape)}.")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"labels must be class indices in [0, {num_classes}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
    noise = torch.randn(num_samples, *input_shape, generator=generator)
    networks = [teacher] + ([student] if student is not None and competition_weight > 0 else [])
    with _frozen(*networks):
        device = next(iter(teacher.parameters()), torch.empty(0)).device
        hooks = BNStatisticsHooks(teacher) if bn_weight > 0 else None
        try:
            batches = []
            for index, chunk in enumerate(batch_indices(num_samples, batch_size)):
                report = None if on_step is None else (lambda step, terms, index=index: on_step(index, step, terms))
                batches.append(_synthesize_batch(
                    teacher, noise[chunk].to(device), labels[chunk].to(device), hooks, generator,
                    steps=steps, lr=lr, bn_weight=bn_weight, first_bn_weight=first_bn_weight, tv_weight=tv_weight,
                    l2_weight=l2_weight, jitter=jitter, input_range=input_range, student=student,
                    competition_weight=competition_weight, temperature=competition_temperature,
                    num_classes=num_classes, on_step=report,
                ))
        finally:
            if hooks is not None:
                hooks.remove()
    return torch.cat(batches), labels.to(device)


def batch_indices(num_samples: int, batch_size: int) -> list[torch.Tensor]:
    """Indices of ``ceil(num_samples / batch_size)`` consecutive batches of nearly equal size (one fewer batch if
    that would leave a batch of a single sample, which has no batch statistics).

    >>> [len(chunk) for chunk in batch_indices(1000, 256)], [len(chunk) for chunk in batch_indices(5, 2)]
    ([250, 250, 250, 250], [3, 2])
    """
    count = math.ceil(num_samples / batch_size)
    if count > 1 and num_samples // count < 2:
        count -= 1
    return list(torch.arange(num_samples).tensor_split(count))


@contextmanager
def _frozen(*networks: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` for ``networks``; every module's training flag and every parameter's
    ``requires_grad`` restored on exit, also on error."""
    modes = [(module, module.training) for network in networks for module in network.modules()]
    grads = [(param, param.requires_grad) for network in networks for param in network.parameters()]
    try:
        for network in networks:
            network.eval()
            network.requires_grad_(False)
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)


def _shift(images: torch.Tensor, jitter: int, generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    if jitter == 0:
        return images, (0, 0)
    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
    return torch.roll(images, shifts=(dy, dx), dims=(-2, -1)), (dy, dx)


def _synthesize_batch(
    teacher: nn.Module, init: torch.Tensor, labels: torch.Tensor, hooks: BNStatisticsHooks | None,
    generator: torch.Generator, *, steps: int, lr: float, bn_weight: float, first_bn_weight: float,
    tv_weight: float, l2_weight: float, jitter: int, input_range: tuple[float, float] | None,
    student: nn.Module | None, competition_weight: float, temperature: float, num_classes: int,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> torch.Tensor:
    inputs = init.clone()
    if input_range is not None:
        inputs.clamp_(*input_range)
    inputs.requires_grad_(True)
    optimizer = torch.optim.Adam([inputs], lr=lr, betas=(0.5, 0.9))
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))
        optimizer.zero_grad(set_to_none=True)
        shifted, _ = _shift(inputs, jitter, generator)
        if hooks is not None:
            hooks.clear()
        with torch.enable_grad():
            logits = teacher(shifted)
            if logits.dim() != 2 or logits.shape[1] != num_classes:
                raise ValueError(
                    f"The teacher must output (batch, {num_classes}) logits, got shape {tuple(logits.shape)}."
                )
            terms = {"class": F.cross_entropy(logits, labels)}
            if hooks is not None:
                terms["bn"] = hooks.weighted_sum(first_bn_weight)
            if tv_weight > 0:
                terms["tv"] = total_variation(shifted)
            if l2_weight > 0:
                terms["l2"] = torch.linalg.vector_norm(shifted.flatten(1), dim=1).mean()
            if competition_weight > 0 and student is not None:
                terms["competition"] = competition_loss(logits, student(shifted), temperature)
            weight = {"class": 1.0, "bn": bn_weight, "tv": tv_weight, "l2": l2_weight,
                      "competition": competition_weight}
            total = torch.stack([weight[name] * value for name, value in terms.items()]).sum()
            total.backward()
        optimizer.step()
        if input_range is not None:
            with torch.no_grad():
                inputs.clamp_(*input_range)
        if on_step is not None:
            values = {name: float(value.detach()) for name, value in terms.items()}
            on_step(step, {**values, "total": float(total.detach())})
    if hooks is not None:
        hooks.clear()
    return inputs.detach()


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of a network's state (names, shapes and values), to tell whether a cached synthetic set was made
    from the same teacher (and student)."""
    digest = hashlib.sha256()
    for name, value in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if value.numel() else b"")
    return digest.hexdigest()
