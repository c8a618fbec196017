"""Inbound room: the SMTP server for the domains and mailboxes mailflow manages - who may be
mailed here (policy), durable acceptance with group commits (store), the server (server).

Importing the room registers its inline projection (domains, mailboxes, received messages).
"""

from mailflow.inbound import directory  # noqa: F401 - registers the inline projection
