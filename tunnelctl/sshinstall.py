"""`tunnelctl ssh-config [--install|--uninstall] [--all-hosts] [--json]`: the files and what
is said.  Standard library, ``tunneld.paths`` and ``tunnelctl.sshsetup`` (the texts) only.

The hosts tunneld manages are those with forwards in config.toml and in the state file, and
those a running daemon lists (asked only if one runs: never started for this).  Every file is
written whole (a temp file in its directory, fsync, ``os.replace``; its mode kept), after a
backup ``~/.ssh/config.tunneld-backup-YYYYmmdd-HHMMSS`` of ~/.ssh/config; a ~/.ssh/config
that is a symlink is followed (its target is edited, and that is said).  Any failure is a
``Failed`` naming the file and what to do (exit 1), with nothing half-written.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunnelctl import client, sshsetup
from tunnelctl.client import Failed
from tunneld import paths

#: seconds to wait for a running daemon's list of hosts
LIST_TIMEOUT = 2.0


def ssh_dir() -> Path:
    return Path.home() / ".ssh"


def conf_path() -> Path:
    """tunneld's own file: ``~/.ssh/tunneld.conf`` (what ``sshsetup.CONF_REF`` names)."""
    return paths.ssh_conf()


def config_path() -> Path:
    return ssh_dir() / "config"


def _note(text: str) -> None:
    print(f"tunnelctl: note: {text}", file=sys.stderr)


# -- the hosts -----------------------------------------------------------------------------------

def _config_hosts() -> list[str]:
    """Hosts with forwards in config.toml (one that cannot be read is said, and skipped)."""
    import tomllib
    path = paths.config_file()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        _note(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc}); its hosts "
              "are left out")
        return []
    hosts = data.get("hosts")
    if not isinstance(hosts, dict):
        return []
    return [h for h, v in hosts.items() if isinstance(v, dict) and v.get("forwards")]


def _state_hosts() -> list[str]:
    """Hosts with saved forwards in the state file (forwards.json)."""
    path = paths.state_file()
    try:
        data = json.loads(path.read_bytes() or b"{}")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, RecursionError) as exc:
        _note(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc}); its hosts "
              "are left out")
        return []
    hosts = data.get("hosts") if isinstance(data, dict) else None
    if not isinstance(hosts, dict):
        return []
    return [h for h, v in hosts.items() if isinstance(h, str) and v]


def _daemon_hosts() -> list[str]:
    """The hosts a running daemon lists; none when no daemon runs (none is started)."""
    try:
        with client.open_socket(autostart=False, timeout=LIST_TIMEOUT) as s:
            r = client.exchange(s, "list", {}, quiet=True)
    except (OSError, client.Unreachable, client.Failed):
        return []
    return [h["name"] for h in (r or {}).get("hosts", [])
            if isinstance(h, dict) and isinstance(h.get("name"), str)]


@dataclass
class Hosts:
    """The hosts tunneld manages: each usable one's control socket, and why others are not."""

    sockets: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def managed_hosts() -> Hosts:
    out = Hosts()
    for name in sorted(set(_config_hosts()) | set(_state_hosts()) | set(_daemon_hosts())):
        problem = sshsetup.host_problem(name)
        if problem:
            out.skipped.append(problem)
        else:
            out.sockets[name] = str(paths.mux_socket(name))
    return out


# -- files ---------------------------------------------------------------------------------------

def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _read(path: Path) -> str | None:
    """The text of ``path`` (bytes kept as they are: surrogateescape), None if it is missing."""
    try:
        return path.read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise Failed(f"{path} is a directory, not a file; move it away and run this again")
    except OSError as exc:
        raise Failed(f"cannot read {path} ({_why(exc)}); make it readable "
                     f"(chmod u+rw {path}) and run this again; nothing was changed")


def _write(path: Path, text: str, mode: int) -> None:
    """Write ``path`` whole: a temp file beside it, fsync, rename; never half a file."""
    paths.atomic_write(path, text.encode("utf-8", "surrogateescape"), mode)


def _backup(path: Path, text: str, mode: int) -> Path:
    """A copy of ``text`` as ``~/.ssh/config.tunneld-backup-STAMP`` (``-N`` added if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = ssh_dir() / f"config.tunneld-backup-{stamp}"
    backup, n = base, 1
    while True:
        try:
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o777)
            break
        except FileExistsError:
            n += 1
            backup = base.with_name(f"{base.name}-{n}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8", "surrogateescape"))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        backup.unlink(missing_ok=True)
        raise
    return backup


@dataclass
class Target:
    """The file to edit for ~/.ssh/config: itself, or its symlink's target."""

    path: Path
    text: str | None
    mode: int = 0o600
    link: bool = False


def _target() -> Target:
    cfg = config_path()
    if cfg.is_symlink():
        real = Path(os.path.realpath(cfg))
        if not real.exists():
            raise Failed(f"{cfg} is a symlink to {real}, which does not exist; create it "
                         f"(touch {real}) or remove the link, and run this again; nothing "
                         "was changed")
        t = Target(real, None, link=True)
    else:
        t = Target(cfg, None)
    if t.path.exists() and not t.path.is_file():
        raise Failed(f"{t.path} is not a regular file; move it away and run this again; "
                     "nothing was changed")
    t.text = _read(t.path)
    if t.text is not None:
        t.mode = t.path.stat().st_mode & 0o7777
    for where in (t.path if t.text is not None else None, t.path.parent):
        if where is not None and where.exists() and not os.access(where, os.W_OK):
            raise Failed(f"cannot write {where} (permission denied); make it writable "
                         f"(chmod u+w {where}) and run this again; nothing was changed")
    return t


def _edit(t: Target, new: str) -> Path | None:
    """Replace the text of ``t`` with ``new`` after a backup (None: a new file)."""
    backup = None
    try:
        if t.text is not None:
            backup = _backup(t.path, t.text, t.mode)
        _write(t.path, new, t.mode)
    except OSError as exc:
        if backup is not None:
            backup.unlink(missing_ok=True)
        raise Failed(f"cannot write {t.path} ({_why(exc)}); it was not changed; fix that "
                     f"and run this again, or add `{sshsetup.INCLUDE_LINE}` at its top "
                     "yourself") from None
    return backup


def _print_diff(t: Target, new: str, backup: Path | None) -> None:
    if t.link:
        print(f"{config_path()} is a symlink: edited its target {t.path}")
    old = t.text or ""
    head = f"{t.path}  (backup: {backup})" if backup else f"{t.path}  (new file)"
    for line in difflib.unified_diff(old.split("\n"), new.split("\n"), head, str(t.path),
                                     lineterm=""):
        # bytes that are not UTF-8 (kept as they are in the file) are shown as U+FFFD
        print(line.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


# -- the verb ------------------------------------------------------------------------------------

def _notes(hosts: Hosts, all_hosts: bool) -> None:
    for s in hosts.skipped:
        _note(s)
    if all_hosts:
        limit = sshsetup.star_limit(str(paths.mux_dir()))
        _note(f"Host * serves names shorter than {limit} characters: longer ones would "
              f"pass the {sshsetup.MAX_SOCKET_PATH}-byte socket path limit (ssh refuses such "
              "a ControlPath), so ssh connects to them by itself, as it does to names "
              "starting with h-; those tunneld manages have blocks of their own")
        _note("your own ControlMaster/ControlPath settings in ~/.ssh/config no longer apply "
              "to any host (ssh takes the first value it reads)")
    elif not hosts.sockets:
        _note("tunneld manages no hosts yet (no forwards in config.toml or the state file, "
              "no daemon running): the file has no Host blocks; run this again after "
              "`tunnelctl add`, or use --all-hosts")


def _conf(hosts: Hosts, all_hosts: bool) -> str:
    try:
        return sshsetup.conf_text(hosts.sockets, str(paths.mux_dir()), all_hosts)
    except ValueError as exc:
        raise Failed(f"tunneld's socket directory {paths.mux_dir()}: {exc}; set "
                     "XDG_RUNTIME_DIR to a plain path") from None


def show(all_hosts: bool, as_json: bool) -> int:
    """The print mode: the lines --install would write, and what it would do."""
    hosts = managed_hosts()
    text = _conf(hosts, all_hosts)
    cfg, conf = config_path(), conf_path()
    current = _read(conf) if conf.is_file() else None
    try:
        cfg_text = _read(Path(os.path.realpath(cfg))) or ""
    except Failed:
        cfg_text = ""
    done = sshsetup.installed(cfg_text, str(conf), str(Path.home())) is not None
    if as_json:
        print(json.dumps({"hosts": sorted(hosts.sockets), "sockets": hosts.sockets,
                          "skipped": hosts.skipped, "all_hosts": all_hosts,
                          "lines": text.split("\n")[:-1], "conf": str(conf),
                          "config": str(cfg), "include": sshsetup.INCLUDE_LINE,
                          "mux_dir": str(paths.mux_dir()), "installed": done,
                          "up_to_date": done and current == text}, indent=1))
        return 0
    print(f"# the lines `tunnelctl ssh-config --install` writes to {conf}:\n")
    sys.stdout.write(text)
    print(f"\n# and the line it adds at the top of {cfg} (once, after a backup):\n\n"
          f"{sshsetup.INCLUDE_LINE}\n")
    if done and current == text:
        print("already installed, and up to date: --install would change nothing")
    elif done:
        print(f"already installed; --install would rewrite {conf} with these lines")
    else:
        print("nothing was changed; `tunnelctl ssh-config --install` installs it "
              "(`--uninstall` takes it out again)")
    _notes(hosts, all_hosts)
    return 0


def install(all_hosts: bool) -> int:
    hosts = managed_hosts()
    text = _conf(hosts, all_hosts)
    t = _target()               # every check on ~/.ssh/config before anything is written
    conf, home = conf_path(), str(Path.home())
    new = sshsetup.add_include(t.text or "", str(conf), home)
    if not ssh_dir().exists():
        try:
            paths.ensure_private_dir(ssh_dir())
        except OSError as exc:
            raise Failed(f"cannot create {ssh_dir()} ({_why(exc)}); nothing was "
                         "changed") from None
    if conf.is_dir():
        raise Failed(f"{conf} is a directory; move it away and run this again")
    if _read(conf) == text:
        print(f"{conf} is up to date")
    else:
        try:
            _write(conf, text, 0o600)
        except OSError as exc:
            raise Failed(f"cannot write {conf} ({_why(exc)}); nothing was changed") from None
        names = ", ".join(sorted(hosts.sockets)) or "none yet"
        print(f"wrote {conf} (" + ("Host *: every host tunneld is connected to; it manages "
                                   if all_hosts else "hosts: ") + f"{names})")
    if new == t.text:
        line = sshsetup.installed(new, str(conf), home)
        print(f"already installed: {t.path} includes {conf} (line {(line or 0) + 1}); "
              "it was not changed")
    else:
        backup = _edit(t, new)
        _print_diff(t, new, backup)
        for i in sshsetup.misplaced(new, str(conf), home):
            _note(f"{t.path}:{i + 1} includes it too, inside a Host/Match block: that line "
                  "counts only for that block's hosts; it does no harm (remove it if you "
                  "like)")
        print("installed: ssh, scp, rsync and git to these hosts ride tunneld's connections "
              "while it runs; with tunneld down ssh connects by itself as before")
    _notes(hosts, all_hosts)
    return 0


def uninstall() -> int:
    t = _target()
    conf, home = conf_path(), str(Path.home())
    text = t.text or ""
    new = sshsetup.remove_include(text, str(conf), home)
    has_conf = conf.exists() or conf.is_symlink()
    if new == text and not has_conf:
        print(f"not installed: {t.path} does not include {conf}, which does not exist; "
              "nothing to do")
        return 0
    if new != text:
        backup = _edit(t, new)
        _print_diff(t, new, backup)
        print(f"removed the Include line from {t.path}")
    if has_conf:
        try:
            conf.unlink()
        except OSError as exc:
            raise Failed(f"cannot remove {conf} ({_why(exc)}); remove it by hand") from None
        print(f"removed {conf}")
    print("uninstalled: ssh makes its own connections again")
    return 0


def run(do_install: bool, do_uninstall: bool, all_hosts: bool, as_json: bool) -> int:
    """The verb: the print mode, --install or --uninstall; its exit status."""
    if (do_install or do_uninstall) and as_json:
        print("tunnelctl ssh-config: --json goes with the print mode (no --install or "
              "--uninstall)", file=sys.stderr)
        return 2
    if do_uninstall:
        if all_hosts:
            print("tunnelctl ssh-config: --uninstall takes no --all-hosts", file=sys.stderr)
            return 2
        return uninstall()
    if do_install:
        return install(all_hosts)
    return show(all_hosts, as_json)
