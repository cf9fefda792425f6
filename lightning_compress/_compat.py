"""Import paths that moved, kept working.

Two mechanisms, one table each:

* :data:`MOVED_MODULES`: a module that moved (``lightning_compress.pruning.tracing`` is now
  ``lightning_compress.graph.tracing``) is still importable under its old name, with a ``DeprecationWarning``; a
  finder installed when the package is imported maps the old name to the new module (the same module object).
* :data:`ATTRIBUTES`: names a package offers although they live in a package above it in the layering (the public
  ``lightning_compress.quantization.export_int8`` is defined in :mod:`lightning_compress.export`), resolved on first
  access by the package's ``__getattr__``, so that importing the lower package never imports the upper one. Names
  marked deprecated warn.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

__all__ = ["ATTRIBUTES", "MOVED_MODULES", "install", "package_attribute"]

_DISTILLATION_METHODS = ("mutual", "self_distillation", "adversarial", "cross_modal", "graph", "lifelong",
                         "data_free", "deep_inversion", "quantized", "search")
_LOSS_KINDS = ("response", "feature", "relation", "graph", "online", "adversarial", "cross_modal")

#: old module name -> new module name (0.1 -> 0.2)
MOVED_MODULES: dict[str, str] = {
    **{f"lightning_compress.pruning.{name}": f"lightning_compress.graph.{name}"
       for name in ("tracing", "dependency", "channel_groups", "channel_ops", "batchnorm", "blocks")},
    "lightning_compress.utils.layers": "lightning_compress.graph.layers",
    "lightning_compress.quantization.calibration": "lightning_compress.quantization.calibrators",
    "lightning_compress.quantization.calibrate": "lightning_compress.quantization.ptq",
    "lightning_compress.quantization.callbacks": "lightning_compress.quantization.qat_callback",
    "lightning_compress.quantization.export": "lightning_compress.export.int8",
    "lightning_compress.quantization.export_callback": "lightning_compress.export.int8_callback",
    "lightning_compress.quantization.engines": "lightning_compress.export.engines",
    "lightning_compress.quantization.verify": "lightning_compress.export.verify",
    "lightning_compress.quantization.counting": "lightning_compress.export.counting",
    "lightning_compress.quantization.int8_weight": "lightning_compress.export.int8_weight",
    **{f"lightning_compress.distillation.losses_{kind}": f"lightning_compress.distillation.losses.{kind}"
       for kind in _LOSS_KINDS},
    **{f"lightning_compress.distillation.{name}": f"lightning_compress.distillation.methods.{name}"
       for name in _DISTILLATION_METHODS},
    "lightning_compress.distillation._checks": "lightning_compress.distillation.checks",
    "lightning_compress.distillation.features": "lightning_compress.distillation.taps",
    "lightning_compress.distillation.feature_terms": "lightning_compress.distillation.terms",
}

_EXPORT_NAMES = ("Int8MismatchError", "Int8Model", "choose_engine", "export_int8", "host_summary",
                 "quantized_counts")

#: package -> {name: (module that defines it, deprecated)}
ATTRIBUTES: dict[str, dict[str, tuple[str, bool]]] = {
    "lightning_compress.quantization": {name: ("lightning_compress.export", False) for name in _EXPORT_NAMES},
    "lightning_compress.utils": {name: ("lightning_compress.graph.layers", True)
                                 for name in ("LAYER_TYPES", "resolve_layer_types", "select_layers")},
}


def _warn_moved(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old name will be removed in a future release", DeprecationWarning,
                  stacklevel=3)


def package_attribute(package: str, name: str) -> Any:
    """The value of ``package.name`` from :data:`ATTRIBUTES` (for the package's ``__getattr__``).

    Raises:
        AttributeError: ``name`` is not one of them.
    """
    source = ATTRIBUTES.get(package, {}).get(name)
    if source is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module, deprecated = source
    if deprecated:
        _warn_moved(f"{package}.{name}", f"{module}.{name}")
    return getattr(importlib.import_module(module), name)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a module under its old name and hands out the module at its new one."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        _warn_moved(spec.name, MOVED_MODULES[spec.name])
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: Any) -> None:
        """The new module is already executed."""


_FINDER = _MovedModuleFinder()


def install() -> None:
    """Put the finder of moved modules in front of the others (once)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
