"""The argument parser every relay subcommand uses: errors are one line naming the flag."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["EXIT_USAGE", "OneLineParser"]

#: Exit code for bad flags, as argparse and the BSD ``sysexits`` tradition use.
EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single line, then exit code 2.

    argparse prints the whole usage block before the error; in a journal or
    a container log that buries the one line that matters.
    """

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)
