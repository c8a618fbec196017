"""Outbound room: the names of its event streams, in one place (public: integrators filter on them).

A stream is the history of one thing: `job-<uuid>`, `campaign-<uuid>`, `contact-<email>`,
`sender-<name>`, `template-<name>`, `segment-<name>`, `suppression-<email>`, and
`contact-import-<uuid>` for one CSV import. See docs/events.md.
"""

from __future__ import annotations

WORKER_GROUP = "workers"  # the consumer group of the workers on mailflow:jobs:<priority>


def job(job_id: object) -> str:
    return f"job-{job_id}"


def campaign(campaign_id: object) -> str:
    return f"campaign-{campaign_id}"


def contact(email: str) -> str:
    return f"contact-{email}"


def sender(name: str) -> str:
    return f"sender-{name}"


def template(name: str) -> str:
    return f"template-{name}"


def segment(name: str) -> str:
    return f"segment-{name}"


def suppression(email: str) -> str:
    return f"suppression-{email}"


def contact_import(import_id: object) -> str:
    return f"contact-import-{import_id}"
