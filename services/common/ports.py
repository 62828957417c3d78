"""Free localhost ports (tests and child processes pick one instead of a fixed number)."""

from __future__ import annotations

import socket


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
