"""How a layer is quantized (:class:`QuantSpec`) and the checks of its settings, shared by the post-training
functions and the callbacks: each raises a ``ValueError`` that names the value and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_compress.quantization.functional import validate_num_bits

__all__ = ["LEARN_MODES", "QuantSpec", "validate_flag", "validate_learn", "validate_options", "validate_reduce_range",
           "validate_unsigned"]

LEARN_MODES = ("none", "lsq", "pact")


def validate_learn(learn: str) -> str:
    """Return ``learn`` or raise a ``ValueError`` quoting it and the allowed values."""
    if learn not in LEARN_MODES:
        raise ValueError(f"learn={learn!r} is not supported; allowed: {', '.join(map(repr, LEARN_MODES))}")
    return learn


def validate_flag(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise a ``ValueError`` naming ``name`` and quoting ``value``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")
    return value


def validate_options(unsigned: Any, **flags: Any) -> None:
    """Check ``unsigned`` (:func:`validate_unsigned`) and every keyword flag (:func:`validate_flag`)."""
    for name, value in flags.items():
        validate_flag(name, value)
    validate_unsigned(unsigned)


def validate_unsigned(value: Any) -> bool | str:
    """``unsigned`` is ``True``, ``False`` or ``"auto"`` (unsigned where calibration sees no negative input)."""
    if value != "auto" and not isinstance(value, bool):
        raise ValueError(f"unsigned={value!r} must be True, False or 'auto'")
    return value


def validate_reduce_range(num_bits: int) -> None:
    """``reduce_range`` takes a bit from the input activation, which needs at least 2 left."""
    if num_bits < 3:
        raise ValueError(f"reduce_range=True needs num_bits >= 3 (the input keeps num_bits - 1), got {num_bits}")



@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized.

    Args:
        num_bits: bits of the weight and of the input activation (2 to 16).
        per_channel: one weight amax per output channel (axis 0) instead of one per tensor.
        unsigned: the input activation is non-negative and uses ``[0, 2^b - 1]`` (e.g. after a ReLU); ``"auto"``:
            an input whose calibration data were all non-negative becomes unsigned, the others stay signed (the
            layout of torch.ao's ``quint8`` activations, which onnxruntime chains into ``QLinearConv`` layers,
            see :func:`~lightning_compress.export.onnx.export_onnx`).
        learn: ``"none"``; ``"lsq"`` (learned step sizes for weight and input, Esser et al. 2019); ``"pact"``
            (learned clipping level of the input, Choi et al. 2018; implies ``unsigned``).
        reduce_range: the input activation uses one bit less (``[-63, 63]`` signed, ``[0, 127]`` unsigned at 8
            bits), as torch.ao's x86 default does, so its int8 export runs exactly under the ``x86`` / ``fbgemm``
            kernels on every x86 CPU, VNNI or not (see :mod:`~lightning_compress.export.engines`). An input
            whose calibration data were all non-negative (after a ReLU) then becomes unsigned, ``[0, 127]``: the
            resolution of a signed 8-bit grid on such data.
    """

    num_bits: int = 8
    per_channel: bool = True
    unsigned: bool | str = False
    learn: str = "none"
    reduce_range: bool = False

    def __post_init__(self) -> None:
        validate_num_bits(self.num_bits)
        validate_flag("per_channel", self.per_channel)
        validate_unsigned(self.unsigned)
        validate_learn(self.learn)
        validate_flag("reduce_range", self.reduce_range)
        if self.reduce_range:
            validate_reduce_range(self.num_bits)

    @property
    def input_bits(self) -> int:
        """Bits of the input activation: ``num_bits``, or one less with ``reduce_range``."""
        return self.num_bits - 1 if self.reduce_range else self.num_bits
