"""Commands room: `mailflow threads` - conversations: the outbound message and what came back to it."""

from __future__ import annotations

import textwrap
from typing import Any

import typer

from mailflow.commands.base import JsonOpt, emit_json, new_app, out, quiet_logs, runtime

app = new_app("Conversations: received mail threaded with the outbound message it answers.")

KIND_WORDS = {
    "reply": "reply",
    "auto_reply": "auto-reply",
    "bounce": "bounce",
    "complaint": "complaint",
    "unsubscribe": "unsubscribe",
    "other": "other",
}
WIDTH = 80


def counts_line(counts: dict[str, int]) -> str:
    """`2 replies, 1 auto-reply`: the kinds a thread has, most common first."""
    plural = {"reply": "replies", "auto_reply": "auto-replies"}
    parts = [
        f"{n} {plural.get(k, KIND_WORDS[k] + 's') if n > 1 else KIND_WORDS[k]}"
        for k, n in sorted(counts.items(), key=lambda kv: -kv[1])
        if n
    ]
    return ", ".join(parts) or "no messages"


def _cut(text: str | None, width: int) -> str:
    """A line cut to `width` columns (`~` marks the cut)."""
    text = text or ""
    return text if len(text) <= width else text[: width - 1] + "~"


def _one_line(value: str | None, width: int) -> str:
    """A value from a message (a subject, an address) on one line of at most `width`."""
    return _cut(" ".join((value or "").split()), width)


def _who(row: dict[str, Any]) -> str:
    return row.get("sender") or ("(erased)" if row.get("erased") else "-")


@app.command("list")
def threads_list(
    mailbox: str | None = typer.Option(None, "--mailbox", help="Only threads with a message in this mailbox."),
    job: str | None = typer.Option(None, "--job", help="Only threads answering this job (an id or its start)."),
    limit: int = typer.Option(50, "--limit", "-n", min=1),
    as_json: bool = JsonOpt,
) -> None:
    """Threads, the latest message first: who with, the subject, messages by kind."""
    from mailflow.inbound import threads_projection as threads

    quiet_logs()
    with runtime().connect() as conn:
        rows = threads.list_threads(conn, mailbox=mailbox, job=job, limit=limit)
    if as_json:
        emit_json([{k: v for k, v in r.items() if k != "tenant"} for r in rows])
        return
    from mailflow.outbound.views import short_ids

    ids = short_ids(r["id"] for r in rows)
    jobs = short_ids(r["job_id"] for r in rows if r["job_id"])
    for r in rows:
        job_mark = f"  job {jobs[r['job_id']]}" if r["job_id"] else ""
        head = f"{ids[r['id']]}  {r['last_at']:%m-%d %H:%M}  {_one_line(_who(r), 40)}{job_mark}"
        out.print(_cut(head, WIDTH), markup=False)
        subject = _one_line(r["subject"] or "(no subject)", 40)
        out.print(
            _cut(f"{'':{len(ids[r['id']])}}  {subject}  [{counts_line(r['counts'])}]  {r['mailbox']}", WIDTH),
            markup=False,
        )


@app.command("show")
def threads_show(
    ref: str = typer.Argument(..., help="A thread id, or its first characters (as lists show)."),
    as_json: bool = JsonOpt,
) -> None:
    """One conversation in order: the outbound message, then each message that came back."""
    from mailflow.inbound import threads_projection as threads

    quiet_logs()
    with runtime().connect() as conn:
        t = threads.thread(conn, ref)
    if as_json:
        emit_json({k: v for k, v in t.items() if k != "tenant"})
        return
    out.print(f"thread    {t['id']}", markup=False)
    out.print(_cut(f"messages  {t['messages']}: {counts_line(t['counts'])}", WIDTH), markup=False)
    out.print(f"with      {_one_line(_who(t), 70)}", markup=False)
    out.print(f"subject   {_one_line(t['subject'] or '(no subject)', 70)}", markup=False)
    out.print(f"mailbox   {t['mailbox'] or '-'}", markup=False)
    job = t["job"]
    if job is not None:
        sent = f"{job['sent_at']:%Y-%m-%d %H:%M}" if job["sent_at"] else "not sent yet"
        out.print("", markup=False)
        out.print(f"{sent:<16}  {'sent':<12} job {job['job_id']}", markup=False)
        if job["campaign_id"]:
            campaign = f"campaign {_one_line(job['campaign'], 40)} ({job['campaign_id']})"
        else:
            campaign = "transactional"
        out.print(_cut(f"    {campaign}", WIDTH), markup=False)
    elif t["job_id"]:
        out.print("", markup=False)
        out.print(f"{'':<16}  {'sent':<12} job {t['job_id']} (no longer kept)", markup=False)
    for m in t["items"]:
        out.print("", markup=False)
        kind = KIND_WORDS.get(m["kind"], m["kind"])
        out.print(_cut(f"{m['at']:%Y-%m-%d %H:%M}  {kind:<12} {_one_line(_who(m), 48)}", WIDTH), markup=False)
        if m["text"]:
            for line in m["text"].splitlines() or [""]:
                wrapped = textwrap.wrap(line, WIDTH - 4, break_long_words=True, break_on_hyphens=False) or [""]
                for part in wrapped:
                    out.print(f"    {part}" if part else "", markup=False)
