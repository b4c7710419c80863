"""Control-socket protocol: JSON lines over a Unix socket.  Standard library only.

A client sends one request per line::

    {"cmd": "add", "proto": 1, "args": {"host": "barhal", "specs": ["8090-8092"]}}

and the daemon answers with zero or more *progress* lines, then exactly one *final* line::

    {"message": "barhal: connecting"}                              progress (stderr)
    {"ok": true,  "version": "0.1.0", "result": {...}}             final, success
    {"ok": false, "version": "0.1.0", "error": {"type": "BindError", "message": "..."}}

Every final line carries the daemon's version so the client can say when it talks to a daemon
of another version.  A connection may carry several requests, one after the other.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ProtocolError, TunneldError

#: bumped when a request or reply changes incompatibly
PROTOCOL_VERSION = 1
#: a security limit: the longest control line either side accepts, in bytes
MAX_LINE = 1 << 20
#: a security limit: seconds a client may take to send a whole request line
REQUEST_TIMEOUT = 30.0
#: a limit: characters of an error message on the wire; a longer one (it echoes hostile
#: input) is cut, so that an error reply always fits in ``MAX_LINE``
MAX_ERROR_MESSAGE = 4096

#: every command the daemon serves; tunnelctl's verbs are these names
COMMANDS = frozenset({
    "add", "remove", "list", "status", "stop", "reconnect",
    "run", "sessions", "logs", "kill", "open", "reload", "events",
})


def encode(msg: dict[str, Any]) -> bytes:
    """One message → one line of UTF-8 JSON, newline-terminated."""
    # a lone surrogate (a path decoded with surrogateescape) becomes its JSON escape "\udcxx"
    data = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "backslashreplace") + b"\n"
    if len(data) > MAX_LINE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_LINE}-byte limit")
    return data


def decode(line: bytes) -> dict[str, Any]:
    """One received line → a message dict.  Raises ``ProtocolError`` on anything else."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line of {len(line)} bytes exceeds the {MAX_LINE}-byte limit")
    if not line.endswith(b"\n"):
        raise ProtocolError("incomplete line: the message must end with a newline")
    try:
        msg = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("malformed JSON: nested too deeply") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object")
    return msg


def request(cmd: str, **args: Any) -> dict[str, Any]:
    return {"cmd": cmd, "proto": PROTOCOL_VERSION, "args": args}


def parse_request(msg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validate a request envelope → (command, args)."""
    try:  # "\ud800" escapes decode to lone surrogates, which are not text: refuse them here
        json.dumps(msg, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ProtocolError("malformed JSON: a string holds a lone surrogate (\\ud800-"
                            "\\udfff), which is not valid Unicode") from None
    except RecursionError:
        raise ProtocolError("malformed JSON: nested too deeply") from None
    cmd = msg.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError("request has no 'cmd' string")
    if cmd not in COMMANDS:
        raise ProtocolError(f"unknown command {cmd!r}; known: {', '.join(sorted(COMMANDS))}")
    proto = msg.get("proto", PROTOCOL_VERSION)
    if proto != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {proto!r} is not supported (this daemon speaks "
                            f"{PROTOCOL_VERSION}); use the tunnelctl of the same version")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("request 'args' must be a JSON object")
    return cmd, args


def ok(version: str, result: Any = None) -> dict[str, Any]:
    return {"ok": True, "version": version, "result": result}


def error(version: str, exc: BaseException) -> dict[str, Any]:
    kind = type(exc).__name__ if isinstance(exc, TunneldError) else "TunneldError"
    message = str(exc)
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE - 1] + "…"
    return {"ok": False, "version": version, "error": {"type": kind, "message": message}}


def progress(message: str) -> dict[str, Any]:
    return {"message": message}


def is_final(msg: dict[str, Any]) -> bool:
    return "ok" in msg
