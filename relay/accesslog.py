"""Logging setup: named loggers on stderr (journald and container runtimes collect it).

``relay.error`` carries operational events; ``relay.access`` gets one line per
exchange.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


def setup_logging(level: str) -> None:
    """Send relay's loggers to stderr at ``level`` (debug, info, warning, error)."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
