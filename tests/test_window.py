"""The receive window's growth rule and the ``max_window`` setting (pure: ``tunneld.window``,
and config.toml's key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunneld.config import load_config
from tunneld.errors import ConfigError
from tunneld.window import (
    BASE_WINDOW,
    DEFAULT_MAX_WINDOW,
    MIN_RTT,
    format_size,
    grown,
    parse_size,
    start_window,
)

MiB = 1024 * 1024


@pytest.mark.parametrize("window, max_window, received, elapsed, rtt, expected", [
    # half a window or more per round trip: the window limited the server, it doubles
    (2 * MiB, 16 * MiB, 2 * MiB, 0.05, 0.05, 4 * MiB),
    (2 * MiB, 16 * MiB, 1 * MiB, 0.05, 0.05, 4 * MiB),
    (8 * MiB, 16 * MiB, 8 * MiB, 0.10, 0.05, 16 * MiB),     # two round trips, 8 MiB: 4/rtt
    # ... never past max_window
    (8 * MiB, 12 * MiB, 8 * MiB, 0.05, 0.05, 12 * MiB),
    (16 * MiB, 16 * MiB, 16 * MiB, 0.05, 0.05, 16 * MiB),
    # a window lowered by a reload is kept (credit given is not taken back)
    (32 * MiB, 16 * MiB, 32 * MiB, 0.05, 0.05, 32 * MiB),
    # less than half a window per round trip: the server (or the local reader) is the limit
    (2 * MiB, 16 * MiB, 1 * MiB - 1, 0.05, 0.05, 2 * MiB),
    (2 * MiB, 16 * MiB, 2 * MiB, 0.25, 0.05, 2 * MiB),      # 2 MiB in five round trips
    # less than a round trip measured: no verdict yet
    (2 * MiB, 16 * MiB, 2 * MiB, 0.04, 0.05, 2 * MiB),
    # no round trip known yet, or one too short to matter (loopback, a LAN)
    (2 * MiB, 16 * MiB, 2 * MiB, 0.05, float("inf"), 2 * MiB),
    (2 * MiB, 16 * MiB, 2 * MiB, 0.001, MIN_RTT / 2, 2 * MiB),
])
def test_growth_rule(window, max_window, received, elapsed, rtt, expected):
    assert grown(window, max_window, received, elapsed, rtt) == expected


def test_loopback_rates_never_grow_the_window():
    # 4 GB/s delivered (far above what one channel moves) over a round trip under MIN_RTT
    rtt = MIN_RTT * 0.9
    assert grown(BASE_WINDOW, DEFAULT_MAX_WINDOW, int(4e9 * rtt), rtt, rtt) == BASE_WINDOW


def test_start_window():
    assert start_window(DEFAULT_MAX_WINDOW) == BASE_WINDOW == 2 * MiB
    assert start_window(512 * 1024) == 512 * 1024


@pytest.mark.parametrize("text, expected", [
    (16777216, 16 * MiB), ("16MiB", 16 * MiB), ("16M", 16 * MiB), ("16 MB", 16 * MiB),
    ("512KiB", 512 * 1024), ("512k", 512 * 1024), ("1GiB", 1024 * MiB), ("1.5M", 3 * MiB // 2),
    ("65536", 65536), ("65536b", 65536),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "16 TiB", "-1M", "", "M", True, 1.5])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (16 * MiB, 1024 * MiB, 512 * 1024, 1000)] == \
        ["16MiB", "1GiB", "512KiB", "1000B"]


def _load(tmp_path: Path, text: str):
    p = tmp_path / "config.toml"
    p.write_text(text)
    return load_config(p)


def test_max_window_in_config(tmp_path):
    assert _load(tmp_path, "").defaults.max_window == DEFAULT_MAX_WINDOW
    cfg = _load(tmp_path, '[defaults]\nmax_window = "64MiB"\n')
    assert cfg.defaults.max_window == 64 * MiB
    assert _load(tmp_path, "[defaults]\nmax_window = 4194304\n").defaults.max_window == 4 * MiB


@pytest.mark.parametrize("value, words", [
    ('"lots"', ["max_window", "not a size", "16MiB"]),
    ('"4GiB"', ["max_window", "4GiB is outside 64KiB..1GiB"]),
    ("1024", ["max_window", "1KiB is outside 64KiB..1GiB"]),
    ("true", ["max_window"]),
])
def test_max_window_errors_name_the_key_and_the_forms(tmp_path, value, words):
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, f"[defaults]\nmax_window = {value}\n")
    text = str(ei.value)
    for w in words:
        assert w in text, text
    assert "config.toml:2: defaults.max_window: " in text, text
