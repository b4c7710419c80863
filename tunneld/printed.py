"""URLs that programs print (Jupyter with ``--no-browser``, TensorBoard, Streamlit, Flask…) →
``PrintedUrl`` events, and which of them tunneld forwards.  Pure: no I/O, no clock.

``find_urls(line)`` finds ``http(s)://HOST:PORT[/…]`` in one line of output (already free of
ANSI escapes: ``markers.Scanner`` strips them and cuts the stream into lines, across chunk
boundaries, with its bounded line length).  A URL is found only with an explicit port (every
web interface prints its port; ``https://github.com/…`` in a log has none) and without
credentials; punctuation that ends a sentence (``.``, ``,``, ``)``…) is not part of it.

``http+unix://%2Fpath%2Fapp.sock/lab?token=…`` (what Jupyter prints for ``--sock``) is found
too: ``unix_target`` gives its socket path and the rest, forwarded to a local port.

``nearby(plan, server)`` says whether a found URL names a place the server can reach for
us: its loopback (``localhost``, 127/8, ``0.0.0.0``, ``::``, ``::1``), a private address
(10/8, 172.16/12, 192.168/16, fc00::/7: the cluster's own network; not link-local), a
single-label host name (``gpu012``), or a name of the server's own domain
(``gpu012.cluster.org`` for ``login1.cluster.org``; a server name of three labels or more).
A public address or another domain's name (``pypi.org:443``) is not forwarded: it is
somebody else's server.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote

from . import urls
from .errors import SpecError
from .spec import check_path
from .urls import MAX_URL, Plan, same_host

#: an http(s) URL with an explicit port; the host is a bracketed IPv6 literal or a name / IPv4
#: address; the rest stops at whitespace, quotes, angle brackets and characters URLs never hold
#: unescaped; a port followed by ``@`` is user info, not a port (not matched)
_URL = re.compile(
    rb"(?<![A-Za-z0-9+.-])https?://"
    rb"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]*):(?P<port>[0-9]{1,5})"
    rb"(?P<rest>[/?#][^\s\"'<>`\\^{}|\x00-\x1f\x7f]*)?"
    rb"(?![A-Za-z0-9@:_~%-])", re.IGNORECASE)
#: a Unix socket's URL: the socket's path percent-encoded as the host (``%2F…``)
_UNIX_URL = re.compile(
    rb"(?<![A-Za-z0-9+.-])http\+unix://%2F[^\s\"'<>`\\^{}|/?#\x00-\x1f\x7f]*"
    rb"(?:[/?#][^\s\"'<>`\\^{}|\x00-\x1f\x7f]*)?", re.IGNORECASE)
_UNIX_PARTS = re.compile(r"http\+unix://(%2F[^/?#]*)(.*)", re.IGNORECASE | re.DOTALL)
#: what ends a sentence rather than a URL, when it is the URL's last character
_TRAILING = b".,;:!?"
_PAIRS = {ord(")"): ord("("), ord("]"): ord("[")}


@dataclass(frozen=True)
class PrintedUrl:
    """A URL a program printed in its output (not a marker)."""

    #: the URL as printed (UTF-8, errors replaced)
    url: str


def find_urls(line: bytes) -> list[PrintedUrl]:
    """The http(s) URLs with an explicit port in one line (no line ending, no ANSI escapes),
    in order, each once."""
    if b"://" not in line:
        return []
    found: list[PrintedUrl] = []
    matches = sorted([*_URL.finditer(line), *_UNIX_URL.finditer(line)], key=lambda m: m.start())
    for m in matches:
        raw = _trim(m.group(0))
        if len(raw) > MAX_URL:
            continue
        url = PrintedUrl(raw.decode("utf-8", errors="replace"))
        if url not in found:
            found.append(url)
    return found


def unix_target(url: str) -> tuple[str, str] | None:
    """``http+unix://%2Fpath%2Fapp.sock/x?y`` → (``/path/app.sock``, ``/x?y``); None for any
    other URL or a path that cannot name a socket (``spec.check_path``)."""
    m = _UNIX_PARTS.fullmatch(url) if isinstance(url, str) and len(url) <= MAX_URL else None
    if m is None:
        return None
    path, rest = unquote(m.group(1)), m.group(2)
    try:
        check_path(path)
    except SpecError:
        return None
    if not path.startswith("/") or urls._bad_char(rest) is not None or \
            any(part in ("", ".", "..") for part in path[1:].split("/")):
        return None   # (one name for one socket: no "..", ".", "//")
    return path, rest if rest.startswith("/") else "/" + rest


def url_key(url: str) -> tuple[int | str, str] | None:
    """What a session lists a printed URL under (``Session.url_ports``: one forward per key)
    and where it leads: a socket's (path, ``"unix"``), else (remote port, remote host); None
    for a URL the rules refuse.  ``session_urls.SessionUrls._printed`` keys URLs so."""
    unix = unix_target(url)
    if unix is not None:
        return unix[0], "unix"
    try:
        plan = urls.plan(url)
    except urls.Refused:
        return None
    return plan.remote_port, plan.remote_host


def _trim(raw: bytes) -> bytes:
    """Without sentence punctuation and unbalanced closing brackets at its end."""
    while raw:
        last = raw[-1]
        if last in _TRAILING:
            raw = raw[:-1]
        elif last in _PAIRS and raw.count(last) > raw.count(_PAIRS[last]):
            raw = raw[:-1]
        else:
            return raw
    return raw


def nearby(plan: Plan, server: str | None) -> bool:
    """True if ``plan`` (of a printed URL) names the server's loopback or a machine of the
    server's own network (see the module docstring); ``server``: the server's host name, if
    known."""
    if plan.is_loopback:
        return True
    host = plan.remote_host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        # the cluster's own network; not link-local (169.254.169.254 is a cloud's metadata
        # service, fe80:: needs a zone)
        return ip.is_private and not ip.is_global and not ip.is_link_local
    if "." not in host.rstrip("."):
        return True
    if not server:
        return False
    if same_host(host, server):
        return True
    # the server's own domain, when it is one (login1.cluster.org: *.cluster.org; not the
    # whole of a two-label name's parent, example.com: *.com)
    labels = server.lower().rstrip(".").split(".")
    return len(labels) >= 3 and host.rstrip(".").endswith("." + ".".join(labels[1:]))
