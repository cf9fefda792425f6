"""Eval mode for a measurement or a probe, with every submodule's own training flag restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode and give every submodule its own ``training`` flag back afterwards.

    ``model.train(was_training)`` would not: it sets the flag of every submodule, so a BatchNorm or a teacher the
    user had frozen in eval mode would train again.

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2).eval())
    >>> with eval_mode(model):
    ...     pass
    >>> model.training, model[1].training
    (True, False)
    """
    saved = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training
