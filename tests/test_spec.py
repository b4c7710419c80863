"""Forward-spec grammar: a table of inputs and what they mean, and of errors."""

import pytest

from tunneld.errors import SpecError
from tunneld.spec import ForwardSpec, parse, parse_all, parse_bind

L = "127.0.0.1"


@pytest.mark.parametrize("text,expected", [
    ("8090", [(L, 8090, "localhost", 8090)]),
    (" 8090 ", [(L, 8090, "localhost", 8090)]),
    ("8090-8092", [(L, p, "localhost", p) for p in (8090, 8091, 8092)]),
    ("18090:8090", [(L, 18090, "localhost", 8090)]),
    ("18090:127.0.0.2:8090", [(L, 18090, "127.0.0.2", 8090)]),
    ("18090:node42:8090", [(L, 18090, "node42", 8090)]),
    ("18090:node42.cluster.example.org:8090", [(L, 18090, "node42.cluster.example.org", 8090)]),
    ("0.0.0.0:8090:localhost:8090", [("0.0.0.0", 8090, "localhost", 8090)]),
    ("*:8090:localhost:8090", [("0.0.0.0", 8090, "localhost", 8090)]),
    ("localhost:8090:localhost:8090", [(L, 8090, "localhost", 8090)]),
    ("[::1]:8090:localhost:80", [("::1", 8090, "localhost", 80)]),
    ("[::1]:8090:[::1]:80", [("::1", 8090, "::1", 80)]),
    ("8090:[fe80::1]:80", [(L, 8090, "fe80::1", 80)]),
    ("18090-18092:8090-8092", [(L, 18090 + i, "localhost", 8090 + i) for i in range(3)]),
    ("18090-18091:node42:8090-8091", [(L, 18090, "node42", 8090), (L, 18091, "node42", 8091)]),
    ("1", [(L, 1, "localhost", 1)]),
    ("65535", [(L, 65535, "localhost", 65535)]),
])
def test_parse(text, expected):
    assert [(s.bind_host, s.bind_port, s.target_host, s.target_port)
            for s in parse(text)] == expected


@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("abc", "not a port"),
    ("0", "out of range"),
    ("65536", "out of range"),
    ("8092-8090", "runs backwards"),
    ("1-2000", "at most"),
    ("8090-8092:8090", "same length"),
    ("8090:8090-8091", "same length"),
    ("a:b:c:d:e", "5 fields"),
    ("8090::8090", "empty remote host"),
    ("8090:bad host:80", "not a valid host"),
    ("8090:fe80::1:80", "fields"),
    ("[::1:8090:localhost:80", "missing ']'"),
    ("foo:8090:localhost:80", "must be an IP address"),
    ("[nothex]:8090:localhost:80", "not an IPv6"),
    ("8090:" + "a" * 300 + ":80", "not a valid host"),
    ("-1", "not a port"),
])
def test_parse_errors(text, fragment):
    with pytest.raises(SpecError) as ei:
        parse(text)
    assert fragment in str(ei.value)


@pytest.mark.parametrize("text", [
    "8090", "18090:8090", "18090:node42:8090", "0.0.0.0:8090:localhost:8090",
    "[::1]:8090:localhost:80", "8090:[fe80::1]:80",
])
def test_str_round_trips(text):
    (s,) = parse(text)
    assert str(s) == text
    assert parse(str(s)) == [s]


def test_listen_and_target_strings():
    (s,) = parse("[::1]:8090:[::1]:80")
    assert s.listen == "[::1]:8090"
    assert s.target == "[::1]:80"
    assert not s.is_public
    assert parse("0.0.0.0:1:x:1")[0].is_public


def test_default_bind_applies_to_short_forms():
    assert parse("8090", default_bind="::1")[0].bind_host == "::1"
    assert parse("1.2.3.4:8090:x:1", default_bind="::1")[0].bind_host == "1.2.3.4"


def test_parse_all_dedups_in_order():
    specs = parse_all(["8091", "8090-8091", "8091"])
    assert [s.bind_port for s in specs] == [8091, 8090]


def test_spec_is_frozen_and_hashable():
    s = ForwardSpec(L, 1, "localhost", 1)
    with pytest.raises(AttributeError):
        s.bind_port = 2  # type: ignore[misc]
    assert {s: 1}[ForwardSpec(L, 1, "localhost", 1)] == 1


@pytest.mark.parametrize("text,expected", [
    ("::1", "::1"), ("[::1]", "::1"), ("*", "0.0.0.0"), ("localhost", L), ("10.1.2.3", "10.1.2.3"),
])
def test_parse_bind(text, expected):
    assert parse_bind(text) == expected
