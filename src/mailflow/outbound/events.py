"""Outbound room: the events that record changes to contacts, segments, templates, suppressions,
senders, campaigns and jobs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mailflow.events.registry import Event, registry

_model: type[Event]


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


class ContactUpdated(Event):
    """Attributes set (merged over the contact's) and removed by hand."""

    email: str
    attributes: dict[str, Any] = {}
    removed: list[str] = []


class ContactReactivated(Event):
    """A stopped or suppressed contact may be mailed again: status active, suppression lifted.

    Who decided it is the event's metadata actor; `reason` is why. `previous_status` and
    `suppression` (the lifted suppression's reason, if there was one) say what it undid."""

    email: str
    reason: str
    previous_status: str
    suppression: str | None = None


class SegmentDeleted(Event):
    name: str


class TemplateDeleted(Event):
    name: str


for _model in (
    ContactsImported,
    ContactStatusChanged,
    SegmentDefined,
    TemplateSaved,
    SuppressionAdded,
    SuppressionRemoved,
    ContactUpdated,
    ContactReactivated,
    SegmentDeleted,
    TemplateDeleted,
):
    registry.register(_model)


# -- senders, campaigns, jobs -----------------------------------------------------------------


class SecretRef(BaseModel):
    """A secret's place in the encrypted secrets table, and its fingerprint (infra/vault.py)."""

    id: str
    fingerprint: str


class SenderSaved(Event):
    """Schema 2: no secret in the log. The relay URL never holds a password; the password and
    the DKIM private key are references into the secrets table."""

    schema_version = 2
    name: str
    from_email: str
    from_name: str = ""
    relay_url: str
    relay_password: SecretRef | None = None
    dkim_selector: str | None = None
    dkim_key: SecretRef | None = None
    dkim_public_key: str | None = None  # base64 SubjectPublicKeyInfo, as in the DNS record


@registry.upcaster("SenderSaved", from_schema=1)
def _sender_saved_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 carried the secrets themselves; migration 0009 rewrote every stored one. A
    schema-1 event met anywhere else is read without them."""
    from mailflow.config import strip_password

    data = dict(data)
    data["relay_url"] = strip_password(data["relay_url"])
    data.pop("dkim_key_pem", None)
    data["dkim_selector"] = None
    return data


class SenderDeleted(Event):
    name: str


class JobCreated(Event):
    job_id: str
    idempotency_key: str
    priority: str
    email: str
    sender: str
    template: str
    variables: dict[str, Any] = {}
    campaign_id: str | None = None
    due_at: str | None = None


class JobQueued(Event):
    job_id: str
    queue_seq: int


class JobStarted(Event):
    job_id: str
    attempt: int
    worker: str
    lease_until: str


class JobCompleted(Event):
    job_id: str
    attempt: int
    code: int
    reply: str


class JobFailed(Event):
    job_id: str
    attempt: int
    code: int | None = None
    reply: str
    kind: str


class JobRetryScheduled(Event):
    job_id: str
    attempt: int
    code: int | None = None
    reply: str
    due_at: str
    reason: str = "transient"


for _model in (
    SenderSaved,
    SenderDeleted,
    JobCreated,
    JobQueued,
    JobStarted,
    JobCompleted,
    JobFailed,
    JobRetryScheduled,
):
    registry.register(_model)


class CampaignCreated(Event):
    campaign_id: str
    name: str
    sender: str
    template: str
    segment: str


class CampaignScheduled(Event):
    campaign_id: str
    at: str


class CampaignStarted(Event):
    """The recipient set was snapshotted: one job per recipient exists from here on."""

    campaign_id: str
    recipients: int


class CampaignPaused(Event):
    campaign_id: str


class CampaignResumed(Event):
    campaign_id: str


class CampaignCancelled(Event):
    campaign_id: str
    unsent: int


class CampaignCompleted(Event):
    campaign_id: str
    completed: int
    failed: int


class CampaignResent(Event):
    """Failed recipients got new jobs (resend-failed)."""

    campaign_id: str
    jobs: int


for _model in (
    CampaignCreated,
    CampaignScheduled,
    CampaignStarted,
    CampaignPaused,
    CampaignResumed,
    CampaignCancelled,
    CampaignCompleted,
    CampaignResent,
):
    registry.register(_model)
