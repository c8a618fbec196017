"""API room: cursor pagination - a listing returns `items` and `next_cursor`; passing the cursor
back returns the next page. A cursor is the sort key of the last item, opaque to the client
(base64url JSON), so pages stay right while rows are added (no OFFSET that shifts)."""

from __future__ import annotations

import base64
from typing import Any, Generic, TypeVar

import orjson
from fastapi import Query
from pydantic import BaseModel

from mailflow.errors import UserError

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


def encode(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode().rstrip("=")


def decode(cursor: str | None, arity: int) -> list[Any] | None:
    if not cursor:
        return None
    try:
        key = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise UserError("cursor is not one this API gave out") from None
    if not isinstance(key, list) or len(key) != arity or not all(isinstance(k, str | int | float) for k in key):
        raise UserError("cursor is not one this API gave out")
    return key


def keyset(cursor: str | None, *kinds: type) -> list[Any] | None:
    """The sort key in a cursor, each part of the kind given (a str part without NUL): a cursor
    this API did not make is UserError (422), never a failed query."""
    key = decode(cursor, len(kinds))
    if key is not None and not all(type(k) is kind and "\x00" not in str(k) for k, kind in zip(key, kinds)):
        raise UserError("cursor is not one this API gave out")
    return key


LimitQuery = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Items per page.")
CursorQuery = Query(None, max_length=500, description="The `next_cursor` of the previous page.")


def page(rows: list[Any], limit: int, key: Any) -> tuple[list[Any], str | None]:
    """The first `limit` of `rows` (fetched limit + 1) and the cursor after them, if more exist."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode(key(rows[-1]))
