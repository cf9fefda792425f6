"""Quantization: fake quantization (STE, LSQ, PACT), calibration (max, percentile, MSE, entropy / KL), non-linear
levels (power of two, k-means codebooks) and 4-bit packing. The math here never imports Lightning."""

from lightning_compress.quantization.calibration import (
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

__all__ = [
    "METHODS",
    "HistogramCalibrator",
    "MaxCalibrator",
    "affine_qparams",
    "amax_entropy",
    "amax_mse",
    "amax_percentile",
    "codebook_fake_quantize",
    "codebook_quantize",
    "compute_amax",
    "dequantize",
    "fake_quantize",
    "fake_quantize_affine",
    "kmeans_codebook",
    "lsq_fake_quantize",
    "lsq_grad_scale",
    "lsq_init_step",
    "pack_int4",
    "pact_fake_quantize",
    "pow2_fake_quantize",
    "pow2_quantize",
    "qrange",
    "quantize",
    "unpack_int4",
]
