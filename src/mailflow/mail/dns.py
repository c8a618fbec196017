"""Mail room: the DNS servers mailflow is told to ask (MAILFLOW_DNS_SERVERS), parsed once for
both rooms that look things up - outbound's MX lookups and inbound's SPF, DKIM and DMARC."""

from __future__ import annotations

import ipaddress

from mailflow.errors import ConfigurationError


def split_host_port(spec: str) -> tuple[str, int | None]:
    """ "host", "host:25", "10.0.0.5:25", "::1" or "[::1]:25" -> (host, port or None); ValueError if not."""
    spec = spec.strip()
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(spec)
        port = rest[1:] or None
    elif spec.count(":") > 1:  # a bare IPv6 address
        host, port = spec, None
    else:
        host, _, port = spec.partition(":")
        port = port or None
    if not host or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(spec)
    return host, int(port) if port else None


def nameserver_address(spec: str) -> tuple[str, int]:
    """ "10.0.0.53", "127.0.0.1:5353" or "[::1]:53" -> (IP address, port) of a server to ask over UDP/TCP."""
    try:
        host, port = split_host_port(spec)
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigurationError(
            f"bad setting MAILFLOW_DNS_SERVERS: {spec!r} is not an IP address with an optional :port"
        ) from exc
    return host, port or 53
