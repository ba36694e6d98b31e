"""Shared fixtures. Helpers for tests live beside this file (harness, relayfixture,
sglang_app) and are importable because setup.cfg puts tests/ on pytest's path."""

import pytest


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Run the test under both event loops relay supports."""
    return request.param
