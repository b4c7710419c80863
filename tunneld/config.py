"""config.toml and the persisted state file, as pydantic models.

config.toml (optional)::

    [defaults]
    bind = "127.0.0.1"          # default listen address of forwards
    keepalive_interval = 9      # seconds between SSH keepalives (0 disables)
    keepalive_count_max = 2     # unanswered keepalives before the link is declared dead
    hold_timeout = 10           # seconds a client is held while its host is down
    printed_urls = "forward"    # URLs a session prints: "forward", "open" or "ignore"
    open_max_age = 120          # seconds: older spool requests are listed, not opened
    job_warning = 10            # minutes before a batch job's time limit: a notification
    mux_persist = 14400         # seconds a host used only by your own ssh stays connected
    max_window = "16MiB"        # the most a channel's receive window grows to on a long link
    resume_suspend = 600        # seconds a resumable forward's stream may stay suspended
    resume_buffer = "8MiB"      # bytes a resumable stream holds unacknowledged, each way
    resume_total_buffer = "64MiB"  # ... all streams of one resumable forward, at each end
    resume_max_streams = 256    # streams one resumable forward carries at once

    [hosts.barhal]
    forwards = ["8090-8092", "18888:node42:8888", {spec = "8890", resume = true}]

The files the daemon writes itself (saved forwards, detached sessions) are ``store.py``'s.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import spec as specmod
from . import window as windowmod
from .errors import ConfigError, SpecError

#: what a URL printed in a session's output gets: a forward and a place in the session's list
#: ("forward"), that and the browser for the first one of the session ("open"), nothing
#: ("ignore"); a marker always opens
PrintedUrls = Literal["forward", "open", "ignore"]


class Strict(BaseModel):
    """Unknown keys are errors; values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Defaults(Strict):
    bind: str = specmod.DEFAULT_BIND
    #: seconds between keepalives; with count_max 2 a black-holed link is dead within 27 s
    keepalive_interval: float = Field(9.0, ge=0, le=3600)
    keepalive_count_max: int = Field(2, ge=1, le=100)
    #: seconds a client connecting during an outage is held before it is closed
    hold_timeout: float = Field(10.0, ge=0, le=600)
    #: seconds allowed for TCP connect + SSH handshake + authentication
    connect_timeout: float = Field(20.0, gt=0, le=600)
    #: browser command for opened URLs (a list of arguments, or a string split like a shell
    #: would, never run by one); "%s" is replaced by the URL, else the URL is appended.
    #: Unset: Python's webbrowser (honours BROWSER in the daemon's environment)
    browser: list[str] | str | None = None
    #: seconds to wait for a marker's remote port to accept connections before opening
    ready_timeout: float = Field(60.0, gt=0, le=3600)
    #: seconds a stopping daemon lets open connections finish (listeners close at once)
    stop_timeout: float = Field(10.0, ge=0, le=600)
    #: URLs printed in a session's output (see ``PrintedUrls``)
    printed_urls: PrintedUrls = "forward"
    #: minutes before a batch job's time limit that a desktop notification warns of its end
    job_warning: float = Field(10.0, ge=0, le=24 * 60)
    #: seconds: a browser-open request from the server's spool older than this when tunneld
    #: first sees it is listed (`tunnelctl opens`), not opened
    open_max_age: float = Field(120.0, ge=0, le=30 * 86400)
    #: seconds a host that only the user's own ssh clients used (its control socket, no
    #: forward, no session) stays connected after the last of them ended, as OpenSSH's
    #: ControlPersist (0: dropped at once)
    mux_persist: float = Field(14400.0, ge=0, le=7 * 86400)
    #: bytes (or "16MiB"): the largest receive window a channel grows to when the link's
    #: bandwidth × round trip needs it (``window``); what one busy channel may hold in memory
    max_window: int = windowmod.DEFAULT_MAX_WINDOW

    @field_validator("max_window", mode="before")
    @classmethod
    def _max_window(cls, v: Any) -> int:
        n = windowmod.parse_size(v)
        lo, hi = windowmod.MIN_MAX_WINDOW, windowmod.MAX_MAX_WINDOW
        if not lo <= n <= hi:
            raise ValueError(f"{windowmod.format_size(n)} is outside "
                             f"{windowmod.format_size(lo)}..{windowmod.format_size(hi)}")
        return n

    #: seconds a resumable forward's stream may stay suspended (no link to its relay); then
    #: both ends are closed, and a relay that had no tunneld for as long exits
    resume_suspend: float = Field(600.0, ge=1, le=7 * 86400)
    #: bytes a resumable stream holds that the other end has not taken, each way (full: its
    #: reader pauses)
    resume_buffer: int = 8 * 1024 * 1024
    #: bytes all the streams of one resumable forward hold, at each end
    resume_total_buffer: int = 64 * 1024 * 1024
    #: streams one resumable forward carries at once (more: refused, logged)
    resume_max_streams: int = Field(256, ge=1, le=65536)

    @field_validator("resume_buffer", "resume_total_buffer", mode="before")
    @classmethod
    def _resume_size(cls, v: Any) -> int:
        n = windowmod.parse_size(v)
        lo, hi = 64 * 1024, windowmod.MAX_MAX_WINDOW
        if not lo <= n <= hi:
            raise ValueError(f"{windowmod.format_size(n)} is outside "
                             f"{windowmod.format_size(lo)}..{windowmod.format_size(hi)}")
        return n

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        try:
            return specmod.parse_bind(v)
        except SpecError as exc:
            raise ValueError(str(exc)) from None


class HostConfig(Strict):
    forwards: list[str] = []
    #: this host's ``printed_urls``, else ``[defaults]``'s
    printed_urls: PrintedUrls | None = None
    #: this host's ``open_max_age``, else ``[defaults]``'s
    open_max_age: float | None = Field(None, ge=0, le=30 * 86400)

    @field_validator("forwards", mode="before")
    @classmethod
    def _forwards(cls, v: Any) -> list[str]:
        """Local forward specs; ``{spec = "8090", resume = true}`` is a resumable one (kept
        as its spec string, ``--resume 8090``)."""
        if not isinstance(v, list):
            return v  # pydantic's own error names the type
        out = []
        for item in v:
            if isinstance(item, dict):
                extra = set(item) - {"spec", "resume"}
                if extra or not isinstance(item.get("spec"), str) or \
                        not isinstance(item.get("resume", False), bool):
                    raise ValueError(f"{item!r}: a forward table is {{spec = \"8090\", "
                                     "resume = true}")
                text = ("--resume " if item.get("resume") else "") + item["spec"]
            elif isinstance(item, str):
                text = item
            else:
                raise ValueError(f"{item!r}: a forward is a spec string like \"8090\" or a "
                                 "table {spec = \"8090\", resume = true}")
            try:
                kinds = {s.kind for s in specmod.parse_any(text)}
            except SpecError as exc:
                raise ValueError(str(exc)) from None
            if kinds - {"local", "resume"}:
                raise ValueError(f"{text!r}: config forwards are local ones (\"8090\", "
                                 "\"18888:node42:8888\"); add -R and -D with tunnelctl add")
            out.append(text)
        return out


class Config(Strict):
    defaults: Defaults = Defaults()
    hosts: dict[str, HostConfig] = {}

    def printed_urls(self, host: str) -> PrintedUrls:
        """What URLs printed in ``host``'s sessions get (its own setting, else the default)."""
        own = self.hosts[host].printed_urls if host in self.hosts else None
        return own or self.defaults.printed_urls

    def open_max_age(self, host: str) -> float:
        """``host``'s ``open_max_age`` (its own, else the default)."""
        own = self.hosts[host].open_max_age if host in self.hosts else None
        return self.defaults.open_max_age if own is None else own

    def forwards(self) -> dict[str, list[specmod.ForwardSpec]]:
        return {name: specmod.parse_all(h.forwards, self.defaults.bind)
                for name, h in self.hosts.items()}


_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY_PATH = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_RE = re.compile(rf"^\s*\[\s*({_KEY_PATH})\s*\]\s*(?:#.*)?$")
_ASSIGN_RE = re.compile(rf"^\s*({_KEY_PATH})\s*=")


def _key_parts(path: str) -> list[str]:
    """``a."b.c".d`` → ``["a", "b.c", "d"]``."""
    return [p[1:-1] if p[:1] in "\"'" else p
            for p in re.findall(_KEY_PART, path)]


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a TOML key path (dotted names quoted)."""
    out: list[str] = []
    for k in loc:
        if isinstance(k, int):
            out[-1] += f"[{k}]"
        else:
            k = str(k)
            out.append(f'"{k}"' if not re.fullmatch(r"[A-Za-z0-9_-]+", k) else k)
    return ".".join(out)


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Line number of the key at ``loc`` in a TOML text (or of its closest enclosing table);
    None when it cannot be found."""
    keys = [str(k) for k in loc if not isinstance(k, int)]
    best: int | None = None
    table: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADER_RE.match(line)
        if m:
            table = _key_parts(m.group(1))
            if table == keys[:len(table)] and len(table) <= len(keys):
                best = n
            continue
        m = _ASSIGN_RE.match(line)
        if m:
            full = table + _key_parts(m.group(1))
            if full == keys[:len(full)]:
                return n
    return best


def load_config(path: Path) -> Config:
    """Read and validate config.toml.  A missing file is an empty config."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                          f"at offset {exc.start}); TOML files must be UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: arrays or tables nested too deeply") from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = err["loc"]
            key = _fmt_loc(loc)
            at = _line_of(text, loc)
            where = f"{path}:{at}" if at else str(path)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(f"{where}: {key}: {msg}")
        raise ConfigError("; ".join(problems)) from None
