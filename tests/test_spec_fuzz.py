"""Forward-spec grammar under hypothesis (issue 7): any text either parses or raises
``SpecError`` (nothing else), and every spec value prints as a spec that parses back to it."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld import spec as specmod
from tunneld.errors import SpecError
from tunneld.spec import MAX_RANGE, ForwardSpec, parse, parse_all, parse_bind

# characters the grammar gives meaning to, plus look-alikes that must not sneak through:
# Unicode digits, a trailing newline (``$`` matches before one), full-width colon, NUL
GRAMMAR_CHARS = "0123456789-:[]*.abcfxz_ \n\t\x00١２："

ports = st.integers(min_value=1, max_value=65535)
host_names = st.from_regex(r"[A-Za-z0-9_.-]{1,40}", fullmatch=True).filter(
    lambda h: ":" not in h)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
bind_hosts = st.one_of(st.just(specmod.DEFAULT_BIND), ipv4, ipv6)
target_hosts = st.one_of(st.just(specmod.DEFAULT_TARGET), host_names, ipv4, ipv6)
specs = st.builds(ForwardSpec, bind_hosts, ports, target_hosts, ports)


def _parse_only_spec_errors(text: str) -> list[ForwardSpec] | None:
    try:
        return parse(text)
    except SpecError:
        return None


@settings(max_examples=800, deadline=None)
@given(st.text())
def test_any_text_raises_only_spec_error(text):
    _parse_only_spec_errors(text)
    try:
        parse_bind(text)
    except SpecError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=GRAMMAR_CHARS, max_size=40))
def test_grammar_like_text_raises_only_spec_error_and_results_are_sane(text):
    """Text made of the grammar's own characters: a parse result is well-formed (ASCII ports
    in range, host names without whitespace, a bounded number of forwards) and prints back."""
    result = _parse_only_spec_errors(text)
    if result is None:
        return
    assert 1 <= len(result) <= MAX_RANGE
    for s in result:
        assert 1 <= s.bind_port <= 65535 and 1 <= s.target_port <= 65535
        assert ipaddress.ip_address(s.bind_host)
        assert s.target_host.isascii() and s.target_host.isprintable(), s
        assert not any(ch.isspace() for ch in s.target_host), s
        assert parse(str(s)) == [s]


@settings(max_examples=800, deadline=None)
@given(specs)
def test_str_of_any_spec_parses_back_to_it(s):
    assert parse(str(s)) == [s]
    assert parse(f"  {s}  ") == [s]
    assert parse_all([str(s), str(s)]) == [s]


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 65535), st.integers(0, MAX_RANGE + 5), st.integers(1, 65535),
       target_hosts)
def test_ranges(lo, extra, rlo, target):
    """``A-B:C-D`` gives one forward per port when both sides fit and match, else SpecError."""
    hi, rhi = lo + extra, rlo + extra
    text = f"{lo}-{hi}:{specmod._fmt_host(target)}:{rlo}-{rhi}"
    if hi > 65535 or rhi > 65535 or extra + 1 > MAX_RANGE:
        try:
            parse(text)
        except SpecError:
            return
        raise AssertionError(f"{text} parsed")
    out = parse(text)
    assert [(s.bind_port, s.target_port) for s in out] == \
        [(lo + i, rlo + i) for i in range(extra + 1)]
    assert all(parse(str(s)) == [s] for s in out[:5])


@settings(max_examples=800, deadline=None)
@given(specs, st.integers(0, 60), st.text(min_size=1, max_size=3))
def test_a_mutated_spec_raises_only_spec_error(s, at, insert):
    text = str(s)
    at = min(at, len(text))
    _parse_only_spec_errors(text[:at] + insert + text[at:])
    _parse_only_spec_errors(text[:at] + text[at + 1:])


def test_look_alikes_are_refused():
    """Found by the properties above: ``\\d`` took Unicode digits and ``$`` a trailing
    newline, so a host field could carry a newline into the log."""
    for text in ("١٢", "８０９０", "8090\n:8091", "1:node\n:2", "0.0.0.0\n:1:x:1"):
        try:
            parse(text)
        except SpecError:
            continue
        raise AssertionError(f"{text!r} parsed")


#: socket paths on the server: ``/…`` or ``~/…`` with any text after (``:`` included)
socket_paths = st.tuples(st.sampled_from(["/", "~/"]), st.text(max_size=120)).map("".join)


@settings(max_examples=800, deadline=None)
@given(st.one_of(st.just(specmod.DEFAULT_BIND), ipv4, ipv6), ports, socket_paths)
def test_socket_path_specs_parse_back_or_raise_spec_error(bind, port, path):
    """``[BIND:]LPORT:PATH``: a path parses to itself (and prints back) or is a SpecError."""
    text = f"{specmod._fmt_host(bind)}:{port}:{path}"
    try:
        (s,) = parse(text)
    except SpecError:
        return
    assert s.target_path and s.target_path.startswith(("/", "~/")), s
    assert s.target_path == path.strip() or text.strip() != text, s
    assert all(ord(c) >= 32 and ord(c) != 127 for c in s.target_path), s
    assert len(s.target_path.encode("utf-8", "surrogateescape")) <= specmod.HOME_PATH_MAX
    assert parse(str(s)) == [s]
