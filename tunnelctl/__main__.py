"""`tunnelctl`: parse the command line, run the verb, turn how it ended into the exit status
(0 success, 1 the command failed, 2 usage error, 3 the daemon could not be reached or started,
141 the output pipe closed, 130 ^C; docs/reference.md).
"""

from __future__ import annotations

import os
import sys

from tunnelctl import cli, commands
from tunnelctl.client import Failed, Unreachable


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(sys.argv[1:] if argv is None else argv)
        finally:
            sys.stdout.flush()   # here (also after --help), where a closed pipe is caught
    except BrokenPipeError:
        # the reader of our output went away (`tunnelctl list | head -1`): end quietly, as a
        # Unix tool does; stdout goes to /dev/null so that the exit's flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return cli.EXIT_PIPE


def _main(argv: list[str]) -> int:
    args = cli.parse(argv)
    try:
        return int(commands.HANDLERS[args.cmd](args))
    except Unreachable as exc:
        print(f"tunnelctl: {exc}", file=sys.stderr)
        return cli.EXIT_UNREACHABLE
    except Failed as exc:
        print(f"tunnelctl: {exc}", file=sys.stderr)
        return cli.EXIT_FAILED
    except KeyboardInterrupt:
        return cli.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
