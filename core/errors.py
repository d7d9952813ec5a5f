"""The one error base, and what each kind of error means to a caller of the `loraloop` command.

Every error loraloop reports to a person derives from :class:`LoraloopError`: its message is one line, and
its class says which exit code the CLI ends with (``exit_code``). The CLI's ``main`` is the only place that
turns an error into output and an exit code (``deploy/cli.py``); commands raise, they do not print errors.
Errors keep their builtin base where callers catch it (a ``RecipeError`` is still a ``ValueError``).
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    """Exit codes of the `loraloop` command (docs/deploy.md, docs/retrain.md)."""

    OK = 0
    #: The command ran and failed (a training run broke, a gateway did not answer, an alias failed in the cycle).
    FAILED = 1
    #: Refused as given: bad settings, arguments, recipe, an unknown version, a refused transition.
    USAGE = 2
    #: `loraloop retrain`: the candidate failed its gate; nothing was registered.
    GATE_REJECTED = 3
    #: `loraloop retrain`: too little new training data (a quiet night); nothing trained, the watermark stays.
    NOT_ENOUGH_DATA = 4
    #: `loraloop cycle`: something was done (promotion, rollback, timeout, ramp, new canary).
    ACTED = 10
    #: `loraloop cycle`: another cycle holds the lock (EX_TEMPFAIL: try again later).
    LOCKED = 75
    #: Interrupted with Ctrl-C.
    INTERRUPTED = 130


class LoraloopError(Exception):
    """An error reported to a person as one line; ``exit_code`` is the CLI's exit code for it."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILED

    def one_line(self) -> str:
        """The message's first line (a traceback or a multi-line library message stays in the log)."""
        text = str(self).strip()
        return text.splitlines()[0] if text else type(self).__name__


class UsageError(LoraloopError):
    """Refused as given: the input (arguments, a file, a name) is wrong; nothing was changed."""

    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """A settings problem, rendered as one line for the operator; ``problems`` holds each one on its own
    (`loraloop config check` prints them a line each)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class CommandError(UsageError):
    """A command's arguments do not fit together (or name something that does not exist)."""


__all__ = ["CommandError", "ConfigError", "ExitCode", "LoraloopError", "UsageError"]
