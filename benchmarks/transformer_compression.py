"""Transformers: 50% of the heads and 50% of the FFN neurons pruned and removed (HeadPruning's math), beside
Torch-Pruning on the same model; int8 Linear (export_int8_dynamic) beside torch.ao quantize_dynamic.

Tiny Hugging Face BERT and GPT-2 and an nn.TransformerEncoder classifier built from configs (4 layers, hidden 64,
4 heads, FFN 256, vocabulary 100; nothing downloaded), batch 16 x 128 tokens, one thread. For each model: parameters,
multiply-adds and latency of the compacted model relative to the dense one, and the relative difference between
the compacted and the masked model's outputs. BERT is trained on a generated task (are the tokens drawn from the
lower half of the vocabulary with probability 0.4 or 0.6?), pruned, fine-tuned and evaluated, with
Torch-Pruning's MetaPruner (magnitude, heads and FFN at 50%) fine-tuned the same way. Then int8: latency and
agreement with fp32 of our module-by-module dynamic int8 export and of torch.ao.quantization.quantize_dynamic on the
trained BERT and on a wider BERT (hidden 256, FFN 1024, untrained: agreement and relative error against fp32 on
random tokens).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved_medians, markdown_table

VOCAB, SEQ, BATCH = 100, 128, 16


def bert(hidden: int = 64) -> nn.Module:
    import transformers

    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=4 * hidden, max_position_embeddings=128))


def gpt2() -> nn.Module:
    import transformers

    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_inner=256, n_positions=128, pad_token_id=0,
        bos_token_id=1, eos_token_id=1))


class EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 256, batch_first=True), 4,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(64, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def task(n: int, seed: int, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence draws its tokens from the lower half of the vocabulary with probability 0.4 (label 0) or 0.6
    (label 1); the classifier reads position 0, so attention must gather the evidence over the sequence."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=generator) < 0.5).long()
    low = torch.rand(n, seq, generator=generator) < (0.4 + 0.2 * labels).view(-1, 1)
    half = VOCAB // 2
    ids = torch.randint(0, half, (n, seq), generator=generator) + half * (~low).long()
    return ids, labels


def train(model: nn.Module, steps: int, lr: float, seed: int = 0, seq: int = SEQ) -> None:
    ids, labels = task(steps * BATCH, seed, seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        loss = nn.functional.cross_entropy(logits(model, ids[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float(torch.cat([logits(model, ids[i:i + 64]).argmax(-1) for i in range(0, len(ids), 64)])
                 .eq(labels).float().mean())


def ours(model: nn.Module) -> tuple[nn.Module, float]:
    """50% heads and FFN by L2 norm per layer, masked, then compacted; returns it and the masked/compacted diff."""
    from lightning_compress.graph import compact_units, find_unit_groups, mask_units, norm_scores
    from lightning_compress.pruning import select_units

    groups, unsupported = find_unit_groups(model)
    assert not unsupported, unsupported
    keeps = {}
    for kind in ("heads", "ffn"):
        chosen = [g for g in groups if g.kind == kind]
        keeps.update(select_units({g.name: norm_scores(model, g) for g in chosen}, 0.5))
    for group in groups:
        mask_units(model, group, keeps[group.name])
    ids = task(BATCH, 99)[0]
    with torch.no_grad():
        masked = logits(model.eval(), ids)
        model = compact_units(model, groups, keeps)
        compacted = logits(model, ids)
    return model, float((masked - compacted).norm() / masked.norm())


def torch_pruning(model: nn.Module) -> nn.Module:
    """Torch-Pruning's MetaPruner: magnitude (L2), 50% of the heads and of the other channels, embeddings, pooler
    and classifier ignored (so the hidden size stays)."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    heads = {layer: m.num_attention_heads for m in model.modules() if isinstance(m, BertSelfAttention)
             for layer in (m.query, m.key, m.value)}
    pruner = tp.pruner.MetaPruner(
        model, task(2, 98)[0], importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
        pruning_ratio=0.5, global_pruning=False, output_transform=lambda out: out.logits.sum(),
        ignored_layers=[model.classifier, model.bert.embeddings, model.bert.pooler], num_heads=heads,
        prune_head_dims=False, prune_num_heads=True, head_pruning_ratio=0.5)
    pruner.step()
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
    return model


def cost(model: nn.Module) -> tuple[int, int]:
    from lightning_compress.measure import count_macs, count_parameters

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused encoder kernel is invisible to the flop counter
    try:
        return count_parameters(model), count_macs(model, task(1, 97)[0])[0]
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def latencies(models: dict[str, nn.Module], repeats: int) -> dict[str, float]:
    ids = task(BATCH, 96)[0]

    def runner(model: nn.Module) -> Any:
        return lambda: model(ids)

    with torch.no_grad():
        for model in models.values():
            model.eval()(ids)  # warm up
        return interleaved_medians({name: runner(m) for name, m in models.items()}, repeats)


def structure_rows(repeats: int) -> list[list[Any]]:
    rows = []
    for name, build in (("BERT", bert), ("GPT-2", gpt2), ("nn.TransformerEncoder", EncoderClassifier)):
        torch.manual_seed(0)
        dense = build().eval()
        variants = {"dense": dense}
        variants["ours"], diff = ours(copy.deepcopy(dense))
        if name == "BERT":
            variants["Torch-Pruning"] = torch_pruning(copy.deepcopy(dense))
        costs = {k: cost(m) for k, m in variants.items()}
        times = latencies(variants, repeats)
        for key in variants:
            if key == "dense":
                continue
            rows.append([name, key, f"{costs['dense'][0] / costs[key][0]:.2f}x",
                         f"{costs['dense'][1] / costs[key][1]:.2f}x", f"{times['dense'] / times[key]:.2f}x",
                         f"{times[key] * 1e3:.1f} ms (dense {times['dense'] * 1e3:.1f})",
                         f"{diff:.1e}" if key == "ours" else "-"])
    return rows


def finetune_rows(train_steps: int, tune_steps: int, seq: int) -> tuple[list[list[Any]], nn.Module]:
    """Dense BERT and GPT-2 trained on the task, pruned 50% (ours; Torch-Pruning for BERT) and fine-tuned."""
    rows, dense_bert = [], None
    for name, build, pruners in (("BERT", bert, (("ours", lambda m: ours(m)[0]), ("Torch-Pruning", torch_pruning))),
                                 ("GPT-2", gpt2, (("ours", lambda m: ours(m)[0]),))):
        torch.manual_seed(0)
        dense = build()
        train(dense, train_steps, 1e-3, seq=seq)
        test_ids, test_labels = task(512, 12345, seq)
        rows.append([name, "dense", f"{accuracy(dense, test_ids, test_labels):.3f}", "-"])
        for key, prune in pruners:
            pruned = prune(copy.deepcopy(dense))
            before = accuracy(pruned, test_ids, test_labels)
            train(pruned, tune_steps, 5e-4, seed=1, seq=seq)
            rows.append([name, key, f"{accuracy(pruned, test_ids, test_labels):.3f}", f"{before:.3f}"])
        dense_bert = dense_bert or dense
    assert dense_bert is not None
    return rows, dense_bert


def int8_rows(dense: nn.Module, repeats: int, label: str) -> list[list[Any]]:
    from lightning_compress.export import export_int8_dynamic
    from lightning_compress.export.engines import quantized_engine

    test_ids, test_labels = task(256, 4242)
    ours_int8 = export_int8_dynamic(dense, test_ids[:64], min_agreement=None)
    with quantized_engine(ours_int8.engine):
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(dense), {nn.Linear}, dtype=torch.qint8)
        times = latencies({"fp32": dense, "ours": ours_int8, "torch.ao": ao}, repeats)
        with torch.no_grad():
            reference = torch.cat([logits(dense, test_ids[i:i + 64]) for i in range(0, 256, 64)]).argmax(-1)
            rows = []
            fp32 = torch.cat([logits(dense, test_ids[i:i + 64]) for i in range(0, 256, 64)])
            for key, model in (("ours (export_int8_dynamic)", ours_int8), ("torch.ao quantize_dynamic", ao)):
                out = torch.cat([logits(model, test_ids[i:i + 64]) for i in range(0, 256, 64)])
                predicted = out.argmax(-1)
                short = "ours" if key.startswith("ours") else "torch.ao"
                rows.append([label, key, ours_int8.engine, f"{times['fp32'] / times[short]:.2f}x",
                             f"{times[short] * 1e3:.1f} ms (fp32 {times['fp32'] * 1e3:.1f})",
                             f"{float((predicted == reference).float().mean()):.3f}",
                             f"{float((predicted == test_labels).float().mean()):.3f}",
                             f"{float((out - fp32).norm() / fp32.norm()):.1e}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per model (median)")
    parser.add_argument("--train-steps", type=int, default=400, help="dense BERT training steps (0: no fine-tuning)")
    parser.add_argument("--tune-steps", type=int, default=80, help="fine-tuning steps after pruning")
    parser.add_argument("--train-seq", type=int, default=32, help="tokens per training / accuracy sequence")
    parser.add_argument("--parts", default="structure,finetune,int8", help="comma-separated parts to run")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, batch {BATCH} x {SEQ} tokens, "
          "1 thread\n")
    parts = args.parts.split(",")
    if "structure" in parts:
        print(markdown_table(["model", "pruned by", "params", "MACs", "speed-up", "latency", "masked vs compacted"],
                             structure_rows(args.repeats)), flush=True)
    torch.manual_seed(0)
    dense = bert()
    if "finetune" in parts and args.train_steps:
        rows, dense = finetune_rows(args.train_steps, args.tune_steps, args.train_seq)
        print(f"\nBERT and GPT-2, generated task ({args.train_seq} tokens), {args.train_steps} training steps, "
              f"{args.tune_steps} fine-tuning steps:\n")
        print(markdown_table(["model", "pruned by", "accuracy", "before fine-tuning"], rows), flush=True)
    if "int8" in parts:
        rows = int8_rows(dense, args.repeats, "BERT hidden 64")
        torch.manual_seed(0)
        rows += int8_rows(bert(256), args.repeats, "BERT hidden 256 (untrained)")
        print()
        print(markdown_table(["model", "int8", "engine", "speed-up vs fp32", "latency", "agreement with fp32",
                              "accuracy", "relative error"], rows))


if __name__ == "__main__":
    main()
