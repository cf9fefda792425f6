"""``lightning-compress``: LightningCLI over any LightningModule and LightningDataModule.

Without a ``model`` or ``data`` section it trains :class:`~lightning_compress.demo.ClassifierModule` with a
:class:`~lightning_compress.demo.ResidualCNN` backbone on :class:`~lightning_compress.demo.DigitsDataModule`.
Compression callbacks go under ``trainer.callbacks`` with their ``class_path``; see ``examples/configs``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

DEFAULT_MODEL = {
    "class_path": "lightning_compress.demo.ClassifierModule",
    "init_args": {"backbone": {"class_path": "lightning_compress.demo.ResidualCNN"}},
}
DEFAULT_DATA = {"class_path": "lightning_compress.demo.DigitsDataModule"}


class CompressCLI(LightningCLI):
    """LightningCLI with the digits demo as the default model and data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": DEFAULT_MODEL, "data": DEFAULT_DATA})


def main(args: Sequence[str] | None = None, run: bool = True) -> CompressCLI:
    """Entry point of the ``lightning-compress`` command (``args`` replaces ``sys.argv[1:]`` in tests)."""
    return CompressCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
