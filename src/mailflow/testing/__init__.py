"""Testing room: peers shared by `mailflow demo`, the benchmarks and the tests - a misbehaving SMTP
server (sink.py) and a loopback DNS server (dns.py)."""
