"""Train two widths of the plain CNN on digits and compare them with CompressionReport.

    python examples/report_digits.py            # full run (20 epochs each)
    python examples/report_digits.py --quick    # a few batches, as the tests run it

The second run's report gives the ratios of the narrow network against the wide one's report.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_compress import CompressionReport
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.demo.experiments import example_parser


def train(width: int, quick: bool, baseline: str | None, output_dir: Path) -> dict:
    pl.seed_everything(0, verbose=False)
    report = CompressionReport(baseline=baseline, output_dir=str(output_dir), batch_size=64)
    trainer = pl.Trainer(
        max_epochs=1 if quick else 20,
        limit_train_batches=2 if quick else None,
        limit_val_batches=2 if quick else None,
        logger=TensorBoardLogger("runs", name=f"report_digits_width{width}"),
        callbacks=[report],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(ClassifierModule(PlainCNN(width=width), lr=3e-3), DigitsDataModule(seed=0))
    assert report.report is not None
    return report.report


def main() -> None:
    parser = example_parser(__doc__)
    args = parser.parse_args()
    output = Path("runs") / "report_digits"
    wide = train(64, args.quick, None, output / "wide")
    narrow = train(16, args.quick, str(output / "wide" / "compression_report.json"), output / "narrow")
    print((output / "narrow" / "compression_report.md").read_text())
    print(json.dumps({"wide_accuracy": wide["accuracy"], "narrow_accuracy": narrow["accuracy"]}))


if __name__ == "__main__":
    main()
