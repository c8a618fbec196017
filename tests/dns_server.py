"""A small authoritative DNS server for tests: real UDP queries, answers from a dict."""

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
    """

    def __init__(self, records: dict[tuple[str, str], list[str]], ttl: int = 300) -> None:
        self.records = {(name.lower().rstrip("."), rdtype): values for (name, rdtype), values in records.items()}
        self.ttl = ttl
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
            for q in query.question:
                name = q.name.to_text(omit_final_dot=True).lower()
                rdtype = dns.rdatatype.to_text(q.rdtype)
                self.queries[(name, rdtype)] += 1
                values = self.records.get((name, rdtype))
                if values:
                    response.answer.append(dns.rrset.from_text(q.name, self.ttl, "IN", rdtype, *values))
                elif not any(n == name for n, _ in self.records):
                    response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)
