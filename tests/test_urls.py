"""URL rules: tables of accepted URLs and their plans, refusals, redaction, Jupyter's redirect
page, and the open policy (dedup and rate limit with explicit clock values)."""

from ipaddress import IPv6Address
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.errors import TunneldError
from tunneld.urls import (
    LOOPBACK_NAMES,
    MAX_URL,
    OpenPolicy,
    Plan,
    Refused,
    is_loopback_host,
    jupyter_redirect_path,
    jupyter_redirect_target,
    on_node,
    plan,
    redact,
    same_host,
)


@pytest.mark.parametrize("url,expected", [
    # the server's loopback in all its spellings
    ("http://0.0.0.0:8090", ("http", "localhost", 8090, "/", True)),
    ("http://0.0.0.0:8090/x?y#z", ("http", "localhost", 8090, "/x?y#z", True)),
    ("http://localhost:8888/lab?token=abc", ("http", "localhost", 8888, "/lab?token=abc", True)),
    ("http://LOCALHOST:8888/", ("http", "localhost", 8888, "/", True)),
    ("http://localhost.:8888/", ("http", "localhost", 8888, "/", True)),
    ("http://127.0.0.1:5000/", ("http", "127.0.0.1", 5000, "/", True)),
    ("http://127.0.0.2:5000/", ("http", "127.0.0.2", 5000, "/", True)),
    ("http://127.255.0.9:5000/", ("http", "127.255.0.9", 5000, "/", True)),
    ("http://[::1]:8888/lab", ("http", "::1", 8888, "/lab", True)),
    ("http://[0:0:0:0:0:0:0:1]:8888/", ("http", "::1", 8888, "/", True)),
    ("http://[::]:8888/", ("http", "localhost", 8888, "/", True)),
    ("http://[::ffff:127.0.0.1]:80/", ("http", str(IPv6Address("::ffff:127.0.0.1")), 80, "/",
                                       True)),
    ("http://ip6-localhost:8888/", ("http", "::1", 8888, "/", True)),
    ("http://ip6-loopback:8888/", ("http", "::1", 8888, "/", True)),
    # missing host = the server itself
    ("http:///x", ("http", "localhost", 80, "/x", True)),
    ("http://:8090/x", ("http", "localhost", 8090, "/x", True)),
    # default and odd ports
    ("http://localhost/", ("http", "localhost", 80, "/", True)),
    ("https://localhost/", ("https", "localhost", 443, "/", True)),
    ("https://localhost:8443", ("https", "localhost", 8443, "/", True)),
    ("http://localhost:/", ("http", "localhost", 80, "/", True)),
    ("http://localhost:08090/", ("http", "localhost", 8090, "/", True)),
    ("http://localhost:1/", ("http", "localhost", 1, "/", True)),
    ("http://localhost:65535/", ("http", "localhost", 65535, "/", True)),
    ("HTTP://localhost:1/", ("http", "localhost", 1, "/", True)),
    # a compute node reached through the server
    ("http://node42:8888/?token=abc", ("http", "node42", 8888, "/?token=abc", False)),
    ("http://Node42.Cluster.Example.ORG:5000/a", ("http", "node42.cluster.example.org", 5000,
                                                   "/a", False)),
    ("http://node_1:80/", ("http", "node_1", 80, "/", False)),
    ("http://10.0.0.5:8888/", ("http", "10.0.0.5", 8888, "/", False)),
    ("http://[fe80::1]:80/", ("http", "fe80::1", 80, "/", False)),
    ("http://[2001:DB8::1]/", ("http", "2001:db8::1", 80, "/", False)),
    # path, query and fragment kept exactly
    ("http://localhost:8090?x=1", ("http", "localhost", 8090, "/?x=1", True)),
    ("http://localhost:8090#frag", ("http", "localhost", 8090, "/#frag", True)),
    ("http://localhost:8090/a/../b;p?q=1&r=%20&s=a\\b#f/g?h",
     ("http", "localhost", 8090, "/a/../b;p?q=1&r=%20&s=a\\b#f/g?h", True)),
    ("http://localhost:8090//double", ("http", "localhost", 8090, "//double", True)),
    ("http://localhost:8090/ünï?ç=é", ("http", "localhost", 8090, "/ünï?ç=é", True)),
    ("http://localhost:8090/a@b", ("http", "localhost", 8090, "/a@b", True)),
    ("http://localhost:8090/?next=http://u:p@evil/", ("http", "localhost", 8090,
                                                      "/?next=http://u:p@evil/", True)),
])
def test_plan(url, expected):
    p = plan(url)
    assert (p.scheme, p.remote_host, p.remote_port, p.path, p.is_loopback) == expected


@pytest.mark.parametrize("url,fragment", [
    ("", "empty"),
    ("file:///etc/passwd", "'file:' URLs are not opened"),
    ("javascript:alert(1)", "'javascript:'"),
    ("JavaScript:alert(1)", "'javascript:'"),
    ("data:text/html,<script>x</script>", "'data:'"),
    ("ftp://localhost/", "'ftp:'"),
    ("ws://localhost:8080/", "'ws:'"),
    ("vscode://file/x", "'vscode:'"),
    ("x-my-app+v1.0://open", "'x-my-app+v1.0:'"),
    ("localhost:8090/x", "no scheme"),
    ("node42:8090", "no scheme"),
    ("127.0.0.1:8090", "no scheme"),
    ("/lab?token=x", "no scheme"),
    ("//localhost/", "no scheme"),
    ("http:localhost:8090/", "no '//'"),
    ("http:/localhost/", "no '//'"),
    ("http:\\\\localhost\\", "no '//'"),
    ("http://localhost\\@evil.com/", "backslash"),
    ("http://evil.com\\@localhost/", "backslash"),
    ("http://localhost:8090\\x", "backslash"),
    ("http://user:pass@localhost:8888/", "user name or password"),
    ("http://user@localhost/", "user name or password"),
    ("http://@localhost/", "user name or password"),
    ("http://localhost:8090@evil/", "user name or password"),
    (" http://localhost/", "whitespace or a control character (U+0020) at position 0"),
    ("http://local host/", "(U+0020)"),
    ("http://localhost/a b", "(U+0020)"),
    ("http://localhost/\n", "(U+000A)"),
    ("http://localhost/\r", "(U+000D)"),
    ("http://localhost/\ta", "(U+0009)"),
    ("http://localhost/\x00", "(U+0000)"),
    ("http://localhost/\x1b[0m", "(U+001B)"),
    ("http://localhost/\x7f", "(U+007F)"),
    ("http://localhost/\x85", "(U+0085)"),
    ("http://localhost/\u00a0", "(U+00A0)"),
    ("http://localhost/\u2028", "(U+2028)"),
    ("http://localhost/\u3000", "(U+3000)"),
    ("http://localhost/" + "a" * (MAX_URL - 16), f"at most {MAX_URL}"),
    ("http://localhost:abc/", "port 'abc' in the URL is not a number"),
    ("http://localhost:-1/", "not a number"),
    ("http://localhost:+80/", "not a number"),
    ("http://localhost:８０/", "not a number"),
    ("http://localhost:0/", "port '0' in the URL is out of range (1-65535)"),
    ("http://localhost:00000/", "out of range"),
    ("http://localhost:65536/", "out of range"),
    ("http://localhost:" + "9" * 5000 + "/", "out of range"),
    ("http://[::1/", "lacks its closing ']'"),
    ("http://[nothex]:80/", "not an IPv6 address"),
    ("http://[127.0.0.1]:80/", "not an IPv6 address"),
    ("http://[::1]x:80/", "unexpected"),
    ("http://[::1]:80:90/", "not a number"),
    ("http://[fe80::1%25eth0]:80/", "zone identifiers"),
    ("http://::1:8888/", "must be written in brackets"),
    ("http://bad!host/", "host 'bad!host' in the URL is not a valid host name"),
    ("http://-oProxyCommand/", "not a valid host name"),
    ("http://loc%61lhost/", "not a valid host name"),
    ("http://bücher.example/", "not a valid host name"),
    ("http://" + "a" * 254 + "/", "not a valid host name"),
    ("http://a]b/", "not a valid host name"),
])
def test_plan_refuses(url, fragment):
    with pytest.raises(Refused) as ei:
        plan(url)
    assert fragment in str(ei.value)


def test_host_of_253_chars_is_accepted():
    name = ".".join(["a" * 63] * 4)[:253]
    assert plan(f"http://{name}:80/").remote_host == name


def test_url_of_max_length_is_accepted():
    url = "http://localhost/" + "a" * (MAX_URL - 17)
    assert len(url) == MAX_URL
    assert plan(url).path == "/" + "a" * (MAX_URL - 17)


def test_refused_is_a_value_error_and_a_tunneld_error():
    assert issubclass(Refused, ValueError)
    assert issubclass(Refused, TunneldError)
    with pytest.raises(ValueError):
        plan("file:///x")


@pytest.mark.parametrize("url", [
    "http://user:hunter2@localhost/?token=SECRET",
    "ftp://localhost/?token=SECRET",
    "javascript:fetch('/?token=SECRET')",
    "http://localhost:abc/?token=SECRET",
    "http://bad!host/?token=SECRET",
    "http://[nothex]/?token=SECRET",
    "http://localhost/?token=SECRET x",
    "http://localhost/?token=SECRET" + "a" * MAX_URL,
    "http:localhost/?token=SECRET",
    "localhost:8888/?token=SECRET",
])
def test_refusal_never_shows_query_or_credentials(url):
    with pytest.raises(Refused) as ei:
        plan(url)
    assert "SECRET" not in str(ei.value)
    assert "hunter2" not in str(ei.value)


def test_plan_refuses_non_text():
    with pytest.raises(Refused, match="must be text"):
        plan(b"http://localhost/")  # type: ignore[arg-type]


@pytest.mark.parametrize("url,port,host,expected", [
    ("http://0.0.0.0:8090/x?y#z", 18090, "127.0.0.1", "http://127.0.0.1:18090/x?y#z"),
    ("http://0.0.0.0:8090", 8090, "127.0.0.1", "http://127.0.0.1:8090/"),
    ("http://localhost:8888/lab?token=abc", 8888, "127.0.0.1",
     "http://127.0.0.1:8888/lab?token=abc"),
    ("https://node42:8443/a#b", 28443, "127.0.0.1", "https://127.0.0.1:28443/a#b"),
    ("http://[::1]:8888/", 18888, "::1", "http://[::1]:18888/"),
    ("http://[::1]:8888/", 18888, "[::1]", "http://[::1]:18888/"),
    ("http://localhost:8090?q", 8090, "localhost", "http://localhost:8090/?q"),
])
def test_local_url(url, port, host, expected):
    assert plan(url).local_url(port, host) == expected


def test_local_url_default_host():
    assert plan("http://0.0.0.0:8090/x?y#z").local_url(18090) == "http://127.0.0.1:18090/x?y#z"


def test_plan_is_a_frozen_value():
    p = plan("http://localhost:1/")
    assert p == Plan("http", "localhost", 1, "/", True)
    with pytest.raises(AttributeError):
        p.remote_port = 2  # type: ignore[misc]


@pytest.mark.parametrize("host,expected", [
    *[(h, True) for h in LOOPBACK_NAMES],
    ("LocalHost", True), ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
    ("::ffff:127.0.0.1", True), ("localhost.", True),
    ("128.0.0.1", False), ("node42", False), ("10.0.0.1", False), ("fe80::1", False),
    ("localhost.example.org", False),
])
def test_is_loopback_host(host, expected):
    assert is_loopback_host(host) is expected


# Whatever the text, plan() either refuses it or gives a local URL that every parser reads as
# our listener: the remote's URL cannot steer the browser elsewhere.
@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.text(max_size=60),
    st.builds(lambda s, a, p: f"{s}://{a}{p}",
              st.sampled_from(["http", "https", "HTTP", "ftp", "file"]),
              st.text(alphabet="abc0123456789.:@[]%-_!\\/ ", max_size=20),
              st.text(alphabet="/?#@:\\[]ab%&=. ", max_size=20)),
))
def test_any_accepted_url_rewrites_to_our_listener(text):
    try:
        p = plan(text)
    except Refused as exc:
        assert str(exc)
        return
    assert p.scheme in ("http", "https")
    assert 1 <= p.remote_port <= 65535
    assert p.path[:1] in ("/", "?", "#") and p.path[:1] == "/"
    local = p.local_url(18090)
    parts = urlsplit(local)
    assert (parts.hostname, parts.port, parts.username) == ("127.0.0.1", 18090, None)
    assert local.endswith(p.path)


# --- redact ------------------------------------------------------------------------------

@pytest.mark.parametrize("url,expected", [
    ("http://localhost:8888/lab?token=abc123", "http://localhost:8888/lab?token=…"),
    ("http://127.0.0.1:18888/lab?TOKEN=abc&x=1", "http://127.0.0.1:18888/lab?TOKEN=…&x=1"),
    ("http://localhost:8888/?tok%65n=abc", "http://localhost:8888/?tok%65n=…"),
    ("http://u:p@host/x", "http://host/x"),
    ("http://u@host:80/x?a=1", "http://host:80/x?a=1"),
    ("http://a@b@host/", "http://host/"),
    ("https://h/?password=p&key=k&secret=s&auth=a&access_token=t&code=c&x=y",
     "https://h/?password=…&key=…&secret=…&auth=…&access_token=…&code=…&x=y"),
    ("https://h/?api_key=k&client_secret=s&X-Amz-Signature=s&refresh_token=r",
     "https://h/?api_key=…&client_secret=…&X-Amz-Signature=…&refresh_token=…"),
    ("https://h/?keyboard=1&author=me&monkey=2&codec=h264",
     "https://h/?keyboard=1&author=me&monkey=2&codec=h264"),
    ("https://h/#access_token=t&x=1", "https://h/#access_token=…&x=1"),
    ("https://h/#section-2", "https://h/#section-2"),
    ("http://h/?token=", "http://h/?token="),
    ("http://h/?token", "http://h/?token"),
    ("http://h/a b\n", "http://h/a%20b%0A"),
    ("http://h/?token=abc\r\nFAKE LOG LINE", "http://h/?token=…"),
    ("http://h/?x=1\r\nFAKE", "http://h/?x=1%0D%0AFAKE"),
    ("http://[::1]:8888/?token=t", "http://[::1]:8888/?token=…"),
    ("http://[::1", "<unparseable URL>"),
    ("file:///home/u/jpserver-1-open.html", "file:///home/u/jpserver-1-open.html"),
    ("javascript:alert(1)", "javascript:alert(1)"),
    ("", ""),
])
def test_redact(url, expected):
    assert redact(url) == expected


@pytest.mark.parametrize("value", [None, b"http://x/", 42])
def test_redact_non_text(value):
    assert redact(value) == "<unparseable URL>"  # type: ignore[arg-type]


def test_redact_caps_length():
    out = redact("http://h/" + "a" * (2 * MAX_URL))
    assert len(out) == MAX_URL + 1 and out.endswith("…")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=48),
       st.sampled_from(["token", "Token", "password", "access_token", "code", "secret"]),
       st.sampled_from(["/lab", "/", "/tree/x", ""]),
       st.sampled_from(["", "&x=1", "#frag"]))
def test_redact_hides_token_values(secret, key, path, suffix):
    url = f"http://localhost:8888{path}?{key}={secret}{suffix}"
    assert secret not in redact(url)
    local = plan(url).local_url(18888)
    assert secret not in redact(local)


# --- Jupyter's redirect page -------------------------------------------------------------

@pytest.mark.parametrize("url,expected", [
    ("file:///home/u/.local/share/jupyter/runtime/jpserver-123-open.html",
     "/home/u/.local/share/jupyter/runtime/jpserver-123-open.html"),
    ("file:///home/u/.local/share/jupyter/runtime/nbserver-4567-open.html",
     "/home/u/.local/share/jupyter/runtime/nbserver-4567-open.html"),
    ("file://localhost/run/user/1000/jupyter/runtime/jpserver-9-open.html",
     "/run/user/1000/jupyter/runtime/jpserver-9-open.html"),
    ("FILE:///tmp/jpserver-1-open.html", "/tmp/jpserver-1-open.html"),
    ("file:/tmp/jpserver-1-open.html", "/tmp/jpserver-1-open.html"),
    ("file:///home/my%20user/jpserver-1-open.html", "/home/my user/jpserver-1-open.html"),
    ("file:///home/u/jpserver-1-open.html?x", None),
    ("file:///home/u/jpserver-1-open.html#x", None),
    ("file:///etc/passwd", None),
    ("file:///home/u/jpserver-abc-open.html", None),
    ("file:///home/u/jpserver-1-open.html.bak", None),
    ("file:///home/u/xjpserver-1-open.html", None),
    ("file:///home/u/../../etc/jpserver-1-open.html", None),
    ("file:///home/u/%2e%2e/jpserver-1-open.html", None),
    ("file:///home/u/%0Ajpserver-1-open.html", None),
    ("file:///home/u%00/jpserver-1-open.html", None),
    ("file://evilhost/home/u/jpserver-1-open.html", None),
    ("file:////home/u/jpserver-1-open.html", None),
    ("file:jpserver-1-open.html", None),
    ("http://localhost:8888/jpserver-1-open.html", None),
    ("http://localhost:8888/lab?token=abc", None),
    ("", None),
    (None, None),
])
def test_jupyter_redirect_path(url, expected):
    assert jupyter_redirect_path(url) == expected


# What jupyter_server 2.x writes to jpserver-<pid>-open.html (templates/browser-open.html).
JPSERVER_OPEN_HTML = """\
<!DOCTYPE html>
<html>
<head>
    <meta charset="UTF-8">
    <meta http-equiv="refresh" content="1;url=http://localhost:8888/lab?token=abc" />
    <title>Opening Jupyter Application</title>
</head>
<body>

<p>
    This page should redirect you to a Jupyter application. If it doesn't,
    <a href="http://localhost:8888/lab?token=abc">click here to go to Jupyter</a>.
</p>

</body>
</html>
"""


@pytest.mark.parametrize("html,expected", [
    (JPSERVER_OPEN_HTML, "http://localhost:8888/lab?token=abc"),
    (JPSERVER_OPEN_HTML.replace("token=abc", "token=abc&amp;x=1"),
     "http://localhost:8888/lab?token=abc&x=1"),
    # meta wins over an earlier link
    ('<a href="http://a/">x</a><meta http-equiv="refresh" content="0; url=http://b/">',
     "http://b/"),
    ('<META HTTP-EQUIV="Refresh" CONTENT="1; URL=\'http://b/?t=1\'">', "http://b/?t=1"),
    ('<meta http-equiv="refresh" content="url=http://b/">', "http://b/"),
    ('<meta http-equiv="refresh" content="5">', None),
    ('<meta http-equiv="refresh" content="5"><a href="http://a/">go</a>', "http://a/"),
    ('<meta name="refresh" content="1;url=http://b/"><a href="http://a/">go</a>', "http://a/"),
    ('<p><a>no href</a><a href="">empty</a><a href=" http://a/ ">x</a></p>', "http://a/"),
    ('<a href="http://a/">1</a><a href="http://b/">2</a>', "http://a/"),
    ("<html><body>no link</body></html>", None),
    ("", None),
    ("<<<!-- <a href=x", None),
    ("<!DOCTYPE><![CDATA[ <a href='http://a/'>", None),
])
def test_jupyter_redirect_target(html, expected):
    assert jupyter_redirect_target(html) == expected


def test_jupyter_redirect_target_reads_only_a_bounded_prefix():
    html = " " * (64 * 1024) + '<a href="http://a/">x</a>'
    assert jupyter_redirect_target(html) is None


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='<>/="\'&;a-hmetrf:! ', max_size=120))
def test_jupyter_redirect_target_never_raises(html):
    assert jupyter_redirect_target(html) is None or isinstance(jupyter_redirect_target(html), str)


def test_jupyter_file_to_local_url():
    """The whole chain: the file:// marker → the file's target → the URL opened locally."""
    assert jupyter_redirect_path(
        "file:///home/u/.local/share/jupyter/runtime/jpserver-123-open.html") is not None
    target = jupyter_redirect_target(JPSERVER_OPEN_HTML)
    p = plan(target)
    assert (p.remote_host, p.remote_port, p.is_loopback) == ("localhost", 8888, True)
    assert p.local_url(18888) == "http://127.0.0.1:18888/lab?token=abc"
    assert redact(p.local_url(18888)) == "http://127.0.0.1:18888/lab?token=…"


# --- open policy -------------------------------------------------------------------------

A, B = "barhal", "other"


def run_policy(steps, **kw):
    """steps: (host, url, now) → [(reason, burst_started), ...]"""
    pol = OpenPolicy(**kw)
    out = []
    for host, url, now in steps:
        out.append((pol.check(host, url, now), pol.burst_started()))
    return out


@pytest.mark.parametrize("steps,expected", [
    # dedup: same URL within DEDUP_WINDOW, measured from the last *allowed* open
    ([(A, "u", 0.0), (A, "u", 5.0), (A, "u", 9.99), (A, "u", 10.0), (A, "u", 19.0)],
     [(None, False), ("duplicate", True), ("duplicate", False), (None, False),
      ("duplicate", True)]),
    # another URL, or the same URL on another host, is not a duplicate
    ([(A, "u", 0.0), (A, "v", 1.0), (B, "u", 1.0)],
     [(None, False), (None, False), (None, False)]),
    # rate: RATE_MAX opens per host per RATE_WINDOW (sliding); the first refusal starts a burst
    ([(A, f"u{i}", float(i)) for i in range(5)]
     + [(A, "u5", 4.5), (A, "u6", 5.0), (B, "u7", 5.0), (A, "u8", 9.99), (A, "u9", 10.0),
        (A, "u10", 10.5), (A, "u11", 11.0)],
     [(None, False)] * 5
     + [("rate-limited", True), ("rate-limited", False), (None, False),
        ("rate-limited", False), (None, False), ("rate-limited", True), (None, False)]),
    # duplicates and rate limits belong to one burst; an allowed open ends it
    ([(A, "u", 0.0), (A, "u", 1.0), (A, "u", 2.0), (A, "v", 3.0), (A, "u", 4.0)],
     [(None, False), ("duplicate", True), ("duplicate", False), (None, False),
      ("duplicate", True)]),
])
def test_open_policy(steps, expected):
    assert run_policy(steps) == expected


def test_policy_defaults():
    pol = OpenPolicy()
    assert (pol.dedup_window, pol.rate_max, pol.rate_window) == (10.0, 5, 10.0)
    assert (OpenPolicy.DEDUP_WINDOW, OpenPolicy.RATE_MAX, OpenPolicy.RATE_WINDOW) == (10.0, 5, 10.0)
    assert pol.burst_started() is False


def test_burst_ends_after_a_quiet_spell():
    steps = [(A, "u", 0.0), (A, "u", 1.0), (A, "u", 2.0), (A, "u", 12.0), (A, "u", 13.0)]
    assert run_policy(steps, dedup_window=100.0) == [
        (None, False), ("duplicate", True), ("duplicate", False), ("duplicate", True),
        ("duplicate", False)]


def test_bursts_are_per_host():
    steps = [(A, "u", 0.0), (B, "u", 0.0), (A, "u", 1.0), (B, "u", 1.5), (A, "u", 2.0)]
    assert run_policy(steps) == [
        (None, False), (None, False), ("duplicate", True), ("duplicate", True),
        ("duplicate", False)]


def test_flood_logs_one_line_per_burst():
    pol = OpenPolicy()
    lines = 0
    opened = 0
    for i in range(1000):   # 1000 distinct URLs within one second
        if pol.check(A, f"http://x/{i}", i / 1000) is None:
            opened += 1
        elif pol.burst_started():
            lines += 1
    assert (opened, lines) == (5, 1)


def test_custom_limits():
    steps = [(A, "a", 0.0), (A, "b", 0.1), (A, "a", 0.5), (A, "a", 1.0)]
    assert run_policy(steps, dedup_window=1.0, rate_max=2, rate_window=0.2) == [
        (None, False), (None, False), ("duplicate", True), (None, False)]


def test_policy_rejects_rate_max_zero():
    with pytest.raises(ValueError):
        OpenPolicy(rate_max=0)


def test_policy_memory_is_bounded():
    pol = OpenPolicy()
    for i in range(20000):
        pol.check(f"h{i % 7}", f"http://x/{i}", i * 0.5)
    assert len(pol._last) <= 7 * OpenPolicy.RATE_MAX
    assert sum(len(q) for q in pol._opens.values()) <= 7 * OpenPolicy.RATE_MAX
    assert len(pol._burst) <= 7


# -- compute nodes: a loopback URL printed on another machine than the server ----------------

@pytest.mark.parametrize("url,node,server,expected", [
    # printed on a compute node: its own loopback, reached through the server
    ("http://127.0.0.1:8888/lab?token=t#f", "node42", "login1",
     ("node42", 8888, "/lab?token=t#f", False)),
    ("http://localhost:8888/", "Node42.cluster.org", "login1", ("node42.cluster.org", 8888,
                                                              "/", False)),
    ("http://0.0.0.0:8080", "10.252.0.2", "login1", ("10.252.0.2", 8080, "/", False)),
    ("http://[::1]:8080/x", "node42", "login1", ("node42", 8080, "/x", False)),
    # printed on the server itself (any spelling of its name): its loopback, as always
    ("http://127.0.0.1:8888/", "login1", "login1", ("127.0.0.1", 8888, "/", True)),
    ("http://127.0.0.1:8888/", "LOGIN1", "login1.cluster.org", ("127.0.0.1", 8888, "/", True)),
    ("http://localhost:8888/", "login1.cluster.org", "login1", ("localhost", 8888, "/", True)),
    # no node, or the server's name unknown: conservatively the server's loopback
    ("http://127.0.0.1:8888/", None, "login1", ("127.0.0.1", 8888, "/", True)),
    ("http://127.0.0.1:8888/", "node42", None, ("127.0.0.1", 8888, "/", True)),
    ("http://127.0.0.1:8888/", "node42", "", ("127.0.0.1", 8888, "/", True)),
    # a URL that names its host keeps it, wherever it was printed
    ("http://node42:8888/lab", "node42", "login1", ("node42", 8888, "/lab", False)),
    ("http://node7:8888/lab", "node42", "login1", ("node7", 8888, "/lab", False)),
])
def test_on_node(url, node, server, expected):
    p = on_node(plan(url), node, server)
    assert (p.remote_host, p.remote_port, p.path, p.is_loopback) == expected
    assert p.scheme == "http"


def test_on_node_refuses_a_node_that_is_not_a_host_name():
    with pytest.raises(Refused, match="not a host name"):
        on_node(plan("http://127.0.0.1:1/"), "-oProxyCommand", "login1")


@pytest.mark.parametrize("a,b,same", [
    ("login1", "login1", True), ("login1", "LOGIN1.", True), ("login1", "login1.x.org", True),
    ("login1.x.org", "login1", True), ("login1.a.org", "login1.b.org", False),
    ("node1", "node10", False), ("10.0.0.1", "10.0.0.1", True), ("10.0.0.1", "10", False),
])
def test_same_host(a, b, same):
    assert same_host(a, b) is same
    assert same_host(b, a) is same
