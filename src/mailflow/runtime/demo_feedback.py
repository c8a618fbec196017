"""`mailflow demo`, the closed loop: what comes back from the campaign's recipients.

While the demo's `mailflow inbound` listens, the remote side answers some of the campaign's
delivered messages as real servers and people do (mailflow.testing.mail): DSNs in Postfix's,
Gmail's and Exim's formats (hard and soft, and one that only says "delayed"), an ARF
complaint from a feedback loop, out-of-office answers in English and German, and human
replies - one from a client that dropped References. Then the inbound_classifier and
outbound_feedback consumers run over it (the same code `mailflow up` runs as processes), and
the summary says what each message was, who is suppressed now, which contacts the campaign
stopped for, and what the webhook endpoint received: a local HTTP receiver, subscribed
before the answers come, that checks each delivery's Standard Webhooks signature with the
`standardwebhooks` package, as an integrator would.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from mailflow.consumers.runtime import ConsumerRunner
from mailflow.mail import tokens
from mailflow.mail.message_ids import message_id
from mailflow.projectors import get as get_projection
from mailflow.runtime import queries as rq
from mailflow.runtime.wiring import Runtime
from mailflow.testing import mail

SENDER_FROM = "news@example.org"
SENDER_DOMAIN = "example.org"

# (what, builder): each answers one delivered campaign message, in this order.
ANSWERS: list[tuple[str, Callable[[mail.Sent], tuple[str, str, bytes]]]] = [
    ("Postfix DSN, user unknown", lambda s: ("", s.return_path, mail.postfix_dsn(s, "5.1.1", "550"))),
    ("Gmail DSN, address not found", lambda s: ("", s.return_path, mail.gmail_bounce(s))),
    ("Exim bounce, no such user", lambda s: ("", s.return_path, mail.exim_bounce(s))),
    (
        "Postfix DSN, mailbox full",
        lambda s: ("", s.return_path, mail.postfix_dsn(s, "5.2.2", "552", "Mailbox full: quota exceeded")),
    ),
    (
        "Postfix DSN, delayed",
        lambda s: ("", s.return_path, mail.postfix_dsn(s, "4.4.1", "451", "Connection timed out")),
    ),
    ("ARF abuse report", lambda s: ("", s.return_path, mail.arf_complaint(s))),
    ("out of office (en)", lambda s: (s.to, SENDER_FROM, mail.out_of_office(s, "en"))),
    ("Abwesenheitsnotiz (de)", lambda s: (s.to, SENDER_FROM, mail.out_of_office(s, "de"))),
    ("a reply", lambda s: (s.to, SENDER_FROM, mail.reply(s, "Yes, please send me the offer."))),
    (
        "a reply without References",
        lambda s: (s.to, SENDER_FROM, mail.reply(s, "Call me tomorrow?", references=False)),
    ),
]


async def _send(port: int, mail_from: str, to: str, data: bytes) -> int:
    import aiosmtplib

    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(mail_from)
        await client.rcpt(to)
        return (await client.data(data)).code
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code
    finally:
        client.close()


def answer(rt: Runtime, port: int, campaign_id: str) -> list[dict[str, Any]]:
    """Send the answers (ANSWERS) to `mailflow inbound` on `port`; what was sent, and its reply code."""
    with rt.connect() as conn:
        delivered = rq.rows(conn, rq.DEMO_DELIVERED, {"campaign_id": campaign_id, "n": len(ANSWERS)})
    key = rt.keyring.signing_key
    out = []
    for (what, build), row in zip(ANSWERS, delivered, strict=False):
        sent = mail.Sent(
            message_id(row["job_id"], SENDER_DOMAIN),
            tokens.verp_address(key, row["job_id"], SENDER_DOMAIN),
            SENDER_FROM,
            row["email"],
            "Spring news",
        )
        mail_from, to, data = build(sent)
        out.append({"what": what, "job_id": row["job_id"], "code": asyncio.run(_send(port, mail_from, to, data))})
    return out


def apply(operator: Runtime) -> None:
    """The consumers of what came back, caught up in this process (`mailflow up` runs them as
    processes): classification, then its effects, then webhook fan-out when installed."""
    for name in ("inbound_classifier", "outbound_feedback", "webhooks"):
        try:
            projection = get_projection(name)
        except Exception:  # noqa: BLE001 - an optional consumer that is not installed
            continue
        runner = ConsumerRunner(projection, operator.store, operator.services.redis_url, operator.settings)
        try:
            operator.store.sync()  # the events the consumer before this one recorded, with positions
            runner.catch_up()
        finally:
            runner.close()


WEBHOOK_KINDS = ["bounce", "complaint", "auto_reply", "reply"]


class Receiver:
    """An integrator's webhook endpoint on loopback: verifies every delivery's signature."""

    def __init__(self) -> None:
        self.secret = ""
        self.received: list[str] = []  # the payloads' types
        self.verified = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                import orjson
                from standardwebhooks import Webhook

                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    Webhook(receiver.secret).verify(body, dict(self.headers.items()))
                    receiver.verified += 1
                except Exception:  # noqa: BLE001 - a bad signature is counted as not verified
                    pass
                receiver.received.append(str(orjson.loads(body).get("type")))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/mailflow"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def subscribe(rt: Runtime, receiver: Receiver) -> None:
    """The tenant's endpoint for what came back (loopback is allowed for the demo's receiver)."""
    from mailflow.inbound import webhooks
    from mailflow.inbound.delivery import AddressGuard

    _, receiver.secret = webhooks.add_endpoint(
        rt.store, rt.vault, AddressGuard(allow_private=True), receiver.url, WEBHOOK_KINDS
    )


def deliver(operator: Runtime, receiver: Receiver, since: datetime, timeout_s: float = 30.0) -> None:
    """The deliverer (as `mailflow inbound` runs it) until the receiver has every delivery the
    fan-out made since `since`."""
    from mailflow.inbound import webhooks
    from mailflow.inbound.delivery import AddressGuard, HttpPoster

    with operator.connect() as conn:
        expected = int(rq.one(conn, rq.DEMO_WEBHOOK_DELIVERIES, {"since": since})["n"])
    stop = threading.Event()
    http = HttpPoster(timeout_s=5.0, guard=AddressGuard(allow_private=True))
    options = webhooks.Options(poll_s=0.05)
    worker = threading.Thread(
        target=lambda: asyncio.run(
            webhooks.run(operator.store, stop, vault=operator.vault, http=http, options=options)
        ),
        daemon=True,
    )
    worker.start()
    deadline = time.monotonic() + timeout_s
    while len(receiver.received) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    worker.join(15)


def summary(
    rt: Runtime, campaign_id: str, since: datetime, sent: list[dict[str, Any]], receiver: Receiver | None = None
) -> dict[str, Any]:
    """What each answer was classified as, and what it changed."""
    from mailflow.outbound import views

    with rt.connect() as conn:
        classified = {
            r["job_id"]: r["kind"] for r in rq.rows(conn, rq.DEMO_CLASSIFIED, {"since": since}) if r["job_id"]
        }
        bounces = {r["job_id"]: r for r in rq.rows(conn, rq.DEMO_BOUNCES, {"since": since})}
        changed = rq.one(conn, rq.DEMO_CAME_BACK, {"since": since, "campaign_id": campaign_id})
        report = views.campaign_report(conn, campaign_id)
    answers = []
    for s in sent:
        b = bounces.get(s["job_id"]) or {}
        answers.append(
            {
                "what": s["what"],
                "code": s["code"],
                "kind": b.get("kind") or classified.get(s["job_id"], "?"),
                "reason": b.get("reason") or "",
                "hard": b.get("hard"),
            }
        )
    return {
        "answers": answers,
        "suppressed": int(changed["suppressed"]),
        "stopped_for_repliers": int(changed["stopped"]),
        "alerts": int(changed["alerts"]),
        "threads": int(changed["threads"]),
        "came_back": report.came_back,
        "webhooks": [{"url": receiver.url, "received": len(receiver.received), "verified": receiver.verified}]
        if receiver is not None
        else [],
    }
