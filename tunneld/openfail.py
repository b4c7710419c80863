"""Why the server could not open a channel to a target, as a sentence a person can act on.
Pure: no I/O.

The server answers a refused ``direct-tcpip`` open with an RFC 4254 code and a reason text;
OpenSSH's reason is ``strerror()`` of its connect ("Connection refused") or, for a name it
could not look up, ``gai_strerror()`` ("Name or service not known").  Saying "is anything
listening?" about a name that does not resolve sends people looking in the wrong place.
"""

from __future__ import annotations

#: RFC 4254 §5.1 reason codes
ADMINISTRATIVELY_PROHIBITED = 1
CONNECT_FAILED = 2

#: how resolvers word a name that does not resolve (glibc, musl, macOS, Windows)
_RESOLVE_ERRORS = ("name or service not known", "nodename nor servname", "no address "
                   "associated", "temporary failure in name resolution", "unknown host",
                   "name does not resolve", "non-recoverable failure in name resolution",
                   "no such host")


def is_resolve_error(reason: str) -> bool:
    """True if ``reason`` says a name could not be resolved."""
    low = (reason or "").lower()
    return any(e in low for e in _RESOLVE_ERRORS)


def describe(host: str, port: int, code: int, reason: str) -> str:
    """Why a channel to ``host:port`` was refused, as a sentence (ends with a period)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    text = reason or "refused"
    if code == ADMINISTRATIVELY_PROHIBITED:
        return (f"the server does not allow connections to {target} ({text}; its sshd's "
                "AllowTcpForwarding or PermitOpen).")
    if is_resolve_error(text):
        return (f"the server could not resolve {host!r} ({text}); check the name (it is "
                "looked up on the server, as a compute node's name would be).")
    return (f"the server could not open the connection ({text}); is anything listening on "
            f"{target} on the server?")


def describe_path(path: str, full: str, code: int, reason: str) -> str:
    """Why a channel to the Unix socket ``path`` on the server (``full`` once ``~`` is
    expanded) was refused, as a sentence (ends with a period).

    OpenSSH gives one answer (CONNECT_FAILED, "open failed") to a missing socket, a socket
    nothing accepts on, one in a directory the login may not enter, and
    ``AllowStreamLocalForwarding no``: its own log says which, the answer does not."""
    shown = path if full == path else f"{path} ({full})"
    text = reason or "refused"
    if code == ADMINISTRATIVELY_PROHIBITED:
        return (f"the server does not allow connections to the Unix socket {shown} ({text}; "
                "its sshd's AllowStreamLocalForwarding or DisableForwarding).")
    return (f"the server could not connect to the Unix socket {shown} ({text}): no such "
            "socket on the server, or nothing accepts connections on it, or it is not yours "
            "to reach (the permissions of its directory), or the server has "
            "`AllowStreamLocalForwarding no` (sshd_config).")
