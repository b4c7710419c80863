"""config.toml and the persisted state file: loading, errors that name key and line, atomic
writes.  Pure and synchronous (files in tmp_path only)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunneld.config import Config, Defaults, load_config
from tunneld.errors import ConfigError, TunneldError
from tunneld.spec import ForwardSpec




def _write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert isinstance(ei.value, TunneldError)
    return str(ei.value)


# -- load_config: good input ---------------------------------------------------------------------

def test_missing_config_is_defaults(tmp_path):
    c = load_config(tmp_path / "nope" / "config.toml")
    assert c == Config()
    assert c.hosts == {}
    d = c.defaults
    assert d.bind == "127.0.0.1"
    assert d.keepalive_interval == 9  # x (2 + 1): a dead link is noticed within 27 s
    assert d.keepalive_count_max == 2
    assert d.hold_timeout == 10
    assert d.connect_timeout == 20
    assert c.forwards() == {}


def test_empty_config_is_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()
    assert load_config(_write(tmp_path, "# only a comment\n\n")) == Config()


def test_valid_config(tmp_path):
    p = _write(tmp_path, """\
# tunneld config
[defaults]
bind = "127.0.0.1"
keepalive_interval = 5
keepalive_count_max = 3
hold_timeout = 2.5
connect_timeout = 7

[hosts.barhal]
forwards = ["8090-8092", "18888:node42:8888"]

[hosts."login.cluster.example.org"]
forwards = ["9000"]

[hosts.empty]
""")
    c = load_config(p)
    assert c.defaults == Defaults(bind="127.0.0.1", keepalive_interval=5, keepalive_count_max=3,
                                  hold_timeout=2.5, connect_timeout=7)
    assert set(c.hosts) == {"barhal", "login.cluster.example.org", "empty"}
    assert c.hosts["barhal"].forwards == ["8090-8092", "18888:node42:8888"]
    assert c.hosts["empty"].forwards == []


@pytest.mark.parametrize("bind,expected", [
    ("127.0.0.1", "127.0.0.1"),
    ("localhost", "127.0.0.1"),
    ("*", "0.0.0.0"),
    ("::1", "::1"),
    ("[::1]", "::1"),
    ("127.0.0.2", "127.0.0.2"),
])
def test_bind_values(tmp_path, bind, expected):
    c = load_config(_write(tmp_path, f'[defaults]\nbind = "{bind}"\n'))
    assert c.defaults.bind == expected


def test_keepalive_zero_disables(tmp_path):
    c = load_config(_write(tmp_path, "[defaults]\nkeepalive_interval = 0\n"))
    assert c.defaults.keepalive_interval == 0


def test_forwards_expands_ranges(tmp_path):
    c = load_config(_write(tmp_path, """\
[hosts.barhal]
forwards = ["8090-8092", "18888:node42:8888", "18090-18091:8090-8091"]

[hosts.other]
forwards = ["7000", "7000"]
"""))
    fw = c.forwards()
    assert set(fw) == {"barhal", "other"}
    assert fw["barhal"] == [
        ForwardSpec("127.0.0.1", 8090, "localhost", 8090),
        ForwardSpec("127.0.0.1", 8091, "localhost", 8091),
        ForwardSpec("127.0.0.1", 8092, "localhost", 8092),
        ForwardSpec("127.0.0.1", 18888, "node42", 8888),
        ForwardSpec("127.0.0.1", 18090, "localhost", 8090),
        ForwardSpec("127.0.0.1", 18091, "localhost", 8091),
    ]
    # the same forward twice is kept once
    assert fw["other"] == [ForwardSpec("127.0.0.1", 7000, "localhost", 7000)]


def test_forwards_use_default_bind(tmp_path):
    c = load_config(_write(tmp_path, """\
[defaults]
bind = "127.0.0.2"

[hosts.h]
forwards = ["8090-8091", "10.0.0.1:9000:node:9000"]
"""))
    assert [(s.bind_host, s.bind_port) for s in c.forwards()["h"]] == [
        ("127.0.0.2", 8090), ("127.0.0.2", 8091), ("10.0.0.1", 9000)]


# -- load_config: errors name path:LINE and the dotted key --------------------------------------

# (toml text, dotted key, line, a fragment of the message)
UNKNOWN_KEYS = [
    ("bogus = 1\n", "bogus", 1, "unknown key"),
    ("[defaults]\nbind = \"127.0.0.1\"\nkeepalive = 3\n", "defaults.keepalive", 3,
     "unknown key"),
    ("# c\n\n[hosts.barhal]\nforwards = [\"8090\"]\nport = 22\n", "hosts.barhal.port", 5,
     "unknown key"),
    ("[defaults]\nhold_timeout = 1\n\n[extra]\nx = 1\n", "extra", 4, "unknown key"),
    ("[hosts.barhal.options]\nx = 1\n", "hosts.barhal.options", 1, "unknown key"),
    # a comment after a table header is ordinary TOML
    pytest.param("[defaults]  # the defaults\nkeepalive = 3\n", "defaults.keepalive", 2,
                 "unknown key", id="comment-after-table-header"),
    # host names with dots are the common case for ssh hosts; TOML quotes them
    pytest.param("[hosts.\"login.example.org\"]\nforwards = [\"8090\"]\nport = 22\n",
                 "port", 3, "unknown key", id="quoted-host-name-with-dots"),
]


@pytest.mark.parametrize("text,key,line,fragment", UNKNOWN_KEYS)
def test_unknown_key(tmp_path, text, key, line, fragment):
    p = _write(tmp_path, text)
    msg = _config_error(p)
    assert f"{p}:{line}" in msg, msg
    assert key in msg, msg
    assert fragment in msg, msg


BAD_VALUES = [
    ("[defaults]\n\nkeepalive_interval = -1\n", "defaults.keepalive_interval", 3,
     "greater than or equal to 0"),
    ("[defaults]\nkeepalive_interval = 99999\n", "defaults.keepalive_interval", 2, "3600"),
    ("[defaults]\nkeepalive_count_max = 0\n", "defaults.keepalive_count_max", 2, "1"),
    ("[defaults]\nkeepalive_count_max = \"two\"\n", "defaults.keepalive_count_max", 2,
     "integer"),
    ("[defaults]\nhold_timeout = -5\n", "defaults.hold_timeout", 2, "0"),
    ("[defaults]\nconnect_timeout = 0\n", "defaults.connect_timeout", 2, "greater than 0"),
    ("[defaults]\nkeepalive_interval = 3\nbind = \"foo\"\n", "defaults.bind", 3, "'foo'"),
    ("[defaults]\nbind = \"300.1.1.1\"\n", "defaults.bind", 2, "300.1.1.1"),
    ("[hosts.barhal]\nforwards = [\"8090\", \"abc\"]\n", "hosts.barhal.forwards", 2, "'abc'"),
    ("[hosts.barhal]\nforwards = [\"8090-8092:1-2\"]\n", "hosts.barhal.forwards", 2,
     "same length"),
    ("[hosts.barhal]\nforwards = [\"70000\"]\n", "hosts.barhal.forwards", 2, "70000"),
    ("[hosts.barhal]\nforwards = \"8090\"\n", "hosts.barhal.forwards", 2, "list"),
    ("[hosts.a]\nforwards = [\"1\"]\n\n[hosts.b]\nforwards = [\"x:y\"]\n",
     "hosts.b.forwards", 5, "'x'"),
    ("hosts = 3\n", "hosts", 1, "dictionary"),
    ("defaults = \"x\"\n", "defaults", 1, ""),
    # inline tables are ordinary TOML too
    ("hosts = { barhal = { forwards = [\"x\"] } }\n", "hosts.barhal.forwards", 1, "'x'"),
    # a comment after the table header must not lose the line
    pytest.param("[hosts.barhal]   # login node\nforwards = [\"abc\"]\n",
                 "hosts.barhal.forwards", 2, "'abc'", id="comment-after-table-header"),
    # a host name with dots (quoted in TOML) must not lose the line
    pytest.param("[hosts.\"login.example.org\"]\nforwards = [\"abc\"]\n", "forwards", 2,
                 "'abc'", id="quoted-host-name-with-dots"),
    # dotted keys are ordinary TOML
    pytest.param("defaults.keepalive_interval = -1\n", "defaults.keepalive_interval", 1, "0",
                 id="dotted-key"),
]


@pytest.mark.parametrize("text,key,line,fragment", BAD_VALUES)
def test_bad_value(tmp_path, text, key, line, fragment):
    p = _write(tmp_path, text)
    msg = _config_error(p)
    assert f"{p}:{line}" in msg, msg
    assert key in msg, msg
    assert fragment in msg, msg


def test_several_problems_are_all_reported(tmp_path):
    p = _write(tmp_path, "[defaults]\nkeepalive_interval = -1\nfoo = 2\n")
    msg = _config_error(p)
    assert f"{p}:2" in msg and "defaults.keepalive_interval" in msg
    assert f"{p}:3" in msg and "defaults.foo" in msg


@pytest.mark.parametrize("text,line", [
    ("[defaults]\nbind = \n", 2),
    ("[defaults\n", 1),
    ("a = 1\nb = 2\na = 3\n", 3),
    ("[hosts.x]\nforwards = [\"8090\",\n\n[other]\n", 4),
    ("[defaults]\nkeepalive_interval = 1 2\n", 2),
])
def test_toml_syntax_error(tmp_path, text, line):
    p = _write(tmp_path, text)
    msg = _config_error(p)
    assert str(p) in msg, msg
    assert re.search(rf"\bline {line}\b", msg) or f"{p}:{line}" in msg, msg


def test_unreadable_config(tmp_path):
    d = tmp_path / "config.toml"
    d.mkdir()  # a directory where the file should be
    msg = _config_error(d)
    assert str(d) in msg


def test_config_is_frozen(tmp_path):
    c = load_config(_write(tmp_path, "[hosts.a]\nforwards = [\"1\"]\n"))
    with pytest.raises(Exception):
        c.defaults.bind = "0.0.0.0"  # type: ignore[misc]


def test_config_forwards_are_local_only(tmp_path):
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, '[hosts.barhal]\nforwards = ["-R 9000:localhost:80"]\n'))


def test_open_max_age_default_per_host_and_bad_values(tmp_path):
    assert Config().open_max_age("any") == 120
    cfg = load_config(_write(tmp_path, "[defaults]\nopen_max_age = 30\n[hosts.hpc]\nopen_max_age = 0\n"
                          "[hosts.other]\nforwards = []\n"))
    assert (cfg.open_max_age("hpc"), cfg.open_max_age("other"), cfg.open_max_age("x")) == \
        (0, 30, 30)
    for text, line in (("[defaults]\nopen_max_age = -1\n", 2),
                       ("[hosts.hpc]\nopen_max_age = \"soon\"\n", 2)):
        assert re.search(rf"config.toml:{line}: .*open_max_age",
                         _config_error(_write(tmp_path, text)))


def test_resumable_forwards_and_their_limits(tmp_path):
    cfg = load_config(_write(tmp_path, '[defaults]\nresume_suspend = 30\nresume_buffer = "1MiB"\n'
                             '[hosts.hpc]\nforwards = ["8090", {spec = "8091", resume = true},'
                             ' {spec = "8092", resume = false}, "--resume 8093"]\n'))
    assert cfg.defaults.resume_suspend == 30 and cfg.defaults.resume_buffer == 1024 ** 2
    assert cfg.defaults.resume_total_buffer == 64 * 1024 ** 2
    assert [(s.bind_port, s.kind) for s in cfg.forwards()["hpc"]] == \
        [(8090, "local"), (8091, "resume"), (8092, "local"), (8093, "resume")]


@pytest.mark.parametrize("text,says", [
    ('[hosts.h]\nforwards = [{spec = "8090", resum = true}]\n', "a forward table is"),
    ('[hosts.h]\nforwards = [{spec = "8090", resume = "yes"}]\n', "a forward table is"),
    ('[hosts.h]\nforwards = ["-R 9000:localhost:80"]\n', "config forwards are local ones"),
    ('[hosts.h]\nforwards = [{spec = "8090:~/a.sock", resume = true}]\n', "TCP targets only"),
    ("[defaults]\nresume_buffer = \"1KiB\"\n", "resume_buffer"),
    ("[defaults]\nresume_suspend = 0\n", "resume_suspend"),
])
def test_bad_resumable_settings_name_what_is_wrong(tmp_path, text, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(_write(tmp_path, text))
