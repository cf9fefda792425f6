"""Choosing layers of a model by name, regular expression or type.

Callbacks take layer choices as strings (YAML-expressible) and resolve them against the model in ``setup``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

#: Layer types a user may name by string, e.g. ``types=["Conv2d", "Linear"]``.
LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "ConvTranspose1d": nn.ConvTranspose1d,
    "ConvTranspose2d": nn.ConvTranspose2d,
    "Linear": nn.Linear,
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
    "Embedding": nn.Embedding,
}


def resolve_layer_types(types: Iterable[str | type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    """Turn type names such as ``"Conv2d"`` into classes.

    Raises:
        ValueError: if a name is not one of :data:`LAYER_TYPES`.

    >>> resolve_layer_types(["Conv2d", nn.Linear])
    (<class 'torch.nn.modules.conv.Conv2d'>, <class 'torch.nn.modules.linear.Linear'>)
    """
    resolved = []
    for layer_type in types:
        if isinstance(layer_type, type) and issubclass(layer_type, nn.Module):
            resolved.append(layer_type)
        elif isinstance(layer_type, str) and layer_type in LAYER_TYPES:
            resolved.append(LAYER_TYPES[layer_type])
        else:
            allowed = f"{sorted(LAYER_TYPES)} or an nn.Module class"
            raise ValueError(f"Unknown layer type {layer_type!r}; allowed: {allowed}.")
    return tuple(resolved)


def _as_list(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or re.fullmatch(pattern, name) is not None


def _compile_all(patterns: list[str]) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"Layer pattern {pattern!r} is not a valid regular expression: {err}.") from err


def select_layers(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    *,
    types: Iterable[str | type[nn.Module]] = ("Conv1d", "Conv2d", "Linear"),
    exclude: str | Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """Select named submodules of ``model``.

    A pattern matches a module whose qualified name equals it or fully matches it as a regular expression.
    Every pattern in ``include`` must match at least one module of the allowed ``types``.

    Args:
        model: the model to search.
        include: names or regexes; ``None`` selects every module of the allowed types.
        types: allowed module types (names from :data:`LAYER_TYPES` or classes).
        exclude: names or regexes removed from the selection (they need not match anything).

    Returns:
        An ordered ``{qualified_name: module}`` dictionary in ``model.named_modules()`` order.

    Raises:
        ValueError: if a pattern is not a valid regex, a type is unknown, or an ``include`` pattern matches nothing.

    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    >>> list(select_layers(model))
    ['0', '3']
    >>> list(select_layers(model, r"\\d", types=["Linear"]))
    ['3']
    """
    allowed = resolve_layer_types(types)
    includes, excludes = _as_list(include), _as_list(exclude)
    _compile_all(includes + excludes)
    candidates = {name: module for name, module in model.named_modules() if name and isinstance(module, allowed)}
    if includes:
        for pattern in includes:
            if not any(_matches(name, pattern) for name in candidates):
                raise ValueError(
                    f"Layer pattern {pattern!r} matches no layer of type "
                    f"{[t.__name__ for t in allowed]} in {type(model).__name__}; "
                    f"available: {list(candidates) or 'none'}."
                )
        candidates = {n: m for n, m in candidates.items() if any(_matches(n, p) for p in includes)}
    return {n: m for n, m in candidates.items() if not any(_matches(n, p) for p in excludes)}


def check_layer_pattern(pattern: object, what: str) -> None:
    """Raise a ``ValueError`` naming ``what`` unless ``pattern`` is a layer name or a valid regular expression."""
    if not isinstance(pattern, str):
        raise ValueError(f"{what} {pattern!r} must be a layer name or regex (a string).")
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression ({error}).") from None
