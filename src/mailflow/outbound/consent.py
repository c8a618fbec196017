"""Outbound room: consent scopes - what each kind of mail needs, and the preferences page's decisions.

Unsubscribing (a link, the preferences page) stops campaign mail only: receipts, password
resets and other transactional mail still go. A hard bounce or a complaint stops every
kind of mail, and so does a suppression for any other reason. `may_send()` is that rule,
the one the worker applies to every job.

Messages carry two links a template can use: `unsubscribe_url` (campaign mail: stop mail
like this) and `preferences_url` (any mail: see and change what the address receives),
both signed tokens, https when base URLs are configured (MAILFLOW_UNSUBSCRIBE_BASE_URL,
MAILFLOW_PREFERENCES_BASE_URL), else a mailto: address for the unsubscribe link.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from mailflow.consumers import inline
from mailflow.events.envelope import Metadata
from mailflow.events.store import EventStore
from mailflow.infra.services import scalar_row
from mailflow.mail import tokens
from mailflow.outbound import contacts, streams
from mailflow.outbound import queries as q
from mailflow.outbound.events import ContactStatusChanged, SuppressionRemoved
from mailflow.outbound.suppressions import added

STOPS_EVERYTHING = ("bounced", "complained")  # contact statuses that stop transactional mail too
CAMPAIGN_ONLY_SUPPRESSION = "unsubscribe"  # a suppression of this reason stops campaign mail only
PREFERENCES_ACTOR = "preferences-page"
LINK_VARIABLES = ("unsubscribe_url", "preferences_url")


def may_send(*, transactional: bool, contact_status: str | None, suppression: str | None) -> str | None:
    """Why a message must not go to an address (the reply to record), or None to send it."""
    if suppression is not None and not (transactional and suppression == CAMPAIGN_ONLY_SUPPRESSION):
        return f"suppressed ({suppression})"
    if contact_status in STOPS_EVERYTHING or (not transactional and contact_status in contacts.STOPPED_STATUSES):
        return f"contact is {contact_status}"
    return None


def preferences_token(secret: bytes, tenant: str, email: str) -> str:
    return tokens.sign(secret, f"pref:{tenant}:{email}")


def read_preferences_token(secret: bytes | list[bytes], token: str) -> tuple[str, str]:
    """(tenant, address) of a genuine preferences token; tokens.BadToken otherwise."""
    kind, _, rest = tokens.verify(secret, token).partition(":")
    tenant, sep, email = rest.partition(":")
    if kind != "pref" or not sep or "@" not in email:
        raise tokens.BadToken("not a preferences token")
    return tenant, email


def preferences_base(unsubscribe_base_url: str | None, preferences_base_url: str | None) -> str | None:
    """The preferences pages' base URL: configured, or /preferences beside the unsubscribe pages."""
    if preferences_base_url:
        return preferences_base_url.rstrip("/")
    if not unsubscribe_base_url:
        return None
    parts = urlsplit(unsubscribe_base_url)
    return urlunsplit(parts._replace(path="/preferences", query="", fragment=""))


def links(
    secret: bytes,
    *,
    to: str,
    tenant: str,
    campaign_id: str | None,
    sender_domain: str,
    unsubscribe_base_url: str | None,
    preferences_base_url: str | None,
) -> dict[str, str]:
    """Template variables: unsubscribe_url (campaign mail) and preferences_url (when the pages
    are served); each is "" where it has no meaning, so a template may always name both."""
    from mailflow.outbound.mime import unsubscribe_token

    found = dict.fromkeys(LINK_VARIABLES, "")
    if campaign_id is not None:
        token = unsubscribe_token(secret, to, campaign_id)
        found["unsubscribe_url"] = (
            f"{unsubscribe_base_url.rstrip('/')}/{token}"
            if unsubscribe_base_url
            else f"mailto:unsubscribe+{token}@{sender_domain}"
        )
    base = preferences_base(unsubscribe_base_url, preferences_base_url)
    if base:
        found["preferences_url"] = f"{base}/{preferences_token(secret, tenant, to)}"
    return found


@dataclass(frozen=True)
class Preferences:
    email: str
    campaign_mail: bool  # campaigns are sent to it
    transactional_mail: bool  # receipts and the like are sent to it
    status: str | None  # the contact's status, None without a contact
    suppression: str | None


def preferences(store: EventStore, email: str) -> Preferences:
    """What the address receives from the store's tenant."""
    with inline.reading(store) as conn:
        subject = store.subject(conn, email)
        status, suppressed = scalar_row(conn, q.ADDRESS_STATE, {"subject": subject})
        row = conn.execute(q.IS_SUPPRESSED, (subject,)).fetchone() if suppressed else None
    suppression = row[0] if row else None
    return Preferences(
        email,
        may_send(transactional=False, contact_status=status, suppression=suppression) is None,
        may_send(transactional=True, contact_status=status, suppression=suppression) is None,
        status,
        suppression,
    )


def set_campaign_mail(store: EventStore, email: str, wanted: bool) -> Preferences:
    """The person's own choice on the preferences page: stop campaign mail (an unsubscribe),
    or receive it again (a reactivation the person asked for, recorded as such)."""
    now = preferences(store, email)
    md = Metadata(actor=PREFERENCES_ACTOR)
    if wanted and not now.campaign_mail:
        if now.status is not None:
            contacts.reactivate(
                store, email, reason="the person asked for campaign mail again", actor=PREFERENCES_ACTOR
            )
        elif now.suppression == CAMPAIGN_ONLY_SUPPRESSION:
            with inline.writing(store) as w:
                subject = store.subject(w.conn, email)
                w.record([(streams.suppression(subject), SuppressionRemoved(subject=subject).to_new(md))])
    elif not wanted and now.campaign_mail:
        with inline.writing(store) as w:
            subject = store.subject(w.conn, email)
            if now.status is not None:
                changed = ContactStatusChanged(subject=subject, status="unsubscribed", reason="preferences page")
                w.record([(streams.contact(subject), changed.to_new(md))])
            else:
                event = added(w.conn, str(store.tenant), subject, email, CAMPAIGN_ONLY_SUPPRESSION, "preferences page")
                w.record([(streams.suppression(subject), event.to_new(md))])
    return preferences(store, email)
