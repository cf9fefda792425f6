"""Compress a BERT classifier in one Trainer: distillation with transformer terms, head/FFN pruning, int8 export.

    python examples/transformer_compress.py            # one seed, the full table (1-2 minutes on 2 cores)
    python examples/transformer_compress.py --quick    # tiny sizes, a couple of batches (what the tests run)

Task (generated, sentiment-like, the one of ``benchmarks/transformer_distill.py``; nothing downloaded): sequences of
12 tokens over a vocabulary of 20: positive words (ids 2..7, +1), negative (8..13, -1), neutral (14..19) and "not"
(id 1, 15% of tokens), which flips the word after it; the label says whether the summed polarity is <= -2, -1..1 or
>= 2 (three classes), so a model has to count words and read each "not" with its neighbour.

1. The teacher, ``BertForSequenceClassification`` built from a ``BertConfig`` (4 layers, hidden 64, 4 heads, FFN
   128, eager attention, dropout 0), is trained with its own loss on 8192 sequences (Adam, lr 2e-3, batch 64). It
   sits on a plateau near 0.62-0.65 accuracy (the majority class and the easy cases), then learns the task within
   two or three epochs; when depends on the seed (epochs 6-8 with seed 0, 12-15 with seed 3, 16-19 with seed 2).
   So it trains until 99% validation accuracy, then 4 epochs more (at most 30 in all): a teacher stopped as soon as
   it reached the target (0.997 test accuracy) taught the student less (0.877 against 1.000, seed 0).
2. The student, a freshly initialised BERT of the teacher's shape, sees only 512 labelled sequences and is
   distilled, pruned and exported in ONE ``Trainer.fit`` (20 epochs, Adam lr 2e-3): ``DistillationModule`` (KD 0.9
   soft + 0.1 hard at T = 2, plus TinyBERT hidden-state MSE and MiniLM attention KL, layer to layer,
   ``TransformerKnowledge``), ``HeadPruning`` (hard, 50% of the heads and of the FFN neurons by first-order Taylor
   importance, reached on a cubic schedule by epoch 10, then 10 recovery epochs; the pruned units are removed at
   the end of fit) and ``Int8Export(method="dynamic")`` (every ``Linear`` of the compacted student to int8,
   checked against it and written to ``runs/transformer_compress/distilled/model_int8.pt``).
3. "student alone" runs the same recipe from the same initialisation without the teacher's knowledge
   (``soft_weight=0, hard_weight=1``, no transformer terms; the teacher is called but teaches nothing).

Accuracy is on 2048 held-out sequences; latency is the median of single-thread runs at batch 16
(``measure_latency``, the models measured in alternating rounds); agreement is the share of test sequences on which
a model predicts the distilled fp32 student's class. The table is printed and written to
``runs/transformer_compress/results.md``.

At this size (hidden 64, 12 tokens) int8 does not pay: quantizing the activations at every call costs more than the
int8 matrix products save, as README's "Pruning and quantizing transformers" measures (int8 Linear is 1.2-1.45x
faster from hidden 256); the int8 student shows that the compacted student exports, agrees and shrinks its file.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import DistillationModule, HeadPruning, Int8Export
from lightning_compress.demo.experiments import ExampleSettings, example_parser, publish, quiet_single_thread
from lightning_compress.demo.tokens import TokenDataset, polarity_bert, polarity_tokens
from lightning_compress.distillation import TransformerKnowledge
from lightning_compress.measure import count_parameters, measure_latency
from lightning_compress.pruning.schedules import AGP

NAME = "transformer_compress"
LR = 2e-3  # Adam, teacher and students
TEACHER_TARGET, SETTLE_EPOCHS = 0.99, 4  # the teacher trains 4 more epochs once it reaches 99% validation accuracy
TEACHER, ALONE, DISTILLED = "teacher (fp32)", "student alone, pruned (fp32)", "distilled + pruned (fp32)"
INT8 = "distilled + pruned (int8, dynamic)"


class Settings(ExampleSettings):
    def __init__(self, quick: bool) -> None:
        super().__init__(quick, seeds=1, teacher_epochs=(1, 30), epochs=(2, 20), prune_epochs=(1, 10),
                         teacher_data=(128, 8192), student_data=(64, 512), test_data=(64, 2048),
                         shape=((32, 2, 4), (64, 4, 4)), latency_runs=(2, 10), latency_rounds=(1, 5))


class HFClassifier(pl.LightningModule):
    """How a user trains the teacher: the model's own loss on dict batches."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        predicted = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(1)
        self.log("val_acc", (predicted == batch["labels"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LR)


class UntilLearned(pl.Callback):
    """Stop training ``extra_epochs`` after the validation accuracy first reaches ``target``."""

    def __init__(self, target: float, extra_epochs: int) -> None:
        self.target, self.extra_epochs, self.reached_at = target, extra_epochs, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reached_at is None and float(trainer.callback_metrics.get("val_acc", 0.0)) >= self.target:
            self.reached_at = trainer.current_epoch
        if self.reached_at is not None and trainer.current_epoch >= self.reached_at + self.extra_epochs:
            trainer.should_stop = True


def _trainer(epochs: int, settings: Settings, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks or [], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      deterministic=True, limit_train_batches=settings.limit, limit_val_batches=settings.limit)


def predict(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.argmax(1)


def compress(student: nn.Module, teacher: nn.Module, labelled: dict[str, torch.Tensor], val: dict[str, torch.Tensor],
             settings: Settings, seed: int, distill: bool) -> tuple[nn.Module, Int8Export]:
    """The student through one fit: distillation (or labels only), pruning, int8 export."""
    pl.seed_everything(seed, verbose=False)
    knowledge = TransformerKnowledge(hidden_weight=1.0, attention_weight=1.0, layer_map="uniform")
    options: dict[str, Any] = {"transformer": knowledge} if distill else {"soft_weight": 0.0, "hard_weight": 1.0}
    module = DistillationModule(student, teacher, temperature=2.0, lr=LR, **options)
    pruning = HeadPruning(head_sparsity=0.5, ffn_sparsity=0.5, criterion="taylor", mode="hard",
                          schedule=AGP(start=0, end=settings.prune_epochs), compact_on_fit_end=True)
    export = Int8Export(output_dir=f"runs/{NAME}/{'distilled' if distill else 'no_teacher'}", method="dynamic",
                        batch_size=64, min_agreement=None if settings.quick else 0.95)
    train = DataLoader(TokenDataset(labelled), batch_size=32, shuffle=True)
    validation = DataLoader(TokenDataset(val), batch_size=256)
    _trainer(settings.epochs, settings, [pruning, export]).fit(module, train, validation)
    return module.compression_target.eval(), export  # compacted: HeadPruning replaced it at the end of fit


def latencies(models: dict[str, nn.Module], data: dict[str, torch.Tensor], settings: Settings) -> dict[str, float]:
    """Median single-thread latency at batch 16 of each model, measured in alternating rounds."""
    batch = {key: data[key][:16] for key in ("input_ids", "attention_mask")}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(settings.latency_rounds):
        for name, model in models.items():
            times[name].append(measure_latency(model, batch, runs=settings.latency_runs, warmup=2,
                                               num_threads=1)["latency_ms"])
    return {name: statistics.median(values) for name, values in times.items()}


def state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0, help="fixes the data, the initialisation and the data order")
    args = parser.parse_args(argv)
    settings, seed = Settings(args.quick), args.seed
    start = time.perf_counter()
    fit_s: dict[str, float] = {}
    with quiet_single_thread():
        teacher_data = polarity_tokens(settings.teacher_data, seed)
        labelled = polarity_tokens(settings.student_data, seed + 1)
        val, test = polarity_tokens(512, seed + 2), polarity_tokens(settings.test_data, seed + 3)
        pl.seed_everything(seed, verbose=False)
        teacher = polarity_bert(*settings.shape)
        began = time.perf_counter()
        trainer = _trainer(settings.teacher_epochs, settings, [UntilLearned(TEACHER_TARGET, SETTLE_EPOCHS)])
        trainer.fit(HFClassifier(teacher), DataLoader(TokenDataset(teacher_data), batch_size=64, shuffle=True),
                    DataLoader(TokenDataset(val), batch_size=256))
        teacher_epochs = trainer.current_epoch  # epochs run (fewer than the limit once the target is reached)
        fit_s[TEACHER] = time.perf_counter() - began
        teacher.eval().requires_grad_(False)
        students: dict[str, nn.Module] = {}
        for name, distill in ((ALONE, False), (DISTILLED, True)):
            pl.seed_everything(seed, verbose=False)  # both students start from the same weights
            began = time.perf_counter()
            student = polarity_bert(*settings.shape)
            students[name], export = compress(student, teacher, labelled, val, settings, seed, distill)
            fit_s[name] = time.perf_counter() - began
        assert export.model is not None, export.results
        models = {TEACHER: teacher, **students, INT8: export.model}
        predicted = {name: predict(model, test) for name, model in models.items()}
        latency = latencies(models, test, settings)
    rows = []
    for name in models:
        accuracy = float((predicted[name] == test["labels"]).float().mean())
        params = count_parameters(models[DISTILLED if name == INT8 else name])
        agreement = float((predicted[name] == predicted[DISTILLED]).float().mean())
        rows.append(f"| {name} | {accuracy:.3f} | {params / 1e3:.1f}k | {latency[name]:.2f} | "
                    f"{latency[TEACHER] / latency[name]:.2f}x | {agreement:.3f} | "
                    f"{f'{fit_s[name]:.0f}' if name in fit_s else '(in the fit above)'} |")
    hidden, layers, heads = settings.shape
    int8_bytes, fp32_bytes = int(export.results["size_bytes"]), state_bytes(students[DISTILLED])
    lines = [f"BERT {layers} layers, hidden {hidden}, {heads} heads, FFN {2 * hidden}; teacher "
             f"{teacher_epochs} epochs on {settings.teacher_data} sequences; students of the same shape, "
             f"{settings.epochs} epochs on {settings.student_data} labelled sequences in one fit (50% of heads and "
             f"FFN neurons pruned by epoch {settings.prune_epochs}, compacted, int8 export at fit end); accuracy on "
             f"{settings.test_data} test sequences; latency at batch 16, 1 thread, median; seed {seed}.", "",
             "| model | test acc | params | latency ms | speed-up vs teacher | agrees with distilled fp32 | fit s |",
             "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
             f"int8 vs fp32 student: latency ratio (int8 / fp32) {latency[INT8] / latency[DISTILLED]:.2f}, "
             f"agreement {float((predicted[INT8] == predicted[DISTILLED]).float().mean()):.3f} on the test set "
             f"({export.results['agreement']:.3f} on the validation set in Int8Export), file {int8_bytes / 1e3:.0f} kB "
             f"(fp32 state_dict {fp32_bytes / 1e3:.0f} kB), engine {export.results['engine']}; "
             f"{time.perf_counter() - start:.0f} s in all."]
    return publish(NAME, "\n".join(lines))


if __name__ == "__main__":
    main()
