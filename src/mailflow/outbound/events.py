"""Outbound room: the events that record changes to contacts, segments, templates and suppressions."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ..events.registry import Event, registry


class ImportedContact(BaseModel):
    email: str
    attributes: dict[str, Any] = {}
    line: int | None = None


class ContactsImported(Event):
    """A batch of contacts from one import (new ones created, known ones' attributes merged)."""

    source: str
    contacts: list[ImportedContact]


class ContactStatusChanged(Event):
    email: str
    status: str
    reason: str = ""


class SegmentDefined(Event):
    name: str
    filter: dict[str, Any]


class TemplateSaved(Event):
    name: str
    subject: str
    html: str = ""
    text: str = ""


class SuppressionAdded(Event):
    email: str
    reason: str
    detail: str = ""


class SuppressionRemoved(Event):
    email: str


for _model in (ContactsImported, ContactStatusChanged, SegmentDefined, TemplateSaved, SuppressionAdded, SuppressionRemoved):
    registry.register(_model)
