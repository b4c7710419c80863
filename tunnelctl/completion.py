"""`tunnelctl completion bash|zsh`: shell completion scripts.  Standard library, tunneld.sshconfig
and tunnelctl.client only.

The scripts complete commands and their options from tunnelctl's own parser (rendered in),
host names and session names by asking ``tunnelctl completion --names hosts|sessions`` at
TAB time: host aliases from ``~/.ssh/config`` (``Host`` lines without wildcards, following
``Include``) and, when the daemon runs, the hosts it knows and its sessions.  Asking never
starts the daemon and gives up after ``NAMES_TIMEOUT`` seconds.

Load them with ``source <(tunnelctl completion bash)`` in ~/.bashrc, or
``tunnelctl completion zsh > ~/.zfunc/_tunnelctl`` with ~/.zfunc in ``fpath`` (or
``source <(tunnelctl completion zsh)`` in ~/.zshrc after ``compinit``).
"""

from __future__ import annotations

from pathlib import Path

from tunnelctl import client
from tunneld import sshconfig

#: seconds a TAB may wait for the daemon's answer
NAMES_TIMEOUT = 1.0
#: commands whose first argument is a host / a session
HOST_COMMANDS = ("add", "remove", "reconnect", "login", "run", "open", "watch", "ssh")
SESSION_COMMANDS = ("logs", "kill")
#: fixed first arguments
WORDS = {"service": ("install", "uninstall", "status"), "completion": ("bash", "zsh")}


# -- names ---------------------------------------------------------------------------------------

def ssh_config_hosts(path: Path | None = None) -> list[str]:
    """Host aliases from ~/.ssh/config and the files it Includes, without patterns."""
    return sshconfig.config_aliases(path)


def _ask_daemon(cmd: str) -> dict | None:
    """One request to a running daemon (never starts one); None if it does not answer."""
    try:
        with client.open_socket(autostart=False, timeout=NAMES_TIMEOUT) as s:
            return client.exchange(s, cmd, {}, quiet=True)
    except (OSError, client.Unreachable, client.Failed):
        return None


def names(kind: str) -> list[str]:
    if kind == "hosts":
        out = ssh_config_hosts()
        for h in (_ask_daemon("list") or {}).get("hosts", []):
            if h.get("name") not in out:
                out.append(h["name"])
        return out
    if kind == "sessions":
        return [x["name"] for x in (_ask_daemon("sessions") or {}).get("sessions", [])]
    return []


# -- scripts -------------------------------------------------------------------------------------

BASH = r'''# bash completion for tunnelctl.  Load it with:  source <(tunnelctl completion bash)
_tunnelctl() {
    local cur=${COMP_WORDS[COMP_CWORD]} cmd="" npos=0 i w
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        if [[ -z $cmd ]]; then
            [[ $w == -* ]] || cmd=$w
        elif [[ $w == -- ]]; then
            return 0        # a remote command follows: nothing to complete
        elif [[ $w != -* ]]; then
            ((npos++))
        fi
    done
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "@COMMANDS@ --help --version" -- "$cur"))
        return 0
    fi
    if [[ $cur == -* ]]; then
        case $cmd in
@OPTIONS@
        esac
        return 0
    fi
    ((npos == 0)) || return 0
    case $cmd in
        @HOSTCMDS@)
            w=$(tunnelctl completion --names hosts 2>/dev/null)
            COMPREPLY=($(compgen -W "$w" -- "$cur")) ;;
        @SESSIONCMDS@)
            w=$(tunnelctl completion --names sessions 2>/dev/null)
            COMPREPLY=($(compgen -W "$w" -- "$cur")) ;;
@WORDS@
    esac
    return 0
}
complete -F _tunnelctl tunnelctl
'''

ZSH = r'''#compdef tunnelctl
# zsh completion for tunnelctl.  Save it as _tunnelctl in a directory of $fpath, or load it
# with:  source <(tunnelctl completion zsh)   (after compinit)
_tunnelctl() {
    local -a cmds opts
    cmds=(
@DESCRIBED@
    )
    local cmd="" w
    integer npos=0 i
    for ((i = 2; i < CURRENT; i++)); do
        w=${words[i]}
        if [[ -z $cmd ]]; then
            [[ $w == -* ]] || cmd=$w
        elif [[ $w == -- ]]; then
            return 0
        elif [[ $w != -* ]]; then
            ((npos++))
        fi
    done
    if [[ -z $cmd ]]; then
        _describe -t commands 'tunnelctl command' cmds
        return
    fi
    if [[ $PREFIX == -* ]]; then
        case $cmd in
@OPTIONS@
        esac
        compadd -- $opts
        return
    fi
    ((npos == 0)) || return 1
    case $cmd in
        @HOSTCMDS@)
            compadd -- ${(f)"$(tunnelctl completion --names hosts 2>/dev/null)"} ;;
        @SESSIONCMDS@)
            compadd -- ${(f)"$(tunnelctl completion --names sessions 2>/dev/null)"} ;;
@ZWORDS@
    esac
}
if [[ ${zsh_eval_context[-1]} == loadautofunc ]]; then
    _tunnelctl "$@"
else
    compdef _tunnelctl tunnelctl
fi
'''


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def render(shell: str, commands: dict[str, tuple[str, list[str]]]) -> str:
    """The script for ``shell``; ``commands``: name → (help, option strings)."""
    names_ = sorted(commands)
    hostcmds = "|".join(c for c in HOST_COMMANDS if c in commands)
    sesscmds = "|".join(c for c in SESSION_COMMANDS if c in commands)
    if shell == "bash":
        options = "\n".join(
            f'            {c}) COMPREPLY=($(compgen -W "{" ".join(o)}" -- "$cur")) ;;'
            for c, (_, o) in sorted(commands.items()) if o)
        words = "\n".join(
            f'        {c}) COMPREPLY=($(compgen -W "{" ".join(w)}" -- "$cur")) ;;'
            for c, w in WORDS.items() if c in commands)
        return (BASH.replace("@COMMANDS@", " ".join(names_)).replace("@OPTIONS@", options)
                .replace("@HOSTCMDS@", hostcmds).replace("@SESSIONCMDS@", sesscmds)
                .replace("@WORDS@", words))
    if shell == "zsh":
        described = "\n".join(f"        {_sh_quote(c + ':' + commands[c][0].replace(':', '-'))}"
                              for c in names_)
        options = "\n".join(f"            {c}) opts=({' '.join(o)}) ;;"
                            for c, (_, o) in sorted(commands.items()) if o)
        words = "\n".join(f"        {c}) compadd -- {' '.join(w)} ;;"
                          for c, w in WORDS.items() if c in commands)
        return (ZSH.replace("@DESCRIBED@", described).replace("@OPTIONS@", options)
                .replace("@HOSTCMDS@", hostcmds).replace("@SESSIONCMDS@", sesscmds)
                .replace("@ZWORDS@", words))
    raise ValueError(f"no completion for {shell!r}; use bash or zsh")


def print_names(kind: str) -> int:
    for n in names(kind):
        print(n)
    return 0

