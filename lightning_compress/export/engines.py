"""Which quantized CPU engine computes an int8 model exactly on this host, and a context to run under it.

torch ships several quantized CPU backends (``torch.backends.quantized.supported_engines``): ``x86`` / ``fbgemm``
(FBGEMM, the fastest on x86), ``onednn`` (oneDNN) and ``qnnpack`` (ARM, and x86 through SSE2). On an x86 CPU
without VNNI (``torch.backends.cpu.get_cpu_capability()`` ``"AVX2"``, or AVX-512 without VNNI) the ``x86`` /
``fbgemm`` convolution and linear kernels multiply ``uint8`` activations by ``int8`` weights with ``vpmaddubsw``,
whose 16-bit sums of two products saturate once activation codes exceed 127; torch.ao's default x86 qconfig
reduces the activation range to 7 bits for that reason. ``qnnpack`` accumulates in 32 bits on every CPU. oneDNN
avoids the overflow on such CPUs by halving the weights internally, which loses their last bit: not exact either.

So an exported model whose activation codes stay within ``[0, 127]`` (7-bit activations:
``QuantizationAwareTraining(reduce_range=True)``, or inputs after a ReLU on a signed 8-bit grid) runs exactly under
``x86`` everywhere; a model with full 8-bit activation codes runs exactly under ``x86`` only with VNNI, and under
``qnnpack`` everywhere. :func:`choose_engine` applies these rules; :func:`host_summary` says what the host offers.

FBGEMM and oneDNN can be held below VNNI on a VNNI CPU (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``,
``ONEDNN_MAX_CPU_ISA=AVX2``); their kernels then saturate as on an AVX2-only CPU, and :func:`has_vnni` says so. This
is how the tests check the AVX2 path on any x86 host.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["ENGINES", "choose_engine", "has_vnni", "host_summary", "kernels_capped_below_vnni", "quantized_engine",
           "validate_engine"]

#: the engines an int8 export may name ("auto": :func:`choose_engine`)
ENGINES = ("auto", "x86", "fbgemm", "onednn", "qnnpack")
_SATURATING = ("x86", "fbgemm", "onednn")  # u8 x s8 pair sums in 16 bits (or halved weights) without VNNI
#: the largest activation code the ``x86`` / ``fbgemm`` kernels compute exactly without VNNI
SAFE_ACTIVATION_CODE = 127
#: ``FBGEMM_ENABLE_INSTRUCTIONS`` / ``ONEDNN_MAX_CPU_ISA`` values that keep the library's kernels below VNNI
FBGEMM_BELOW_VNNI = ("AVX2", "AVX512", "AVX512_256")
ONEDNN_BELOW_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")


def kernels_capped_below_vnni() -> bool:
    """Whether the environment holds FBGEMM or oneDNN below VNNI instructions (read when the library is first used,
    so set it before the process starts)."""
    fbgemm = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper()
    onednn = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return fbgemm in FBGEMM_BELOW_VNNI or onednn in ONEDNN_BELOW_VNNI


def has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (or AVX-VNNI), the int8 dot-product instructions FBGEMM needs to compute
    full-range ``uint8`` activations exactly, and the environment lets FBGEMM and oneDNN use them."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) and not kernels_capped_below_vnni() if callable(probe) else False


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def host_summary() -> dict[str, object]:
    """What this host offers for int8: machine, ``get_cpu_capability()``, VNNI, supported engines, current engine.

    >>> sorted(host_summary())
    ['capability', 'current_engine', 'engines', 'machine', 'vnni']
    """
    return {"machine": platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
            "vnni": has_vnni(), "engines": list(torch.backends.quantized.supported_engines),
            "current_engine": torch.backends.quantized.engine}


def validate_engine(engine: str) -> str:
    """Return ``engine`` or raise a ``ValueError`` naming it and the allowed / available engines."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not supported; allowed: {', '.join(map(repr, ENGINES))}")
    if engine != "auto" and engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"engine={engine!r} is not available in this torch build; available: "
                         f"{list(torch.backends.quantized.supported_engines)}")
    return engine


def exact_engines(max_activation_code: int) -> list[str]:
    """The supported engines that compute a model whose ``uint8`` activation codes reach ``max_activation_code``
    exactly on this host, fastest first."""
    engines = list(torch.backends.quantized.supported_engines)
    full_range = max_activation_code > SAFE_ACTIVATION_CODE
    order = ["x86", "fbgemm", "onednn", "qnnpack"] if _is_x86() else ["qnnpack", "onednn", "x86", "fbgemm"]
    exact = [e for e in order if e in engines and not (full_range and e in _SATURATING and not has_vnni())]
    return [e for e in exact if e != "onednn" or has_vnni() or not full_range]


def choose_engine(max_activation_code: int, engine: str = "auto") -> str:
    """The engine to convert and run an int8 model under.

    Args:
        max_activation_code: the largest ``uint8`` code any quantized layer's input can take (127 for 7-bit or
            post-ReLU signed 8-bit activations, 255 for full-range ones).
        engine: ``"auto"`` (the fastest exact engine here) or an engine to use; a named engine that would
            saturate on this CPU is refused.

    Raises:
        ValueError: an unknown or unavailable engine, or one that cannot compute these activations exactly here.
    """
    validate_engine(engine)
    exact = exact_engines(max_activation_code)
    if engine == "auto":
        if not exact:
            raise ValueError(f"no quantized engine computes full-range int8 activations exactly on this host "
                             f"({host_summary()}); quantize with reduce_range=True")
        return exact[0]
    if engine not in exact:
        summary = host_summary()
        raise ValueError(
            f"engine={engine!r} cannot compute this model exactly here: its activation codes reach "
            f"{max_activation_code}, and on a {summary['capability']} CPU without VNNI the {engine!r} kernels "
            f"saturate above {SAFE_ACTIVATION_CODE}. Use engine='auto' (here {exact[0] if exact else None!r}) or "
            "quantize for it with reduce_range=True (7-bit activations)")
    return engine


@contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Set ``torch.backends.quantized.engine`` inside the block and restore the previous one after."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
