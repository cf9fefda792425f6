"""Deployment: the compressed network as a real int8 model that runs exactly on the host, checked against the model
it came from, written to a file that records what it needs.

- :mod:`~lightning_compress.export.int8`: :func:`export_int8` (torch.ao FX with our scales, inputs clipped at their
  ``amax``, output layers in float from int8 weights);
- :mod:`~lightning_compress.export.engines`: which quantized engine computes the model exactly on this CPU;
- :mod:`~lightning_compress.export.verify`: agreement and output error against the original model;
- :mod:`~lightning_compress.export.counting`: parameters, bytes and multiply-adds of an int8 model;
- :mod:`~lightning_compress.export.int8_dynamic`: transformers without FX: int8 ``Linear`` / ``Conv1D`` swapped
  module by module, activations quantized per call (:func:`export_int8_dynamic`);
- :mod:`~lightning_compress.export.int8_weight`: layers keeping an int8 weight and computing in float;
- :mod:`~lightning_compress.export.int8_callback`: :class:`Int8Export` (fit end), :func:`save_int8`,
  :func:`load_int8`;
- :mod:`~lightning_compress.export.onnx`: :func:`export_onnx` (float, compacted and QDQ models, verified in
  onnxruntime) and :func:`export_program` (``torch.export``); :mod:`~lightning_compress.export.qdq`: the QDQ rewrite;
- :mod:`~lightning_compress.export.onnx_callback`: :class:`OnnxExport` (fit end).
"""

from lightning_compress.export.counting import quantized_counts
from lightning_compress.export.engines import choose_engine, exact_engines, host_summary
from lightning_compress.export.int8 import Int8Model, export_int8
from lightning_compress.export.int8_callback import Int8Export, int8_metadata, load_int8, save_int8
from lightning_compress.export.int8_dynamic import (
    export_int8_dynamic,
    load_int8_dynamic,
    quantize_linears_dynamic,
    save_int8_dynamic,
)
from lightning_compress.export.onnx import OnnxMismatchError, export_onnx, export_program, onnx_metadata
from lightning_compress.export.onnx_callback import OnnxExport
from lightning_compress.export.qdq import qdq_model
from lightning_compress.export.verify import Int8MismatchError, check_agreement, output_agreement

__all__ = [
    "Int8Export",
    "Int8MismatchError",
    "Int8Model",
    "OnnxExport",
    "OnnxMismatchError",
    "check_agreement",
    "choose_engine",
    "exact_engines",
    "export_int8",
    "export_int8_dynamic",
    "export_onnx",
    "export_program",
    "host_summary",
    "int8_metadata",
    "load_int8",
    "load_int8_dynamic",
    "onnx_metadata",
    "output_agreement",
    "qdq_model",
    "quantize_linears_dynamic",
    "quantized_counts",
    "save_int8",
    "save_int8_dynamic",
]
