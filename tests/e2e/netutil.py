"""Small socket helpers shared by the end-to-end tests (importable: tests/e2e is on sys.path)."""

from __future__ import annotations

import socket


def roundtrip(port: int, payload: bytes = b"ping", host: str = "127.0.0.1",
              timeout: float = 15.0) -> bytes:
    """Connect, send ``payload``, half-close, return everything read back until EOF."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")
