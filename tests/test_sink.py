"""The misbehaving SMTP peer of the demo and the tests: which recipient gets which fault."""

from __future__ import annotations

from collections import Counter

import pytest

from mailflow.testing.sink import FAULTS, FaultRates, fault_for

pytestmark = pytest.mark.pure


def test_a_local_part_names_its_fault_and_wins_over_the_rates():
    for name in FAULTS:
        assert fault_for(f"{name}-1@example.net") == name
    assert fault_for("stall-1@example.net", FaultRates(bounce=1000)) == "stall"
    assert fault_for("bounced@example.net") is None  # a fault name needs its hyphen
    assert fault_for("ann@example.net") is None


def test_rates_give_each_fault_its_share_of_the_addresses():
    rates = FaultRates(bounce=10, policy=5, tempfail=30, drop=10, slow=20)
    addresses = [f"reader{i}@example.net" for i in range(20000)]
    got = Counter(fault_for(a, rates) for a in addresses)
    for name, per_mille in [("bounce", 10), ("policy", 5), ("tempfail", 30), ("drop", 10), ("slow", 20)]:
        assert abs(got[name] - per_mille * 20) < per_mille * 20 * 0.25, (name, got)
    assert fault_for("ann@example.net", FaultRates()) is None
