"""Opening the SSH connection of a host with asyncssh: ``~/.ssh/config`` read as ssh reads it,
ProxyJump hops followed by tunneld itself (so that its options apply to every hop: design.md
§9), the fast path's ciphers preferred unless the config names ``Ciphers``, the user's
ServerAlive* settings over tunneld's keepalive, every connection (each hop's too: they carry
all of the host's bytes) put on the fast path, and every foreign error mapped to a
TunneldError whose message a person can act on (``map_error``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from . import fastpath
from .config import Defaults
from .errors import (
    AuthError,
    ConfigError,
    ConnectError,
    HostKeyError,
    LoginAbandoned,
    LoginNeeded,
    TunneldError,
)
from .login import MAX_PASSPHRASE_TRIES, LoginClient, LoginHost, _home_path, _identity_files

#: longest ProxyJump chain followed
MAX_JUMPS = 8


@dataclass
class Connected:
    """An open connection: the client that logged in, the jump hops under it (closed with
    it, by the caller), and the keepalive (interval, count_max) it was opened with."""

    conn: asyncssh.SSHClientConnection
    client: LoginClient
    hops: list[asyncssh.SSHClientConnection]
    keepalive: tuple[float, int]


async def connect(host: LoginHost, settings: Defaults) -> Connected:
    """Open ``host.name``'s connection (no deadline here: the caller bounds it).  Raises a
    TunneldError (ConnectError, AuthError, HostKeyError, ConfigError)."""
    keepalive: list[tuple[float, int]] = []
    conn, client, hops = await _open(host, settings, host.name, None, 0, keepalive)
    return Connected(conn, client, hops, keepalive[0])


async def _open(host_: LoginHost, settings: Defaults, target: str,
            tunnel: asyncssh.SSHClientConnection | None, depth: int,
            keepalive: list[tuple[float, int]]
            ) -> tuple[asyncssh.SSHClientConnection, LoginClient,
                       list[asyncssh.SSHClientConnection]]:
    """Connect to ``target`` (an alias or ``[user@]host[:port]``), following its
    ProxyJump hops ourselves so that our options apply to every hop (design.md §9)."""
    user, host, port = _split_target(target)
    try:
        # config=() loads ~/.ssh/config (the default, None, loads nothing)
        options = asyncssh.SSHClientConnectionOptions(
            config=(), host=host, port=port if port else (), username=user or ())
    except (ValueError, asyncssh.Error) as exc:
        raise ConfigError(f"{host_.name}: bad ssh configuration for {host}: {exc}") from None
    cfg = options.config
    hops: list[asyncssh.SSHClientConnection] = []
    jump = options.tunnel if tunnel is None else None
    if isinstance(jump, str) and jump.lower() != "none":
        if depth >= MAX_JUMPS:
            raise ConfigError(f"{host_.name}: ProxyJump chain longer than {MAX_JUMPS} "
                              "hops")
        for hop in jump.split(","):
            hop_conn, _, hop_hops = await _open(host_, settings, hop.strip(), tunnel,
                                                depth + 1, keepalive)
            hops.extend(hop_hops)
            hops.append(hop_conn)
            tunnel = hop_conn
    kwargs: dict[str, Any] = {}
    if cfg.get("Ciphers") is None:
        kwargs["encryption_algs"] = fastpath.preferred_ciphers()
    # the user's ServerAlive* settings win over ours
    kwargs["keepalive_interval"] = cfg.get("ServerAliveInterval",
                                           settings.keepalive_interval)
    kwargs["keepalive_count_max"] = cfg.get("ServerAliveCountMax",
                                            settings.keepalive_count_max)
    if depth == 0:
        keepalive.append((kwargs["keepalive_interval"], kwargs["keepalive_count_max"]))
    client_box: list[LoginClient] = []
    who = f"{options.username}@{options.host}"
    keys = _identity_files(cfg)

    def factory() -> LoginClient:
        client_box.append(LoginClient(host_, target, who, keys))
        return client_box[-1]

    try:
        conn = await asyncssh.connect(
            host, port=port if port else (), username=user or (),
            tunnel=tunnel if tunnel is not None else (), client_factory=factory,
            request_pty=False, x11_forwarding=False, agent_forwarding=False,
            # our own deadline bounds the attempt, less the time a person takes to answer
            login_timeout=0, **kwargs)
    except BaseException as exc:
        for h in reversed(hops):
            h.close()
        if isinstance(exc, Exception):
            client = client_box[-1] if client_box else None
            raise map_error(host_.name, exc, options, target,
                                  client.offered_key if client else None, client) from None
        raise
    fastpath.attach(conn)
    return conn, client_box[-1], hops

def map_error(name_: str, exc: Exception, options: Any, target: str,
              offered: str | None = None, client: LoginClient | None = None) -> TunneldError:
    """Foreign error → a TunneldError whose message a user can act on.  ``offered``: the
    untrusted host key the server showed ("ssh-ed25519 SHA256:…"), if any; ``client``:
    what the login needed and got."""
    via = "" if target == name_ else f" (via {target})"
    addr = f"{options.host}:{options.port}"
    name = f"{name_}{via}"
    if isinstance(exc, TunneldError):
        return exc
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        files = _known_hosts_files(options)
        known = _has_known_key(files, options.host, options.port)
        entry = options.host if options.port == 22 else f"[{options.host}]:{options.port}"
        shown = ", ".join(str(f) for f in files) or "~/.ssh/known_hosts"
        now = f"; the server offers {offered}" if offered else ""
        # the fingerprint without trusting anything (not through a jump host: use ssh)
        scan = "" if via else (
            f" (`ssh-keyscan {'' if options.port == 22 else f'-p {options.port} '}"
            f"{options.host} | ssh-keygen -lf -` shows it too)")
        if known is not None:
            return HostKeyError(
                f"{name}: the host key of {addr} does NOT match the one in {known} "
                f"(it changed, or someone is intercepting the connection){now}. "
                f"`ssh-keygen -lF '{entry}' -f {known}` shows the key on record. Check the "
                f"new fingerprint with the server's admin{scan}, then run "
                f"`ssh-keygen -R '{entry}' -f {known}` and `ssh {target}` to accept it; "
                f"then `tunnelctl reconnect {name_}`")
        return HostKeyError(
            f"{name}: the host key of {addr} is unknown (not in {shown}){now}. Check "
            f"that fingerprint with the server's admin{scan}, then run `ssh {target}` "
            f"once to accept it, then `tunnelctl reconnect {name_}`")
    if isinstance(exc, asyncssh.PermissionDenied) and client is not None:
        login = login_error(name_, client, name, addr, exc.reason or "permission denied")
        if login is not None:
            return login
    if isinstance(exc, asyncssh.PermissionDenied):
        return AuthError(
            f"{name}: authentication failed at {addr} ({exc.reason or 'permission denied'})"
            f". Check that `ssh {target}` logs in without a prompt (key in "
            f"~/.ssh/config IdentityFile or loaded with ssh-add), then "
            f"`tunnelctl reconnect {name_}`")
    if isinstance(exc, asyncssh.DisconnectError):
        return ConnectError(f"{name}: the server at {addr} closed the connection: "
                            f"{exc.reason or exc}")
    if isinstance(exc, asyncssh.Error):
        return ConnectError(f"{name}: SSH error from {addr}: {exc}")
    import socket as _socket
    if isinstance(exc, _socket.gaierror):
        return ConnectError(f"{name}: cannot resolve host name {options.host!r} "
                            f"({exc.strerror}); check the Host/HostName in ~/.ssh/config "
                            "or your network/VPN")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(f"{name}: connection refused by {addr}; is sshd running there "
                            "and is the Port right?")
    if isinstance(exc, OSError):
        return ConnectError(f"{name}: cannot connect to {addr}: {exc.strerror or exc}")
    if isinstance(exc, ValueError):
        return ConfigError(f"{name}: bad ssh configuration: {exc}")
    return ConnectError(f"{name}: {type(exc).__name__}: {exc}")

def login_error(name_: str, client: LoginClient, name: str, addr: str,
                reason: str) -> AuthError | None:
    """The error for a refused login that involved (or needed) a person; None if it did
    not.  Never contains an answer."""
    again = f"run `tunnelctl login {name_}` to try again"
    if client.abandoned is not None:
        return LoginAbandoned(f"{name}: login abandoned ({client.abandoned}); {again}")
    if client.answered:
        return AuthError(f"{name}: the server at {addr} rejected the answers ({reason}); "
                         f"{again}")
    if client.wrong_passphrase:
        return AuthError(f"{name}: wrong passphrase for key '{client.wrong_passphrase}' "
                         f"({MAX_PASSPHRASE_TRIES} tries); {again}")
    unusable = ", ".join(f"'{_home_path(p)}'" for p in client.unusable_keys)
    if unusable and not client.needed:
        return AuthError(
            f"{name}: authentication failed at {addr} ({reason}); key {unusable} is "
            "encrypted in OpenSSH's format, which tunneld unlocks only with the Python "
            "module bcrypt installed (`pip install bcrypt` where tunneld runs); or load it "
            f"into your agent: `ssh-add {_home_path(client.unusable_keys[0])}`")
    if not client.needed:
        return None
    what = {"password": "a password",
            "kbdint": "answers to the server's prompts (password, verification code)",
            "passphrase": "the passphrase of key " + ", ".join(
                f"'{_home_path(p)}'" for p in client.locked_keys)}
    needs = " or ".join(what[k] for k in client.needed
                        if not (k == "password" and "kbdint" in client.needed))
    hint = "".join(f", or load the key into your agent: `ssh-add {_home_path(p)}`"
                   for p in client.locked_keys[:1])
    return LoginNeeded(f"{name}: login needs {needs} and no terminal is waiting; run "
                       f"`tunnelctl login {name_}`{hint}")


def _split_target(target: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` (IPv6 in brackets) → (user, host, port)."""
    user, _, rest = target.rpartition("@")
    port: int | None = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":") and tail[1:].isdigit():
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, p = rest.partition(":")
        if p.isdigit():
            port = int(p)
    else:
        host = rest
    return (user or None), host, port


def _known_hosts_files(options: Any) -> list[Path]:
    files = options.config.get("UserKnownHostsFile") or ["~/.ssh/known_hosts"]
    return [Path(os.path.expanduser(f)) for f in files]


def _has_known_key(files: list[Path], host: str, port: int) -> Path | None:
    """The first of ``files`` that holds a key for ``host``:``port``, or None."""
    for f in files:
        try:
            known = asyncssh.read_known_hosts(str(f))
        except (OSError, ValueError, asyncssh.Error):
            continue
        keys = known.match(host, host, port)
        if keys[0] or keys[1]:
            return f
    return None
