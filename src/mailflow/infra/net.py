"""Infra room: listening sockets for the servers mailflow runs (web, inbound SMTP)."""

from __future__ import annotations

import socket

from mailflow.errors import MailflowError


class CannotListen(MailflowError):
    """The address or port given to a server cannot be listened on."""

    exit_code = 1


def listen(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """A bound TCP socket, or one CannotListen line. `shared`: several processes listen on
    the same port (SO_REUSEPORT) and the kernel spreads the connections between them."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ]
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror}; --host must be a local address") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port or --host") from exc
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for a child server the caller starts next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
