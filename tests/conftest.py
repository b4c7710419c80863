"""Fixtures shared by the unit tests (the end-to-end ones have tests/e2e/conftest.py)."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def tlog(caplog):
    """Records of the "tunneld" logger, even if something set ``propagate = False`` on it
    (the daemon's ``setup_logging`` does)."""
    logger = logging.getLogger("tunneld")
    logger.addHandler(caplog.handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old_level)
