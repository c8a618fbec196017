"""Mail room: signed tokens for VERP return paths and one-click unsubscribe links.

A token is base64url(payload) "." base64url(HMAC-SHA256(secret, payload)[:12]). Nothing is
stored: a bounce or an unsubscribe request proves itself by its signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

from mailflow.errors import BadToken
from mailflow.infra.vault import Keyring

_SIG_BYTES = 12


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: bytes, payload: str) -> str:
    body = payload.encode()
    mac = hmac.new(secret, body, hashlib.sha256).digest()[:_SIG_BYTES]
    return f"{_b64(body)}.{_b64(mac)}"


def verify(secret: bytes | list[bytes], token: str) -> str:
    """The payload of a genuine token, signed with `secret` (or any key of a keyring, newest
    first: links sent before a key rotation still work); BadToken otherwise."""
    try:
        body_b64, mac_b64 = token.split(".", 1)
        body, mac = _unb64(body_b64), _unb64(mac_b64)
    except (ValueError, TypeError) as exc:
        raise BadToken("malformed token") from exc
    for key in [secret] if isinstance(secret, bytes) else secret:
        expected = hmac.new(key, body, hashlib.sha256).digest()[:_SIG_BYTES]
        if hmac.compare_digest(mac, expected):
            return body.decode()
    raise BadToken("token signature does not match")


def load_secret(home: Path, configured: str | None = None) -> bytes:
    """The newest key of the keyring (infra/vault.py): the key that signs new tokens."""
    return Keyring.load(home, configured).signing_key


def verp_address(secret: bytes, job_id: str, domain: str, local: str = "bounces") -> str:
    """bounces+<token>@domain: a bounce to this address names its job, and proves it."""
    return f"{local}+{sign(secret, job_id)}@{domain}"


def job_from_verp(secret: bytes | list[bytes], address: str) -> str:
    local = address.split("@", 1)[0]
    if "+" not in local:
        raise BadToken(f"{address!r} is not a VERP address")
    return verify(secret, local.split("+", 1)[1])
