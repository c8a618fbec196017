"""Tenants room: who owns what - tenants and their limits (and, as they come, secrets, keys,
users and consent).

Importing the room registers its inline projection (the tenants table) on the write path.
"""

from mailflow.tenants import registry  # noqa: F401 - registers the inline projection
