"""schemathesis against a live `mailflow web`: every operation of the OpenAPI document fuzzed
with a valid admin key (positive and negative data); no answer may be a 5xx, and every answer
must match the documented status codes, content types and schemas."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mailflow.outbound import sending, templates
from mailflow.outbound.senders import Sender
from mailflow.tenants import keys

from .conftest import wait_until
from .servers import free_port

pytestmark = pytest.mark.process

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def _schemathesis() -> str:
    found = Path(sys.executable).with_name("schemathesis")
    return str(found) if found.exists() else shutil.which("schemathesis") or "schemathesis"


def test_schemathesis_finds_no_server_error_and_no_answer_that_breaks_the_schema(store, env, procs, tmp_path):
    sending.save_sender(store, Sender("tx", "noreply@example.org", "Example", "smtp://127.0.0.1:9"))
    templates.save(store, templates.Template("welcome", "Hi {{ name }}", "<p>Hi</p>", "Hi"))
    _, token = keys.create(store, "fuzz", ["admin"])
    port = free_port()
    web_env = {**env, "MAILFLOW_API_RATE_PER_KEY": "100000", "MAILFLOW_API_RATE_PER_TENANT": "100000"}
    web = procs.start("web", "--port", str(port), env=web_env)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(f"{base}/healthz"), timeout=30, what="mailflow web")
    examples = os.environ.get("MAILFLOW_FUZZ_EXAMPLES", "25")
    run = subprocess.run(
        [
            _schemathesis(),
            "run",
            f"{base}/api/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--checks",
            CHECKS,
            "--max-examples",
            examples,
            "--seed",
            os.environ.get("MAILFLOW_FUZZ_SEED", "20261202"),
            # One worker: hypothesis parses code with `ast` in each, and CPython 3.11's ast is not
            # thread-safe ("AST constructor recursion depth mismatch", fixed in 3.12).
            "--workers",
            "1",
            "--no-color",
            "--generation-database",
            "none",
            "--report-dir",
            str(tmp_path / "report"),
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    (Path(os.environ.get("MAILFLOW_FUZZ_LOG", tmp_path / "fuzz.log"))).write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:] + procs.log_of(web)[-3000:]
    assert "passed" in run.stdout.lower()


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
