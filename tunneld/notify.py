"""Desktop notifications: ``notify-send`` on Linux, ``osascript`` on macOS, when found.
Fire and forget: a notification never blocks the daemon nor fails it."""

from __future__ import annotations

import asyncio
import logging
import shutil

log = logging.getLogger("tunneld")

#: seconds a desktop notification command may run before it is killed
NOTIFY_TIMEOUT = 10.0


#: desktop notifications still running (a reference keeps their task alive)
_notifying: set[asyncio.Task[None]] = set()


def notify_argv(title: str, text: str) -> list[str] | None:
    """The command that shows a desktop notification here, or None if there is none."""
    if shutil.which("notify-send"):
        return ["notify-send", "--app-name=tunneld", title, text]
    if shutil.which("osascript"):
        def q(x: str) -> str:
            return '"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return ["osascript", "-e", f"display notification {q(text)} with title {q(title)}"]
    return None


def notify(title: str, text: str) -> None:
    """Show a desktop notification if this machine can; fire and forget, never blocks."""
    argv = notify_argv(title, text)
    if argv is None:
        return

    async def run() -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.debug("notification failed: %s", exc)
            return
        try:
            await asyncio.wait_for(proc.wait(), NOTIFY_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()

    task = asyncio.get_running_loop().create_task(run())
    _notifying.add(task)
    task.add_done_callback(_notifying.discard)
