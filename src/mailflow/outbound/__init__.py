"""Outbound room: contacts, segments, templates, senders, campaigns, jobs, MIME and SMTP out."""
