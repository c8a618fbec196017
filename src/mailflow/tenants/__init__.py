"""Tenants room: who owns what - tenants and their limits, API keys (keys.py), the users of the
browser pages and their sessions (users.py).

Importing the room registers its inline projections (tenants, api_keys, users) on the write path.
"""

from mailflow.tenants import keys, registry, users  # noqa: F401 - register their inline projections
