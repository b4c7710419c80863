"""The command line: tunnelctl's verbs and options (the argparse definition) and its exit
statuses, the contract of docs/reference.md.
"""

from __future__ import annotations

import argparse

from tunneld import __version__, paths

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
#: the status of a Unix tool whose output pipe closed (killed by SIGPIPE: 128 + 13)
EXIT_PIPE = 141
#: the status after ^C (128 + SIGINT)
EXIT_INTERRUPTED = 130
#: verbs that run in the client itself → the wire command they send (house rule 8)
LOCAL_VERBS = {"watch": "open", "ssh": "open", "service": "status", "completion": "list",
               "ssh-config": "list"}


def _no_prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-prompt", action="store_true",
                   help="never ask for a password, code or passphrase (a login that needs one "
                        "leaves the host in needs-auth)")


def build_parser() -> argparse.ArgumentParser:
    """tunnelctl's parser: one sub-parser per verb, named in ``args.cmd`` (each verb has its
    function in ``commands.HANDLERS``)."""
    ap = argparse.ArgumentParser(prog="tunnelctl", description="control the tunneld daemon")
    ap.add_argument("--version", action="version", version=f"tunnelctl {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("add", help="add forwards to a host (local, -R remote, -D SOCKS)",
                       usage="tunnelctl add HOST [SPEC...] [-R SPEC]... [-D [BIND:]PORT]... "
                             "[--public] [--resume]")
    p.add_argument("host", help="host alias from ~/.ssh/config, or a host name")
    p.add_argument("specs", nargs="*", metavar="SPEC",
                   help="PORT, A-B, LPORT:RPORT, LPORT:RHOST:RPORT, BIND:LPORT:RHOST:RPORT, "
                   "or [BIND:]LPORT:PATH (a Unix socket on the server: /… or ~/…)")
    p.add_argument("-R", dest="remote", action="append", default=[], metavar="SPEC",
                   help="remote forward: the server listens on [RBIND:]RPORT (default "
                        "127.0.0.1) and connects back to LHOST:LPORT from here; "
                        "[RBIND:]RPORT:LHOST:LPORT, ranges allowed")
    p.add_argument("-D", dest="socks", action="append", default=[], metavar="[BIND:]PORT",
                   help="SOCKS5/4a proxy on a local port; host names are resolved by the "
                        "server")
    p.add_argument("--public", action="store_true",
                   help="allow a non-loopback listen address (reachable from other machines)")
    p.add_argument("--resume", action="store_true",
                   help="make the SPECs resumable: their connections survive an outage, a "
                        "sleep and a daemon restart (a relay on the server, Python 3 there)")
    p.add_argument("--force", "--offline", dest="force", action="store_true",
                   help="add a host that is not in ~/.ssh/config and does not resolve now "
                        "(e.g. one reached only through a VPN that is down)")
    _no_prompt(p)

    p = sub.add_parser("remove", help="remove forwards (all of HOST's with no SPEC)",
                       usage="tunnelctl remove HOST [SPEC...] [-R SPEC|RPORT]... "
                             "[-D [BIND:]PORT]...")
    p.add_argument("host")
    p.add_argument("specs", nargs="*", metavar="SPEC")
    p.add_argument("-R", dest="remote", action="append", default=[], metavar="SPEC",
                   help="a remote forward, by its spec or its remote port")
    p.add_argument("-D", dest="socks", action="append", default=[], metavar="[BIND:]PORT",
                   help="a SOCKS proxy")

    p = sub.add_parser("list", help="hosts and forwards with state and counters")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="daemon version, pid, uptime; exit 0 if healthy")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stop", help="stop the daemon (forwards stay saved)")

    p = sub.add_parser("reconnect", help="drop and re-establish connections now")
    p.add_argument("host", nargs="?")
    _no_prompt(p)

    p = sub.add_parser("login", help="log in to a host now, answering its password / code "
                                     "prompts here")
    p.add_argument("host")
    _no_prompt(p)

    p = sub.add_parser("run", help="run a remote command as a session, output watched",
                       usage="tunnelctl run HOST [--name N] [--port auto|N] [--sock auto] "
                             "[--job 'OPTIONS' [--scheduler S]] [--follow] [--no-detach] "
                             "[--no-prompt] -- COMMAND...",
                       epilog="Several words after -- reach the server each as typed; one "
                              "word is a command line for the server's shell: "
                              "tunnelctl run HOST -- 'cd ~/proj && jupyter lab'. {port} and "
                              "{sock} are replaced in both (quoted for the shell in one word).")
    p.add_argument("host")
    p.add_argument("--name", help="session name (default: the command's name and a number)")
    p.add_argument("--port", metavar="auto|N",
                   help="a port for the command: 'auto' picks one free on the server; "
                        "replaces {port} in COMMAND, exported as PORT, and forwarded")
    p.add_argument("--sock", metavar="auto",
                   help="'auto': a Unix socket path in a private (0700) directory on the "
                        "server replaces {sock} in COMMAND, exported as SOCK; a local port is "
                        "forwarded to it once the command listens there")
    p.add_argument("--job", metavar="'OPTIONS'",
                   help="run COMMAND as a batch job, submitted with these scheduler options "
                        "(one argument: --job '-p gpu --time=4:00:00'; '' for none); "
                        "`kill` cancels it; with --port the port is on the job's node "
                        "('auto': chosen there when the job starts)")
    p.add_argument("--scheduler", choices=("slurm", "pbs", "lsf"),
                   help="the server's batch scheduler (default: the one it has)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream the output until the session ends")
    p.add_argument("--no-detach", dest="detach", action="store_false",
                   help="run the command in the SSH connection itself: it ends when the "
                        "connection drops or the daemon stops (default: it runs detached on "
                        "the server and survives both)")
    _no_prompt(p)
    p.set_defaults(command=[])

    p = sub.add_parser("sessions", help="sessions with state and exit status")
    p.add_argument("--json", action="store_true",
                   help="every field whole, as JSON (words, urls, sock…: docs/reference.md)")
    p.add_argument("--prune", action="store_true",
                   help="forget every ended session (and its logs)")

    p = sub.add_parser("forget", help="remove ended sessions from the list (and their logs)")
    p.add_argument("sessions", nargs="+", metavar="SESSION")

    p = sub.add_parser("logs", help="a session's output, or the daemon's log (--daemon)",
                       usage="tunnelctl logs SESSION [-f] [--all] | "
                             "tunnelctl logs --daemon [-f] [-n N] [--all]")
    p.add_argument("session", nargs="?")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep streaming (a session: until it ends; --daemon: until ^C)")
    p.add_argument("--all", action="store_true", help="the whole log, not only its tail")
    p.add_argument("--daemon", action="store_true",
                   help=f"the daemon's own log ({paths.log_file()}); works without a daemon")
    p.add_argument("-n", "--lines", type=int, default=50, metavar="N",
                   help="with --daemon: how many lines of its tail (default 50)")

    p = sub.add_parser("kill", help="stop a session's remote process and all its children")
    p.add_argument("session")

    p = sub.add_parser("open", help="open a session's newest URL, a URL printed on a host, "
                                    "or a listed request, locally through the tunnel",
                       usage="tunnelctl open SESSION [--list] | tunnelctl open HOST URL | "
                             "tunnelctl open --request N")
    p.add_argument("target", metavar="SESSION|HOST", nargs="?")
    p.add_argument("url", nargs="?", help="a URL as printed on HOST")
    p.add_argument("--list", action="store_true",
                   help="print the URLs the session printed (their local ends); open none")
    p.add_argument("--request", type=int, metavar="N",
                   help="open request N of `tunnelctl opens` (e.g. one too old to be opened "
                        "on its own)")
    _no_prompt(p)

    p = sub.add_parser("opens", help="recent browser-open requests and what was done with each")
    p.add_argument("--json", action="store_true",
                   help="every field, as JSON (docs/reference.md)")

    p = sub.add_parser("setup-remote",
                       help="the line for the server's shell start-up file that sends every "
                            "program's browser to tunneld (--apply: add it)",
                       usage="tunnelctl setup-remote HOST [--apply] [--shell-file PATH]")
    p.add_argument("host")
    p.add_argument("--apply", action="store_true",
                   help="install the BROWSER helper and add the line (once; after a backup)")
    p.add_argument("--shell-file", metavar="PATH",
                   help="the start-up file (default: ~/.bashrc for bash, ~/.zshrc for zsh, "
                        "else ~/.profile; a relative PATH is under the home on the server)")
    _no_prompt(p)

    p = sub.add_parser("watch", help="copy stdin to stdout, opening browser-open markers")
    p.add_argument("host", help="the host whose output this is")

    p = sub.add_parser("ssh", help="your own ssh in a terminal, output watched for markers",
                       usage="tunnelctl ssh HOST [ssh args...]")
    p.add_argument("host")
    p.add_argument("ssh_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("ssh-config",
                       help="let your own ssh, scp, rsync and git ride tunneld's connections "
                            "(prints the lines; --install adds them to ~/.ssh)",
                       usage="tunnelctl ssh-config [--install | --uninstall] [--all-hosts] "
                             "[--json]")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--install", action="store_true",
                   help="write ~/.ssh/tunneld.conf and include it at the top of ~/.ssh/config "
                        "(once, after a backup; again: rewrites tunneld.conf for new hosts)")
    g.add_argument("--uninstall", action="store_true",
                   help="remove the Include line (after a backup) and ~/.ssh/tunneld.conf")
    p.add_argument("--all-hosts", action="store_true",
                   help="one `Host *` block instead of one block per host tunneld manages "
                        "now: any host tunneld is connected to, whatever its name")
    p.add_argument("--json", action="store_true",
                   help="without --install/--uninstall: the hosts, the lines and the paths "
                        "as JSON")

    p = sub.add_parser("reload", help="re-read the config; unchanged forwards are not touched")

    p = sub.add_parser("events", help="stream state changes as lines until interrupted")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser("service", help="start tunneld at login (systemd user unit / launchd "
                                       "agent)")
    p.add_argument("action", choices=["install", "uninstall", "status"])
    p.add_argument("--dry-run", action="store_true",
                   help="print the file and the commands; change nothing")
    p.add_argument("--manager", choices=["systemd", "launchd"],
                   help="service manager (default: this system's)")

    p = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    p.add_argument("shell", nargs="?", choices=["bash", "zsh"])
    p.add_argument("--names", choices=["hosts", "sessions"], help=argparse.SUPPRESS)
    return ap


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``run HOST [opts] -- CMD...``: everything after the first ``--`` is the command,
    untouched by option parsing."""
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    command = None
    if first is not None and argv[first] == "run" and "--" in argv[first:]:
        i = argv.index("--", first)
        argv, command = argv[:i], argv[i + 1:]
    if first is not None and argv[first] == "run":
        # `--job '--time=2:00:00'`: the scheduler's options are its value, dashes and all
        # (argparse would take a value that starts with a dash for an option of its own)
        argv = list(argv)
        for i in range(len(argv) - 2, first, -1):
            if argv[i] == "--job":
                argv[i:i + 2] = [f"--job={argv[i + 1]}"]
    return argv, command


def verbs(ap: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Each verb of ``ap`` (as ``build_parser`` makes it) → (its help, its parser)."""
    sub = next(x for x in ap._actions if isinstance(x, argparse._SubParsersAction))
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    return {name: (helps.get(name, ""), p) for name, p in sub.choices.items()}


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line → its arguments; ``args.cmd`` is the verb.  A usage error is said on
    stderr and exits with ``EXIT_USAGE`` (``SystemExit``, as argparse does)."""
    argv, command = _split_command(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `add HOST 8090 -R … 8091`: argparse takes positionals only before the first option
        if args.cmd in ("add", "remove") and not any(x.startswith("-") for x in extra):
            args.specs = list(args.specs) + extra
        elif args.cmd == "run" and command is None:
            parser.exit(EXIT_USAGE, f"tunnelctl run: put the command after --: tunnelctl run "
                                    f"{args.host} -- {' '.join(extra)}\n")
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if command is not None:
        args.command = command
    return args
