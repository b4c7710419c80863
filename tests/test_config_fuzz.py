"""config.toml and the state file under hypothesis (issue 7): whatever a file holds, loading
it gives a Config or a ``ConfigError`` (never another exception), and a state file is either
read or set aside intact, never replaced."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tunneld.config import Config, load_config
from tunneld.store import StateFile, load_state
from tunneld.errors import ConfigError

FILE_SETTINGS = settings(max_examples=250, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = ["defaults", "hosts", "bind", "forwards", "keepalive_interval", "keepalive_count_max",
        "hold_timeout", "connect_timeout", "browser", "ready_timeout", "barhal", "a.b", ""]
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
keys = st.one_of(st.sampled_from(KEYS), texts)
leaves = st.one_of(
    st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), texts,
    st.sampled_from(["8090", "8090-8092", "0.0.0.0:1:x:1", "*", "::1", "[::1]", "localhost",
                     "%s", "18090:node42:8090", "1-2000", "١٢"]))
json_like = st.recursive(
    leaves, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(keys, ch, max_size=4),
    max_leaves=16)
# shaped like a real config, so that values reach the field validators
shaped = st.fixed_dictionaries({}, optional={
    "defaults": st.dictionaries(st.sampled_from(KEYS[2:10]), json_like, max_size=5),
    "hosts": st.dictionaries(keys, st.one_of(
        st.fixed_dictionaries({"forwards": st.lists(st.one_of(leaves, json_like),
                                                    max_size=4)}),
        json_like), max_size=3),
})
configs = st.one_of(shaped, st.dictionaries(keys, json_like, max_size=4))


def toml_value(v) -> str:
    """A JSON-like value as TOML (inline tables and arrays)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)   # a JSON string is a TOML basic string (no lone surrogates here)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_document(data: dict) -> str:
    """Tables as ``[table]`` headers (so line numbers matter), the rest inline."""
    out = []
    for k, v in data.items():
        if not isinstance(v, dict):
            out.append(f"{json.dumps(k)} = {toml_value(v)}")
    for k, v in data.items():
        if isinstance(v, dict):
            out.append(f"[{json.dumps(k)}]")
            out += [f"{json.dumps(k2)} = {toml_value(v2)}" for k2, v2 in v.items()]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _load(path: Path, content: bytes) -> Config | None:
    path.write_bytes(content)
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc), exc   # every error names the file...
        return None
    config.forwards()                        # ...and a loaded config is usable
    return config


@settings(max_examples=300, deadline=None)
@given(configs)
def test_model_validate_raises_only_validation_error(data):
    try:
        Config.model_validate(data).forwards()
    except ValidationError:
        pass


@FILE_SETTINGS
@given(configs)
def test_any_json_like_config_file_gives_config_or_config_error(scratch, data):
    _load(scratch / "config.toml", toml_document(data).encode())


@FILE_SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_give_config_or_config_error(scratch, data):
    """Found this way: a file that is not UTF-8 raised UnicodeDecodeError."""
    _load(scratch / "config.toml", data)


TOML_BITS = ["[defaults]", "[hosts.barhal]", "[hosts.\"a.b\"]", "[[hosts]]", "[", "]",
             "bind = ", "forwards = ", "keepalive_interval = ", "browser = ", "x = ", "\n",
             "\"8090\"", "'8090-8092'", "[\"8090\", 1]", "1", "-1", "1e999", "nan", "true",
             "{", "}", ",", "\"\"\"", "'''", "#", "\\", "\\u0000", "\x00", "\u2028", "=",
             "0x10", "1979-05-27", " ", "\t", "\r\n", "é"]


@FILE_SETTINGS
@given(st.lists(st.sampled_from(TOML_BITS), max_size=25))
def test_toml_ish_text_gives_config_or_config_error(scratch, bits):
    _load(scratch / "config.toml", "".join(bits).encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("text", [
    "a = " + "[" * 100_000,
    "a = " + "{b = " * 100_000,
    "[defaults]\nbind = \"0.0.0.0\"\n\x80\n",
], ids=["deep-array", "deep-table", "not-utf8"])
def test_pathological_files_are_config_errors(tmp_path, text):
    p = tmp_path / "config.toml"
    p.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(p) in str(info.value)


@FILE_SETTINGS
@given(st.one_of(st.binary(max_size=200),
                 json_like.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["version", "hosts", "x"]), json_like,
                                 max_size=3).map(lambda v: json.dumps(v).encode()),
                 st.just(b"[" * 100_000)))
def test_state_file_is_read_or_set_aside_intact(scratch, data):
    """Never an exception, never a silent replacement: either the file is read, or it is
    moved aside byte for byte and the daemon starts with no saved forwards."""
    d = Path(tempfile.mkdtemp(dir=scratch))
    p = d / "forwards.json"
    p.write_bytes(data)
    state = load_state(p)
    assert isinstance(state, StateFile)
    asides = list(d.glob("forwards.json.corrupt-*"))
    if p.exists():
        assert not asides and p.read_bytes() == data
    else:
        assert state.hosts == {}
        assert len(asides) == 1 and asides[0].read_bytes() == data
