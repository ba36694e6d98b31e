"""The argument parser every relay subcommand uses: errors are one line naming the flag."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["EXIT_USAGE", "OneLineParser", "join_negative_values"]

#: Exit code for bad flags, as argparse and the BSD ``sysexits`` tradition use.
EXIT_USAGE = 2

# A word that starts like a negative number ("-5s", "-1m", "-.5"). No relay
# option looks like this, so such a word can only be the value of the flag
# before it.
_NEGATIVE_VALUE = re.compile(r"-\.?[0-9]")


def join_negative_values(args: Sequence[str]) -> list[str]:
    """``["--x", "-5s"]`` → ``["--x=-5s"]``, so a negative value reaches its validator.

    argparse takes any word that starts with ``-`` and is not a plain
    negative number for an option, so ``--client-head-timeout -5s`` would
    fail with "expected one argument" instead of "must be positive". Only
    words after a long option without ``=`` are joined; after ``--`` nothing
    is touched.
    """
    out: list[str] = []
    for word in args:
        previous = out[-1] if out else ""
        if (
            _NEGATIVE_VALUE.match(word)
            and previous.startswith("--")
            and len(previous) > 2
            and "=" not in previous
            and "--" not in out
        ):
            out[-1] = f"{previous}={word}"
        else:
            out.append(word)
    return out


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single line, then exit code 2.

    argparse prints the whole usage block before the error; in a journal or
    a container log that buries the one line that matters.
    """

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}{self._suggestion(message)}\n")
        sys.exit(EXIT_USAGE)

    def _suggestion(self, message: str) -> str:
        """`` (did you mean --upstream?)`` for the first unknown ``--flag`` in ``message``."""
        if not message.startswith("unrecognized arguments: "):
            return ""
        words = message.removeprefix("unrecognized arguments: ").split()
        flags = [word.split("=", 1)[0][2:] for word in words if word.startswith("--")]
        # Compared without the dashes, which every flag shares and would make any
        # two of them look alike.
        known = [o[2:] for o in self._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(flags[0], known, n=1, cutoff=0.7) if flags else []
        return f" (did you mean --{close[0]}?)" if close else ""

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = sys.argv[1:] if args is None else args
        return super().parse_known_args(join_negative_values(words), namespace)
