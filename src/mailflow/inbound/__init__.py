"""Inbound room: the SMTP server for the domains and mailboxes mailflow manages - who may be
mailed here (policy), what a message is (authn, spam, defects), where it goes (routing),
durable acceptance with group commits (store), the server (server), and what became of each
message after its 250 (mailbox).

Importing the room registers its inline projections (domains and mailboxes; routes;
received messages, their mailboxes and the quarantine; conversation threads; webhook
endpoints).
"""

from mailflow.inbound import directory, mailbox, threads_projection, webhooks  # noqa: F401 - registers the inline projections
