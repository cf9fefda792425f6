"""DeepInversion (Yin et al., CVPR 2020) without Lightning: ``synthesize`` optimises inputs from noise until a trained
teacher sees its own BatchNorm statistics and the sampled classes (the terms are in
:mod:`lightning_compress.distillation.losses.data_free`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.distillation.checks import check_count, check_nonnegative
from lightning_compress.distillation.losses.data_free import (
    BNStatisticsHooks,
    bn_statistics_loss,
    competition_loss,
    total_variation,
)

__all__ = ["TERMS", "BNStatisticsHooks", "balanced_labels", "batch_indices", "bn_statistics_loss", "competition_loss",
           "synthesize", "teacher_fingerprint", "total_variation"]

#: Names of the synthesis terms, as passed to ``on_step`` and logged by :class:`SyntheticDataModule`.

#: Names of the synthesis terms, as passed to ``on_step`` and logged by ``SyntheticDataModule``.
TERMS = ("class", "bn", "tv", "l2", "competition", "total")


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
