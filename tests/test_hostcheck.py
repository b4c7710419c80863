"""Typo detection for new host names: the ssh config reader and the suggestions (pure), and
check_new_host against a temporary ~/.ssh/config (the resolver is the machine's: names under
.invalid never resolve, RFC 6761)."""

from __future__ import annotations

import asyncio

import pytest

from tunneld import hostcheck, sshconfig
from tunneld.errors import UsageError


def test_host_aliases_takes_literal_names_and_includes():
    text = ("# comment\nHost hpc hpc-login\n  HostName login.example.org\n"
            "Host *.cluster !bad gpu?? \"quoted name\"\nHost=eq\n"
            "Include ~/.ssh/conf.d/* other\nMatch host x\n")
    names, includes = sshconfig.host_aliases(text)
    assert names == ["hpc", "hpc-login", "quoted name", "eq"]
    assert includes == ["~/.ssh/conf.d/*", "other"]


def test_config_aliases_follow_includes(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    ssh = tmp_path / ".ssh"
    (ssh / "conf.d").mkdir(parents=True)
    (ssh / "config").write_text("Host a\nInclude conf.d/*\nInclude config\n")
    (ssh / "conf.d" / "x").write_text("Host b c\n")
    assert sshconfig.config_aliases() == ["a", "b", "c"]


def test_suggest_finds_the_likely_name():
    assert hostcheck.suggest("hcp", ["hpc", "barhal", "localhost"]) == ["hpc"]
    assert hostcheck.suggest("barhall", ["hpc", "barhal"]) == ["barhal"]
    assert hostcheck.suggest("zzz", ["hpc", "barhal"]) == []


@pytest.fixture
def home(tmp_path, monkeypatch):
    (tmp_path / ".ssh").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.mark.timeout(30)
def test_check_new_host(home):
    (home / ".ssh" / "config").write_text(
        "Host hpc\n  HostName 127.0.0.1\nHost gone\n  HostName gone.invalid\n"
        "Host *.jump\n  ProxyJump hpc\n")

    def check(name: str) -> None:
        asyncio.run(hostcheck.check_new_host(name, ["barhal"]))

    check("hpc")            # a Host alias
    check("gone")           # an alias, even if its HostName does not resolve now
    check("node1.jump")     # resolved on the jump host
    check("localhost")      # resolves
    check("127.0.0.1")
    with pytest.raises(UsageError, match=r"no host 'hcp' in ~/.ssh/config .* did you mean "
                                         r"'hpc'\?.*--force"):
        check("hcp")
    with pytest.raises(UsageError, match="does not resolve"):
        check("user@typo.invalid")
