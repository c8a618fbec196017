"""Typed events and upcasting: old stored schemas are read as the current one."""

from __future__ import annotations

import pytest

from mailflow.errors import InvalidEventError
from mailflow.events import Event, EventRegistry, EventStore, NewEvent

pytestmark = pytest.mark.integration


def make_registry() -> tuple[EventRegistry, type[Event]]:
    reg = EventRegistry()

    class ContactAdded(Event):
        schema_version = 3
        email: str
        full_name: str
        source: str

    reg.register(ContactAdded)

    @reg.upcaster("ContactAdded", from_schema=1)
    def v1_to_v2(data):
        data["full_name"] = data.pop("name")
        return data

    @reg.upcaster("ContactAdded", from_schema=2)
    def v2_to_v3(data):
        data.setdefault("source", "import")
        return data

    return reg, ContactAdded


def test_upcasters_chain_from_any_old_schema_to_the_current_one():
    reg, _ = make_registry()
    assert reg.upcast("ContactAdded", 1, {"email": "a@x.org", "name": "Ann"}) == (
        3,
        {"email": "a@x.org", "full_name": "Ann", "source": "import"},
    )
    assert reg.upcast("ContactAdded", 3, {"email": "a@x.org", "full_name": "Ann", "source": "api"})[0] == 3
    assert reg.upcast("Unknown", 1, {"x": 1}) == (1, {"x": 1})


def test_typed_event_becomes_a_new_event_with_its_schema():
    reg, ContactAdded = make_registry()
    new = ContactAdded(email="b@x.org", full_name="Bo", source="api").to_new()
    assert (new.type, new.schema) == ("ContactAdded", 3)
    assert reg.decode(new.type, new.schema, new.data) == ContactAdded(email="b@x.org", full_name="Bo", source="api")


def test_invalid_data_for_a_registered_type_names_the_field():
    reg, _ = make_registry()
    with pytest.raises(InvalidEventError, match="email"):
        reg.validate("ContactAdded", 3, {"full_name": "x", "source": "y"})


def test_registering_two_models_under_one_type_is_an_error():
    reg, _ = make_registry()

    class ContactAdded(Event):
        email: str

    with pytest.raises(ValueError, match="twice"):
        reg.register(ContactAdded)


def test_stored_old_schema_events_are_read_as_the_current_schema(rt):
    reg, ContactAdded = make_registry()
    store = EventStore(rt.pool, registry=reg, tenant="default")
    try:
        # Written long ago, before the registry knew schema 2 and 3:
        EventStore(rt.pool, registry=EventRegistry(), tenant="default").append(
            "contact-1", [NewEvent("ContactAdded", {"email": "a@x.org", "name": "Ann"}, schema=1)]
        )
        store.append("contact-1", [ContactAdded(email="c@x.org", full_name="Cy", source="api").to_new()])
        old, new = store.read_stream("contact-1")
        assert (old.schema, old.data) == (3, {"email": "a@x.org", "full_name": "Ann", "source": "import"})
        assert new.schema == 3 and new.data["source"] == "api"
        with pytest.raises(InvalidEventError):
            store.append("contact-1", [NewEvent("ContactAdded", {"email": 5}, schema=3)])
    finally:
        store.close()
