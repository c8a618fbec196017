"""Inbound room, classification: readers for what bounces are written in - the shared small
readers and RFC 3464 field blocks (fields.py), the prose of MTAs that write no fields
(text.py), Amazon SES JSON notices (sesjson.py), and what some services' reports mean
(providers.py). bounce.py decides which to ask."""
