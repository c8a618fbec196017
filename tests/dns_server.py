"""The loopback DNS server the tests publish their records on (src/mailflow/testing/dns.py)."""

from mailflow.testing.dns import DnsServer

__all__ = ["DnsServer"]
