"""Running code right before Lightning's strict model load, by wrapping the LightningModule's ``on_load_checkpoint``.

Lightning calls ``pl_module.on_load_checkpoint(checkpoint)`` right before ``load_state_dict(strict=True)``: the one
place where a callback can reshape a fresh model (replay compactions, attach quantizers) so that a checkpoint of a
changed model loads. Several callbacks may wrap the hook; each must be removable without dropping the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ModelLoadHook"]

_CLASS_HOOK = object()  # marks "no instance attribute was there": the class's own hook


class ModelLoadHook:
    """Run ``before(checkpoint)`` before and ``after(checkpoint)`` after the ``on_load_checkpoint`` that was there
    (the class's own or another callback's wrapper).

    Order between callbacks: code that changes the layers (compaction replay) goes ``before``, code that attaches
    to the layers (quantizers) ``after``; then the order in which the wrappers were installed does not matter.
    :meth:`remove` puts back exactly the attribute value this wrapper replaced, and only while the wrapper is still
    the outermost one; under a wrapper installed later it only becomes a pass-through (deleting or overwriting the
    attribute would drop the other wrapper), unwrapped when that outer wrapper is removed.

    >>> class Module:
    ...     def on_load_checkpoint(self, checkpoint):
    ...         checkpoint.append("own")
    >>> module, calls = Module(), []
    >>> inner = ModelLoadHook(module, after=lambda checkpoint: checkpoint.append("after"))
    >>> outer = ModelLoadHook(module, before=lambda checkpoint: checkpoint.append("before"))
    >>> module.on_load_checkpoint(calls); calls
    ['before', 'own', 'after']
    >>> inner.remove(), outer.remove(), "on_load_checkpoint" in vars(module)
    (False, True, False)
    """

    def __init__(self, pl_module: Any, before: Callable[[dict[str, Any]], None] | None = None,
                 after: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.module, self.active = pl_module, True
        self._replaced = vars(pl_module).get("on_load_checkpoint", _CLASS_HOOK)
        inner = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            if self.active and before is not None:
                before(checkpoint)
            inner(checkpoint)
            if self.active and after is not None:
                after(checkpoint)

        on_load_checkpoint.load_hook = self  # type: ignore[attr-defined]
        self._wrapper = on_load_checkpoint
        pl_module.on_load_checkpoint = on_load_checkpoint

    def remove(self) -> bool:
        """Stop running the added code; unwrap if outermost. Returns whether the wrapper is gone from the module."""
        self.active = False
        current = vars(self.module).get("on_load_checkpoint")
        if current is None:
            return True  # nothing is patched any more
        if current is not self._wrapper:
            return False
        if self._replaced is _CLASS_HOOK:
            del self.module.on_load_checkpoint
        else:
            self.module.on_load_checkpoint = self._replaced
            inner = getattr(self._replaced, "load_hook", None)
            if isinstance(inner, ModelLoadHook) and not inner.active:
                inner.remove()  # a wrapper already removed while this one covered it: unwrap it now
        return True
