"""session_urls.SessionUrls with a fake opener: which printed URLs of a session become
forwards and entries of its list (one per port, repeats and lesser repeats dropped, a refused
loopback URL leaves its port to the next address, the session's own socket only, the
printed_urls modes, the bound).  The real programs and sshd: tests/e2e/test_e2e_printed.py."""

from __future__ import annotations

import asyncio

import pytest

from tunneld import session_urls, urls
from tunneld.config import Config, Defaults
from tunneld.errors import UsageError
from tunneld.events import EventHub
from tunneld.opener import Routed
from tunneld.printed import PrintedUrl, unix_target
from tunneld.session import Session

pytestmark = pytest.mark.timeout(10)

SOCK = "/h/.tunneld/sock/s-1.abc123/web.sock"


class FakeHost:
    name = "barhal"

    def live_connection(self):
        return None


class FakeOpener:
    def __init__(self):
        self.routed: list[str] = []
        self.launched: list[str] = []

    async def route(self, host, url, node=None, source="", server=None, socket=None):
        self.routed.append(url)
        unix = unix_target(url)
        if unix is not None:
            if unix[0] != socket:
                raise UsageError("not the session's socket")
            return Routed(None, unix[0], f"30000:{unix[0]}", f"http://127.0.0.1:30000{unix[1]}")
        p = urls.plan(url)
        return Routed(p, "", f"{p.remote_port}:{p.remote_host}:{p.remote_port}",
                      p.local_url(p.remote_port))

    async def launch(self, host, routed, source="", explicit=False):
        self.launched.append(routed.local)
        return {"url": routed.local, "opened": True, "forward": routed.forward}


def make(tmp_path, mode="forward", not_ours=()):
    opener = FakeOpener()
    config = Config(defaults=Defaults(printed_urls=mode))
    links = session_urls.SessionUrls(opener, EventHub(), lambda: config,  # type: ignore[arg-type]
                                     lambda s: None)

    async def verdict(sess, port):
        return "not yours" if port in not_ours else None
    links._not_ours = verdict  # type: ignore[method-assign]
    sess = Session("s-1", FakeHost(), ["x"], tmp_path / "s.log", links.on_open)  # type: ignore[arg-type]
    sess.server = "login1.cluster.org"
    return links, sess, opener


async def feed(links, sess, *lines):
    for line in lines:
        await links.on_open(sess, PrintedUrl(line))


async def test_one_forward_per_port_and_repeats_are_dropped(tmp_path):
    links, sess, opener = make(tmp_path)
    token = "http://gpu012:8888/lab?token=t"
    await feed(links, sess, token, "http://127.0.0.1:8888/lab?token=t", token,
               "http://gpu012:8888/", "http://gpu012:8888/lab", "http://gpu012:8888/tree?token=t")
    assert [u["remote"] for u in sess.urls] == [token, "http://gpu012:8888/tree?token=t"]
    assert sess.forwards == ["8888:gpu012:8888"] and opener.launched == []


async def test_a_url_is_a_repeat_only_up_to_a_boundary(tmp_path):
    links, sess, _ = make(tmp_path)
    await feed(links, sess, "http://127.0.0.1:50001/", "http://127.0.0.1:5000")
    assert [u["remote"] for u in sess.urls] == ["http://127.0.0.1:50001/",
                                                "http://127.0.0.1:5000"]


async def test_a_refused_loopback_url_leaves_its_port_to_the_next_address(tmp_path):
    """Flask on a compute node: 127.0.0.1:5000 is not ours on the login node; the node's
    own address printed next is forwarded."""
    links, sess, opener = make(tmp_path, not_ours={5000})
    await feed(links, sess, "http://127.0.0.1:5000", "http://10.1.2.3:5000")
    assert [u["remote"] for u in sess.urls] == ["http://10.1.2.3:5000"]
    assert opener.routed == ["http://10.1.2.3:5000"]


async def test_open_opens_the_first_and_ignore_takes_nothing(tmp_path):
    links, sess, opener = make(tmp_path, mode="open")
    await feed(links, sess, "http://localhost:6006/", "http://localhost:6007/")
    assert opener.launched == ["http://127.0.0.1:6006/"] and sess.opens == 1
    links, sess, opener = make(tmp_path, mode="ignore")
    await feed(links, sess, "http://localhost:6006/")
    assert sess.urls == [] and opener.routed == []


async def test_only_the_sessions_own_socket_is_followed(tmp_path):
    links, sess, opener = make(tmp_path)
    await feed(links, sess, "http+unix://%2Fvar%2Frun%2Fdocker.sock/containers/json")
    assert sess.urls == [] and opener.routed == []
    sess.sock = SOCK
    own = "http+unix://" + SOCK.replace("/", "%2F")
    await feed(links, sess, own + "/?token=t")
    assert sess.urls[0]["local"] == "http://127.0.0.1:30000/?token=t"


async def test_the_own_socket_is_listed_under_ignore_and_opened_only_without_a_better_url(
        tmp_path, monkeypatch):
    monkeypatch.setattr(session_urls, "SOCK_OPEN_GRACE", 0.05)
    own = "http+unix://" + SOCK.replace("/", "%2F") + "/"
    links, sess, opener = make(tmp_path, mode="ignore")
    sess.sock = SOCK
    await links._printed(sess, own, own_socket=True)
    assert [u["remote"] for u in sess.urls] == [own] and opener.launched == []
    links, sess, opener = make(tmp_path, mode="open")
    sess.sock = SOCK
    await asyncio.gather(links._printed(sess, own, own_socket=True),
                         feed(links, sess, own + "?token=t"))
    assert opener.launched == ["http://127.0.0.1:30000/?token=t"]
    links, sess, opener = make(tmp_path, mode="open")
    sess.sock = SOCK
    await links._printed(sess, own, own_socket=True)
    assert opener.launched == ["http://127.0.0.1:30000/"]


async def test_urls_per_session_are_bounded(tmp_path):
    links, sess, opener = make(tmp_path)
    await feed(links, sess, *(f"http://localhost:{7000 + i}/" for i in range(40)))
    assert len(sess.urls) == session_urls.MAX_SESSION_URLS
    assert len(opener.routed) == session_urls.MAX_SESSION_URLS


async def test_public_and_foreign_urls_are_left_alone(tmp_path):
    links, sess, opener = make(tmp_path)
    await feed(links, sess, "https://pypi.org:443/simple", "http://93.184.216.34:80/",
               "http://169.254.169.254:80/latest/meta-data/", "http://u:p@localhost:80/")
    assert sess.urls == [] and opener.routed == []
