"""One table: each row this library against the tool people use today, measured in the same run, with the ratio.

    python benchmarks/run.py            # its accuracy rows train four networks for 10 epochs each
    pip install torch-pruning           # optional: adds the Torch-Pruning row (the `bench` extra)

Rows: fit overhead of MagnitudePruning vs Lightning's ModelPruning (both against the plain fit), sparsity after a
resume (ModelPruning loses its masks), test accuracy of FilterPruning(0.4) with its defaults against the compact
architecture trained from scratch with the same recipe, on digits and on the harder shapes workload, QAT step time
and int8 accuracy vs torch.ao eager QAT, CPU latency at equal multiply-adds vs Torch-Pruning's magnitude pruner,
and entropy-calibration amax time vs a per-candidate loop.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, machine, markdown_table, median_time, parse_no_options, quiet_trainer
from calibration_speed import loop_entropy_torch
from prune_overhead import fit as prune_fit
from qat_vs_torchao import run_seed as qat_run_seed

from lightning_compress import FilterPruning, MagnitudePruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ShapesDataModule
from lightning_compress.measure import count_macs, measure_latency
from lightning_compress.pruning import compact, pruned_architecture
from lightning_compress.pruning.groups import prune_filter_groups
from lightning_compress.quantization import HistogramCalibrator, amax_entropy


def pruning_overhead() -> tuple[float, float]:
    from lightning.pytorch.callbacks import ModelPruning

    fns = {
        "plain": lambda: prune_fit([], 4, 32),
        "ours": lambda: prune_fit([MagnitudePruning(sparsity=0.5)], 4, 32),
        "lightning": lambda: prune_fit([ModelPruning("l1_unstructured", amount=0.5, verbose=0,
                                                     use_lottery_ticket_hypothesis=False)], 4, 32),
    }
    times = interleaved_medians(fns, 5)
    return times["ours"] / times["plain"], times["lightning"] / times["plain"]


def sparsity_after_resume(make_callback) -> float:
    from lightning.pytorch.callbacks import ModelCheckpoint

    with tempfile.TemporaryDirectory() as directory:
        def fit(epochs: int, ckpt: str | None) -> torch.nn.Module:
            module = ClassifierModule(PlainCNN(width=8))
            checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=0, save_last=True)
            trainer = quiet_trainer(max_epochs=epochs, limit_train_batches=4, limit_val_batches=1,
                                    callbacks=[make_callback(), checkpoint], enable_checkpointing=True)
            trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt)
            return module.backbone

        fit(2, None)
        weight = fit(3, str(Path(directory) / "last.ckpt")).block2.conv.weight
        return float((weight == 0).float().mean())


def latency_vs_torch_pruning() -> tuple[float, float, float] | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    example = torch.randn(8, 1, 8, 8)
    batch = torch.randn(256, 1, 8, 8)
    torch.manual_seed(0)
    dense = PlainCNN(width=64).eval()
    ours_masked = PlainCNN(width=64).eval()
    ours_masked.load_state_dict(dense.state_dict())
    prune_filter_groups(ours_masked, example, 0.4)
    ours = compact(ours_masked, example)
    theirs = PlainCNN(width=64).eval()
    theirs.load_state_dict(dense.state_dict())
    pruner = tp.pruner.MagnitudePruner(theirs, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.4, ignored_layers=[theirs.classifier])
    pruner.step()
    ours_ms, theirs_ms = [], []
    for _ in range(5):
        ours_ms.append(measure_latency(ours, batch, runs=10, warmup=3)["latency_ms"])
        theirs_ms.append(measure_latency(theirs, batch, runs=10, warmup=3)["latency_ms"])
    macs_ratio = count_macs(ours, batch)[0] / count_macs(theirs, batch)[0]
    return statistics.median(ours_ms), statistics.median(theirs_ms), macs_ratio


def filter_pruning_vs_compact_from_scratch(workload: str, epochs: int = 10) -> tuple[float, float]:
    """Test accuracy of ``FilterPruning(0.4)`` (defaults) training ``PlainCNN(width=16)`` from scratch, and of its
    compact architecture trained from scratch with the same recipe (Adam 3e-3, cosine, ``epochs``)."""
    import lightning.pytorch as pl

    data = DigitsDataModule(batch_size=64) if workload == "digits" else ShapesDataModule(batch_size=64)
    data.setup()
    size = data.input_shape[-1]
    accuracies = []
    for compact_reference in (False, True):
        pl.seed_everything(0, verbose=False)
        network = PlainCNN(width=16, image_size=size)
        if compact_reference:
            network = pruned_architecture(network, 0.4, data.train_set.tensors[0][:2], seed=0)
        module = ClassifierModule(network, lr=3e-3)
        trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, deterministic=True,
                                callbacks=[] if compact_reference else [FilterPruning(sparsity=0.4)])
        trainer.fit(module, data)
        accuracies.append(float(trainer.test(module, data, verbose=False)[0]["test/acc"]))
    return accuracies[0], accuracies[1]


def calibration_time() -> tuple[float, float]:
    calibrator = HistogramCalibrator(2048)
    calibrator.collect(torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)))
    counts, width = calibrator.counts, calibrator.bin_width
    return (median_time(lambda: amax_entropy(counts, width, num_bits=8, unsigned=False, start_bin=128, stride=1), 10),
            median_time(lambda: loop_entropy_torch(counts, width), 2))


def main() -> None:
    parse_no_options(__doc__)
    torch.set_num_threads(1)
    rows = []
    ours, lightning = pruning_overhead()
    rows.append(("fit time with pruning / plain fit (PlainCNN(32), 4 epochs)", "MagnitudePruning", ours,
                 "Lightning ModelPruning", lightning, ours / lightning))
    from lightning.pytorch.callbacks import ModelPruning

    kept = sparsity_after_resume(lambda: MagnitudePruning(sparsity=0.9, scope="layer"))  # block2 holds 0.9
    lost = sparsity_after_resume(lambda: ModelPruning("l1_unstructured", amount=0.9, verbose=0,
                                                      apply_pruning=lambda epoch: epoch == 0,
                                                      use_lottery_ticket_hypothesis=False))
    rows.append(("sparsity after a resume (target 0.9)", "MagnitudePruning", kept, "Lightning ModelPruning", lost,
                 "-"))
    for workload in ("digits", "shapes"):
        pruned, reference = filter_pruning_vs_compact_from_scratch(workload)
        rows.append((f"test accuracy, {workload}, PlainCNN(16) 40% filters, Adam, 10 epochs", "FilterPruning(0.4)",
                     pruned, "compact architecture from scratch", reference, pruned / reference))
    qat = qat_run_seed(0, 3)
    rows.append(("QAT step time ms (PlainCNN(32))", "QuantizationAwareTraining", qat["ours step ms"],
                 "torch.ao eager QAT", qat["torch.ao step ms"], qat["ours step ms"] / qat["torch.ao step ms"]))
    rows.append(("int8 test accuracy after QAT", "export_int8", qat["ours int8 acc"], "torch.ao convert",
                 qat["torch.ao int8 acc"], qat["ours int8 acc"] / qat["torch.ao int8 acc"]))
    latency = latency_vs_torch_pruning()
    if latency is None:
        rows.append(("latency at equal MACs, batch 256", "compact", "-", "Torch-Pruning", "not installed", "-"))
    else:
        rows.append((f"latency ms at equal MACs (MAC ratio {latency[2]:.3f}), PlainCNN(64) 40%, batch 256",
                     "compact", latency[0], "Torch-Pruning MagnitudePruner", latency[1], latency[0] / latency[1]))
    fast, slow = calibration_time()
    rows.append(("entropy amax time ms (2048 bins)", "vectorised", fast * 1e3, "per-candidate loop", slow * 1e3,
                 fast / slow))
    print(f"lightning_compress benchmarks, {datetime.date.today()}, {machine()}, 1 torch thread\n")
    print(markdown_table(["measure", "ours", "value", "anchor", "value", "ours / anchor"], rows))


if __name__ == "__main__":
    main()
