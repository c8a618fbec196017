"""Outbound room: message templates - subject, HTML and text in sandboxed Jinja2.

Rendering uses Jinja2's SandboxedEnvironment (templates cannot reach Python internals)
with StrictUndefined, so a missing variable is an error rather than a silent blank. Every
error names the template, the part (subject/html/text), the line and, when it is a
missing variable, the variable.

Templates are saved (TemplateSaved) and deleted (TemplateDeleted) by name; one that an
unfinished campaign or an unsent job uses cannot be deleted.
"""

from __future__ import annotations

import functools
import re
import traceback
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment
from psycopg.rows import class_row

from mailflow.consumers import inline
from mailflow.errors import NotFoundError, UserError
from mailflow.outbound import queries as q
from mailflow.outbound import streams
from mailflow.outbound.catalog import refuse_if_in_use
from mailflow.outbound.events import TemplateDeleted, TemplateSaved

PARTS = ("subject", "html", "text")


class TemplateError(UserError):
    def __init__(self, template: str, part: str, line: int | None, message: str, variable: str | None = None) -> None:
        self.template, self.part, self.line, self.variable = template, part, line, variable
        where = f"template {template!r} {part}" + (f" line {line}" if line else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Template:
    name: str
    subject: str
    html: str = ""
    text: str = ""


@dataclass(frozen=True)
class Rendered:
    subject: str
    html: str
    text: str


_UNDEFINED = re.compile(r"'([^']+)' is undefined")


def _environment(autoescape: bool) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


_HTML_ENV = _environment(autoescape=True)
_TEXT_ENV = _environment(autoescape=False)


def _compile(tpl: Template, part: str) -> jinja2.Template:
    try:
        return _compiled(getattr(tpl, part), part == "html")
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(tpl.name, part, exc.lineno, f"syntax error: {exc.message}") from exc


@functools.lru_cache(maxsize=512)
def _compiled(source: str, html: bool) -> jinja2.Template:
    """Compiling costs ~100x rendering; a campaign renders one template per recipient."""
    return (_HTML_ENV if html else _TEXT_ENV).from_string(source)


def check(tpl: Template) -> None:
    """Compile every part; raises TemplateError on a syntax error."""
    if not tpl.subject.strip():
        raise TemplateError(tpl.name, "subject", None, "the subject is empty")
    if not tpl.html.strip() and not tpl.text.strip():
        raise TemplateError(tpl.name, "body", None, "needs an HTML or a text body (or both)")
    for part in PARTS:
        _compile(tpl, part)


def render(tpl: Template, variables: dict[str, Any]) -> Rendered:
    out: dict[str, str] = {}
    for part in PARTS:
        compiled = _compile(tpl, part)
        try:
            out[part] = compiled.render(variables)
        except jinja2.UndefinedError as exc:
            m = _UNDEFINED.search(str(exc))
            var = m.group(1) if m else None
            raise TemplateError(
                tpl.name, part, _template_line(exc), f"undefined variable {var!r}" if var else str(exc), var
            ) from exc
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(tpl.name, part, _template_line(exc), f"not allowed in a template: {exc}") from exc
        except Exception as exc:
            raise TemplateError(tpl.name, part, _template_line(exc), f"{type(exc).__name__}: {exc}") from exc
    subject = " ".join(out["subject"].split())  # one line, no header injection
    return Rendered(subject=subject, html=out["html"], text=out["text"])


def _template_line(exc: BaseException) -> int | None:
    """Jinja2 rewrites tracebacks so template frames carry the template's line numbers."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == "<template>":
            line = frame.lineno
    return line


# -- the template service -----------------------------------------------------------------


def save(store, tpl: Template) -> None:
    """Check that every part compiles, then save it (TemplateSaved)."""
    if not re.match(r"^[A-Za-z0-9_.\-]{1,100}$", tpl.name):
        raise TemplateError(tpl.name, "name", None, "use letters, digits, '.', '_' and '-' (1 to 100 characters)")
    check(tpl)
    event = TemplateSaved(name=tpl.name, subject=tpl.subject, html=tpl.html, text=tpl.text).to_new()
    inline.record(store, [(streams.template(tpl.name), event)])


def _not_found(name: str) -> NotFoundError:
    return NotFoundError(f"no template named {name!r} (see `mailflow templates list`)")


def load(conn, name: str, *, tenant: str | None = None) -> Template:
    """The template `name` of the connection's tenant (or of `tenant`, for an operator's connection)."""
    with conn.cursor(row_factory=class_row(Template)) as cur:
        tpl = cur.execute(q.GET_TEMPLATE, {"tenant": tenant, "name": name}).fetchone()
    if tpl is None:
        raise _not_found(name)
    return tpl


def delete(store, name: str) -> None:
    """Delete a template (TemplateDeleted), unless an unfinished campaign or unsent job uses it."""
    with inline.writing(store) as w:
        if w.conn.execute(q.LOCK_TEMPLATE, (name,)).fetchone() is None:
            raise _not_found(name)
        refuse_if_in_use(w.conn, "template", name)
        w.record([(streams.template(name), TemplateDeleted(name=name).to_new())])
