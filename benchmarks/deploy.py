"""Deployed ONNX models in onnxruntime (1 thread): fp32 ONNX, our int8 QDQ ONNX (export_onnx of the fake-quantized
model) and onnxruntime's own quantize_static / quantize_dynamic of the fp32 ONNX file.

    python benchmarks/deploy.py        # a few minutes on 2 CPU cores

Models: PlainCNN(width=32) and ResidualCNN(width=8) trained 2 epochs on digits (accuracy on the test split); a
BERT-style classifier (Hugging Face BertForSequenceClassification from a small config, 4 layers, hidden 256,
128 tokens; untrained, random tokens: agreement only). Our int8 models are quantized post-training (max
calibration, 7-bit activations with reduce_range=True: exact in onnxruntime's x86 integer kernels on every CPU);
for BERT also with ``int8_embeddings=True`` (embedding tables as int8 rows, which the PyTorch model keeps float).
The "VNNI" rows: 8-bit activations, unsigned where calibration saw no negative input (``unsigned="auto"``), with
``integer_kernels=True``: onnxruntime chains QLinearConv layers, exact only on CPUs with VNNI (the agreement shows it).
"agreement": argmax agreement with the PyTorch model the file comes from (fp32 for fp32 / onnxruntime's
quantization, the fake-quantized model for ours). Latency: median of interleaved runs, milliseconds.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, machine, markdown_table, parse_no_options

from lightning_compress.demo import DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.export.onnx import export_onnx, ort_session, run_session
from lightning_compress.export.verify import output_agreement
from lightning_compress.quantization import quantize_model
from lightning_compress.testing import train_briefly

TOKENS, VOCAB = 128, 2000


def _bert() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=TOKENS, num_labels=4)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    model.config.return_dict = False
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, VOCAB, (16, TOKENS), generator=generator),
                "attention_mask": torch.ones(16, TOKENS, dtype=torch.long)} for _ in range(4)]
    return model, batches


VNNI_LABEL = "ours 8-bit QDQ, unsigned='auto', integer_kernels=True (VNNI)"


def _calibration_reader(batches: list[Any], names: list[str]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            feeds = [{n: b[n].numpy() for n in names} if isinstance(b, dict) else {names[0]: b.numpy()}
                     for b in batches]
            self.iterator = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.iterator, None)

    return Reader()


def _ort_quantized(fp32: Path, out: Path, kind: str, batches: list[Any]) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    if kind == "dynamic":
        quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)
    else:
        names = [i.name for i in ort_session(prepared).get_inputs()]
        quantize_static(str(prepared), str(out), _calibration_reader(batches, names), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    return out


def _outputs(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return (out[0] if isinstance(out, tuple) else out).float()


def _rows_for(name: str, model: torch.nn.Module, calibration: list[Any], test: list[Any],
              labels: torch.Tensor | None, work: Path, embeddings: bool = False) -> list[list[Any]]:
    example = calibration[0]
    quantized = quantize_model(model, "static", calibration, calibration="max", reduce_range=True)
    files = {"fp32 ONNX": (model, work / f"{name}_fp32.onnx"), "ours int8 QDQ": (quantized, work / f"{name}_qdq.onnx")}
    for source, path in files.values():
        export_onnx(source, example, path, check_inputs=test, min_agreement=None)
    # 8 bits, unsigned after ReLUs, integer kernels everywhere: onnxruntime chains QLinearConv (exact with VNNI)
    full_range = quantize_model(model, "static", calibration, calibration="max", unsigned="auto")
    files[VNNI_LABEL] = (full_range, work / f"{name}_qdq8.onnx")
    export_onnx(full_range, example, files[VNNI_LABEL][1], check_inputs=test, min_agreement=None,
                integer_kernels=True)
    if embeddings:
        files["ours int8 QDQ + int8_embeddings"] = (quantized, work / f"{name}_qdq_emb.onnx")
        export_onnx(quantized, example, files["ours int8 QDQ + int8_embeddings"][1], check_inputs=test,
                    min_agreement=None, int8_embeddings=True)
    fp32 = files["fp32 ONNX"][1]
    for kind in ("static", "dynamic"):
        files[f"onnxruntime quantize_{kind}"] = (model, _ort_quantized(fp32, work / f"{name}_ort_{kind}.onnx", kind,
                                                                       calibration))
    sessions = {label: ort_session(path) for label, (_, path) in files.items()}
    one = {k: v[:1] for k, v in example.items()} if isinstance(example, dict) else example[:1]
    big = test[0]
    timings = {}
    for batch_name, batch in (("1", one), ("big", big)):
        calls = {label: (lambda s=s, b=batch: run_session(s, b)) for label, s in sessions.items()}
        timings[batch_name] = interleaved_medians(calls, 15 if batch_name == "1" else 7)
    rows = []
    base = files["fp32 ONNX"][1].stat().st_size
    for label, (source, path) in files.items():
        outputs = torch.cat([run_session(sessions[label], b) for b in test])
        reference = torch.cat([_outputs(source, b) for b in test])
        agreement = output_agreement(reference, outputs)["agreement"]
        accuracy = f"{float((outputs.argmax(1) == labels).float().mean()):.4f}" if labels is not None else "n/a"
        size = path.stat().st_size
        rows.append([name, label, accuracy, f"{agreement:.4f}", f"{size / 1024:.0f}", f"{base / size:.2f}x",
                     f"{timings['1'][label] * 1e3:.3f}", f"{timings['big'][label] * 1e3:.2f}",
                     f"{timings['big']['fp32 ONNX'] / timings['big'][label]:.2f}x"])
    return rows


def rows() -> list[list[Any]]:
    table: list[list[Any]] = []
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    train = list(dm.train_dataloader())
    test_inputs = torch.cat([b[0] for b in dm.test_dataloader()])
    test_labels = torch.cat([b[1] for b in dm.test_dataloader()])
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("PlainCNN(32)", lambda: PlainCNN(width=32)), ("ResidualCNN(8)", lambda: ResidualCNN(
                width=8))):
            torch.manual_seed(0)
            model = train_briefly(make(), train, 2)
            calibration = [b[0] for b in train[:4]]
            test = list(test_inputs.split(64))
            table += _rows_for(name, model, calibration, test, test_labels, Path(tmp))
        bert, batches = _bert()
        table += _rows_for("BERT-style (4x256)", bert, batches[:2], batches[2:], None, Path(tmp), embeddings=True)
    return table


def main() -> None:
    parse_no_options(__doc__)
    torch.set_num_threads(1)
    print(machine())
    print(markdown_table(["model", "file", "accuracy", "agreement", "size KiB", "fp32 size / size", "batch 1 ms",
                          "batch 64 (BERT 16) ms", "speed-up vs fp32 ONNX"], rows()))


if __name__ == "__main__":
    main()
