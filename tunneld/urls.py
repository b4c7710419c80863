"""Marker URLs → what to forward and what to open locally; log redaction; open policy.  Pure.

``plan(url)`` applies the rules of design.md §7 to a URL printed on a server and returns a
``Plan``: the host and port the server must connect to, and the path (with query and fragment)
to keep when the URL is rewritten to the local end of the tunnel::

    http://0.0.0.0:8090/x?y#z   →  Plan(remote_host="localhost", remote_port=8090, path="/x?y#z")
                                   .local_url(18090)  →  http://127.0.0.1:18090/x?y#z

Rules (each refusal raises ``Refused`` with a sentence that says why and never echoes the URL's
query, where tokens live):

- only ``http`` and ``https``; any other scheme is refused, by name;
- at most ``MAX_URL`` characters; no whitespace or control characters anywhere;
- no credentials (``user:pass@`` or ``user@``); no backslash before the query (browsers read it
  as ``/``, urllib does not);
- the host is the server's loopback (``LOOPBACK_NAMES``, ``127.0.0.0/8``, ``::1``; an empty
  host as in ``http:///x`` counts as ``localhost``) or a name or address the server can reach
  (a compute node): ``[A-Za-z0-9_.-]``, 1–253 characters, not starting with ``-``; IPv6
  addresses in brackets;
- the port is explicit (1–65535) or the scheme's default (80, 443).

``on_node(plan, node, server)`` routes a loopback URL printed on a compute node to that node.
``redact(url)`` makes a URL fit for logs; ``jupyter_redirect_path`` / ``jupyter_redirect_target``
handle Jupyter's ``jpserver-*-open.html`` redirect page; ``OpenPolicy`` drops duplicate opens
and rate-limits floods, with the clock passed in by the caller.
"""

from __future__ import annotations

import html.parser
import ipaddress
import re
from collections import deque
from dataclasses import dataclass
from urllib.parse import quote, unquote, unquote_plus, urlsplit

from .errors import TunneldError
from .names import MAX_HOST_LEN, is_host_name

#: a security limit: longest URL (characters) accepted
MAX_URL = 8192
#: a limit: characters of a Jupyter redirect page that are parsed
MAX_REDIRECT_HTML = 64 * 1024

#: names (lower-case) and literals that mean the server's own loopback; all of 127.0.0.0/8
#: counts too (``is_loopback_host``)
LOOPBACK_NAMES = frozenset({"localhost", "", "0.0.0.0", "::", "::1", "ip6-localhost",
                            "ip6-loopback"})
#: loopback names that the server reaches as ``localhost`` (wildcards and the empty host)
_AS_LOCALHOST = frozenset({"localhost", "", "0.0.0.0", "::"})
#: loopback names that are IPv6-only aliases (Debian's /etc/hosts)
_AS_IP6 = frozenset({"ip6-localhost", "ip6-loopback"})

DEFAULT_PORTS = {"http": 80, "https": 443}

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_AUTHORITY_END = re.compile(r"[/?#]")
#: query keys (or parts of keys split at ``-``, ``_``, ``.``) whose values ``redact`` hides
SECRET_KEYS = frozenset({"token", "password", "passwd", "pwd", "key", "apikey", "secret",
                         "auth", "access_token", "code", "signature", "sig", "session",
                         "jwt", "credential", "credentials"})
_KEY_PARTS = re.compile(r"[-_.]")
_JUPYTER_FILE_URL = re.compile(r"file:(?://(?:localhost)?)?(/(?!/)[^?#]*)", re.IGNORECASE)
_JUPYTER_NAME = re.compile(r"(?:jp|nb)server-\d+-open\.html")
_REFRESH_RE = re.compile(r"\s*[\d.]*\s*[;,]?\s*(?:url\s*=\s*)?(.*)", re.IGNORECASE | re.DOTALL)


class Refused(TunneldError, ValueError):
    """A URL that is not opened; the message says why, without the URL's query."""


def _bad_char(text: str) -> tuple[int, str] | None:
    """Position and ``U+XXXX`` of the first whitespace or control character, if any."""
    for i, ch in enumerate(text):
        o = ord(ch)
        if o <= 0x20 or 0x7F <= o <= 0x9F or ch.isspace():
            return i, f"U+{o:04X}"
    return None


def _show(text: str, limit: int = 64) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def is_loopback_host(host: str) -> bool:
    """True for the server's loopback: ``LOOPBACK_NAMES``, 127.0.0.0/8, ::1, IPv4-mapped 127/8.

    ``host`` is a host as written in a URL without brackets (``::1``, not ``[::1]``).
    """
    host = host.lower()
    if host in LOOPBACK_NAMES or host.rstrip(".") in LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or ip.is_unspecified or bool(mapped and mapped.is_loopback)


@dataclass(frozen=True)
class Plan:
    """What to do with an accepted URL: forward to ``remote_host:remote_port``, open ``path``."""

    #: ``"http"`` or ``"https"``
    scheme: str
    #: the host the server connects to: ``localhost`` for the wildcard/empty/localhost forms,
    #: ``::1`` for the ip6-localhost aliases, the literal for other addresses, else the name
    #: (a compute node) lower-cased
    remote_host: str
    #: explicit port, or 80/443 by scheme
    remote_port: int
    #: path (``/`` when empty) + ``?query`` + ``#fragment``, exactly as in the URL
    path: str
    #: ``remote_host`` is the server's own loopback
    is_loopback: bool

    def local_url(self, local_port: int, local_host: str = "127.0.0.1") -> str:
        """The URL to open locally: ``scheme://local_host:local_port`` + ``path``.

        An IPv6 ``local_host`` may be given with or without brackets.
        """
        if ":" in local_host and not local_host.startswith("["):
            local_host = f"[{local_host}]"
        return f"{self.scheme}://{local_host}:{local_port}{self.path}"


def plan(url: str) -> Plan:
    """Apply the URL rules to ``url``; raise ``Refused`` (a sentence saying why) if it breaks
    one."""
    if not isinstance(url, str):
        raise Refused(f"a URL must be text, not {type(url).__name__}")
    if len(url) > MAX_URL:
        raise Refused(f"the URL is {len(url)} characters long; at most {MAX_URL} are accepted")
    if not url:
        raise Refused("the URL is empty")
    bad = _bad_char(url)
    if bad is not None:
        raise Refused(f"the URL contains whitespace or a control character ({bad[1]}) at "
                      f"position {bad[0]}; only plain http:// and https:// URLs are opened")
    m = _SCHEME_RE.match(url)
    if m is None:
        raise Refused("the URL has no scheme; write it as http://HOST:PORT/…")
    scheme = m.group(1).lower()
    rest = url[m.end():]
    if scheme not in DEFAULT_PORTS:
        if rest[:1].isdigit():   # "localhost:8090/x": a host and port, not a scheme
            raise Refused("the URL has no scheme; write it as http://HOST:PORT/…")
        raise Refused(f"{_show(scheme + ':', 32)} URLs are not opened; only http and https "
                      "URLs are")
    if not rest.startswith("//"):
        raise Refused(f"the {scheme}: URL has no '//' before its host; write it as "
                      f"{scheme}://HOST:PORT/…")
    if "\\" in re.split(r"[?#]", url, maxsplit=1)[0]:
        # browsers read "\" as "/" in http(s) URLs, urllib does not: refuse the ambiguity
        raise Refused("the URL has a backslash in its host or path; write it as %5C or /")
    rest = rest[2:]
    end = _AUTHORITY_END.search(rest)
    cut = end.start() if end else len(rest)
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        raise Refused("URLs with a user name or password (user:pass@host) are not opened; "
                      "remove the credentials from the URL")
    host, is_ip6, port_text = _split_authority(authority)
    port = _port(port_text, scheme)
    remote_host, loopback = _remote_host(host, is_ip6)
    path_end = min((i for i in (tail.find("?"), tail.find("#")) if i >= 0), default=len(tail))
    if path_end == 0:
        tail = "/" + tail
    return Plan(scheme, remote_host, port, tail, loopback)


def same_host(a: str, b: str) -> bool:
    """``a`` and ``b`` name the same machine as far as names tell: equal (case and a final
    ``.`` aside), or one is the other's first label (``login1`` / ``login1.cluster.org``)."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if a == b:
        return True
    if _is_ip(a) or _is_ip(b):
        return False
    return a.split(".", 1)[0] == b.split(".", 1)[0] and ("." not in a or "." not in b)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def on_node(p: Plan, node: str | None, server: str | None) -> Plan:
    """``p`` for a URL printed on ``node`` (a marker's NODE) while the session runs on
    ``server`` (the host tunneld connects to, by its own name).

    A loopback URL printed on another machine than the server — a compute node the program
    was started on with srun or a batch job — means that node's loopback: the plan then
    targets ``node`` itself, reached through the server.  Everything else is unchanged: no
    node, an unknown server name (conservatively: the server's loopback), the server itself,
    or a URL that already names its host (``http://node42:8888/``)."""
    if node is None or not server or not p.is_loopback or same_host(node, server):
        return p
    name = node.lower().rstrip(".")
    if not is_host_name(name):
        raise Refused(f"the node name {_show(node)} is not a host name")
    return Plan(p.scheme, name, p.remote_port, p.path, False)


def _split_authority(authority: str) -> tuple[str, bool, str | None]:
    """``HOST[:PORT]`` or ``[IPV6][:PORT]`` → (host, host is IPv6, port text or None)."""
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise Refused("the IPv6 address in the URL lacks its closing ']'")
        literal, after = authority[1:close], authority[close + 1:]
        if after and not after.startswith(":"):
            raise Refused(f"unexpected {_show(after, 16)} after the IPv6 address in the URL")
        return literal, True, (after[1:] if after else None)
    host, sep, port_text = authority.partition(":")
    if ":" in port_text:
        raise Refused("IPv6 addresses in a URL must be written in brackets, "
                      "e.g. http://[::1]:8888/")
    return host, False, (port_text if sep else None)


def _port(text: str | None, scheme: str) -> int:
    if not text:   # absent or "host:" — the scheme's default, as browsers do
        return DEFAULT_PORTS[scheme]
    if not (text.isascii() and text.isdigit()):
        raise Refused(f"port {_show(text, 16)} in the URL is not a number")
    if len(text) > 5 or not 1 <= int(text) <= 65535:
        raise Refused(f"port {_show(text, 16)} in the URL is out of range (1-65535)")
    return int(text)


def _remote_host(host: str, is_ip6: bool) -> tuple[str, bool]:
    """(host the server connects to, it is the server's loopback)."""
    if is_ip6:
        if "%" in host:
            raise Refused("IPv6 zone identifiers (%…) are not supported in URLs")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise Refused(f"[{_show(host)[1:-1]}] in the URL is not an IPv6 address") from None
        if ip.is_unspecified:
            return "localhost", True
        return str(ip), is_loopback_host(str(ip))
    name = host.lower()
    bare = name.removesuffix(".")
    if bare in _AS_LOCALHOST:
        return "localhost", True
    if bare in _AS_IP6:
        return "::1", True
    try:
        ip4 = ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        return str(ip4), ip4.is_loopback
    if not is_host_name(name):
        raise Refused(f"host {_show(host)} in the URL is not a valid host name (letters, "
                      f"digits, '.', '-', '_'; at most {MAX_HOST_LEN} characters)")
    return name, False


def redact(url: str) -> str:
    """``url`` fit for a log line: no user info, secret query values replaced by ``…``.

    Values of the keys in ``SECRET_KEYS`` (case-insensitive, also as a part of a key such as
    ``access_token`` or ``api_key``) are hidden in the query and in a ``key=value`` fragment.
    Whitespace and control characters are percent-encoded so the log stays one line; a result
    longer than ``MAX_URL`` is cut.  A value that does not parse gives ``"<unparseable URL>"``.
    """
    if not isinstance(url, str):
        return "<unparseable URL>"
    try:
        urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    m = _SCHEME_RE.match(url)
    head, rest = (url[:m.end()], url[m.end():]) if m else ("", url)
    if rest.startswith("//"):
        end = _AUTHORITY_END.search(rest, 2)
        cut = end.start() if end else len(rest)
        authority = rest[2:cut]
        head += "//" + authority.rpartition("@")[2]
        rest = rest[cut:]
    before_frag, hash_, fragment = rest.partition("#")
    path, q, query = before_frag.partition("?")
    out = head + path + q + _redact_pairs(query) + hash_ + (
        _redact_pairs(fragment) if "=" in fragment else fragment)
    out = "".join(quote(ch, safe="") if _bad_char(ch) else ch for ch in out)
    return out if len(out) <= MAX_URL else out[:MAX_URL] + "…"


def _is_secret(key: str) -> bool:
    key = unquote_plus(key).lower()
    return key in SECRET_KEYS or any(p in SECRET_KEYS for p in _KEY_PARTS.split(key))


def _redact_pairs(text: str) -> str:
    out = []
    for pair in text.split("&"):
        key, eq, value = pair.partition("=")
        out.append(f"{key}=…" if eq and value and _is_secret(key) else pair)
    return "&".join(out)


def jupyter_redirect_path(url: str) -> str | None:
    """The server-side path of Jupyter's browser-open redirect page named by ``url``, or None.

    ``file:///home/u/.local/share/jupyter/runtime/jpserver-123-open.html`` (also
    ``nbserver-*-open.html``; ``file://localhost/…`` and ``file:/…`` too) → the absolute,
    percent-decoded path.  Anything else (other files, queries, ``..`` segments, control
    characters) → None.
    """
    if not isinstance(url, str) or len(url) > MAX_URL:
        return None
    m = _JUPYTER_FILE_URL.fullmatch(url)
    if m is None:
        return None
    path = unquote(m.group(1))
    if _bad_char(path.replace(" ", "x")) is not None:   # spaces in a home dir are fine
        return None
    parts = path.split("/")
    if ".." in parts or "." in parts or not _JUPYTER_NAME.fullmatch(parts[-1]):
        return None
    return path


class _RedirectParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refresh: str | None = None   # URL of the first <meta http-equiv="refresh">
        self.href: str | None = None      # the first <a href>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k.lower(): (v or "") for k, v in attrs}
        if tag == "meta" and self.refresh is None \
                and a.get("http-equiv", "").strip().lower() == "refresh":
            m = _REFRESH_RE.fullmatch(a.get("content", ""))
            target = m.group(1).strip().strip("'\"").strip() if m else ""
            if target:
                self.refresh = target
        elif tag == "a" and self.href is None and a.get("href", "").strip():
            self.href = a["href"].strip()


def jupyter_redirect_target(html: str) -> str | None:
    """The URL Jupyter's redirect page sends the browser to, HTML-unescaped; None if absent.

    The ``<meta http-equiv="refresh" content="1;url=…">`` target wins over the first
    ``<a href="…">``.  Only the first ``MAX_REDIRECT_HTML`` characters are read.
    """
    parser = _RedirectParser()
    try:
        parser.feed(html[:MAX_REDIRECT_HTML])
        parser.close()
    except Exception:  # noqa: BLE001 — HTMLParser on hostile markup: "no link found"
        return None
    return parser.refresh or parser.href


class OpenPolicy:
    """Dedup + rate limit for browser opens.  Pure: the caller passes ``now`` (monotonic seconds).

    - **duplicate**: the same ``url`` on the same ``host`` was allowed less than
      ``dedup_window`` seconds ago.
    - **rate-limited**: ``rate_max`` opens were already allowed for ``host`` in the last
      ``rate_window`` seconds (a sliding window).

    Only allowed opens are recorded; refusals neither extend a window nor count toward the rate.
    Memory is bounded by the opens inside the windows (older records are pruned by ``check``).
    """

    DEDUP_WINDOW = 10.0
    RATE_MAX = 5
    RATE_WINDOW = 10.0

    def __init__(self, dedup_window: float = DEDUP_WINDOW, rate_max: int = RATE_MAX,
                 rate_window: float = RATE_WINDOW) -> None:
        if rate_max < 1:
            raise ValueError("rate_max must be at least 1")
        self.dedup_window = dedup_window
        self.rate_max = rate_max
        self.rate_window = rate_window
        # (host, url) → time of its last allowed open; only entries younger than dedup_window
        # matter, older ones are pruned lazily
        self._last: dict[tuple[str, str], float] = {}
        # host → times of its allowed opens within the last rate_window, oldest first
        self._opens: dict[str, deque[float]] = {}
        # host → time of its last refusal, while that host is in a burst of refusals
        self._burst: dict[str, float] = {}
        # True if and only if the last check() was the first refusal of a burst
        self._burst_started = False

    def check(self, host: str, url: str, now: float) -> str | None:
        """None if ``url`` may be opened now (the open is recorded); else ``"duplicate"`` or
        ``"rate-limited"``."""
        self._prune(now)
        reason: str | None = None
        last = self._last.get((host, url))
        opens = self._opens.get(host)
        if last is not None and now - last < self.dedup_window:
            reason = "duplicate"
        elif opens is not None and len(opens) >= self.rate_max:
            reason = "rate-limited"
        if reason is None:
            self._last[(host, url)] = now
            self._opens.setdefault(host, deque()).append(now)
            self._burst.pop(host, None)
            self._burst_started = False
            return None
        prev = self._burst.get(host)
        self._burst_started = prev is None or now - prev >= self.rate_window
        self._burst[host] = now
        return reason

    def burst_started(self) -> bool:
        """True only when the last ``check()`` refused and that refusal starts a burst.

        A burst is a run of refusals for one host (duplicates and rate limits alike) with no
        allowed open for that host in between and no gap of ``rate_window`` seconds or more
        between consecutive refusals.  So a caller that logs when this is True writes one line
        per burst; the line after an allowed open, or after a quiet spell, starts a new one.
        False after an allowed check and before any check.
        """
        return self._burst_started

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self._last.items() if now - t >= self.dedup_window]:
            del self._last[key]
        for host in list(self._opens):
            q = self._opens[host]
            while q and now - q[0] >= self.rate_window:
                q.popleft()
            if not q:
                del self._opens[host]
        for host in [h for h, t in self._burst.items() if now - t >= self.rate_window]:
            del self._burst[host]
