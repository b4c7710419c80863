"""Control-socket protocol: JSON lines over a Unix socket.  Standard library only.

A client sends one request per line::

    {"cmd": "add", "proto": 1, "args": {"host": "barhal", "specs": ["8090-8092"]}}

and the daemon answers with zero or more *progress* lines, then exactly one *final* line::

    {"message": "barhal: connecting"}                              progress (stderr)
    {"ok": true,  "version": "0.1.0", "result": {...}}             final, success
    {"ok": false, "version": "0.1.0", "error": {"type": "BindError", "message": "..."}}

Every final line carries the daemon's version so the client can say when it talks to a daemon
of another version.  A connection may carry several requests, one after the other.

Login prompts.  A client that can ask a person (it has a terminal) says so with
``"interactive": true`` in the args of ``add``, ``reconnect`` and ``login``.  While such a request
runs, the daemon may send a *prompt* progress line and then reads exactly one *answer* line::

    {"prompt": {"id": 1, "host": "barhal", "kind": "kbdint", "name": "", "instructions": "",
                "attempt": 1, "prompts": [{"text": "Verification code: ", "echo": false}]}}
    {"answer": {"id": 1, "responses": ["123456"]}}          the client: one response a prompt
    {"answer": {"id": 1, "cancel": true}}                    the client: the person gave up

``kind`` is ``password``, ``kbdint`` (keyboard-interactive: the server's own prompts) or
``passphrase`` (of a private key); ``attempt`` counts the tries of that question in this login.
Answers are secrets: they are never logged, stored, or echoed in an error message.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from .errors import ProtocolError, TunneldError, UsageError
from .names import SCHEDULERS, check_host_alias, check_session_name

#: bumped when a request or reply changes incompatibly
PROTOCOL_VERSION = 1
#: a security limit: the longest control line either side accepts, in bytes
MAX_LINE = 1 << 20
#: a security limit: seconds a client may take to send a whole request line
REQUEST_TIMEOUT = 30.0
#: a limit: characters of an error message on the wire; a longer one (it echoes hostile
#: input) is cut, so that an error reply always fits in ``MAX_LINE``
MAX_ERROR_MESSAGE = 4096

#: a limit: seconds the daemon waits for a person's answer to one prompt
ANSWER_TIMEOUT = 180.0
#: a security limit: prompts in one question, and characters of one prompt text / response
MAX_PROMPTS = 16
MAX_PROMPT_TEXT = 1024
MAX_RESPONSE = 4096
#: what a login prompt may ask for
PROMPT_KINDS = frozenset({"password", "kbdint", "passphrase"})

#: every command the daemon serves; tunnelctl's verbs are these names (their arguments:
#: ``ARGS`` below)
COMMANDS = frozenset({
    "add", "remove", "list", "status", "stop", "reconnect", "login",
    "run", "sessions", "logs", "kill", "open", "reload", "events", "forget", "opens",
    "setup-remote",
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


# -- the arguments of each command --------------------------------------------------------------
#
# Each command declares its arguments: name → a checker that returns the typed value (or the
# default for a missing / null one) or raises UsageError naming the argument.  Only the *types*
# are checked here (a host alias, a list of strings, a flag...); what a value means (a spec's
# grammar, whether a session exists) is the services' business.  A request with an argument
# its command does not take is refused: a typo must not be ignored.

Checker = Callable[[str, Any], Any]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def flag(default: bool = False) -> Checker:
    def check(name: str, value: Any) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise UsageError(f"{name!r} must be true or false, not {_show(value)}")
        return value
    return check


def text(required: bool = True) -> Checker:
    def check(name: str, value: Any) -> str | None:
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise UsageError(f"{name!r} must be a string, not {_show(value)}")
        return value
    return check


def texts(name: str, value: Any) -> list[str]:
    """A list of strings (a missing one: empty)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise UsageError(f"{name!r} must be a list of strings, not {_show(value)}")
    return list(value)


def _named(rule: Callable[[Any], str], required: bool) -> Checker:
    """A name checked by ``names``' ``rule`` (None allowed unless ``required``)."""
    def check(name: str, value: Any) -> str | None:
        if value is None and not required:
            return None
        return rule(value)
    return check


def host(required: bool = True) -> Checker:
    return _named(check_host_alias, required)


def session_name(required: bool = True) -> Checker:
    return _named(check_session_name, required)


def port_choice(name: str, value: Any) -> int | str | None:
    """``run --port``: none, "auto" or a port number."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise UsageError(f"--port takes 'auto' or a port number, not {value!r}")
    return value


def sock_choice(name: str, value: Any) -> str | None:
    """``run --sock``: none or "auto"."""
    if value is None or value == "auto":
        return value
    raise UsageError(f"--sock takes 'auto' (a socket in a private directory on the server), "
                     f"not {_show(value)}")


def scheduler_choice(name: str, value: Any) -> str | None:
    """``run --scheduler``: none (found on the server) or one tunneld knows."""
    if value is None or value in SCHEDULERS:
        return value
    raise UsageError(f"--scheduler takes {', '.join(SCHEDULERS)} (or leave it out: the server's "
                     f"is found), not {_show(value)}")


def number(name: str, value: Any) -> int | None:
    """A positive whole number, or none."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name!r} must be a whole number from 1, not {_show(value)}")
    return value


def command_words(name: str, value: Any) -> list[str]:
    """A session's command: its words (a string is one word)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or \
            not all(isinstance(a, str) for a in value) or not "".join(value).strip():
        raise UsageError("run needs a command, e.g. `tunnelctl run HOST -- jupyter lab`")
    return list(value)


_FORWARDS = {"specs": texts, "remote": texts, "socks": texts}
#: every command's arguments (see above); ``interactive``: the client can answer login prompts
ARGS: dict[str, dict[str, Checker]] = {
    "add": {"host": host(), **_FORWARDS, "public": flag(), "force": flag(),
            "interactive": flag()},
    "remove": {"host": host(), **_FORWARDS},
    "list": {},
    "status": {},
    "stop": {},
    "reconnect": {"host": host(required=False), "interactive": flag()},
    "login": {"host": host(), "interactive": flag()},
    "run": {"host": host(), "command": command_words, "name": session_name(required=False),
            "port": port_choice, "sock": sock_choice, "detach": flag(True), "follow": flag(),
            "interactive": flag(),
            # a batch job: the scheduler's options (one string, split as a shell would)
            "job": text(required=False), "scheduler": scheduler_choice},
    "sessions": {},
    "logs": {"name": text(), "follow": flag(), "all": flag()},
    "kill": {"name": text()},
    "forget": {"names": texts, "ended": flag()},
    # a URL printed on a host, or (``session``) the newest URL a session printed; ``list``:
    # the session's URLs, nothing opened; ``request``: a request `opens` lists
    "open": {"host": host(required=False), "url": text(required=False),
             "node": text(required=False), "session": session_name(required=False),
             "list": flag(), "request": number, "interactive": flag()},
    # recent browser-open requests (the spool's, sessions' markers, `open`'s)
    "opens": {},
    # the BROWSER line for the server's shell start-up file; ``apply``: add it
    "setup-remote": {"host": host(), "apply": flag(), "shell_file": text(required=False),
                     "interactive": flag()},
    "reload": {},
    "events": {},
}


def parse_args(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    """The typed arguments of a request (``parse_request``'s): every argument of ``cmd``,
    checked, with its default when missing.  Raises UsageError naming the bad one."""
    spec = ARGS[cmd]
    unknown = sorted(set(args) - set(spec))
    if unknown:
        takes = ", ".join(sorted(spec)) or "no arguments"
        raise UsageError(f"{cmd} takes no argument {unknown[0]!r} (it takes: {takes})")
    return {name: check(name, args.get(name)) for name, check in spec.items()}


assert set(ARGS) == COMMANDS


def iso_time(t: float, ms: bool = False) -> str:
    """A wall-clock time as the wire writes it: UTC, ``2026-11-21T21:00:00Z`` (``ms``: with
    milliseconds, ``…:00.123Z``)."""
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return text + (f".{int(t % 1 * 1000):03d}Z" if ms else "Z")


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


# -- login prompts ---------------------------------------------------------------------------

def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string")
    if len(value) > limit:
        raise ProtocolError(f"{what} is longer than {limit} characters")
    return value


def prompt(pid: int, host: str, kind: str, prompts: list[tuple[str, bool]], name: str = "",
           instructions: str = "", attempt: int = 1) -> dict[str, Any]:
    """A prompt progress line: ask the client's person ``prompts`` ((text, echo) pairs)."""
    return {"prompt": {"id": pid, "host": host, "kind": kind, "name": name,
                       "instructions": instructions, "attempt": attempt,
                       "prompts": [{"text": t, "echo": bool(e)} for t, e in prompts]}}


def is_prompt(msg: dict[str, Any]) -> bool:
    return "prompt" in msg


def parse_prompt(msg: dict[str, Any]) -> dict[str, Any]:
    """Validate a prompt line (the client's side) → its ``prompt`` object, with ``prompts``
    as a list of (text, echo).  Raises ``ProtocolError``."""
    p = msg.get("prompt")
    if not isinstance(p, dict):
        raise ProtocolError("a prompt must be a JSON object")
    pid = p.get("id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ProtocolError("a prompt needs an integer 'id'")
    if p.get("kind") not in PROMPT_KINDS:
        raise ProtocolError(f"unknown prompt kind {p.get('kind')!r}")
    items = p.get("prompts")
    if not isinstance(items, list) or len(items) > MAX_PROMPTS:
        raise ProtocolError(f"a prompt has a list of at most {MAX_PROMPTS} prompts")
    prompts = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("echo"), bool):
            raise ProtocolError("each prompt is {\"text\": str, \"echo\": bool}")
        prompts.append((_text(item.get("text"), "a prompt text", MAX_PROMPT_TEXT), item["echo"]))
    attempt = p.get("attempt", 1)
    return {"id": pid, "kind": p["kind"], "prompts": prompts,
            "host": _text(p.get("host", ""), "a prompt's host", MAX_PROMPT_TEXT),
            "name": _text(p.get("name", ""), "a prompt's name", MAX_PROMPT_TEXT),
            "instructions": _text(p.get("instructions", ""), "a prompt's instructions",
                                  MAX_PROMPT_TEXT * 4),
            "attempt": attempt if isinstance(attempt, int) and not isinstance(attempt, bool)
            else 1}


def answer(pid: int, responses: list[str]) -> dict[str, Any]:
    return {"answer": {"id": pid, "responses": responses}}


def cancel(pid: int) -> dict[str, Any]:
    return {"answer": {"id": pid, "cancel": True}}


def parse_answer(msg: dict[str, Any], pid: int, count: int) -> list[str] | None:
    """Validate the client's answer to prompt ``pid`` with ``count`` prompts → the responses,
    or None if the person cancelled.  Raises ``ProtocolError`` (whose message never contains
    a response: they are secrets)."""
    a = msg.get("answer")
    if not isinstance(a, dict):
        raise ProtocolError("expected an answer line {\"answer\": {...}}")
    if a.get("id") != pid or isinstance(a.get("id"), bool):
        raise ProtocolError(f"the answer is not for prompt {pid}")
    if a.get("cancel") is True:
        return None
    responses = a.get("responses")
    if not isinstance(responses, list) or len(responses) != count:
        raise ProtocolError(f"the answer needs a list of {count} response(s)")
    for r in responses:
        if not isinstance(r, str):
            raise ProtocolError("each response must be a string")
        if len(r) > MAX_RESPONSE:
            raise ProtocolError(f"a response is longer than {MAX_RESPONSE} characters")
        try:
            r.encode()
        except UnicodeEncodeError:
            raise ProtocolError("a response holds a lone surrogate, which is not text") \
                from None
    return list(responses)
