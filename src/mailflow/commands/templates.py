"""Commands room: `mailflow templates` - templates: subject, HTML and text in sandboxed Jinja2."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    new_app,
    out,
    parse_json_object,
    quiet_logs,
    runtime,
)
from mailflow.errors import UsageError

app = new_app("Templates: subject, HTML and text in sandboxed Jinja2.")


def read_text_file(path: Path | None, option: str) -> str:
    """The UTF-8 text of a file argument: `-` is stdin, and any readable path will do - a
    pipe such as bash's <(...) (/dev/fd/N) or a FIFO, not only a regular file."""
    if path is None:
        return ""
    if str(path) == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise UsageError(f"no such file: {path}") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{option} {path} is a directory, not a file") from exc
    except PermissionError as exc:
        raise UsageError(f"{option} {path}: permission denied") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{option} {path} is not UTF-8 text") from exc
    except OSError as exc:
        raise UsageError(f"{option} {path} cannot be read: {exc.strerror or exc}") from exc


@app.command("create")
def templates_create(
    name: str = typer.Argument(...),
    subject: str = typer.Option(..., "--subject"),
    html: Path | None = typer.Option(None, "--html", help="File with the HTML body (- for stdin)."),
    text: Path | None = typer.Option(None, "--text", help="File with the plain-text body (- for stdin)."),
    as_json: bool = JsonOpt,
) -> None:
    """Save a template (checked: every part must compile); saving a name again replaces it."""
    from mailflow.outbound import templates

    quiet_logs()
    if html is not None and text is not None and str(html) == str(text) == "-":
        raise UsageError("only one of --html and --text can be read from stdin (-)")
    tpl = templates.Template(name, subject, read_text_file(html, "--html"), read_text_file(text, "--text"))
    templates.save(runtime().store, tpl)
    if as_json:
        emit_json({"name": name, "subject": subject, "html": bool(tpl.html), "text": bool(tpl.text)})
    else:
        out.print(f"template {name} saved")


@app.command("render")
def templates_render(
    name: str = typer.Argument(...),
    variables: str = typer.Option("{}", "--vars", help="Variables as a JSON object."),
    contact: str | None = typer.Option(None, "--contact", help="Use this contact's attributes (and email)."),
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
    from mailflow.outbound.consent import LINK_VARIABLES

    # The links each message gets (consent.links), as placeholders in a preview.
    r = templates.render(tpl, {**{v: f"<{v}>" for v in LINK_VARIABLES}, **values})
    if as_json:
        emit_json({"subject": r.subject, "html": r.html, "text": r.text})
    else:
        out.print(f"Subject: {r.subject}\n\n--- text ---\n{r.text}\n--- html ---\n{r.html}", markup=False)


@app.command("list")
def templates_list(as_json: bool = JsonOpt) -> None:
    """Saved templates."""
    from mailflow.outbound import views

    quiet_logs()
    with runtime().connect() as conn:
        rows = views.list_templates(conn)
    if as_json:
        emit_json([r.to_dict() for r in rows])
    else:
        for r in rows:
            out.print(f"{r.name:<24} {r.subject}", markup=False)


@app.command("delete")
def templates_delete(name: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Delete a template; refused while an unfinished campaign or an unsent job uses it."""
    from mailflow.outbound import templates

    quiet_logs()
    templates.delete(runtime().store, name)
    emit_json({"deleted": name}) if as_json else out.print(f"template {name} deleted", markup=False)
