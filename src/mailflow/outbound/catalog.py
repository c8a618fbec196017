"""Outbound room: the catalogue - contacts, segments, templates, suppressions, senders, campaigns.

An inline projection: commands apply it in the same transaction that appends the events,
so the tables are never behind their events. `mailflow projections rebuild catalog`
replays the events through its handlers (see consumers/inline.py); timestamps come from the
events, so a replay gives the same tables.

`refuse_if_in_use()` is the one check that deleting a segment, template or sender makes:
nothing an unfinished campaign (or, for templates and senders, an unsent job) still needs.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from mailflow.consumers.inline import InlineProjection, register
from mailflow.errors import ConflictError
from mailflow.events.envelope import Envelope
from mailflow.infra import personal
from mailflow.outbound import queries as q


def refuse_if_in_use(conn: psycopg.Connection, kind: str, name: str) -> None:
    """ConflictError naming the campaign when a draft, scheduled, running or paused campaign
    uses the segment, template or sender `name` (kind), or an unsent job uses the template
    or sender. Call it in the deleting transaction, after locking the row to delete."""
    column = sql.Identifier(kind)
    with conn.cursor(row_factory=dict_row) as cur:
        using = cur.execute(sql.SQL(q.CAMPAIGNS_USING).format(column=column), (name,)).fetchall()
        if using:
            named = ", ".join(f"{c['name']!r} ({c['status']})" for c in using)
            raise ConflictError(
                f"{kind} {name!r} is used by campaign {named}; cancel the campaign or let it finish first"
            )
        if kind in ("template", "sender"):
            row = cur.execute(sql.SQL(q.UNFINISHED_JOBS_USING).format(column=column), (name,)).fetchone()
            if row and row["jobs"]:
                raise ConflictError(
                    f"{kind} {name!r} is used by {row['jobs']} unsent job(s); try again when they are sent"
                )


def _contacts_imported(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    """Contacts created or merged. A contact erased since (its value cannot be opened) is
    inserted as a placeholder and deleted at once: it takes the id it took when it was
    imported, so a rebuild numbers every other contact as the first time."""
    contacts = data["contacts"]
    opened = personal.open_many(conn, tenant, [(c["subject"], c["sealed"]) for c in contacts])
    conn.execute(
        q.UPSERT_CONTACTS,
        {
            "subjects": [c["subject"] for c in contacts],
            "emails": [v["email"] if v else None for v in opened],
            "attributes": [orjson.dumps((v or {}).get("attributes") or {}).decode() for v in opened],
            "at": at,
            "tenant": tenant,
        },
    )
    erased = [c["subject"] for c, v in zip(contacts, opened) if v is None]
    if erased:
        conn.execute(q.DELETE_ERASED_PLACEHOLDERS, (tenant, erased))


def _status_changed(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(q.SET_CONTACT_STATUS, (data["status"], at, tenant, data["subject"]))


def _contact_updated(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    (change,) = personal.open_many(conn, tenant, [(data["subject"], data["sealed"])])
    if change is None:
        return
    conn.execute(
        q.UPDATE_CONTACT_ATTRIBUTES,
        {
            "subject": data["subject"],
            "attributes": Jsonb(change.get("attributes") or {}),
            "removed": list(change.get("removed") or []),
            "at": at,
            "tenant": tenant,
        },
    )


def _contact_reactivated(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(q.REACTIVATE_CONTACT, {"subject": data["subject"], "at": at, "tenant": tenant})
    conn.execute(q.REMOVE_SUPPRESSION, (tenant, data["subject"]))


def _contact_erased(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    """The contact goes, the jobs keep their states without the address, and the subject stays
    suppressed. (The jobs rows are the jobs projection's; a rebuild of it finds the sealed
    addresses unreadable and leaves them empty too.)"""
    subject = data["subject"]
    conn.execute(q.DELETE_CONTACT, (tenant, subject))
    conn.execute(q.FORGET_JOB_RECIPIENT, (tenant, subject))
    conn.execute(q.SUPPRESS_ERASED, (tenant, subject, at))


def _contact_deleted(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(q.DELETE_CONTACT, (tenant, data["subject"]))


def _segment_defined(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(q.UPSERT_SEGMENT, (tenant, data["name"], Jsonb(data["filter"]), at, at))


def _segment_deleted(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(q.DELETE_SEGMENT, (tenant, data["name"]))


def _template_saved(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(
        q.UPSERT_TEMPLATE, (tenant, data["name"], data["subject"], data.get("html", ""), data.get("text", ""), at, at)
    )


def _template_deleted(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(q.DELETE_TEMPLATE, (tenant, data["name"]))


def _suppression_added(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    sealed = data.get("sealed")
    (value,) = personal.open_many(conn, tenant, [(data["subject"], sealed)]) if sealed else (None,)
    email = value["email"] if value else None
    conn.execute(q.ADD_SUPPRESSION, (tenant, data["subject"], email, data["reason"], data.get("detail", ""), at))


def _suppression_removed(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(q.REMOVE_SUPPRESSION, (tenant, data["subject"]))


def _sender_saved(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(
        q.UPSERT_SENDER,
        (
            tenant,
            data["name"],
            data["from_email"],
            data.get("from_name", ""),
            data["relay_url"],
            data.get("dkim_selector"),
            (data.get("relay_password") or {}).get("id"),
            (data.get("dkim_key") or {}).get("id"),
            data.get("dkim_public_key"),
            at,
            at,
        ),
    )


def _sender_deleted(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(q.DELETE_SENDER, (tenant, data["name"]))


def _campaign_created(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
    conn.execute(
        q.INSERT_CAMPAIGN,
        (
            data["campaign_id"],
            tenant,
            data["name"],
            data["sender"],
            data["template"],
            data["segment"],
            data.get("stop_on_reply", True),
            data.get("tracking"),
            at,
            at,
        ),
    )


def _campaign_status(status: str) -> Callable[[psycopg.Connection, dict, datetime, str], None]:
    def apply(conn: psycopg.Connection, data: dict, at: datetime, tenant: str) -> None:
        conn.execute(
            q.SET_CAMPAIGN_STATUS,
            {
                "id": data["campaign_id"],
                "status": status,
                "scheduled_at": data.get("at"),
                "recipients": data.get("recipients"),
                "at": at,
            },
        )

    return apply


HANDLERS: dict[str, Callable[[psycopg.Connection, dict, datetime, str], None]] = {
    "ContactsImported": _contacts_imported,
    "ContactStatusChanged": _status_changed,
    "ContactUpdated": _contact_updated,
    "ContactReactivated": _contact_reactivated,
    "ContactErased": _contact_erased,
    "ContactDeleted": _contact_deleted,
    "SegmentDefined": _segment_defined,
    "SegmentDeleted": _segment_deleted,
    "TemplateSaved": _template_saved,
    "TemplateDeleted": _template_deleted,
    "SuppressionAdded": _suppression_added,
    "SuppressionRemoved": _suppression_removed,
    "SenderSaved": _sender_saved,
    "SenderDeleted": _sender_deleted,
    "CampaignCreated": _campaign_created,
    "CampaignScheduled": _campaign_status("scheduled"),
    "CampaignStarted": _campaign_status("running"),
    "CampaignPaused": _campaign_status("paused"),
    "CampaignResumed": _campaign_status("running"),
    "CampaignResent": _campaign_status("running"),
    "CampaignCancelled": _campaign_status("cancelled"),
    "CampaignCompleted": _campaign_status("completed"),
}


def _tenant(env: Envelope) -> str:
    if env.metadata.tenant is None:  # the store stamps every event; migration 0007 stamped the old ones
        raise ValueError(f"event {env.id} ({env.type}) has no tenant")
    return env.metadata.tenant


def _per_event(handler: Callable[[psycopg.Connection, dict, datetime, str], None]):
    def apply(conn: psycopg.Connection, events: list[Envelope]) -> None:
        for env in events:
            handler(conn, env.data, env.recorded_at, _tenant(env))

    return apply


PROJECTION = register(
    InlineProjection(
        "catalog",
        "contacts, segments, templates, suppressions, senders, campaigns (inline)",
        ("contacts", "suppressions", "segments", "templates", "senders", "campaigns"),
        {etype: _per_event(h) for etype, h in HANDLERS.items()},
    )
)
