"""Logins that need a person, on the asyncssh side: ``LoginClient`` answers the server's
password and keyboard-interactive prompts and unlocks encrypted keys through the host's
*prompter* (the ``ask`` coroutine of a tunnelctl with a terminal waiting for this host's
attempt).  With none attached nothing is asked (asyncssh does not even send those methods,
so the server counts no failed try) and the client records what was needed, for the error.
Answers live only in the attempt; unlocked keys only in this process (``UNLOCKED_KEYS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Awaitable, Callable, Iterator, Protocol, Sequence

import asyncssh

from .errors import LoginAbandoned

log = logging.getLogger("tunneld")

#: a limit: a person's tries (password and keyboard-interactive together) in one connection
#: attempt, as OpenSSH's NumberOfPasswordPrompts; the server may allow fewer.  Wrong answers
#: lock accounts at many sites: tunneld never retries them on its own
MAX_ANSWER_TRIES = 3
#: a limit: passphrase tries per encrypted key in one connection attempt
MAX_PASSPHRASE_TRIES = 3
#: key files OpenSSH (and asyncssh) use when ~/.ssh/config names no IdentityFile
DEFAULT_KEY_FILES = ("id_ed25519_sk", "id_ecdsa_sk", "id_ed448", "id_ed25519", "id_ecdsa",
                     "id_rsa", "id_dsa")

#: asks the person at a waiting tunnelctl: a prompt (wire.prompt's fields without the id) →
#: one response per prompt; raises LoginAbandoned when nobody answers
Prompter = Callable[[dict[str, Any]], Awaitable[list[str]]]

#: private keys unlocked with a passphrase, by (path, mtime, size): shared by every host of
#: this daemon run, held in memory only (never written anywhere), gone when it stops
UNLOCKED_KEYS: dict[tuple[str, int, int], asyncssh.SSHKey] = {}


class LoginHost(Protocol):
    """What a login needs of its host: its name, who can answer now, and a way to say that a
    person is being asked (the connect timeout's clock stops meanwhile)."""

    name: str

    @property
    def prompter(self) -> Prompter | None: ...

    def asking(self) -> contextlib.AbstractContextManager[None]: ...


class LoginClient(asyncssh.SSHClient):
    """Records why the connection ended, and the host key a server offered that known_hosts
    does not trust (for the error message; it is never accepted).  Answers the server's
    password / keyboard-interactive questions and unlocks encrypted keys through the
    supervisor's prompter, if one is attached; records what was needed when none is."""

    def __init__(self, sup: "LoginHost | None" = None, target: str = "",
                 who: str = "", key_files: list[str] | None = None) -> None:
        self.lost: asyncio.Future[Exception | None] = \
            asyncio.get_running_loop().create_future()
        #: "ssh-ed25519 SHA256:…" of an untrusted host key the server offered, if any
        self.offered_key: str | None = None
        self._sup = sup
        #: the alias or hop this login is for (shown with the prompts), and "user@host"
        self._target, self._who = target, who
        #: what the server wanted that nobody could answer: "password", "kbdint", "passphrase"
        self.needed: list[str] = []
        #: encrypted keys that stayed locked because nobody could give their passphrase
        self.locked_keys: list[str] = []
        #: the key whose passphrase was wrong every time, if any
        self.wrong_passphrase: str | None = None
        #: encrypted keys in OpenSSH's format while the bcrypt module is missing (no unlocking)
        self.unusable_keys: list[str] = []
        #: True once a person's password / kbdint answers were sent to the server
        self.answered = False
        #: why the person's login was abandoned, if it was; nothing is asked after that
        self.abandoned: str | None = None
        #: password / kbdint tries in this attempt (bounded by MAX_ANSWER_TRIES)
        self._tries = 0
        #: IdentityFile paths; the encrypted ones are offered by public_key_auth_requested
        self._key_files = list(key_files or [])

    # -- answers from a person (asyncssh calls these during authentication) -------------------

    def _prompter(self, kind: str) -> Prompter | None:
        """The prompter to ask for ``kind``, or None (noting that ``kind`` was needed)."""
        if self.abandoned is not None:
            return None
        ask = self._sup.prompter if self._sup is not None else None
        if ask is None and kind not in self.needed:
            self.needed.append(kind)
        return ask

    async def _ask(self, ask: Prompter, kind: str, prompts: list[tuple[str, bool]],
                   attempt: int, name: str = "", instructions: str = "") -> list[str] | None:
        assert self._sup is not None
        try:
            with self._sup.asking():
                responses = await ask({"host": self._target, "kind": kind, "name": name,
                                       "instructions": instructions, "attempt": attempt,
                                       "prompts": prompts})
        except LoginAbandoned as exc:
            self.abandoned = str(exc)
            return None
        return responses if len(responses) == len(prompts) else None

    def _next_try(self) -> int | None:
        self._tries += 1
        return self._tries if self._tries <= MAX_ANSWER_TRIES else None

    def kbdint_auth_requested(self) -> str | None:
        if self._prompter("kbdint") is None or self._next_try() is None:
            return None   # asyncssh moves on without sending the method
        return ""         # let the server choose its submethods

    async def kbdint_challenge_received(
            self, name: str, instructions: str, lang: str,
            prompts: Sequence[tuple[str, bool]]) -> list[str] | None:
        ask = self._prompter("kbdint")
        if ask is None:
            return None
        if not prompts and not name and not instructions:
            return []
        answers = await self._ask(ask, "kbdint", list(prompts), max(self._tries, 1), name,
                                  instructions)
        if answers is not None and prompts:
            self.answered = True
        return answers

    async def password_auth_requested(self) -> str | None:
        ask = self._prompter("password")
        n = self._next_try() if ask is not None else None
        if ask is None or n is None:
            return None
        answers = await self._ask(ask, "password", [(f"{self._who}'s password: ", False)], n)
        if not answers:
            return None
        self.answered = True
        return answers[0]

    async def public_key_auth_requested(self) -> list[asyncssh.SSHKey] | None:
        """After the agent's keys and the unencrypted IdentityFile keys: the encrypted ones,
        unlocked this daemon run, or unlocked now with a passphrase from the prompter."""
        while self._key_files:
            path = self._key_files.pop(0)
            found = _encrypted_key(path)
            if found is None:
                continue
            ident, data = found
            key = UNLOCKED_KEYS.get(ident)
            if key is not None:
                return [key]
            if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY") and not _bcrypt():
                self.unusable_keys.append(path)
                continue
            ask = self._prompter("passphrase")
            if ask is None:
                self.locked_keys.append(path)
                continue
            shown = _home_path(path)
            for n in range(1, MAX_PASSPHRASE_TRIES + 1):
                answers = await self._ask(
                    ask, "passphrase", [(f"Enter passphrase for key '{shown}': ", False)], n)
                if answers is None:
                    return None
                try:   # the KDF takes a moment of CPU: not on the event loop
                    key = await asyncio.get_running_loop().run_in_executor(
                        None, asyncssh.import_private_key, data, answers[0])
                except (asyncssh.KeyEncryptionError, asyncssh.KeyImportError):
                    continue
                finally:
                    answers = None
                UNLOCKED_KEYS[ident] = key
                log.info("%s: unlocked key %s (held in memory until the daemon stops)",
                         self._sup.name if self._sup else self._target, shown)
                return [key]
            self.wrong_passphrase = shown
        return None

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.offered_key = f"{key.get_algorithm()} {key.get_fingerprint()}"
        return False   # known_hosts alone decides; there is no trust on first use

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def _identity_files(cfg: Any) -> list[str]:
    """The private key files a login may use: IdentityFile, else OpenSSH's defaults."""
    files = cfg.get("IdentityFile") or [os.path.join("~", ".ssh", f) for f in DEFAULT_KEY_FILES]
    return [os.path.expanduser(str(f)) for f in files]


def _encrypted_key(path: str) -> tuple[tuple[str, int, int], bytes] | None:
    """(identity, contents) of ``path`` if it is a private key that needs a passphrase."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return None
    try:
        asyncssh.import_private_key(data)
    except asyncssh.KeyImportError as exc:
        if "passphrase" in str(exc).lower():
            return (path, st.st_mtime_ns, st.st_size), data
        return None
    except (ValueError, asyncssh.Error):
        return None
    return None   # not encrypted: asyncssh loaded it already


def _bcrypt() -> bool:
    """True if asyncssh can decrypt keys in OpenSSH's format (it needs bcrypt's KDF)."""
    try:
        import bcrypt
    except ImportError:
        return False
    return hasattr(bcrypt, "kdf")


def _home_path(path: str) -> str:
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if home and path.startswith(home + os.sep) else path


class Prompting:
    """Who answers a host's login prompts, and the clock of its connection attempt that
    stops while a person is asked (a mixin of ``host.HostSupervisor``)."""

    def __init__(self) -> None:
        #: who can answer login prompts now: the ask coroutines of tunnelctl clients waiting
        #: for this host with a terminal, the last attached asked (empty: nobody is asked)
        self._prompters: list[Prompter] = []
        #: monotonic seconds spent waiting for people's answers (connect timeouts skip them)
        self._person_secs = 0.0
        #: monotonic time the pending question was asked; None while nobody is asked
        self._asking_since: float | None = None

    @property
    def prompter(self) -> Prompter | None:
        return self._prompters[-1] if self._prompters else None

    @contextlib.contextmanager
    def prompting(self, ask: Prompter | None) -> Iterator[None]:
        """Let ``ask`` answer this host's login prompts while the block runs (attach it
        before the attempt it should answer starts).  ``None``: a no-op."""
        if ask is None:
            yield
            return
        self._prompters.append(ask)
        try:
            yield
        finally:
            self._prompters.remove(ask)

    @contextlib.contextmanager
    def asking(self) -> Iterator[None]:
        """A person is being asked while the block runs: the connect timeout's clock stops."""
        self._asking_since = start = time.monotonic()
        try:
            yield
        finally:
            self._person_secs += time.monotonic() - start
            self._asking_since = None

    def _machine_clock(self) -> float:
        """Monotonic seconds, less the time spent waiting for people's answers."""
        now = time.monotonic()
        asking = now - self._asking_since if self._asking_since is not None else 0.0
        return now - self._person_secs - asking
