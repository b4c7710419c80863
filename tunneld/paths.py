"""Where tunneld keeps its files.  platformdirs and the standard library only.

Everything honours ``HOME`` and the ``XDG_*`` variables, so a test can run a whole daemon in a
temporary home.  Directories are created on demand (platformdirs does not create them).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import platformdirs

APP = "tunneld"
#: Unix socket paths must stay under this many bytes (104 on macOS, 108 on Linux)
MAX_SOCKET_PATH = 104


def config_file() -> Path:
    env = os.environ.get("TUNNELD_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP))


def state_file() -> Path:
    # on macOS user_state_dir equals the config dir: the file name keeps them apart
    return state_dir() / "forwards.json"


def runtime_dir() -> Path:
    # without XDG_RUNTIME_DIR platformdirs falls back to /tmp/runtime-<uid> (with a warning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP))


def socket_path() -> Path:
    env = os.environ.get("TUNNELD_SOCKET")
    return Path(env).expanduser() if env else runtime_dir() / "tunneld.sock"


def lock_path() -> Path:
    return socket_path().with_name(socket_path().name + ".lock")


def log_dir() -> Path:
    return Path(platformdirs.user_log_dir(APP))


def log_file() -> Path:
    return log_dir() / "tunneld.log"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700.  Returns it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def mux_dir() -> Path:
    """The directory of tunneld's per-host control sockets (OpenSSH's ControlPath points
    here; ``muxserver``)."""
    return runtime_dir() / "mux"


def ssh_conf() -> Path:
    """The ssh_config file tunneld owns, ``~/.ssh/tunneld.conf`` (`tunnelctl ssh-config
    --install` writes it; its ``Host`` blocks name the hosts whose sockets the daemon makes
    at start)."""
    return Path.home() / ".ssh" / "tunneld.conf"


def mux_socket(host: str) -> Path:
    """The control socket of ``host``: ``mux/HOST`` (what ``ControlPath …/%n`` names), or
    ``mux/h-HASH`` (the first 20 hex digits of the name's SHA-1, as OpenSSH's ``%C`` hashes)
    when that would pass ``MAX_SOCKET_PATH`` or the name is not a plain file name."""
    import hashlib
    plain = mux_dir() / host
    if len(str(plain).encode()) < MAX_SOCKET_PATH and host not in (".", "..") and \
            "/" not in host and not host.startswith("h-"):
        return plain
    return mux_dir() / ("h-" + hashlib.sha1(host.encode()).hexdigest()[:20])


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
