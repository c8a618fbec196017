"""Routes' http and forward actions: mail taken by the real SMTP server is POSTed, signed per
Standard Webhooks with the tenant's secret, to a real HTTP server, or forwarded through a real
SMTP relay from an SRS address; failures are retried with backoff or given up, each attempt an
event; two inbound processes never send one action twice; a rebuild restores every state and
sends nothing again. The decisions (what an answer means, when to retry) are tested alone."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook

from mailflow.inbound import actions, routes
from mailflow.inbound.actions import Attempt, Options, RetryPolicy
from mailflow.inbound.mailbox import PROJECTION
from mailflow.inbound.server import Limits
from mailflow.mail import tokens
from mailflow.testing.sink import Sink, SinkServer

from .conftest import run_cli, wait_until
from .test_inbound import Server, message, transaction

pytestmark = pytest.mark.process

FAST = RetryPolicy(base_s=0.05, factor=1.0, max_attempts=12, max_delay_s=1.0)


class Hook:
    """An HTTP endpoint in a thread. Each path answers with its statuses in turn (the last one
    again and again; None: never answers); every request is kept."""

    def __init__(self, answers: dict[str, list[int | None]], headers: dict[str, str] | None = None) -> None:
        self.answers = answers
        self.headers = headers or {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with hook.lock:
                    seen = sum(1 for r in hook.requests if r["path"] == self.path)
                    hook.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "at": time.monotonic(),
                        }
                    )
                plan = hook.answers[self.path]
                status = plan[min(seen, len(plan) - 1)]
                if status is None:
                    hook.release.wait(30)  # never answers (the client gives up first)
                    return
                self.send_response(status)
                for name, value in hook.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def hits(self, path: str | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if path is None or r["path"] == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks():
    made: list[Hook] = []

    def make(answers: dict[str, list[int | None]], headers: dict[str, str] | None = None) -> Hook:
        made.append(Hook(answers, headers))
        return made[-1]

    yield make
    for h in made:
        h.close()


@pytest.fixture
def inbound(operator_rt, acme):
    """`serve()` with the route actions beside it, as `mailflow inbound` runs them."""
    started: list[Server] = []

    def start(*, forwarder: actions.Forwarder | None = None, timeout_s: float = 5.0, **options: object) -> Server:
        opts = Options(**{"retry": FAST, "poll_s": 0.05, "lease_s": 10.0, **options})

        def run_actions(halt: asyncio.Event):
            http = actions.HttpPoster(timeout_s=timeout_s)
            return actions.run(
                operator_rt.store, halt, http=http, forwarder=forwarder, vault=operator_rt.vault, options=opts
            )

        started.append(Server(operator_rt.store, Limits(), actions=run_actions))
        return started[-1]

    yield start
    for s in started:
        s.close()


def send(server: Server, to: str, body: str = "Hello\r\n") -> str:
    """One message over SMTP; returns its id (the 250 names it)."""
    replies = asyncio.run(transaction(server.port, "ann@sender.example", [to], message(to=to, body=body)))
    assert [c for c, _ in replies] == [250, 250, 250], replies
    return replies[-1][1].rsplit(" ", 1)[1]


def outcomes(db, message_id: str | None = None) -> list[tuple[str, dict]]:
    return [
        (t, d)
        for t, d in db.execute(
            "SELECT type, data FROM events WHERE type IN ('RouteActionDone', 'RouteActionFailed') ORDER BY seq"
        ).fetchall()
        if message_id is None or d["message_id"] == message_id
    ]


def action_row(db, message_id: str) -> dict:
    cols = ("state", "attempts", "last_status", "last_error", "next_at", "done_at", "route_id", "captures")
    row = db.execute(f"SELECT {', '.join(cols)} FROM route_actions WHERE message_id = %s", (message_id,)).fetchone()
    return dict(zip(cols, row)) if row else {}


def settled(db, message_id: str, state: str):
    return lambda: action_row(db, message_id).get("state") == state


def verify(secret: str, request: dict) -> dict:
    """Standard Webhooks' check, written from the spec (not mailflow's code): the signature is
    base64(HMAC-SHA256(base64-decoded secret, "id.timestamp.body")), prefixed v1,."""
    h = request["headers"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + request["body"]
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert expected in h["webhook-signature"].split(" ")
    assert abs(int(h["webhook-timestamp"]) - time.time()) < 60
    return json.loads(request["body"])


# -- http ----------------------------------------------------------------------------------------


def test_a_post_answered_500_twice_then_200_is_done_after_three_attempts_each_signed(
    acme, inbound, hooks, db, env, operator_rt
):
    hook = hooks({"/in": [500, 500, 200]})
    route = routes.add_route(acme, "*@acme.example", "http", hook.url("/in"))
    server = inbound()
    message_id = send(server, "orders+x@acme.example")
    wait_until(settled(db, message_id, "done"), what="the action to be done")

    got = outcomes(db, message_id)
    assert [(t, d["attempts"], d.get("final"), d["status"]) for t, d in got] == [
        ("RouteActionFailed", 1, False, 500),
        ("RouteActionFailed", 2, False, 500),
        ("RouteActionDone", 3, None, 200),
    ]
    assert all(d["retry_at"] is not None and "500" in d["error"] for _, d in got[:2])
    row = action_row(db, message_id)
    assert (row["state"], row["attempts"], row["last_status"], row["last_error"]) == ("done", 3, 200, None)

    secret = run_cli(env, "routes", "secret").stdout.strip()  # what the tenant gives its receiver
    assert secret.startswith("whsec_")
    requests = hook.hits("/in")
    assert len(requests) == 3
    bodies = [verify(secret, r) for r in requests]
    assert len({r["headers"]["webhook-id"] for r in requests}) == 1  # the receiver's key to dedupe
    Webhook(secret).verify(requests[-1]["body"], requests[-1]["headers"])  # the reference library agrees
    raw = bytes(db.execute("SELECT data FROM raw_messages").fetchone()[0])
    body = bodies[-1]
    assert body["message_id"] == message_id and body["tenant"] == "default"
    assert (body["recipient"], body["route_id"], body["captures"]) == (
        "orders+x@acme.example",
        route.id,
        {"local": "orders", "tag": "x"},
    )
    assert body["envelope"] == {"recipients": ["orders+x@acme.example"], "helo": "client.test", "tls": False}
    assert base64.b64decode(body["raw"]) == raw and body["raw_omitted"] is None and body["spam"] is not None
    # The secret is in the vault only: encrypted, in no event.
    assert db.execute("SELECT count(*) FROM events WHERE data::text LIKE %s", (f"%{secret[6:20]}%",)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM secrets WHERE kind = 'webhook_secret'").fetchone()[0] == 1


def test_a_410_is_a_final_failure_after_one_attempt(acme, inbound, hooks, db):
    hook = hooks({"/gone": [410]})
    routes.add_route(acme, "*@acme.example", "http", hook.url("/gone"))
    message_id = send(inbound(), "someone@acme.example")
    wait_until(settled(db, message_id, "failed"), what="the action to fail")
    [(etype, data)] = outcomes(db, message_id)
    assert (etype, data["attempts"], data["final"], data["status"], data["retry_at"]) == (
        "RouteActionFailed",
        1,
        True,
        410,
        None,
    )
    row = action_row(db, message_id)
    assert row["done_at"] is not None and "410" in row["last_error"]
    time.sleep(0.5)  # several polls and retry delays later: not tried again
    assert len(hook.hits()) == 1


def test_a_server_that_never_answers_is_retried_then_given_up(acme, inbound, hooks, db):
    hook = hooks({"/silent": [None]})
    routes.add_route(acme, "*@acme.example", "http", hook.url("/silent"))
    server = inbound(timeout_s=0.3, retry=RetryPolicy(base_s=0.05, factor=1.0, max_attempts=3))
    message_id = send(server, "someone@acme.example")
    wait_until(settled(db, message_id, "failed"), what="the action to be given up")
    got = outcomes(db, message_id)
    assert [(d["attempts"], d["final"], d["status"]) for _, d in got] == [
        (1, False, None),
        (2, False, None),
        (3, True, None),
    ]
    assert all("no answer" in d["error"] for _, d in got) and "gave up after 3 attempts" in got[-1][1]["error"]
    assert len(hook.hits()) == 3


def test_retry_after_is_honoured(acme, inbound, hooks, db):
    hook = hooks({"/busy": [503, 200]}, headers={"Retry-After": "1"})
    routes.add_route(acme, "*@acme.example", "http", hook.url("/busy"))
    message_id = send(inbound(), "someone@acme.example")  # the backoff alone would be 0.05 s
    wait_until(settled(db, message_id, "done"), what="the action to be done")
    first, second = hook.hits()
    assert second["at"] - first["at"] >= 0.95
    failed = outcomes(db, message_id)[0][1]
    assert failed["status"] == 503 and failed["final"] is False


def test_a_message_over_the_size_limit_is_posted_without_its_raw_copy(acme, inbound, hooks, db):
    hook = hooks({"/in": [204]})
    routes.add_route(acme, "*@acme.example", "http", hook.url("/in"))
    message_id = send(inbound(max_raw_bytes=200), "someone@acme.example", body="x" * 500 + "\r\n")
    wait_until(settled(db, message_id, "done"), what="the action to be done")
    body = json.loads(hook.hits()[0]["body"])
    assert body["raw"] is None and body["raw_omitted"] == "too_large" and body["size"] > 500


def test_rotating_the_secret_signs_later_posts_with_the_new_one(acme, operator_rt, rt, env):
    with rt.connect() as conn:
        first = actions.webhook_secret(conn, rt.vault, "default")
        assert actions.webhook_secret(conn, rt.vault, "default") == first  # made once
    shown = json.loads(run_cli(env, "routes", "secret", "--json").stdout)
    rotated = json.loads(run_cli(env, "routes", "secret", "--rotate", "--json").stdout)
    assert shown == {"secret": first, "rotated": False}
    assert rotated["rotated"] and rotated["secret"] != first
    with operator_rt.connect() as conn:
        assert actions.webhook_secret(conn, operator_rt.vault, "default") == rotated["secret"]
        assert conn.execute("SELECT count(*) FROM secrets WHERE kind = 'webhook_secret'").fetchone()[0] == 1


# -- forward -------------------------------------------------------------------------------------


def _forwarder(operator_rt, settings, relay_url: str) -> actions.Forwarder:
    """Built as `mailflow inbound` builds it, from MAILFLOW_INBOUND_FORWARD_RELAY."""
    from mailflow.commands.inbound import _forward_relay
    from mailflow.outbound.senders import smtp_client

    relay = _forward_relay(relay_url)
    assert relay is not None
    return actions.Forwarder(
        lambda: smtp_client(relay, local_hostname="mx.test"),
        srs_key=operator_rt.keyring.signing_key,
        hostname="mx.test",
    )


def test_a_forward_goes_through_the_relay_from_an_srs_address_at_the_inbound_domain(
    acme, inbound, db, operator_rt, settings
):
    routes.add_route(acme, "sales@acme.example", "forward", "tempfail-desk@example.net")  # 451 once
    with SinkServer(Sink(tempfail_times=1)) as relay:
        server = inbound(forwarder=_forwarder(operator_rt, settings, relay.relay_url()))
        message_id = send(server, "Sales@acme.example")
        wait_until(settled(db, message_id, "done"), what="the forward to be done")
    got = outcomes(db, message_id)
    assert [(t, d["attempts"], d["status"]) for t, d in got] == [
        ("RouteActionFailed", 1, 451),
        ("RouteActionDone", 2, 250),
    ]
    [(mail_from, rcpt)] = relay.sink.envelopes
    assert rcpt == "tempfail-desk@example.net"
    assert mail_from.startswith("SRS0=") and mail_from.endswith("@acme.example") and len(mail_from.split("@")[0]) <= 64
    today = actions.epoch_day(datetime.now(UTC))
    assert actions.srs_message(operator_rt.keyring.verifying_keys, mail_from, today) == message_id
    [data] = relay.sink.raw
    stored = bytes(db.execute("SELECT data FROM raw_messages").fetchone()[0])
    head, _, rest = data.partition(b"\r\nX-Forwarded-For: sales@acme.example tempfail-desk@example.net\r\n")
    assert head.startswith(b"Received: by mx.test (mailflow) id " + message_id.encode())
    assert rest == stored  # the stored copy, byte for byte, under our trace headers


def test_a_forward_refused_with_5xx_fails_for_good(acme, inbound, db, operator_rt, settings):
    routes.add_route(acme, "sales@acme.example", "forward", "bounce-desk@example.net")
    with SinkServer(Sink()) as relay:
        message_id = send(inbound(forwarder=_forwarder(operator_rt, settings, relay.relay_url())), "sales@acme.example")
        wait_until(settled(db, message_id, "failed"), what="the forward to fail")
    [(_, data)] = outcomes(db, message_id)
    assert data["final"] and data["status"] == 550 and "User unknown" in data["error"]


def test_forwards_fail_for_good_when_no_relay_is_configured(acme, inbound, db):
    routes.add_route(acme, "sales@acme.example", "forward", "desk@example.net")
    message_id = send(inbound(forwarder=None), "sales@acme.example")
    wait_until(settled(db, message_id, "failed"), what="the forward to fail")
    [(_, data)] = outcomes(db, message_id)
    assert data["final"] and "MAILFLOW_INBOUND_FORWARD_RELAY" in data["error"]


def test_a_direct_relay_is_not_a_forward_relay():
    from mailflow.commands.inbound import _forward_relay
    from mailflow.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="smart host"):
        _forward_relay("direct://")
    with pytest.raises(ConfigurationError, match="MAILFLOW_INBOUND_FORWARD_RELAY"):
        _forward_relay("ftp://relay.example")
    assert _forward_relay(None) is None


# -- at least once, never twice at once; rebuilds ------------------------------------------------


def test_two_inbound_processes_never_send_one_action_twice(acme, inbound, hooks, db):
    hook = hooks({"/in": [200]})
    routes.add_route(acme, "*@acme.example", "http", hook.url("/in"))
    first, _second = inbound(concurrency=4), inbound(concurrency=4)
    ids = [send(first, f"user{i}@acme.example", body=f"message {i}\r\n") for i in range(30)]
    wait_until(lambda: all(action_row(db, m).get("state") == "done" for m in ids), what="every action to be done")
    sent = [r["headers"]["webhook-id"] for r in hook.hits()]
    assert len(sent) == 30 and len(set(sent)) == 30
    assert len(outcomes(db)) == 30


def test_an_action_whose_process_died_after_sending_is_sent_again_after_its_lease(acme, hooks, db, operator_rt):
    """At least once: claimed and sent, but never recorded (the process died), it is claimed
    again once the lease has run out, sent again with the same webhook-id, and recorded once."""
    hook = hooks({"/in": [200]})
    routes.add_route(acme, "*@acme.example", "http", hook.url("/in"))
    server = Server(operator_rt.store, Limits())
    try:
        message_id = send(server, "someone@acme.example")
    finally:
        server.close()

    def process() -> actions.Actions:
        return actions.Actions(
            operator_rt.store, operator_rt.vault, actions.HttpPoster(), None, Options(retry=FAST, lease_s=1.0)
        )

    dead, alive = process(), process()
    [claimed] = dead._claim(10)
    asyncio.run(dead._attempt(claimed))  # sent; then the process dies before recording it
    assert alive._claim(10) == []  # leased: nobody else takes it meanwhile
    time.sleep(1.1)
    [again] = alive._claim(10)
    assert again.key == claimed.key and again.attempts == 0
    asyncio.run(alive._carry_out(again))
    assert action_row(db, message_id)["state"] == "done"
    assert len({r["headers"]["webhook-id"] for r in hook.hits()}) == 1 and len(hook.hits()) == 2
    assert dead._record(claimed, actions.judge("http", Attempt(200), 1, FAST)) is False  # too late: no event
    assert len(outcomes(db, message_id)) == 1


def test_a_rebuild_restores_every_actions_state_and_sends_nothing_again(acme, inbound, hooks, db, operator_store):
    hook = hooks({"/ok": [200], "/gone": [410], "/busy": [500]})
    routes.add_route(acme, "ok@acme.example", "http", hook.url("/ok"))
    routes.add_route(acme, "gone@acme.example", "http", hook.url("/gone"))
    routes.add_route(acme, "busy@acme.example", "http", hook.url("/busy"))
    routes.add_route(acme, "fwd@acme.example", "forward", "desk@example.net")
    # busy: tried again at once, then in two hours (its two failures are consecutive events)
    slow = RetryPolicy(base_s=0.05, factor=144_000.0, max_attempts=12, max_delay_s=7200)
    server = inbound(retry=slow)
    ids = {"busy": send(server, "busy@acme.example")}
    wait_until(lambda: action_row(db, ids["busy"]).get("attempts") == 2, what="busy's second attempt")
    ids |= {name: send(server, f"{name}@acme.example") for name in ("ok", "gone", "fwd")}
    wait_until(lambda: action_row(db, ids["ok"]).get("state") == "done", what="ok")
    for name, state in (("gone", "failed"), ("fwd", "failed")):
        wait_until(settled(db, ids[name], state), what=name)
    server.close()

    def snapshot() -> list[tuple]:
        return db.execute(
            "SELECT tenant, message_id, recipient, action, target, route_id, captures, state, attempts, next_at, "
            "last_status, last_error, created_at, done_at FROM route_actions ORDER BY recipient"
        ).fetchall()

    before = snapshot()
    assert [r[7] for r in before] == ["pending", "failed", "failed", "done"]  # busy, fwd, gone, ok
    assert before[0][8] == 2 and before[0][9] > datetime.now(UTC) + timedelta(minutes=110)  # from its last event
    PROJECTION.rebuild(operator_store)
    assert snapshot() == before
    hits = len(hook.hits())
    again = inbound(retry=slow)
    time.sleep(0.5)  # ten polls
    again.close()
    assert len(hook.hits()) == hits and len(outcomes(db)) == 5


# -- the decisions -------------------------------------------------------------------------------


def test_what_an_http_status_means():
    assert [actions.http_outcome(s) for s in (200, 204, 299)] == ["done"] * 3
    assert [actions.http_outcome(s) for s in (None, 408, 429, 500, 502, 503, 599)] == ["retry"] * 7
    assert [actions.http_outcome(s) for s in (410, 400, 401, 403, 404, 413, 301, 302, 100)] == ["final"] * 9


def test_what_an_smtp_reply_means():
    assert [actions.smtp_outcome(c) for c in (250, 251)] == ["done"] * 2
    assert [actions.smtp_outcome(c) for c in (None, 421, 451, 452)] == ["retry"] * 4
    assert [actions.smtp_outcome(c) for c in (550, 552, 554)] == ["final"] * 3


def test_retries_back_off_exponentially_up_to_a_ceiling_and_stop_after_the_last_attempt():
    policy = RetryPolicy(base_s=30, factor=2, max_attempts=12, max_delay_s=3600)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert policy.delay(11) == 3600  # 30 * 2**10 is over the ceiling
    assert policy.delay(1, retry_after_s=600) == 600 and policy.delay(4, retry_after_s=5) == 240
    assert policy.delay(1, retry_after_s=10**9) == 3600  # a hostile Retry-After is capped
    assert actions.judge("http", Attempt(500, "HTTP 500"), 11, policy) == actions.Verdict(
        "retry", 500, "HTTP 500", 3600
    )
    last = actions.judge("http", Attempt(500, "HTTP 500"), 12, policy)
    assert last.outcome == "final" and "gave up after 12 attempts" in last.error
    assert actions.judge("forward", Attempt(None, "no relay", permanent=True), 1, policy).outcome == "final"
    assert actions.judge("http", Attempt(204), 1, policy) == actions.Verdict("done", 204)


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert actions.retry_after("120", now) == 120
    assert actions.retry_after("Thu, 01 Jan 2026 12:05:00 GMT", now) == 300
    assert actions.retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0
    assert actions.retry_after(None, now) is None and actions.retry_after("soon", now) is None


def test_the_signature_is_the_one_standard_webhooks_verifies():
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body = b'{"message_id":"m","caf\xc3\xa9":1}'
    now = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": ""}
    headers["webhook-signature"] = actions.sign(secret, "msg_1", now, body)
    assert headers["webhook-signature"].startswith("v1,")
    Webhook(secret).verify(body, headers)
    assert actions.webhook_id("t", "m", "a@x", "u") == actions.webhook_id("t", "m", "a@x", "u")
    assert actions.webhook_id("t", "m", "a@x", "u") != actions.webhook_id("t", "m", "b@x", "u")


def test_an_srs_address_names_its_message_proves_itself_and_expires():
    key, message_id = b"srs-key", "4f0c2a9e-3d1b-4c55-9a0e-6f7d8e9a0b1c"
    address = actions.srs_address(key, message_id, "acme.example", 20_000)
    local = address.split("@")[0]
    assert address.endswith("@acme.example") and local.startswith("SRS0=") and len(local) <= 64
    assert actions.srs_message([b"newer", key], address, 20_003) == message_id
    with pytest.raises(tokens.BadToken):
        actions.srs_message(b"other-key", address, 20_000)
    with pytest.raises(tokens.BadToken, match="expired"):
        actions.srs_message(key, address, 20_000 + actions.SRS_VALID_DAYS + 1)
    with pytest.raises(tokens.BadToken):
        actions.srs_message(key, "desk@acme.example", 20_000)


def test_a_message_in_a_loop_is_not_forwarded_again():
    looped = (
        b"".join(b"Received: by mx%d.example\r\n" % i for i in range(actions.MAX_HOPS)) + b"Subject: x\r\n\r\nbody\r\n"
    )
    assert actions.hops(looped) == actions.MAX_HOPS
    assert actions.hops(b"Subject: x\r\n\r\nReceived: in the body\r\n") == 0
    forwarder = actions.Forwarder(lambda: None, srs_key=b"k", hostname="mx.test")  # never connects
    attempt = asyncio.run(forwarder.forward("4f0c2a9e-3d1b-4c55-9a0e-6f7d8e9a0b1c", "a@acme.example", "b@x", looped))
    assert attempt.permanent and "loop" in attempt.error
