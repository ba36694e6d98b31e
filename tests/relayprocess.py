"""relay as a subprocess for e2e tests: started, its stderr lines kept, stopped or killed.

Tests that need separate processes (``--workers``, two relays sharing a
store, SIGKILL) use :class:`RelayProcess`; the rest run relay in a thread
(:mod:`relayfixture`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LIMIT = 20.0


class RelayProcess:
    """relay as a subprocess whose stderr lines are kept (read by a thread)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "--listen", "127.0.0.1:0", *args],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            line = self.wait_line(r"listening on 127\.0\.0\.1:(\d+)")
        except BaseException:
            self.kill()  # a relay that did not start must not outlive the test
            raise
        self.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", line).group(1))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # EOF marker
            self._changed.notify_all()

    def wait_line(self, pattern: str, limit: float = LIMIT) -> str:
        """The first stderr line matching ``pattern`` (waits for it, bounded)."""
        deadline = time.monotonic() + limit
        with self._changed:
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.lines and self.lines[-1] == ""):
                    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(self.lines))
                self._changed.wait(remaining)

    def count(self, pattern: str) -> int:
        """How many stderr lines so far match ``pattern``."""
        with self._changed:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def workers(self) -> list[int]:
        """The pids of the relay's children (its workers with ``--workers``)."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def kill(self) -> None:
        """SIGKILL the relay and (for --workers) its workers."""
        try:
            pids = self.workers()
        except OSError:
            pids = []
        for pid in [self.process.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(LIMIT)

    def stop(self) -> int:
        """SIGTERM, then wait (bounded; killed past it); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(LIMIT)
        finally:
            if self.process.poll() is None:
                self.kill()
