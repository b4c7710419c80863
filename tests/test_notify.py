"""The desktop-notification command of host.py (which program, how the text is quoted)."""

from __future__ import annotations

from tunneld import notify as host


def test_notify_send_first(monkeypatch):
    monkeypatch.setattr(host.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert host.notify_argv("tunneld", "barhal: run `tunnelctl login barhal`") == [
        "notify-send", "--app-name=tunneld", "tunneld", "barhal: run `tunnelctl login barhal`"]


def test_osascript_quotes_the_text(monkeypatch):
    monkeypatch.setattr(host.shutil, "which",
                        lambda name: "/usr/bin/osascript" if name == "osascript" else None)
    argv = host.notify_argv("tunneld", 'say "hi" \\ bye')
    assert argv == ["osascript", "-e",
                    'display notification "say \\"hi\\" \\\\ bye" with title "tunneld"']


def test_no_notifier(monkeypatch):
    monkeypatch.setattr(host.shutil, "which", lambda name: None)
    assert host.notify_argv("tunneld", "x") is None
