"""Quantization: how a network computes with fewer bits, and the callbacks that train and calibrate it.

- :mod:`~lightning_compress.quantization.functional`: fake quantization with a straight-through gradient, integer
  quantize / dequantize, zero points, LSQ and PACT (pure functions);
- :mod:`~lightning_compress.quantization.calibrators`: ``amax`` by max, percentile, MSE and entropy (TensorRT's
  conventions), histogram and running-max calibrators;
- :mod:`~lightning_compress.quantization.quantizers`: quantizer modules and the quantized Conv1d / Conv2d / Linear;
- :mod:`~lightning_compress.quantization.nonlinear` and :mod:`~lightning_compress.quantization.packed`: power-of-two
  and k-means levels, weight-only packed storage;
- :mod:`~lightning_compress.quantization.ptq`: ``quantize_model`` (post-training, any network);
- :mod:`~lightning_compress.quantization.qat_ranges`: input ranges that track a training network (moving-average
  min / max), the ``ranges="auto"`` choice;
- :mod:`~lightning_compress.quantization.qat_callback` / :mod:`~lightning_compress.quantization.ptq_callback`: the
  Lightning callbacks (exported at the package top level).

The real int8 model lives one floor up, in :mod:`lightning_compress.export`; ``export_int8`` and its companions are
also reachable here (resolved on first use, so this package never imports the export).
"""

from typing import Any

from lightning_compress._compat import package_attribute
from lightning_compress.quantization.calibrators import (
    METHODS,
    HistogramCalibrator,
    MaxCalibrator,
    amax_entropy,
    amax_mse,
    amax_percentile,
    compute_amax,
)
from lightning_compress.quantization.functional import (
    affine_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_affine,
    lsq_fake_quantize,
    lsq_grad_scale,
    lsq_init_step,
    pact_fake_quantize,
    qrange,
    quantize,
)
from lightning_compress.quantization.nonlinear import (
    codebook_fake_quantize,
    codebook_quantize,
    kmeans_codebook,
    pack_int4,
    pow2_fake_quantize,
    pow2_quantize,
    unpack_int4,
)
from lightning_compress.quantization.packed import (
    PACKED_METHODS,
    PackedConv1d,
    PackedConv2d,
    PackedLinear,
    export_packed,
    pack_bits,
    packed_layers,
    unpack_bits,
)
from lightning_compress.quantization.ptq import classification_accuracy, quantize_model
from lightning_compress.quantization.qat_ranges import RANGES, RangeTracker, looks_untrained
from lightning_compress.quantization.quantizers import (
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    TensorQuantizer,
    attach_quantizer,
    float_state_dict,
    quantized_layers,
    remove_quantizers,
)

__all__ = [
    "METHODS",
    "PACKED_METHODS",
    "RANGES",
    "HistogramCalibrator",
    "Int8MismatchError",
    "Int8Model",
    "MaxCalibrator",
    "PackedConv1d",
    "PackedConv2d",
    "PackedLinear",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "RangeTracker",
    "TensorQuantizer",
    "affine_qparams",
    "amax_entropy",
    "amax_mse",
    "amax_percentile",
    "attach_quantizer",
    "choose_engine",
    "classification_accuracy",
    "codebook_fake_quantize",
    "codebook_quantize",
    "compute_amax",
    "dequantize",
    "export_int8",
    "export_packed",
    "fake_quantize",
    "fake_quantize_affine",
    "float_state_dict",
    "host_summary",
    "kmeans_codebook",
    "looks_untrained",
    "lsq_fake_quantize",
    "lsq_grad_scale",
    "lsq_init_step",
    "pack_bits",
    "pack_int4",
    "packed_layers",
    "pact_fake_quantize",
    "pow2_fake_quantize",
    "pow2_quantize",
    "qrange",
    "quantize",
    "quantize_model",
    "quantized_counts",
    "quantized_layers",
    "remove_quantizers",
    "unpack_bits",
    "unpack_int4",
]


def __getattr__(name: str) -> Any:
    return package_attribute(__name__, name)
