"""``lightning-compress``: LightningCLI over any LightningModule and LightningDataModule.

Without a ``model`` or ``data`` section it trains :class:`~lightning_compress.demo.ClassifierModule` with a
:class:`~lightning_compress.demo.ResidualCNN` backbone on :class:`~lightning_compress.demo.DigitsDataModule`.
Compression callbacks go under ``trainer.callbacks`` with their ``class_path``; see ``examples/configs``.

Additions to the plain LightningCLI, acting before ``fit`` starts:

* a ``references`` section (:class:`~lightning_compress.references.References`) trains the teacher and the
  compressed network alone first (or reuses them), so that one command distills from a trained teacher and the
  report compares against both;
* errors are short: a config typo or a bad value prints its root cause (with the option probably meant) in a few
  lines instead of the usage of every option and a traceback (:mod:`lightning_compress.cli_errors`);
* ``--ckpt_path`` is checked first: a truncated or corrupt checkpoint stops the command with a clear error before
  anything is written. ``--ckpt_path last`` resumes from the ``last.ckpt`` of the newest run the config wrote
  (``runs/<name>/version_N/checkpoints/last.ckpt``, or the ``ModelCheckpoint`` ``dirpath``) and continues logging
  into that run's directory (:func:`~lightning_compress.utils.resume.find_last_checkpoint`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_compress.cli_errors import ConciseArgumentParser, exit_with
from lightning_compress.pruning.schedules import Schedule
from lightning_compress.references import References, prepare_references
from lightning_compress.utils.checkpoint import CheckpointError, check_checkpoint
from lightning_compress.utils.resume import ResumeError, find_last_checkpoint

DEFAULT_MODEL = {
    "class_path": "lightning_compress.demo.ClassifierModule",
    "init_args": {"backbone": {"class_path": "lightning_compress.demo.ResidualCNN"}},
}
DEFAULT_DATA = {"class_path": "lightning_compress.demo.DigitsDataModule"}


class CompressCLI(LightningCLI):
    """LightningCLI with the digits demo as the default model and data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": DEFAULT_MODEL, "data": DEFAULT_DATA})
        parser.add_argument("--references", type=References | None, default=None,
                            help="Reference runs trained (or reused) before fit: the teacher and the network alone.")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``ckpt_path`` before LightningCLI or the Trainer read it (a clear error, no traceback)."""
        super().parse_arguments(parser, args)
        config = self.config.get(str(self.config.get("subcommand")), self.config)
        path = config.get("ckpt_path") if hasattr(config, "get") else None
        try:
            if path == "last":
                found, version = find_last_checkpoint(config["trainer"])
                config["ckpt_path"] = path = str(found)
                logger = config["trainer"].get("logger")
                if version is not None and hasattr(logger, "get") and logger.get("init_args") is not None:
                    logger["init_args"]["version"] = version  # continue in the same run directory
                print(f"Resuming from {path}", file=sys.stderr)
            if path not in (None, "best", "hpc", "registry"):
                check_checkpoint(path, mmap=True)
        except (CheckpointError, ResumeError) as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from error

    def instantiate_classes(self) -> None:
        """Build the classes; a bad value a constructor refuses is printed in a few lines (no traceback)."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            exit_with(error)

    def before_fit(self) -> None:
        """Prepare the reference runs (see the module docstring)."""
        references = self.config_init[self.subcommand].get("references")
        if references is not None:
            prepare_references(references, self.trainer, self.model, self.datamodule)


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> CompressCLI:
    """Parse ``args`` (default ``sys.argv[1:]``) and, with ``run``, run the subcommand; returns the CLI object."""
    # Schedules are dataclasses, which jsonargparse otherwise accepts only as the base class: allow AGP, Cosine, ...
    set_parsing_settings(subclasses_enabled=[Schedule])
    return CompressCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_class=ConciseArgumentParser,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-compress`` command: returns nothing, so the process exits with status 0 after a
    successful run (the console script passes the return value to ``sys.exit``)."""
    build_cli(args)


if __name__ == "__main__":
    main()
