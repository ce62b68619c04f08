"""Soak tests run only when asked for (`make soak`, i.e. `pytest -m soak tests/soak`). Otherwise they are
deselected, not skipped: the summary says "N deselected" and no skip hides in the default run."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "soak" in (config.getoption("markexpr") or ""):
        return  # -m mentions soak: pytest's own marker selection decides
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]
