"""Shared fixtures, and the guarantee that the suite tests the installed relay.

Helpers for tests live beside this file (harness, relayfixture, relayprocess,
redisfixture, sglang_app) and are importable because setup.cfg puts tests/ on
pytest's path; fixtures more than one test module uses are here.

The suite runs against relay as pip installed it, never the checkout's
``relay/`` folder: a wheel that lacks a module must fail here, as it fails for
users. So the checkout is kept off ``sys.path`` (``python -P``, and
``PYTHONSAFEPATH=1`` for every child process the tests start), and the first
import of relay is checked to come from outside the checkout. Developers who
want the fast loop against their edits set ``TEST_FROM_CHECKOUT=1``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from redisfixture import RedisServer, need_redis_server

CHECKOUT = Path(__file__).resolve().parents[1]
FROM_CHECKOUT = os.environ.get("TEST_FROM_CHECKOUT") == "1"

if not FROM_CHECKOUT:
    # Child processes (`python -m relay`, the bench) must not find the
    # checkout through their working directory either.
    os.environ["PYTHONSAFEPATH"] = "1"


def _bench_path() -> str:
    """A directory holding only ``bench`` (a link to the checkout's), for imports.

    The bench is not installed, but putting the checkout itself on the path
    would put its ``relay/`` there too.
    """
    holder = tempfile.mkdtemp(prefix="relay-bench-path-")
    atexit.register(shutil.rmtree, holder, ignore_errors=True)
    os.symlink(CHECKOUT / "bench", Path(holder) / "bench")
    return holder


BENCH_PATH = _bench_path()
sys.path.append(BENCH_PATH)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (BENCH_PATH, os.environ.get("PYTHONPATH")) if p
)


def pytest_configure(config: pytest.Config) -> None:
    import relay

    origin = Path(relay.__file__).resolve()
    if not FROM_CHECKOUT and origin.is_relative_to(CHECKOUT / "relay"):
        raise pytest.UsageError(
            f"the tests imported relay from the checkout ({origin.parent}), not from the "
            "installed package; run them as the README says: "
            "pip install '.[test]' && python -P -m pytest (or set TEST_FROM_CHECKOUT=1)"
        )


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Run the test under both event loops relay supports."""
    return request.param


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port (skips where it is not installed)."""
    need_redis_server()
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()
