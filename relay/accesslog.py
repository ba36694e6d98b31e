"""Logging: named loggers on stderr, and the one access-log line per exchange.

``relay.error`` carries operational events; ``relay.access`` gets one line
per exchange, as text (``key=value``) or JSON (``--log-format json``), which
journald and container runtimes collect from stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "access", "log_exchange", "setup_logging"]

access = logging.getLogger("relay.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; access records carry their fields."""

    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self.pid:
            document["pid"] = record.process
        fields = getattr(record, "fields", None)
        if fields:
            document.update(fields)
        else:
            document["message"] = record.getMessage()
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text", *, pid: bool = False) -> None:
    """Send relay's loggers to stderr at ``level``, as ``text`` or ``json``.

    ``pid`` (``--workers`` above 1) puts the process id on every line, so the
    lines of each worker and of their parent can be told apart.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(pid=pid))
    else:
        name = "%(name)s[%(process)d]" if pid else "%(name)s"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def log_exchange(
    *,
    client: str,
    method: bytes,
    target: bytes,
    status: int | None,
    upstream: str,
    requested_model: str | None,
    forwarded_model: str | None,
    bytes_in: int,
    bytes_out: int,
    head_s: float | None,
    ttft_s: float | None,
    total_s: float,
    ending: str,
) -> None:
    """Write the access line for one finished exchange (if INFO is enabled)."""
    if not access.isEnabledFor(logging.INFO):
        return
    fields = {
        "client": client,
        "method": method.decode("ascii", "replace"),
        "path": target.decode("ascii", "replace"),
        "status": status,
        "model": requested_model,
        "forwarded_model": forwarded_model,
        "upstream": upstream,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "head_ms": _ms(head_s),
        "ttft_ms": _ms(ttft_s),
        "total_ms": _ms(total_s),
        "ending": ending,
    }
    text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    access.info(text, extra={"fields": fields})
