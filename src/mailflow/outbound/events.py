"""Outbound room: the events that record changes to contacts, segments, templates, suppressions,
senders, campaigns, jobs and sending domains."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from mailflow.events.registry import Event, registry

_model: type[Event]


# People are named by subject (a keyed hash of the address, infra/personal.py), never by
# address; what must be said about them is `sealed` under the subject's own key, which
# erasure deletes. Schema 2 of each of these events; migration 0011 rewrote the schema-1 ones.


class ImportedContact(BaseModel):
    subject: str
    sealed: str  # {"email", "attributes"}
    line: int | None = None


class ContactsImported(Event):
    """A batch of contacts from one import (new ones created, known ones' attributes merged)."""

    schema_version = 2
    source: str
    contacts: list[ImportedContact]


class ContactStatusChanged(Event):
    schema_version = 2
    subject: str
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
    schema_version = 2
    subject: str
    sealed: str | None = None  # {"email"}; None when only the subject is known (an erasure)
    reason: str
    detail: str = ""


class SuppressionRemoved(Event):
    schema_version = 2
    subject: str


class ContactUpdated(Event):
    """Attributes set (merged over the contact's) and removed by hand."""

    schema_version = 2
    subject: str
    sealed: str  # {"attributes", "removed"}


class ContactReactivated(Event):
    """A stopped or suppressed contact may be mailed again: status active, suppression lifted.

    Who decided it is the event's metadata actor; `reason` is why. `previous_status` and
    `suppression` (the lifted suppression's reason, if there was one) say what it undid."""

    schema_version = 2
    subject: str
    reason: str
    previous_status: str
    suppression: str | None = None


class ContactErased(Event):
    """The person's data was erased (their subject key deleted) on request; the subject stays
    suppressed so that the address is never mailed again. `jobs` is how many jobs named them."""

    subject: str
    jobs: int = 0


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
    ContactErased,
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
    """A job: a message to send (kind `send`), or a duty of the system (kind `aggregate`,
    `cleanup`, `dns_check`, ...: runtime/duties.py) with its `args`, which has no recipient,
    sender or template and is recorded under the `_system` tenant."""

    schema_version = 2
    job_id: str
    idempotency_key: str
    priority: str
    subject: str = ""
    domain: str = ""  # the recipient's domain (rate limits, analytics): not the person
    sealed: str = ""  # {"email", "variables"}
    sender: str = ""
    template: str = ""
    campaign_id: str | None = None
    due_at: str | None = None
    kind: str = "send"
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _a_message_names_its_parts(self) -> JobCreated:
        if self.kind == "send" and not (self.subject and self.sealed and self.sender and self.template):
            raise ValueError("a send job needs its subject, sealed recipient, sender and template")
        return self


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
    code: int  # the SMTP reply code; 0 for a duty
    reply: str
    size: int | None = None  # bytes of the message as sent


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
    stop_on_reply: bool = True  # a contact who replies gets nothing more from the campaign
    tracking: bool | None = None  # open and click tracking; None: the tenant's default (docs/tracking.md)


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


class FeedbackReceived(Event):
    """What came back for one person from one received message (inbound's classification,
    applied by outbound/feedback.py): on the job's stream when it answers one of our jobs
    (its history), else on the contact's. `kind`: bounce | delayed | complaint | auto_reply |
    reply | unsubscribe; for a bounce the reason, status and hard verdict."""

    message_id: str
    subject: str
    job_id: str | None = None
    campaign_id: str | None = None
    kind: str
    reason: str = ""
    status: str = ""
    hard: bool = False


class SoftBounceCounted(Event):
    """A soft bounce counted against an address: `count` within the last `window_days`;
    at `limit` the address is suppressed (reason soft_bounces)."""

    subject: str
    message_id: str
    count: int
    limit: int
    window_days: float


class DeliverabilityAlertRaised(Event):
    """A bounce that blames the sender, not the address (blocked, filtered, spamdetected,
    policyviolation, ...), or a complaint: the sender and its domain need attention."""

    sender: str
    domain: str
    kind: str  # bounce | complaint
    reason: str
    job_id: str | None = None
    message_id: str
    detail: str = ""


class CampaignStoppedForContact(Event):
    """The contact replied: the campaign sends them nothing more (its stop_on_reply)."""

    campaign_id: str
    subject: str
    reason: str
    message_id: str


for _model in (FeedbackReceived, SoftBounceCounted, DeliverabilityAlertRaised, CampaignStoppedForContact):
    registry.register(_model)


# -- engagement (open and click tracking: web/tracking.py) ----------------------------------


class MessageOpened(Event):
    """The open pixel of a sent message was fetched. `machine`: by a prefetcher or a scanner
    (Apple Mail Privacy Protection, an image proxy, a link checker: mail/tracking.py), so not
    counted as a person's open; `reason` says which rule decided. No address, no IP address."""

    job_id: str
    machine: bool = False
    reason: str = "human"


class LinkClicked(Event):
    """A rewritten link of a sent message was followed (`link`: its index in the message)."""

    job_id: str
    link: int
    machine: bool = False
    reason: str = "human"


for _model in (MessageOpened, LinkClicked):
    registry.register(_model)


# -- sending domains (domains.py) -------------------------------------------------------------


class SendingDomainAdded(Event):
    """A domain the tenant sends from, with the DKIM key mailflow generated for it: the private
    key is a reference into the vault, the public key is what the DKIM record publishes."""

    domain: str  # lower case, IDNA A-labels
    selector: str
    dkim_key: SecretRef  # fingerprint: vault.dkim_fingerprint of the public key
    dkim_public_key: str  # base64 SubjectPublicKeyInfo, as in the DNS record's p=


class RecordVerdict(BaseModel):
    """What one DNS check found of one record to publish (outbound/domains.py RecordCheck)."""

    purpose: str  # spf | dkim | dmarc | return_path
    type: str  # TXT | MX
    name: str
    required: bool
    status: str  # ok | warning | missing | wrong | error
    detail: str
    known: str | None = None  # the last verdict DNS answered for: this one, unless it is error


class SendingDomainChecked(Event):
    """A DNS check of a sending domain's records; `status` verified when every required record passed."""

    domain: str
    status: str  # verified | failing
    checks: list[RecordVerdict]


class SendingDomainRecordBroken(Event):
    """A record that passed at the domain's previous check does not any more (the warning)."""

    domain: str
    purpose: str
    type: str
    name: str
    was: str  # the previous verdict: ok | warning
    now: str  # missing | wrong | error
    detail: str


class SendingDomainRemoved(Event):
    domain: str


for _model in (SendingDomainAdded, SendingDomainChecked, SendingDomainRecordBroken, SendingDomainRemoved):
    registry.register(_model)


class ContactDeleted(Event):
    """A contact taken off the list (not erased): its row goes and its campaign jobs not yet
    sent were ended (`jobs_ended`); the log keeps what it held, and a later import brings it back."""

    subject: str
    jobs_ended: int = 0


registry.register(ContactDeleted)
