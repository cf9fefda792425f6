"""Short command-line errors: the root cause of a config typo or a bad value in a few lines.

jsonargparse reports a mistake inside a ``class_path`` list (a callback's misspelled option) as a union mismatch:
the usage of every Trainer option, then every union member it tried, then the whole list of values (some 70 lines).
The root cause is one line among them. :func:`root_causes` picks those lines out, :func:`suggest` adds the option
the user probably meant, and :class:`ConciseArgumentParser` prints just that.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["ConciseArgumentParser", "concise_message", "exit_with", "root_causes", "suggest"]

_NOISE = ("Expected a <class 'NoneType'>", "Not a valid subclass of", "Subclass types expect", "a class path (str)",
          "a dict with class_path entry", "a dict without class_path", "a dict with parameters accepted",
          "Given value", "Subtypes:", "Does not validate against any", "Errors:")
_PROBLEM = re.compile(r"Problem with given class_path '([\w.]+)'")
_OPTION = re.compile(r"Option '([\w.]+)' is not accepted")
_KEY = re.compile(r'Parser key "([\w.]+)"')


def root_causes(message: str) -> list[str]:
    """The lines of a jsonargparse error that say what is wrong, each with the class it concerns (if any).

    >>> root_causes("Parser key \\"x\\":\\n  Errors:\\n    - Problem with given class_path 'a.B':\\n"
    ...             "        Option 'z' is not accepted\\n    - Expected a <class 'NoneType'>")
    ["a.B: Option 'z' is not accepted"]
    """
    causes: list[str] = []
    where: str | None = None
    for raw in message.splitlines():
        line = raw.strip().lstrip("- ").strip()
        if not line or any(line.startswith(noise) or noise in line for noise in _NOISE) or _KEY.match(line):
            continue
        problem = _PROBLEM.search(line)
        if problem:
            where = problem.group(1)
            continue
        cause = f"{where}: {line}" if where else line
        if cause not in causes:
            causes.append(cause)
    return causes


def _accepted(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    parameters = inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters
    return [p for p in parameters if p not in ("self", "args", "kwargs")]


def suggest(cause: str) -> str:
    """``cause`` with the accepted option nearest to a misspelled one, and the accepted options.

    >>> suggest("lightning_compress.FilterPruning: Option 'sparsty' is not accepted")[34:]  # doctest: +ELLIPSIS
    "Option 'sparsty' is not accepted; did you mean 'sparsity'? Accepted: sparsity, mode, ..."
    """
    option = _OPTION.search(cause)
    class_path = cause.split(":", 1)[0] if ":" in cause else ""
    if option is None or not class_path:
        return cause
    accepted = _accepted(class_path)
    if not accepted:
        return cause
    close = difflib.get_close_matches(option.group(1).rsplit(".", 1)[-1], accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return f"{cause}{hint} Accepted: {', '.join(accepted)}"


def concise_message(message: str) -> str:
    """The error as a few lines: where (the config key) and the root causes, or ``message`` itself."""
    key = _KEY.search(message)
    causes = [suggest(cause) for cause in root_causes(message)]
    if not causes:
        return message
    head = f"{key.group(1)}: " if key else ""
    return head + ("\n  ".join(causes) if len(causes) > 1 else causes[0])


def _unrecognized(message: str, options: list[str]) -> str:
    """``unrecognized arguments: --x`` with the option probably meant."""
    unknown = re.findall(r"(--[\w.]+)", message) if message.startswith("unrecognized arguments") else []
    close = difflib.get_close_matches(unknown[0], options, n=1, cutoff=0.75) if unknown else []
    return f"{message}; did you mean {close[0]}?" if close else message


def _all_options(parser: LightningArgumentParser) -> list[str]:
    """The option strings of ``parser`` and of its subcommands' parsers."""
    options = list(parser._option_string_actions)
    for action in parser._actions:
        for sub in getattr(action, "_name_parser_map", {}).values():
            options += list(sub._option_string_actions)
    return options


class ConciseArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, printing the root cause of an error and a tip instead of the usage of every option."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        self._logger.error(message)
        message = _unrecognized(message, _all_options(self))
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {concise_message(message)}\n"
                         f"tip: `{prog} --help` lists every option; `--print_config` shows the parsed config.\n")
        self.exit(2)


def exit_with(error: Exception) -> NoReturn:
    """Print a bad value found while building the classes (a constructor's ``ValueError``) in a few lines, exit 2."""
    sys.stderr.write(f"error: {concise_message(str(error))}\n")
    raise SystemExit(2) from error
