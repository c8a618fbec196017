"""Outbound room: contacts, segments, templates, senders, campaigns, jobs and their read models, MIME and SMTP out.

Importing the room registers its inline projections (the catalogue, the jobs table, what came back,
sending domains) on the one write path, so no writer can append an outbound event without applying it.
"""

from mailflow.outbound import catalog, domains, feedback, jobs  # noqa: F401 - registers the inline projections
