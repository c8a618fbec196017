"""Commands room: `mailflow templates` - templates: subject, HTML and text in sandboxed Jinja2."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mailflow.commands.base import (
    new_app,
    JsonOpt, emit_json, out, parse_json_object, quiet_logs, runtime,
)
from mailflow.errors import UsageError

app = new_app("Templates: subject, HTML and text in sandboxed Jinja2.")


def _read_text(path: Optional[Path]) -> str:
    if path is None:
        return ""
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    return path.read_text(encoding="utf-8")


@app.command("create")
def templates_create(
    name: str = typer.Argument(...),
    subject: str = typer.Option(..., "--subject"),
    html: Optional[Path] = typer.Option(None, "--html", help="File with the HTML body."),
    text: Optional[Path] = typer.Option(None, "--text", help="File with the plain-text body."),
    as_json: bool = JsonOpt,
) -> None:
    """Save a template (checked: every part must compile); saving a name again replaces it."""
    from mailflow.outbound import templates

    quiet_logs()
    tpl = templates.Template(name, subject, _read_text(html), _read_text(text))
    templates.save(runtime().store, tpl)
    if as_json:
        emit_json({"name": name, "subject": subject, "html": bool(tpl.html), "text": bool(tpl.text)})
    else:
        out.print(f"template {name} saved")


@app.command("render")
def templates_render(
    name: str = typer.Argument(...),
    variables: str = typer.Option("{}", "--vars", help="Variables as a JSON object."),
    contact: Optional[str] = typer.Option(None, "--contact", help="Use this contact's attributes (and email)."),
    as_json: bool = JsonOpt,
) -> None:
    """Render a template with variables (or a contact's attributes) to check it."""
    from mailflow.outbound import segments, templates

    quiet_logs()
    values = parse_json_object(variables, "--vars")
    with runtime().connect() as conn:
        tpl = templates.load(conn, name)
        if contact:
            pv = segments.preview(conn, {"email": contact.strip().lower()}, sample=1)
            if not pv.sample:
                raise UsageError(f"no contact {contact!r}")
            values = {**pv.sample[0]["attributes"], "email": pv.sample[0]["email"], **values}
    r = templates.render(tpl, values)
    if as_json:
        emit_json({"subject": r.subject, "html": r.html, "text": r.text})
    else:
        out.print(f"Subject: {r.subject}\n\n--- text ---\n{r.text}\n--- html ---\n{r.html}", markup=False)


@app.command("list")
def templates_list(as_json: bool = JsonOpt) -> None:
    """Saved templates."""
    from mailflow.outbound import queries as oq

    quiet_logs()
    with runtime().connect() as conn:
        rows = [{"name": n, "subject": s_, "updated_at": u.isoformat()} for n, s_, u in conn.execute(oq.LIST_TEMPLATES)]
    if as_json:
        emit_json(rows)
    else:
        for r in rows:
            out.print(f"{r['name']:<24} {r['subject']}", markup=False)
