"""Composition root: lock, socket, logging, signals, sd_notify, graceful stop."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import logging.handlers
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import __version__, paths
from . import clock as sleepclock
from .config import Config, load_config
from .control import ControlServer
from .errors import ConfigError, DaemonUnavailable, TunneldError
from .manager import Manager

log = logging.getLogger("tunneld")

#: rotating daemon log: size of one file and how many old ones are kept
LOG_MAX_BYTES = 2 * 1024 * 1024
LOG_BACKUPS = 3


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Log files are created 0600 (and an older one is made so): hosts, ports and errors
    are nobody else's business.  A file that cannot be written (a full disk) is said once on
    stderr, not with a traceback per line; stderr keeps every line meanwhile."""

    #: True while writing the file fails (until a line is written again)
    _failing = False
    #: True iff the line being emitted could not be written
    _failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        super().emit(record)
        if not self._failed_now:
            self._failing = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's
        self._failed_now = True
        if not self._failing:
            self._failing = True
            exc = sys.exc_info()[1]
            sys.stderr.write(f"tunneld: cannot write the log file {self.baseFilename}: "
                             f"{getattr(exc, 'strerror', None) or exc}; logging to stderr "
                             "only until it can\n")

    def _open(self) -> Any:
        old = os.umask(0o077)
        try:
            stream = super()._open()
        finally:
            os.umask(old)
        os.chmod(self.baseFilename, 0o600)
        return stream


def setup_logging(level: str = "INFO", to_file: bool = True) -> None:
    """One line per event to stderr (journald adds its own timestamps) and to a rotating
    file.  asyncssh's per-channel chatter shows only at DEBUG."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(err)
    if to_file:
        try:
            paths.log_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
            fh = _PrivateRotatingFileHandler(
                paths.log_file(), maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)
            fh.setFormatter(fmt)
            root.addHandler(fh)
        except OSError as exc:
            log.warning("cannot write the log file under %s: %s", paths.log_dir(), exc)
    root.setLevel(logging.WARNING)
    log.setLevel(level)
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if level == "DEBUG" else
                                           logging.WARNING)


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Expected network errors nobody waited for go to DEBUG, not an ERROR with a traceback.

    Under uvloop, cancelling ``asyncssh.connect`` while it resolves the host name (a host
    removed or stopped mid-connect) leaves the resolver's future to fail alone with
    ``gaierror``: "Future exception was never retrieved".  Anything else: the default."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and "never retrieved" in str(context.get("message", "")):
        log.debug("unawaited network error (a cancelled connect): %s", exc)
        return
    loop.default_exception_handler(context)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, if it is listening."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", addr, exc)


def acquire_lock(path: Path) -> int:
    """Exactly one daemon per user: hold an exclusive lock on ``path`` for our lifetime.

    Returns a raw descriptor that is never closed: the kernel releases the lock when the
    process is gone, so a client waiting for the lock knows the daemon has exited."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise DaemonUnavailable(f"another tunneld (pid {pid}) is already running for this user "
                                f"(lock {path}); `tunnelctl stop` stops it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead daemon.  We hold the lock, so no live daemon owns it."""
    if not path.exists() and not path.is_symlink():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            log.info("removing stale socket %s", path)
            path.unlink()
            return
    raise DaemonUnavailable(f"{path} is served by another process; is another tunneld running "
                            "with a different lock file? Stop it first")


class Daemon:
    def __init__(self, config: Config, socket_path: Path, state_path: Path):
        self.config = config
        self.socket_path = socket_path
        self.manager = Manager(config, state_path)
        self.control = ControlServer(self.manager, socket_path, self.request_stop,
                                     self.reload)
        self._stop = asyncio.Event()
        #: reloads started by SIGHUP and not finished yet
        self._reloads: set[asyncio.Task[Any]] = set()
        #: True once the saved forwards are restored; a SIGHUP before that waits for it
        self._ready = False
        self._hup_pending = False

    def request_stop(self) -> None:
        self._stop.set()

    async def reload(self, why: str) -> dict[str, Any]:
        """Re-read config.toml and apply it (``Manager.reload``).  A config with errors is
        rejected (the error is raised and logged) and the running one stays.  systemd hears
        RELOADING=1 … READY=1 around it either way."""
        path = paths.config_file()
        log.info("reloading %s (%s)", path, why)
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            try:
                config = load_config(path)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (not reloaded: the running config stays)") from None
            result = await self.manager.reload(config)
            self.config = config
            return result
        except TunneldError as exc:
            log.error("reload rejected: %s", exc)
            raise
        finally:
            sd_notify("READY=1")

    def _reload_on_signal(self) -> None:
        if not self._ready:
            self._hup_pending = True
            return

        async def run() -> None:
            try:
                await self.reload("SIGHUP")
            except TunneldError:
                pass  # logged by reload()
        task = asyncio.get_running_loop().create_task(run())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def run(self, on_ready: Callable[[], None] | None = None) -> int:
        paths.ensure_private_dir(self.socket_path.parent)
        acquire_lock(paths.lock_path())
        try:
            clear_stale_socket(self.socket_path)
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(loop_exception_handler)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            # SIGUSR1: the network changed (a hook can send it): check every link now
            loop.add_signal_handler(signal.SIGUSR1, self.manager.hosts.check_liveness,
                                    "SIGUSR1")
            # SIGHUP: re-read the config (what `systemctl reload` and `tunnelctl reload` do)
            loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
            # SIGWINCH: an ssh riding a control socket relays its terminal's resize to the
            # master's pid (ours): every terminal passenger's size is read again
            loop.add_signal_handler(signal.SIGWINCH, self.manager.mux.window_changed)
            await self.control.start()
            await self.manager.restore()
            clock = asyncio.get_running_loop().create_task(
                sleepclock.watch(self.manager.hosts.check_liveness))
            log.info("tunneld %s ready (pid %d, socket %s)", __version__, os.getpid(),
                     self.socket_path)
            sd_notify("READY=1")
            self._ready = True
            if self._hup_pending:
                self._reload_on_signal()
            if on_ready:
                on_ready()
            await self._stop.wait()
            log.info("stopping")
            sd_notify("STOPPING=1")
            clock.cancel()
            self.manager.events.publish("daemon", event="stopping")
            self.manager.events.close()
            await self.control.close()
            for task in list(self._reloads):
                task.cancel()
            await self.manager.shutdown(self.config.defaults.stop_timeout)
            log.info("stopped")
            return 0
        finally:
            # the lock is not released here: acquire_lock says why
            await self.control.close()
