"""Issue 18, "all in one Trainer with resume exact": a BERT student distilled from a BERT teacher with the transformer
terms (TinyBERT hidden states through a learned projection, MiniLM attention KL), hard head/FFN pruning by Taylor
importance on a step schedule and an int8 export (``method="dynamic"``) at the end of fit, in one ``Trainer``.

A run that crashes in the middle of the pruning schedule and is resumed from its ``last.ckpt`` by fresh objects (built
the same way, as a new process would) ends bitwise where the uninterrupted run ends: student and projections, masks,
schedule position, compaction and the int8 model's outputs. Dropout is 0 and the data unshuffled: dropout draws and
the sampler's random state are not in checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_compress import DistillationModule, HeadPruning, Int8Export
from lightning_compress.distillation import TransformerKnowledge
from lightning_compress.pruning.schedules import Linear

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*token_id.*")

EPOCHS, STEPS_PER_EPOCH, CRASH_EPOCH = 4, 3, 2
SCHEDULE = dict(start=1, end=9, unit="step", frequency=2)  # mask updates at steps 1, 3, 5, 7, 9: mid-way at step 6


def bert(hidden: int, layers: int) -> Any:
    config = transformers.BertConfig(vocab_size=30, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=16,
                                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"  # attention probabilities for the MiniLM term
    return transformers.BertForSequenceClassification(config)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (STEPS_PER_EPOCH * 8, 10), generator=generator)
    samples = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row[1] % 3} for row in ids]
    return DataLoader(samples, batch_size=8)


class Crash(pl.Callback):
    """Stop the run abruptly (no end of fit) at the first step of ``epoch``, as a killed process would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"crashed at step {trainer.global_step}")


class Interrupted(RuntimeError):
    pass


class Start(pl.Callback):
    """Where training started: epoch, step and the pruning schedule's position."""

    def __init__(self, pruning: HeadPruning) -> None:
        self.pruning = pruning
        self.at: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.at = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                   "position": self.pruning.position}


def fit(root: Path, resume: str | None = None, crash: bool = False) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    teacher, student = bert(48, 4).eval(), bert(32, 2)
    knowledge = TransformerKnowledge(hidden_weight=1.0, attention_weight=1.0, layer_map="uniform")
    module = DistillationModule(student, teacher, lr=3e-3, transformer=knowledge)
    pruning = HeadPruning(head_sparsity=0.5, ffn_sparsity=0.5, criterion="taylor", mode="hard",
                          schedule=Linear(**SCHEDULE), compact_on_fit_end=True)
    export = Int8Export(output_dir=str(root), method="dynamic", batch_size=16, min_agreement=None)
    start = Start(pruning)
    callbacks = [pruning, export, start, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)]
    trainer = pl.Trainer(max_epochs=EPOCHS, limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=1,
                         callbacks=callbacks + ([Crash(CRASH_EPOCH)] if crash else []), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         deterministic=True, default_root_dir=str(root))
    trainer.fit(module, loader(), loader(), ckpt_path=resume)
    with torch.no_grad():
        inputs = next(iter(loader()))
        int8_logits = export.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return {"state": {k: v.detach().clone() for k, v in module.state_dict().items()}, "pruning": pruning,
            "export": export, "start": start.at, "int8_logits": int8_logits, "student": module.compression_target}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("transformer_pipeline")
    straight = fit(root / "straight")
    with pytest.raises(Interrupted):
        fit(root / "crashed", crash=True)
    last = root / "crashed" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)  # before the resumed run writes its own
    resumed = fit(root / "crashed", resume=str(last))
    return {"straight": straight, "resumed": resumed, "checkpoint": checkpoint}


def test_the_checkpoint_is_mid_schedule_and_the_resumed_run_starts_from_it(runs):
    checkpoint = runs["checkpoint"]
    assert checkpoint["epoch"] == CRASH_EPOCH - 1 and checkpoint["global_step"] == CRASH_EPOCH * STEPS_PER_EPOCH
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("HeadPruning"))
    assert SCHEDULE["start"] < state["position"] < SCHEDULE["end"]  # pruning under way: some units, not all
    alive = [float(m.float().mean()) for m in state["masks"].values()]
    assert all(0.5 < a < 1.0 for a in alive), alive
    assert not state["compacted"]
    assert runs["straight"]["start"] == {"epoch": 0, "global_step": 0, "position": None}
    assert runs["resumed"]["start"] == {"epoch": CRASH_EPOCH, "global_step": CRASH_EPOCH * STEPS_PER_EPOCH,
                                        "position": state["position"]}


def test_resumed_run_ends_bitwise_where_the_uninterrupted_run_ends(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    assert straight["state"].keys() == resumed["state"].keys()
    assert "transformer_terms.projections.0.proj.weight" in straight["state"]  # TinyBERT W_h, 32 -> 48, trained
    for name, value in straight["state"].items():
        assert torch.equal(value, resumed["state"][name]), name
    a, b = straight["pruning"], resumed["pruning"]
    assert a.position == b.position >= SCHEDULE["end"] and a.compacted and b.compacted
    assert a.masks.keys() == b.masks.keys()
    assert all(torch.equal(a.masks[name], b.masks[name]) for name in a.masks)
    assert a.alive("heads") == 0.5 and a.alive("ffn") == 0.5
    layer = resumed["student"].bert.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 2 and layer.intermediate.dense.out_features == 32
    assert straight["export"].results["quantized_layers"] == resumed["export"].results["quantized_layers"] > 0
    assert torch.equal(straight["int8_logits"], resumed["int8_logits"])
