"""Quantization: fake quantization (STE, LSQ, PACT), calibration (max, percentile, MSE, entropy / KL), non-linear
levels (power of two, k-means codebooks), 4-bit packing, quantizer modules, ``quantize_model`` (post-training, any
network) and ``export_int8`` (a real int8 model). Nothing here imports Lightning; the callbacks
(``QuantizationAwareTraining``, ``PostTrainingQuantization``) live in :mod:`~lightning_compress.quantization.callbacks`
and are exported at the package top level."""

from lightning_compress.quantization.calibrate import classification_accuracy, quantize_model
from lightning_compress.quantization.calibration import (
    METHODS,
    HistogramCalibrator,
    MaxCalibrator,
    amax_entropy,
    amax_mse,
    amax_percentile,
    compute_amax,
)
from lightning_compress.quantization.engines import choose_engine, host_summary
from lightning_compress.quantization.export import Int8MismatchError, Int8Model, export_int8, quantized_counts
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
