"""URLs that programs print: found in lines of output (with ANSI colour, across chunks), and
which are forwarded (``printed.nearby``).  Pure; the lines are what the tools print."""

from __future__ import annotations

import pytest

from tunneld import printed, urls
from tunneld.markers import BrowserOpen, Scanner
from tunneld.printed import PrintedUrl

TOKEN = "0123456789abcdef0123456789abcdef0123456789abcdef"
#: (tool, a line it prints, the URLs expected in it)
TOOL_LINES = [
    ("jupyter server", f"[I 2026-12-01 10:00:00.000 ServerApp]     http://gpu012:8888/lab?token={TOKEN}",
     [f"http://gpu012:8888/lab?token={TOKEN}"]),
    ("jupyter server", f"[I 2026-12-01 10:00:00.000 ServerApp]  or http://127.0.0.1:8888/lab?token={TOKEN}",
     [f"http://127.0.0.1:8888/lab?token={TOKEN}"]),
    ("jupyter notebook 6", f"    Or copy and paste one of these URLs:\n"
     f"        http://localhost:8889/?token={TOKEN}".split("\n")[1],
     [f"http://localhost:8889/?token={TOKEN}"]),
    ("tensorboard", "TensorBoard 2.15.1 at http://localhost:6006/ (Press CTRL+C to quit)",
     ["http://localhost:6006/"]),
    ("streamlit", "  Local URL: \x1b[1mhttp://localhost:8501\x1b[0m",
     ["http://localhost:8501"]),
    ("streamlit", "  Network URL: \x1b[1mhttp://10.1.2.3:8501\x1b[0m",
     ["http://10.1.2.3:8501"]),
    ("dash", "Dash is running on http://127.0.0.1:8050/", ["http://127.0.0.1:8050/"]),
    ("flask", " * Running on http://127.0.0.1:5000", ["http://127.0.0.1:5000"]),
    ("flask", " * Running on all addresses (0.0.0.0)", []),
    ("flask (Firefly)", " * Running on http://0.0.0.0:5500/ (Press CTRL+C to quit)",
     ["http://0.0.0.0:5500/"]),
    ("bokeh", "2026-12-01 10:00:00,000 Bokeh app running at: http://localhost:5006/myapp",
     ["http://localhost:5006/myapp"]),
    ("code-server", "[2026-12-01T10:00:00.000Z] info  HTTP server listening on "
     "http://127.0.0.1:8080/", ["http://127.0.0.1:8080/"]),
    # rserver prints nothing itself; this is what the usual HPC launch scripts (Open
    # OnDemand's, rocker's singularity recipes) echo once it listens
    ("rstudio server", "RStudio Server is running at http://node42:8787 - log in as $USER",
     ["http://node42:8787"]),
    ("uvicorn", "INFO:     Uvicorn running on http://127.0.0.1:8000 (Press CTRL+C to quit)",
     ["http://127.0.0.1:8000"]),
    ("anvi'o", "Server address ......................: http://0.0.0.0:8090",
     ["http://0.0.0.0:8090"]),
    ("ipv6", "listening on http://[::1]:9000/x, and https://[fd00::5]:9443.",
     ["http://[::1]:9000/x", "https://[fd00::5]:9443"]),
    ("sentence", "Open (http://localhost:7000/docs), then http://localhost:7001/a_(b).",
     ["http://localhost:7000/docs", "http://localhost:7001/a_(b)"]),
    ("quoted", "url='http://localhost:7002/q?a=1&b=2' \"http://localhost:7003\"",
     ["http://localhost:7002/q?a=1&b=2", "http://localhost:7003"]),
    ("no port", "see https://jupyter.org/ and http://localhost/", []),
    ("credentials", "http://user:secret@localhost:8000/ and http://u:1234@h:80/", []),
    ("twice", "http://localhost:8888/ http://localhost:8888/", ["http://localhost:8888/"]),
    ("not a scheme", "xhttp://localhost:1/ and myhttps://localhost:2/", []),
]


@pytest.mark.parametrize("tool,line,expected", TOOL_LINES, ids=[t[0] for t in TOOL_LINES])
def test_urls_tools_print_are_found(tool, line, expected):
    s = Scanner(urls=True)
    found = s.feed(line.encode() + b"\r\n")
    assert [e.url for e in found if isinstance(e, PrintedUrl)] == expected


def test_a_url_split_across_chunks_is_found_once_its_line_ends():
    line = b"  Local URL: \x1b[1mhttp://localhost:8501/app?x=1\x1b[0m\n"
    for cut in range(1, len(line)):
        s = Scanner(urls=True)
        got = s.feed(line[:cut]) + s.feed(line[cut:])
        assert got == [PrintedUrl("http://localhost:8501/app?x=1")], cut


def test_an_unterminated_last_line_is_scanned_at_close():
    s = Scanner(urls=True)
    assert s.feed(b"Running on http://127.0.0.1:5000") == []
    assert s.close() == [PrintedUrl("http://127.0.0.1:5000")]


def test_a_marker_line_is_a_marker_not_a_printed_url():
    s = Scanner(urls=True)
    got = s.feed(b"OPEN_ON_LOCAL(node1)[http://127.0.0.1:8888/lab]\n")
    assert got == [BrowserOpen("http://127.0.0.1:8888/lab", "node1")]


def test_without_urls_the_scanner_finds_markers_only():
    assert Scanner().feed(b"Running on http://127.0.0.1:5000\n") == []


def test_a_long_url_is_not_found():
    url = "http://localhost:1/" + "a" * urls.MAX_URL
    assert printed.find_urls(url.encode()) == []


SERVER = "login1.cluster.org"
NEARBY = [
    ("http://localhost:8888/", True), ("http://127.0.0.2:8888/", True),
    ("http://0.0.0.0:8888/", True), ("http://[::]:8888/", True), ("http://[::1]:8888/", True),
    ("http://gpu012:8888/", True), ("http://gpu012.cluster.org:8888/", True),
    ("http://login1:8888/", True), ("http://login1.cluster.org:8888/", True),
    ("http://10.1.2.3:8501", True), ("http://192.168.5.5:5000", True),
    ("http://172.16.0.9:5000", True), ("http://[fd00::5]:9443", True),
    ("http://169.254.169.254:80/latest/meta-data/", False), ("http://[fe80::1]:80/", False),
    ("http://93.184.216.34:8501", False), ("http://8.8.8.8:53/", False),
    ("https://pypi.org:443/simple", False), ("http://gpu012.other.org:8888/", False),
    ("http://evil.cluster.org.example.com:80/", False),
]


@pytest.mark.parametrize("url,ok", NEARBY)
def test_only_urls_the_server_reaches_for_us_are_forwarded(url, ok):
    assert printed.nearby(urls.plan(url), SERVER) is ok


def test_a_two_label_server_name_gives_no_domain():
    assert not printed.nearby(urls.plan("https://api.github.com:443/"), "example.com")
    assert printed.nearby(urls.plan("http://example:443/"), "example.com")


def test_without_the_servers_name_only_single_labels_and_addresses_count():
    assert printed.nearby(urls.plan("http://gpu012:8888/"), None)
    assert not printed.nearby(urls.plan("http://gpu012.cluster.org:8888/"), None)


@pytest.mark.parametrize("url", [
    "http+unix://%2Fh%2F.tunneld%2Fsock%2Fx.abc123%2F..%2F..%2Fvar%2Frun%2Fdocker.sock/v1/",
    "http+unix://%2Fh%2F.tunneld%2Fsock%2Fx.abc123%2F.%2Fweb.sock/",
    "http+unix://%2Fh%2F%2Fweb.sock/", "http+unix://%2Fh%2Fweb.sock%0A/",
    "http+unix://relative.sock/"])
def test_a_unix_url_names_one_socket_plainly(url):
    assert printed.unix_target(url) is None


def test_a_unix_url_gives_its_socket_and_the_rest():
    assert printed.unix_target("http+unix://%2Fh%2Fs.abc123%2Fweb.sock/lab?token=t") == \
        ("/h/s.abc123/web.sock", "/lab?token=t")
    assert printed.unix_target("http+unix://%2Fh%2Fweb.sock?x=1") == ("/h/web.sock", "/?x=1")
