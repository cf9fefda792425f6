"""Distilling a BERT-style transformer (Hugging Face, built from configs; nothing downloaded): the student alone,
KD, and KD with hidden-state (TinyBERT) and MiniLM attention / value-relation terms, over 3 seeds.

    python benchmarks/transformer_distill.py

Task (generated, sentiment-like): sequences of 12 tokens over a vocabulary of 20: positive words (ids 2..7, +1),
negative (8..13, -1), neutral (14..19) and "not" (id 1, 15% of tokens) which flips the word after it; the label
says whether the summed polarity is <= -2, -1..1 or >= 2, so the model has to count words and read each "not" with its
neighbour. The teacher
(``BertForSequenceClassification``, 4 layers, hidden 48, 4 heads, eager attention) trains on 3072 sequences; each
student (2 layers, hidden 24, 2 heads) on 256 labelled sequences only, for a fixed number of epochs with the same
recipe (Adam, lr 2e-3), so the teacher's knowledge is what differs; accuracy on 2048 held-out sequences. Every
variant is a ``DistillationModule`` on dict batches (``input_ids``, ``attention_mask``, ``labels``): "student
alone" is ``soft_weight=0, hard_weight=1`` (the teacher runs but teaches nothing).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, markdown_table, parse_no_options, quiet_trainer

from lightning_compress.demo.tokens import TokenDataset, polarity_bert, polarity_tokens

SEEDS = (0, 1, 2)
STUDENT_EPOCHS, TEACHER_EPOCHS = 20, 15
TEACHER, STUDENT = (48, 4, 4), (24, 2, 2)  # hidden, layers, heads
TEACHER_DATA, STUDENT_DATA = 3072, 256


class HFClassifier(pl.LightningModule):
    """How a user trains the teacher: the model's own loss on dict batches."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def accuracy(model: Any, data: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return float((logits.argmax(1) == data["labels"]).float().mean())


def variants() -> dict[str, dict[str, Any]]:
    from lightning_compress.distillation import TransformerKnowledge

    knowledge = TransformerKnowledge(hidden_weight=1.0, attention_weight=1.0, value_weight=1.0, layer_map="uniform",
                                     relation_heads=2, student_values="bert.encoder.layer.1.attention.self.value",
                                     teacher_values="bert.encoder.layer.3.attention.self.value")
    return {"student alone": {"soft_weight": 0.0, "hard_weight": 1.0},
            "KD (soft 0.9 + hard 0.1, T=4)": {},
            "KD + hidden (TinyBERT) + MiniLM attention + value relation": {"transformer": knowledge}}


def main() -> None:
    parse_no_options(__doc__)
    from lightning_compress.distillation import DistillationModule

    torch.set_num_threads(1)
    train, small, test = polarity_tokens(TEACHER_DATA, 0), polarity_tokens(STUDENT_DATA, 1), polarity_tokens(2048, 2)
    pl.seed_everything(0, verbose=False)
    teacher = polarity_bert(*TEACHER)
    start = time.perf_counter()
    quiet_trainer(max_epochs=TEACHER_EPOCHS).fit(HFClassifier(teacher), DataLoader(TokenDataset(train), batch_size=64,
                                                                                   shuffle=True))
    teacher_time, teacher_acc = time.perf_counter() - start, accuracy(teacher, test)
    print(f"teacher: {teacher_acc:.3f} test accuracy ({teacher_time:.0f} s)", flush=True)
    results: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    for name, options in variants().items():
        for seed in SEEDS:
            pl.seed_everything(seed, verbose=False)
            student = polarity_bert(*STUDENT)
            module = DistillationModule(student, teacher, lr=2e-3, **options)
            loader = DataLoader(TokenDataset(small), batch_size=32, shuffle=True)
            start = time.perf_counter()
            quiet_trainer(max_epochs=STUDENT_EPOCHS).fit(module, loader)
            times.setdefault(name, []).append(time.perf_counter() - start)
            results.setdefault(name, []).append(accuracy(student, test))
            print(f"{name}, seed {seed}: {results[name][-1]:.3f}", flush=True)
    alone = results["student alone"]
    rows = []
    for name, values in results.items():
        gains = [v - a for v, a in zip(values, alone, strict=True)]
        rows.append([name, f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}",
                     " / ".join(f"{v:.3f}" for v in values),
                     "-" if values is alone else f"{statistics.mean(gains):+.3f} ({sum(g > 0 for g in gains)}/3)",
                     f"{statistics.mean(times[name]):.0f}"])
    print(f"\nteacher (hidden, layers, heads) {TEACHER}: {teacher_acc:.3f}; students {STUDENT}, {STUDENT_DATA} "
          f"labelled sequences, {STUDENT_EPOCHS} epochs; {machine()}\n")
    print(markdown_table(["student", "test acc (mean ± sd)", "seeds 0 / 1 / 2", "vs alone (paired; wins)",
                          "fit s"], rows))


if __name__ == "__main__":
    main()
