"""`tunneld`: arguments → config → uvloop → Daemon.run()."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__, paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tunneld", description="SSH tunnel daemon")
    ap.add_argument("--config", type=Path, help="config file (default: %s)" % paths.config_file())
    ap.add_argument("--socket", type=Path, help="control socket (default: %s)"
                    % paths.socket_path())
    ap.add_argument("--log-level", default=os.environ.get("TUNNELD_LOG_LEVEL", "INFO"),
                    choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ap.add_argument("--detach-stderr", action="store_true",
                    help="once ready, stop writing to stderr (used by tunnelctl's autostart)")
    ap.add_argument("--version", action="version", version=f"tunneld {__version__}")
    args = ap.parse_args(argv)

    if args.config:
        os.environ["TUNNELD_CONFIG"] = str(args.config)
    if args.socket:
        os.environ["TUNNELD_SOCKET"] = str(args.socket)

    import uvloop

    from .config import load_config
    from .daemon import Daemon, setup_logging
    from .errors import TunneldError

    setup_logging(args.log_level)
    from . import fastpath
    fastpath.announce()   # on for tested asyncssh versions, unless TUNNELD_STOCK_ASYNCSSH=1
    try:
        config = load_config(paths.config_file())
    except TunneldError as exc:
        print(f"tunneld: {exc}", file=sys.stderr)
        return 1

    def detach() -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    daemon = Daemon(config, paths.socket_path(), paths.state_file())
    try:
        return uvloop.run(daemon.run(on_ready=detach if args.detach_stderr else None))
    except TunneldError as exc:
        print(f"tunneld: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
