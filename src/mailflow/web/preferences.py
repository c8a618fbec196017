"""Web room: the preferences page - what an address receives from a tenant, and the person's choice.

GET shows it and changes nothing (link scanners fetch every URL in a message); the form's
POST records the choice: stop campaign mail (an unsubscribe), or receive it again (a
reactivation the person asked for, with actor `preferences-page`). Transactional mail -
receipts, password resets - is not the person's to switch off here; a bounce or a
complaint stops it.
"""

from __future__ import annotations

from html import escape
from urllib.parse import parse_qs

import psycopg
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse

from mailflow.errors import MailflowError
from mailflow.events.store import EventStore
from mailflow.log import get_logger
from mailflow.mail.tokens import BadToken
from mailflow.outbound.consent import Preferences, preferences, read_preferences_token, set_campaign_mail
from mailflow.web.unsubscribe import MAX_BODY_BYTES, page, read_body, try_again_later

log = get_logger("mailflow.web")


def invalid_link() -> HTMLResponse:
    return page(
        "This preferences link is not valid",
        "<p>Open it again from the email, or copy the whole link into your browser's address bar.</p>"
        "<p>Nothing was changed.</p>",
        status=400,
    )


def show(p: Preferences, changed: bool = False) -> HTMLResponse:
    who = f"<strong>{escape(p.email)}</strong>"
    if p.campaign_mail:
        state = f"<p>{who} receives newsletters and other campaign mail.</p>"
        form = (
            '<form method="post"><input type="hidden" name="campaign_mail" value="no">'
            '<button type="submit">Stop campaign mail</button></form>'
        )
    else:
        why = {
            "bounced": "because mail to it bounced",
            "complained": "because it was reported as spam",
        }.get(p.status or "", "")
        state = f"<p>{who} receives no campaign mail {why}.</p>".replace(" .", ".")
        form = (
            '<form method="post"><input type="hidden" name="campaign_mail" value="yes">'
            '<button type="submit">Receive campaign mail again</button></form>'
        )
    transactional = (
        "<p>Messages about your account and orders (receipts, password resets) are still sent.</p>"
        if p.transactional_mail
        else "<p>No mail of any kind is sent to it.</p>"
    )
    note = "<p>Your choice is saved.</p>" if changed else "<p>Nothing changes until you press the button.</p>"
    return page("Email preferences", f"{state}\n{transactional}\n{form}\n{note}")


class PreferencesPages:
    """GET and POST handlers for `<path>/{token}`; an operator's store acts for the token's tenant."""

    def __init__(self, store: EventStore, secret: bytes | list[bytes]) -> None:
        self.store = store
        self.secret = secret

    def _subject(self, request: Request) -> tuple[EventStore, str] | None:
        try:
            tenant, email = read_preferences_token(self.secret, request.path_params["token"])
        except BadToken:
            return None
        return (self.store.for_tenant(tenant) if self.store.tenant != tenant else self.store), email

    async def get(self, request: Request) -> HTMLResponse:
        found = self._subject(request)
        if found is None:
            return invalid_link()
        try:
            return show(await run_in_threadpool(preferences, *found))
        except (psycopg.Error, MailflowError):
            return try_again_later()

    async def post(self, request: Request) -> HTMLResponse:
        found = self._subject(request)
        if found is None:
            log.info("web.preferences_refused", reason="invalid token")
            return invalid_link()
        form = parse_qs((await read_body(request, MAX_BODY_BYTES)).decode("latin-1"))
        choice = form.get("campaign_mail", [""])[0]
        if choice not in ("yes", "no"):
            return show(await run_in_threadpool(preferences, *found))
        try:
            after = await run_in_threadpool(set_campaign_mail, *found, choice == "yes")
        except (psycopg.Error, MailflowError) as exc:
            log.error("web.preferences_failed", error=" ".join(str(exc).split())[:300] or type(exc).__name__)
            return try_again_later()
        log.info("web.preferences", campaign_mail=after.campaign_mail)
        return show(after, changed=True)
