"""Outbound room: the segment filter language, compiled to parameterized SQL.

A segment is a JSON filter in the style of MongoDB queries (as Keila uses), evaluated over
contacts. Users never write SQL: every value becomes a query parameter and every field
name is checked against a fixed list, so a filter cannot inject anything.

    {"status": "active",
     "attributes.country": {"$in": ["NL", "BE"]},
     "attributes.age": {"$gte": 18},
     "$or": [{"attributes.plan": "pro"}, {"email": {"$contains": "@example.org"}}]}

Fields: email, domain (the part after @), status, created_at, attributes.<key>[.<key>...].
Operators: $eq $ne $gt $gte $lt $lte $in $nin $exists $contains, and $and $or $not.
A bare value means $eq; several fields in one object are ANDed. See docs/segments.md.

Segments are saved (SegmentDefined) and deleted (SegmentDeleted) by name; one that an
unfinished campaign uses cannot be deleted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from mailflow.consumers import inline
from mailflow.errors import NotFoundError, UserError
from mailflow.outbound import queries as q
from mailflow.outbound import streams
from mailflow.outbound.catalog import refuse_if_in_use
from mailflow.outbound.events import SegmentDefined, SegmentDeleted

CORE_FIELDS: dict[str, tuple[str, str]] = {
    # name: (SQL expression, kind)
    "email": ("email", "text"),
    "domain": ("split_part(email, '@', 2)", "text"),
    "status": ("status", "text"),
    "created_at": ("created_at", "time"),
}
STATUSES = ("active", "unsubscribed", "bounced", "complained")
COMPARISONS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
OPERATORS = {"$eq", "$ne", "$in", "$nin", "$exists", "$contains", *COMPARISONS}
_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_DEPTH = 8
MAX_NODES = 200


class SegmentError(UserError):
    """The filter is not valid; the message says where (a JSON path) and why."""


@dataclass
class Compiled:
    where: sql.Composable
    params: list[Any]


class _Compiler:
    def __init__(self) -> None:
        self.params: list[Any] = []
        self.nodes = 0

    def param(self, value: Any) -> sql.Composable:
        self.params.append(value)
        return sql.SQL("%s")

    def node(self, where: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SegmentError(f"filter too large (more than {MAX_NODES} conditions)")
        if depth > MAX_DEPTH:
            raise SegmentError(f"{where}: filter nested deeper than {MAX_DEPTH} levels")

    def document(self, doc: Any, where: str, depth: int) -> sql.Composable:
        self.node(where, depth)
        if not isinstance(doc, dict):
            raise SegmentError(f"{where}: expected an object of conditions, got {type(doc).__name__}")
        if not doc:
            return sql.SQL("TRUE")
        parts: list[sql.Composable] = []
        for key, value in doc.items():
            here = f"{where}.{key}"
            if key in ("$and", "$or"):
                if not isinstance(value, list) or not value:
                    raise SegmentError(f"{here}: expected a non-empty list of filters")
                subs = [self.document(v, f"{here}[{i}]", depth + 1) for i, v in enumerate(value)]
                joiner = sql.SQL(" AND " if key == "$and" else " OR ")
                parts.append(sql.SQL("({})").format(joiner.join(subs)))
            elif key == "$not":
                parts.append(sql.SQL("NOT ({})").format(self.document(value, here, depth + 1)))
            elif key.startswith("$"):
                raise SegmentError(f"{here}: unknown operator {key!r} at this level (use $and, $or, $not)")
            else:
                parts.append(self.field(key, value, here, depth + 1))
        return sql.SQL("({})").format(sql.SQL(" AND ").join(parts)) if len(parts) > 1 else parts[0]

    def field(self, name: str, cond: Any, where: str, depth: int) -> sql.Composable:
        self.node(where, depth)
        if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            tests = [self.operator(name, op, val, f"{where}.{op}") for op, val in cond.items()]
            return sql.SQL("({})").format(sql.SQL(" AND ").join(tests)) if len(tests) > 1 else tests[0]
        return self.operator(name, "$eq", cond, where)

    def operator(self, name: str, op: str, value: Any, where: str) -> sql.Composable:
        if op not in OPERATORS:
            raise SegmentError(f"{where}: unknown operator {op!r}; known: {', '.join(sorted(OPERATORS))}")
        if name in CORE_FIELDS:
            return self.core(name, op, value, where)
        if name.startswith("attributes."):
            path = name.split(".")[1:]
            for key in path:
                if not _KEY.match(key):
                    raise SegmentError(f"{where}: attribute name {key!r} may only use letters, digits, _ and -")
            return self.attribute(path, op, value, where)
        raise SegmentError(f"{where}: unknown field {name!r}; use {', '.join(CORE_FIELDS)} or attributes.<name>")

    # -- core columns ----------------------------------------------------------------------

    def core(self, name: str, op: str, value: Any, where: str) -> sql.Composable:
        expr, kind = CORE_FIELDS[name]
        col = sql.SQL(expr)
        if op == "$exists":
            return sql.SQL("TRUE") if value else sql.SQL("FALSE")
        if op in ("$in", "$nin"):
            if not isinstance(value, list) or not value:
                raise SegmentError(f"{where}: {op} needs a non-empty list")
            vals = [self.core_value(name, kind, v, where) for v in value]
            test = sql.SQL("{} = ANY({})").format(col, self.param(vals))
            return test if op == "$in" else sql.SQL("NOT ({})").format(test)
        v = self.core_value(name, kind, value, where)
        if op == "$contains":
            if kind != "text":
                raise SegmentError(f"{where}: $contains works on text fields")
            return sql.SQL("strpos(lower({}), lower({})) > 0").format(col, self.param(v))
        if op == "$eq":
            return sql.SQL("{} = {}").format(col, self.param(v))
        if op == "$ne":
            return sql.SQL("{} <> {}").format(col, self.param(v))
        return sql.SQL("{} {} {}").format(col, sql.SQL(COMPARISONS[op]), self.param(v))

    def core_value(self, name: str, kind: str, value: Any, where: str) -> Any:
        if kind == "time":
            if not isinstance(value, str):
                raise SegmentError(f"{where}: {name} takes an ISO 8601 date or time string")
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError as exc:
                raise SegmentError(f"{where}: {value!r} is not an ISO 8601 date or time") from exc
        if not isinstance(value, str):
            raise SegmentError(f"{where}: {name} takes a string, got {type(value).__name__}")
        if name == "status" and value not in STATUSES:
            raise SegmentError(f"{where}: status is one of {', '.join(STATUSES)}")
        return value

    # -- attributes (jsonb) ------------------------------------------------------------------

    def attribute(self, path: list[str], op: str, value: Any, where: str) -> sql.Composable:
        # The path appears several times in one test, so it is a literal (its keys were
        # checked against _KEY above and psycopg quotes it), not a positional parameter.
        at = sql.SQL("(attributes #> {}::text[])").format(sql.Literal(path))
        if op == "$exists":
            return sql.SQL("{} IS {} NULL").format(at, sql.SQL("NOT" if value else ""))
        if op in ("$eq", "$ne"):
            self.check_json_scalar(value, where, allow_list=True)
            # $ne also matches contacts without the attribute (IS DISTINCT FROM).
            same = "{} = {}::jsonb" if op == "$eq" else "({} IS DISTINCT FROM {}::jsonb)"
            return sql.SQL(same).format(at, self.param(Jsonb(value)))
        if op in ("$in", "$nin"):
            if not isinstance(value, list) or not value:
                raise SegmentError(f"{where}: {op} needs a non-empty list")
            for v in value:
                self.check_json_scalar(v, where)
            test = sql.SQL("coalesce({} = ANY({}::jsonb[]), false)").format(at, self.param([Jsonb(v) for v in value]))
            return test if op == "$in" else sql.SQL("NOT {}").format(test)
        if op == "$contains":
            self.check_json_scalar(value, where)
            # Arrays: membership. Strings: case-insensitive substring.
            return sql.SQL(
                "(CASE jsonb_typeof({at}) WHEN 'array' THEN {at} @> jsonb_build_array({v}::jsonb) "
                "WHEN 'string' THEN strpos(lower({at} #>> '{{}}'), lower({s})) > 0 ELSE false END)"
            ).format(at=at, v=self.param(Jsonb(value)), s=self.param(str(value)))
        # $gt/$gte/$lt/$lte: numbers compare as numbers, strings as text; other types never match.
        cmp = sql.SQL(COMPARISONS[op])
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SegmentError(f"{where}: {op} compares numbers or strings")
        if isinstance(value, str):
            return sql.SQL(
                "(CASE WHEN jsonb_typeof({at}) = 'string' THEN ({at} #>> '{{}}') {cmp} {v} ELSE false END)"
            ).format(at=at, cmp=cmp, v=self.param(value))
        return sql.SQL(
            "(CASE WHEN jsonb_typeof({at}) = 'number' THEN ({at} #>> '{{}}')::numeric {cmp} {v} ELSE false END)"
        ).format(at=at, cmp=cmp, v=self.param(value))

    @staticmethod
    def check_json_scalar(value: Any, where: str, allow_list: bool = False) -> None:
        ok = (str, int, float, bool, type(None)) + ((list,) if allow_list else ())
        if not isinstance(value, ok):
            raise SegmentError(f"{where}: expected a string, number, boolean or null")


def compile_filter(doc: Any) -> Compiled:
    """Compile a filter document to a WHERE clause over `contacts` and its parameters."""
    c = _Compiler()
    where = c.document(doc, "$", 0)
    return Compiled(where, c.params)


# -- the segment service ------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not re.match(r"^[A-Za-z0-9_.\-]{1,100}$", name):
        raise SegmentError("a segment name uses letters, digits, '.', '_' and '-' (1 to 100 characters)")


def define(store, name: str, doc: dict[str, Any]) -> None:
    """Validate and save a segment (SegmentDefined); redefining a name replaces its filter."""
    _check_name(name)
    compiled = compile_filter(doc)
    with inline.reading(store) as conn:  # prove it runs before saving it
        conn.execute(sql.SQL("EXPLAIN SELECT 1 FROM contacts WHERE {}").format(compiled.where), compiled.params)
    inline.record(store, [(streams.segment(name), SegmentDefined(name=name, filter=doc).to_new())])


def _not_found(name: str) -> NotFoundError:
    return NotFoundError(f"no segment named {name!r} (see `mailflow segments list`)")


def load(conn, name: str) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.GET_SEGMENT, (name,)).fetchone()
    if row is None:
        raise _not_found(name)
    return row["filter"]


def delete(store, name: str) -> None:
    """Delete a segment (SegmentDeleted), unless an unfinished campaign uses it (ConflictError)."""
    with inline.writing(store) as w:
        if w.conn.execute(q.LOCK_SEGMENT, (name,)).fetchone() is None:
            raise _not_found(name)
        refuse_if_in_use(w.conn, "segment", name)
        w.record([(streams.segment(name), SegmentDeleted(name=name).to_new())])


@dataclass
class Preview:
    count: int
    sample: list[dict[str, Any]]


def preview(conn, doc: dict[str, Any], sample: int = 10) -> Preview:
    compiled = compile_filter(doc)
    with conn.cursor(row_factory=dict_row) as cur:
        count = cur.execute(sql.SQL(q.COUNT_CONTACTS).format(where=compiled.where), compiled.params).fetchone()["count"]
        rows = cur.execute(sql.SQL(q.LIST_CONTACTS).format(where=compiled.where), [*compiled.params, sample]).fetchall()
    return Preview(count=int(count), sample=[{**r, "created_at": r["created_at"].isoformat()} for r in rows])
