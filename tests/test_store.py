"""The daemon's own files (store.py): the state file, atomic writes, setting a corrupt file
aside, the sessions file."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from tunneld import spec as specmod
from tunneld.store import (STATE_VERSION, StateFile, Store, atomic_write, load_state,
                           remove_stale_temp_files, save_state)




# -- load_state ----------------------------------------------------------------------------------

def _asides(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def test_missing_state_is_empty(tmp_path, tlog):
    s = load_state(tmp_path / "nope" / "forwards.json")
    assert s == StateFile()
    assert s.hosts == {} and s.version == STATE_VERSION
    assert not [r for r in tlog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("data", [b"", b"\n", b"  \n\t\n"])
def test_empty_state_is_empty_with_warning(tmp_path, tlog, data):
    p = tmp_path / "forwards.json"
    p.write_bytes(data)
    s = load_state(p)
    assert s.hosts == {}
    warnings = [r for r in tlog.records if r.levelno == logging.WARNING]
    assert warnings, tlog.records
    assert str(p) in warnings[0].getMessage()
    assert not _asides(p)


CORRUPT = [
    pytest.param(b"{not json", id="malformed-json"),
    pytest.param(b'{"version": 1, "hosts": {"a": ["8090"]}', id="truncated"),
    pytest.param(b"\xff\xfe\x00garbage", id="binary"),
    pytest.param(b"[1, 2, 3]\n", id="list"),
    pytest.param(b"null\n", id="null"),
    pytest.param(b'"hosts"\n', id="string"),
    pytest.param(b'{"version": 1, "hosts": {"a": "8090"}}\n', id="specs-not-list"),
    pytest.param(b'{"version": 1, "hosts": ["a"]}\n', id="hosts-not-object"),
    pytest.param(b'{"version": 1, "hosts": {}, "extra": true}\n', id="unknown-key"),
    pytest.param(b'{"version": "one", "hosts": {}}\n', id="version-not-int"),
    pytest.param(b'{"version": 1, "hosts": {"a": [8090]}}\n', id="spec-not-string"),
    pytest.param(b'{"version": 1, "hosts": {"a": ["abc"]}}\n', id="bad-spec"),
    pytest.param(b'{"version": 1, "hosts": {"a": ["8090", "1-3:4"]}}\n', id="bad-range"),
]


@pytest.mark.parametrize("data", CORRUPT)
def test_corrupt_state_is_set_aside(tmp_path, tlog, data):
    p = tmp_path / "forwards.json"
    p.write_bytes(data)
    s = load_state(p)
    assert s.hosts == {}
    assert not p.exists(), "the corrupt file must be moved out of the way"
    asides = _asides(p)
    assert len(asides) == 1, list(tmp_path.iterdir())
    assert asides[0].read_bytes() == data
    errors = [r for r in tlog.records if r.levelno >= logging.ERROR]
    assert errors, tlog.records
    text = errors[0].getMessage()
    assert str(p) in text and asides[0].name in text
    # loading again now sees no file at all: empty, nothing more set aside
    assert load_state(p).hosts == {}
    assert _asides(p) == asides


def test_save_then_load_round_trips(tmp_path):
    p = tmp_path / "state" / "forwards.json"
    state = StateFile(hosts={"barhal": ["8090", "8091", "18888:node42:8888"],
                             "login.example.org": ["[::1]:9000:localhost:9000"],
                             "empty": []})
    save_state(p, state)
    assert load_state(p) == state
    on_disk = json.loads(p.read_bytes())
    assert on_disk["version"] == STATE_VERSION
    assert on_disk["hosts"]["barhal"] == ["8090", "8091", "18888:node42:8888"]
    # the spec strings survive as written, and still parse
    for texts in load_state(p).hosts.values():
        specmod.parse_all(texts)


def test_save_overwrites(tmp_path):
    p = tmp_path / "forwards.json"
    save_state(p, StateFile(hosts={"a": ["1", "2"]}))
    save_state(p, StateFile(hosts={"b": ["3"]}))
    assert load_state(p) == StateFile(hosts={"b": ["3"]})
    assert sorted(x.name for x in tmp_path.iterdir()) == ["forwards.json"]


def test_state_file_mode_0600(tmp_path):
    p = tmp_path / "forwards.json"
    p.write_text("{}")
    p.chmod(0o644)  # an older, too-open file is replaced by a private one
    old_umask = os.umask(0)
    try:
        save_state(p, StateFile(hosts={"a": ["1"]}))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_save_state_creates_private_dir(tmp_path):
    p = tmp_path / "a" / "b" / "forwards.json"
    save_state(p, StateFile())
    assert p.is_file()
    assert stat.S_IMODE(p.parent.stat().st_mode) & 0o077 == 0


# -- atomic_write --------------------------------------------------------------------------------

def test_atomic_write_new_file(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write(p, b"hello\x00world")
    assert p.read_bytes() == b"hello\x00world"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_mode_argument(tmp_path):
    p = tmp_path / "f"
    atomic_write(p, b"x", mode=0o640)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640


def test_atomic_write_replaces_by_rename(tmp_path):
    """A reader holding the old file sees the old bytes whole; the path gets a new inode."""
    p = tmp_path / "f"
    atomic_write(p, b"old contents\n")
    old_inode = p.stat().st_ino
    with open(p, "rb") as reader:
        atomic_write(p, b"new\n")
        assert reader.read() == b"old contents\n"
    assert p.read_bytes() == b"new\n"
    assert p.stat().st_ino != old_inode
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_atomic_write_many_times_leaves_no_temp_files(tmp_path):
    p = tmp_path / "f"
    for i in range(50):
        atomic_write(p, str(i).encode())
    assert p.read_bytes() == b"49"
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    p = tmp_path / "f"
    atomic_write(p, b"precious")
    with pytest.raises(TypeError):
        atomic_write(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"precious"
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_state_file_keeps_remote_and_socks_forwards(tmp_path):
    """-R/-D forwards are saved as their canonical strings and read back (not set aside)."""
    path = tmp_path / "forwards.json"
    texts = ["8090", "-R 9000:localhost:8000", "-R [::1]:9001:127.0.0.2:80", "-D 1080",
             "-D 0.0.0.0:1081"]
    save_state(path, StateFile(hosts={"barhal": texts}))
    state = load_state(path)
    assert state.hosts == {"barhal": texts}
    assert not list(tmp_path.glob("*.corrupt-*"))
    specs = specmod.parse_all(state.hosts["barhal"])
    assert [s.kind for s in specs] == ["local", "remote", "remote", "socks", "socks"]
    assert [str(s) for s in specs] == texts


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    for name in (".forwards.json.abcd1234", ".sessions.json.x", "forwards.json", ".other.x",
                 "forwards.json.corrupt-20260101T000000"):
        (tmp_path / name).write_text("x")
    assert remove_stale_temp_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.x", "forwards.json", "forwards.json.corrupt-20260101T000000"]


def test_sessions_file_round_trip_and_malformed_records(tmp_path, tlog):
    store = Store(tmp_path / "forwards.json")
    good = {"name": "a", "command": "x"}
    store.save_sessions([good, {"name": "bad"}, {"name": "a2", "command": "y", "zz": 1}])
    assert oct(os.stat(store.sessions_path).st_mode & 0o777) == "0o600"

    def check(rec):
        if "command" not in rec:
            raise ValueError("no command")
    assert store.load_sessions(("name", "command"), check, 10) == [good]
    assert "skipped a malformed record" in tlog.text
    store.sessions_path.write_text("{not json")
    assert store.load_sessions(("name", "command"), check, 10) == []
    assert list(tmp_path.glob("sessions.json.corrupt-*"))
