"""Peak memory and step time of distillation fits against the student-alone fit, each fit in a fresh process.

    python benchmarks/distill_memory.py

Student ``ResidualCNN(width=4)`` (5.1k parameters), teacher ``ResidualCNN(width=16)`` (77.8k), digits at batch
256, 3 epochs, one thread. Columns: peak RSS of the process (``ru_maxrss``: the interpreter, torch and Lightning
dominate it), the bytes autograd saved for backward in one training step (summed over the step's saved tensors:
the activation memory a step holds; a teacher run under ``no_grad`` adds nothing there), and the median training
step time (``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer) with its ratio to the
student-alone fit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, markdown_table, parse_no_options

STAGES = "['stage1', 'stage2', 'stage3']"
CONFIGS = {
    "student alone": "ClassifierModule(student())",
    "teacher alone (for scale)": "ClassifierModule(teacher())",
    "KD (soft + hard)": "DistillationModule(student(), teacher())",
    "KD + FitNets hints (3 stages)": f"DistillationModule(student(), teacher(), student_layers={STAGES}, "
                                     f"teacher_layers={STAGES}, hint_weight=1.0)",
    "KD + attention (3 stages)": f"DistillationModule(student(), teacher(), student_layers={STAGES}, "
                                 f"teacher_layers={STAGES}, attention_weight=1.0)",
    "mutual learning (2 peers)": "MutualLearningModule([student(), student()])",
    "Be Your Own Teacher (2 exits)": "SelfDistillationModule(student(), ['stage1', 'stage2'], 'stage3', "
                                     "input_shape=[1, 8, 8])",
}

CHILD = """
import json, resource, statistics, time, warnings, torch, lightning.pytorch as pl
from lightning_compress.demo import ClassifierModule, DigitsDataModule, ResidualCNN
from lightning_compress.distillation import DistillationModule, MutualLearningModule, SelfDistillationModule
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
pl.seed_everything(0, verbose=False)
student = lambda: ResidualCNN(width=4)
teacher = lambda: ResidualCNN(width=16)

class Probe(pl.Callback):
    def __init__(self):
        self.times, self.saved, self._bytes = [], [], 0
    def _pack(self, tensor):
        self._bytes += tensor.numel() * tensor.element_size()
        return tensor
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        self._start = time.perf_counter()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)
        self._hooks.__exit__(None, None, None)
        self.saved.append(self._bytes)

probe = Probe()
module = {module}
trainer = pl.Trainer(max_epochs=3, callbacks=[probe], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
trainer.fit(module, DigitsDataModule(batch_size=256))
print(json.dumps({{"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "saved_mib": max(probe.saved) / 2**20, "step_ms": 1000 * statistics.median(probe.times)}}))
"""


def measure(module: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(module=module)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parse_no_options(__doc__)
    results = {name: measure(module) for name, module in CONFIGS.items()}
    base = results["student alone"]
    rows = [(name, r["peak_mib"], r["peak_mib"] / base["peak_mib"], r["saved_mib"], r["step_ms"],
             r["step_ms"] / base["step_ms"]) for name, r in results.items()]
    print(f"Digits, batch 256, 3 epochs, 1 thread, each fit in a fresh process ({machine()})\n")
    print(markdown_table(["fit", "peak RSS MiB", "RSS ratio", "autograd saved MiB / step", "step ms (median)",
                          "step time ratio"], rows))


if __name__ == "__main__":
    main()
