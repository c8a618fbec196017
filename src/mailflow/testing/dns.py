"""Testing room: a small authoritative DNS server on loopback - real UDP queries, answers from a
dict - for the tests, the inbound benchmark and `mailflow demo` (SPF, DKIM and DMARC records
of their own domains, without the network)."""

from __future__ import annotations

import socket
import threading
from collections import Counter

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    """records: {("a.test", "MX"): ["10 mx.a.test."], ("mx.a.test", "A"): ["127.0.0.1"]}.

    A name with no records of any type is NXDOMAIN; a name with records of other types
    answers NOERROR with no data. `queries` counts the questions asked.

    A TXT value written in zone-file form ('"v=spf1 -all"') is used as is; one that is not
    quoted is the record's text, split into strings of 255 bytes as DNS requires (a DKIM key).
    Questions about a name in `silent` are counted and never answered: a server that hangs.
    With `negative_ttl`, NXDOMAIN and no-data answers carry an SOA saying how long to cache them.
    """

    def __init__(
        self,
        records: dict[tuple[str, str], list[str]],
        ttl: int = 300,
        *,
        silent: set[str] | frozenset[str] = frozenset(),
        negative_ttl: int | None = None,
    ) -> None:
        self.records = {
            (name.lower().rstrip("."), rdtype): [_zone_text(rdtype, v) for v in values]
            for (name, rdtype), values in records.items()
        }
        self.ttl = ttl
        self.silent = {name.lower().rstrip(".") for name in silent}
        self.negative_ttl = negative_ttl
        self.queries: Counter = Counter()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            silent = False
            for q in query.question:
                name = q.name.to_text(omit_final_dot=True).lower()
                rdtype = dns.rdatatype.to_text(q.rdtype)
                self.queries[(name, rdtype)] += 1
                silent = silent or name in self.silent
                values = self.records.get((name, rdtype))
                if values:
                    response.answer.append(dns.rrset.from_text(q.name, self.ttl, "IN", rdtype, *values))
                    continue
                if not any(n == name for n, _ in self.records):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                if self.negative_ttl is not None:
                    zone = q.name.split(2)[1]  # the top-level domain: an ancestor of every name asked
                    soa = f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {self.negative_ttl}"
                    response.authority.append(dns.rrset.from_text(zone, self.negative_ttl, "IN", "SOA", soa))
            if not silent:
                self.sock.sendto(response.to_wire(), peer)


def _zone_text(rdtype: str, value: str) -> str:
    """A TXT record's text as zone-file strings of at most 255 bytes; other values as given."""
    if rdtype != "TXT" or value.startswith('"'):
        return value
    raw = value.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join('"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


def dkim_keypair(bits: int = 2048) -> tuple[bytes, str]:
    """A new RSA key: (its private PEM, for dkim.sign; the DKIM TXT record that publishes it)."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
