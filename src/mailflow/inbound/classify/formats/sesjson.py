"""Inbound room, classification: Amazon SES notifications mailed as JSON (an SNS envelope whose
`Message` is the SES event): bounces, deliveries and complaints, one recipient each."""

from __future__ import annotations

import json
import re
from typing import Any

from mailflow.inbound.classify.formats.fields import canonical
from mailflow.inbound.classify.formats.text import Found

_MARK = re.compile(r'"notificationType"\s*:|\\"notificationType\\"\s*:')


def _load(text: str) -> Any:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    body = text[start : end + 1]
    for candidate in (body, re.sub(r"\r?\n ", "", body), re.sub(r"\r?\n\s*", "", body)):
        try:
            return json.loads(candidate, strict=False)
        except ValueError:
            continue
    return None


def recipients(notes: str) -> list[Found]:
    """The recipients of an SES notification in `notes`, or [] when it holds none."""
    if not _MARK.search(notes):
        return []
    event = _load(notes)
    if isinstance(event, dict) and isinstance(event.get("Message"), str):
        event = _load(event["Message"])
    if not isinstance(event, dict):
        return []
    kind = str(event.get("notificationType") or event.get("eventType") or "")
    out: list[Found] = []
    if kind == "Bounce":
        for r in (event.get("bounce") or {}).get("bouncedRecipients") or []:
            if isinstance(r, dict) and r.get("emailAddress"):
                out.append(
                    Found(
                        address=canonical(str(r["emailAddress"])),
                        status=str(r.get("status") or ""),
                        diagnostic=str(r.get("diagnosticCode") or ""),
                        action=str(r.get("action") or "failed").lower(),
                    )
                )
    elif kind == "Delivery":
        delivery = event.get("delivery") or {}
        for address in delivery.get("recipients") or []:
            out.append(
                Found(
                    address=canonical(str(address)),
                    diagnostic=str(delivery.get("smtpResponse") or ""),
                    remote_mta=str(delivery.get("reportingMTA") or ""),
                    action="delivered",
                )
            )
    elif kind == "Complaint":
        for r in (event.get("complaint") or {}).get("complainedRecipients") or []:
            if isinstance(r, dict) and r.get("emailAddress"):
                out.append(Found(address=canonical(str(r["emailAddress"])), reason="feedback"))
    return out
