"""Forward-spec grammar: a table of inputs and what they mean, and of errors."""

import re

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


# -- remote forwards (-R) and SOCKS proxies (-D) -------------------------------------------------

from tunneld.spec import parse_any, parse_remote, parse_socks  # noqa: E402


@pytest.mark.parametrize("text,expected", [
    ("9000:localhost:8000", [(L, 9000, "localhost", 8000)]),
    (" 9000:127.0.0.2:8000 ", [(L, 9000, "127.0.0.2", 8000)]),
    ("9000:node42:8000", [(L, 9000, "node42", 8000)]),
    ("0.0.0.0:9000:localhost:8000", [("0.0.0.0", 9000, "localhost", 8000)]),
    ("*:9000:localhost:8000", [("0.0.0.0", 9000, "localhost", 8000)]),
    ("localhost:9000:localhost:8000", [(L, 9000, "localhost", 8000)]),
    ("[::1]:9000:[::1]:8000", [("::1", 9000, "::1", 8000)]),
    ("9000-9002:localhost:8000-8002", [(L, 9000 + i, "localhost", 8000 + i) for i in range(3)]),
])
def test_parse_remote(text, expected):
    specs = parse_remote(text)
    assert [(s.bind_host, s.bind_port, s.target_host, s.target_port) for s in specs] == expected
    assert all(s.kind == "remote" for s in specs)


@pytest.mark.parametrize("text,fragment", [
    ("", "empty remote"),
    ("9000", "names no local target"),
    ("9000:8000", "names no local target"),
    ("a:b:c:d:e", "5 fields"),
    ("9000-9001:localhost:8000", "same length"),
    ("0:localhost:8000", "out of range"),
    ("9000:bad host:80", "not a valid host"),
    ("foo:9000:localhost:80", "must be an IP address"),
    ("9000::80", "empty local host"),
])
def test_parse_remote_errors(text, fragment):
    with pytest.raises(SpecError) as ei:
        parse_remote(text)
    assert fragment in str(ei.value)
    assert "-R" in str(ei.value)


@pytest.mark.parametrize("text,bind,port", [
    ("1080", L, 1080), ("127.0.0.1:1080", L, 1080), ("localhost:1080", L, 1080),
    ("*:1080", "0.0.0.0", 1080), ("[::1]:1080", "::1", 1080), (" 1080 ", L, 1080),
])
def test_parse_socks(text, bind, port):
    (s,) = parse_socks(text)
    assert (s.kind, s.bind_host, s.bind_port) == ("socks", bind, port)
    assert s.target == "*"


@pytest.mark.parametrize("text,fragment", [
    ("", "empty SOCKS"), ("abc", "not a port"), ("1080-1081", "range"),
    ("a:b:c", "3 fields"), ("0", "out of range"), ("foo:1080", "must be an IP address"),
])
def test_parse_socks_errors(text, fragment):
    with pytest.raises(SpecError) as ei:
        parse_socks(text)
    assert fragment in str(ei.value)


def test_socks_default_bind_is_the_configured_one():
    assert parse_socks("1080", default_bind="::1")[0].bind_host == "::1"
    assert parse_any("-D 1080", default_bind="::1")[0].bind_host == "::1"
    # the server-side default of a remote forward is not the local default bind
    assert parse_any("-R 9000:localhost:80", default_bind="::1")[0].bind_host == L


@pytest.mark.parametrize("text,canonical", [
    ("-R 9000:localhost:8000", "-R 9000:localhost:8000"),
    ("-R9000:localhost:8000", "-R 9000:localhost:8000"),
    ("-R   localhost:9000:node:1", "-R 9000:node:1"),
    ("-R 0.0.0.0:9000:127.0.0.2:80", "-R 0.0.0.0:9000:127.0.0.2:80"),
    ("-R [::1]:9000:[::1]:80", "-R [::1]:9000:[::1]:80"),
    ("-D 1080", "-D 1080"),
    ("-D1080", "-D 1080"),
    ("-D 127.0.0.1:1080", "-D 1080"),
    ("-D *:1080", "-D 0.0.0.0:1080"),
    ("-D [::1]:1080", "-D [::1]:1080"),
    ("8090", "8090"),
    ("18090:node42:8090", "18090:node42:8090"),
])
def test_parse_any_and_canonical_strings(text, canonical):
    (s,) = parse_any(text)
    assert str(s) == canonical
    assert parse_any(str(s)) == [s]


def test_kinds_of_the_same_ports_are_different_forwards():
    (local,) = parse_any("9000:localhost:9000")
    (remote,) = parse_any("-R 9000:localhost:9000")
    assert local != remote and len({local, remote}) == 2
    assert (local.kind, remote.kind) == ("local", "remote")
    # the local form's string is unchanged (design.md §4: "spec": "8090")
    assert str(parse_any("8090")[0]) == "8090"


def test_parse_any_unknown_option():
    with pytest.raises(SpecError) as ei:
        parse_any("-L 8090:localhost:8090")
    assert "-R" in str(ei.value) and "-D" in str(ei.value)


def test_parse_all_reads_every_kind_and_dedups():
    specs = parse_all(["8090", "-R 9000:localhost:80", "-D 1080", "-R9000:localhost:80"])
    assert [(s.kind, s.bind_port) for s in specs] == [("local", 8090), ("remote", 9000),
                                                      ("socks", 1080)]


def test_public_remote_and_socks():
    assert parse_any("-R 0.0.0.0:9000:localhost:80")[0].is_public
    assert not parse_any("-R 9000:localhost:80")[0].is_public
    assert parse_any("-D *:1080")[0].is_public
    assert not parse_any("-D 1080")[0].is_public


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="-RD 0123456789:*[].abclhost", max_size=40))
def test_parse_any_raises_only_spec_error_and_round_trips(text):
    try:
        specs = parse_any(text)
    except SpecError:
        return
    for s in specs[:5]:
        assert s.kind in ("local", "remote", "socks")
        assert parse_any(str(s)) == [s]


# -- local forwards to a Unix socket on the server (issue 17) ------------------------------------

from tunneld.spec import HOME_PATH_MAX, SUN_PATH_MAX, expand_home  # noqa: E402


@pytest.mark.parametrize("text,bind,port,path,shown", [
    ("8090:/run/app.sock", L, 8090, "/run/app.sock", "8090:/run/app.sock"),
    ("8090:~/app.sock", L, 8090, "~/app.sock", "8090:~/app.sock"),
    ("127.0.0.1:8090:~/x.sock", L, 8090, "~/x.sock", "8090:~/x.sock"),
    ("localhost:8090:/x.sock", L, 8090, "/x.sock", "8090:/x.sock"),
    ("[::1]:8090:/run/app.sock", "::1", 8090, "/run/app.sock", "[::1]:8090:/run/app.sock"),
    ("*:8090:/x.sock", "0.0.0.0", 8090, "/x.sock", "0.0.0.0:8090:/x.sock"),
    ("8090:/tmp/a:b/c.sock", L, 8090, "/tmp/a:b/c.sock", "8090:/tmp/a:b/c.sock"),
    ("8090:/srv/my app/s.sock", L, 8090, "/srv/my app/s.sock", "8090:/srv/my app/s.sock"),
    (" 8090:/x ", L, 8090, "/x", "8090:/x"),
    ("8090:/" + "a" * (SUN_PATH_MAX - 1), L, 8090, "/" + "a" * (SUN_PATH_MAX - 1), None),
    ("8090:~/" + "a" * (HOME_PATH_MAX - 2), L, 8090, "~/" + "a" * (HOME_PATH_MAX - 2), None),
])
def test_parse_socket_path(text, bind, port, path, shown):
    (s,) = parse(text)
    assert (s.bind_host, s.bind_port, s.target_path, s.kind) == (bind, port, path, "local")
    assert (s.target_host, s.target_port) == ("", 0)
    assert s.target == path
    assert str(s) == (shown or text.strip())
    assert parse(str(s)) == [s] == parse_any(str(s))
    assert s.is_public == (bind == "0.0.0.0")


@pytest.mark.parametrize("text,fragment", [
    ("8090-8092:/x.sock", "listens on one port"),
    ("1:2:8090:/x.sock", "4 fields"),
    ("8090:~user/x.sock", "starts with / or ~/"),
    ("8090:run/app.sock", "starts with / or ~/"),
    ("8090:relative.sock", "starts with / or ~/"),
    ("8090:x/y:80", "starts with / or ~/"),
    ("8090:~", "starts with / or ~/"),
    (":/x.sock", "not a port"),
    ("0:/x.sock", "out of range"),
    ("foo:8090:/x.sock", "must be an IP address"),
    ("8090:/", "names a directory"),
    ("8090:~/", "names a directory"),
    ("8090:/run/", "names a directory"),
    ("8090:/run/..", "names a directory"),
    ("8090:/a\x00b", "contains a NUL"),
    ("8090:/a\nb", "contains a newline"),
    ("8090:/a\x1bb", "control character"),
    ("8090:/" + "a" * SUN_PATH_MAX, f"at most {SUN_PATH_MAX} bytes"),
    ("8090:/" + "é" * 54, f"at most {SUN_PATH_MAX} bytes"),
    ("8090:~/" + "a" * HOME_PATH_MAX, f"at most {HOME_PATH_MAX} are accepted before ~"),
])
def test_parse_socket_path_errors(text, fragment):
    with pytest.raises(SpecError) as ei:
        parse(text)
    assert fragment in str(ei.value)


def test_a_socket_path_is_not_a_remote_forward_or_socks():
    with pytest.raises(SpecError):
        parse_any("-R 9000:/x.sock")
    with pytest.raises(SpecError):
        parse_any("-D 1080:/x.sock")


@pytest.mark.parametrize("path,home,expected", [
    ("~/x.sock", "/home/me", "/home/me/x.sock"),
    ("~/x.sock", "/home/me/", "/home/me/x.sock"),
    ("~/run/x.sock", "/", "/run/x.sock"),
    ("/abs/x.sock", "/home/me", "/abs/x.sock"),
])
def test_expand_home(path, home, expected):
    assert expand_home(path, home) == expected


def test_expand_home_checks_the_length_on_the_server():
    with pytest.raises(SpecError) as ei:
        expand_home("~/" + "a" * 100, "/home/" + "b" * 20)
    assert f"at most {SUN_PATH_MAX}" in str(ei.value) and "on the server" in str(ei.value)


def test_socket_path_specs_sort_with_the_others():
    specs = parse_all(["8092:/b.sock", "8090", "8091:~/a.sock", "-D 1080"])
    assert [str(s) for s in sorted(specs)] == ["-D 1080", "8090", "8091:~/a.sock",
                                               "8092:/b.sock"]


@pytest.mark.parametrize("text,want", [
    ("--resume 8090", ForwardSpec("127.0.0.1", 8090, "localhost", 8090, kind="resume")),
    ("--resume=18090:node42:8090",
     ForwardSpec("127.0.0.1", 18090, "node42", 8090, kind="resume")),
    ("--resume 0.0.0.0:8090:localhost:80",
     ForwardSpec("0.0.0.0", 8090, "localhost", 80, kind="resume")),
])
def test_a_resumable_spec_parses_and_prints_back(text, want):
    assert parse_any(text) == [want]
    assert parse_any(str(want)) == [want]
    assert str(want).startswith("--resume ")


@pytest.mark.parametrize("text,says", [
    ("--resume 8090:~/app.sock", "TCP targets only"),
    ("--resume", "empty forward spec"),
    ("--resum 8090", "unknown option '--resum'"),
])
def test_a_bad_resumable_spec_says_what_is_wrong(text, says):
    with pytest.raises(SpecError, match=re.escape(says)):
        parse_any(text)
