"""Classification benchmark: mailflow's bounce classifier against sisimai's verdicts and flufl.bounce.

Run `python bench/classify.py --json` (one JSON object on stdout; progress on stderr). It runs
`mailflow inbound classify --json FILE...` once over every file of the shared sisimai corpus
(../shared/corpus/bounces-sisimai), or, while that command does not exist yet, calls
`mailflow.inbound.classify.classify(raw)` (else `bounce.parse`) in process. It then compares:

- with expected.json (sisimai's verdicts for the labelled files, one row per bounced
  recipient, compared by position): kind_accuracy, reason_agreement, hard_agreement,
  status_agreement;
- speed: ms_per_message is classify() in process; cli_ms_per_message the CLI run's wall time;
- with flufl.bounce run on the same files in the same run: bounces_with_address (bounce
  files where at least one recipient address was found) for both.

`--misses` also prints every disagreeing row (file, row, expected vs got) on stderr.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import finish, rnd, say

GOALS: dict[str, tuple[str, float]] = {
    "kind_accuracy": (">=", 0.99),
    "reason_agreement": (">=", 0.95),
    "hard_agreement": (">=", 0.98),
    "status_agreement": (">=", 0.97),
    "bounces_with_address": (">=", 0.99),
    "ms_per_message": ("<", 5),
}
_SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "bounces-sisimai"
_COPY = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "corpus" / "bounces-sisimai"
CORPUS = _SHARED if (_SHARED / "expected.json").exists() else _COPY  # the copy holds the same files


@dataclass
class Params:
    corpus: str = str(CORPUS.resolve())
    runner: str = "auto"  # auto | cli | in_process


def expected_kind(name: str) -> str:
    if name.startswith("arf-"):
        return "complaint"
    if name.startswith("rfc3834-"):
        return "auto_reply"
    return "bounce"


def run_cli(files: list[Path]) -> tuple[dict[str, dict[str, Any]], float] | None:
    """One `mailflow inbound classify --json` over all files: results by file stem, seconds."""
    cmd = [sys.executable, "-m", "mailflow.cli", "inbound", "classify", "--json", *map(str, files)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"mailflow inbound classify failed to run: {exc}")
        return None
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        say(f"mailflow inbound classify exited {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}")
        return None
    out: dict[str, dict[str, Any]] = {}
    for line in done.stdout.splitlines():
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(row, dict) and "file" in row:
            out[Path(str(row["file"])).stem] = row
    if not out:
        say("mailflow inbound classify printed no results")
        return None
    return out, seconds


def run_in_process(files: list[Path]) -> tuple[dict[str, dict[str, Any]], float, str]:
    from mailflow.inbound.classify import classify

    def dispatcher(raw: bytes) -> dict[str, Any]:
        return classify(raw).to_dict()

    def parser_only(raw: bytes) -> dict[str, Any]:
        from mailflow.inbound.classify import bounce

        found = bounce.parse(email.message_from_bytes(raw, policy=email.policy.compat32))
        if found is None:
            return {"kind": "other", "recipients": []}
        return {
            "kind": "bounce",
            "recipients": [r.to_dict() for r in found.recipients],
            "original_message_id": found.original.message_id,
        }

    how, fn = "classify()", dispatcher
    try:
        fn(files[0].read_bytes())
    except NotImplementedError:
        how, fn = "bounce.parse()", parser_only
    raws = {f.stem: f.read_bytes() for f in files}
    t0 = time.perf_counter()
    out = {name: fn(raw) for name, raw in raws.items()}
    return out, time.perf_counter() - t0, how


def run_flufl(files: list[Path]) -> tuple[dict[str, int], float]:
    from flufl.bounce import all_failures

    found: dict[str, int] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            msg = email.message_from_bytes(f.read_bytes(), policy=email.policy.compat32)
            try:
                permanent, temporary = all_failures(msg)
                found[f.stem] = len(set(permanent) | set(temporary))
            except Exception:  # noqa: BLE001 - a library's crash counts as nothing found
                found[f.stem] = 0
    return found, time.perf_counter() - t0


def compare(
    results: dict[str, dict[str, Any]], expected: dict[str, list[dict[str, Any]]], names: list[str]
) -> tuple[dict[str, Any], list[str]]:
    counts = dict.fromkeys(("kind_ok", "kind_n", "rows", "reason_ok", "hard_ok", "status_ok"), 0)
    misses: list[str] = []
    for name in names:
        if name not in expected:
            continue
        got = results.get(name, {})
        want_kind = expected_kind(name)
        counts["kind_n"] += 1
        counts["kind_ok"] += got.get("kind") == want_kind
        if got.get("kind") != want_kind:
            misses.append(f"{name}: kind expected {want_kind} got {got.get('kind')}")
        rows = got.get("recipients") or []
        for i, want in enumerate(expected[name]):
            counts["rows"] += 1
            have = rows[i] if i < len(rows) else {}
            ok_reason = have.get("reason") == want["reason"]
            ok_hard = have.get("hard") == want["hardbounce"]
            ok_status = (have.get("status") or "") == want["status"]
            counts["reason_ok"] += ok_reason
            counts["hard_ok"] += ok_hard
            counts["status_ok"] += ok_status
            if not (ok_reason and ok_hard and ok_status):
                misses.append(
                    f"{name}[{i}]: expected {want['reason']}/{want['status']}/{want['replycode']}/"
                    f"{'hard' if want['hardbounce'] else 'soft'} got {have.get('reason')}/{have.get('status')}/"
                    f"{have.get('reply_code')}/{'hard' if have.get('hard') else 'soft'} "
                    f"{have.get('address')} | {str(have.get('diagnostic', ''))[:160]}"
                )
        if len(rows) != len(expected[name]):
            misses.append(f"{name}: {len(expected[name])} rows expected, {len(rows)} found")
    return counts, misses


def run(p: Params, show_misses: bool) -> dict[str, Any]:
    elapsed: dict[str, float] = {}
    t_total = time.perf_counter()
    load_start = os.getloadavg()[0]
    corpus = Path(p.corpus)
    files = sorted(corpus.glob("*.eml"))
    expected: dict[str, list[dict[str, Any]]] = orjson.loads((corpus / "expected.json").read_bytes())
    names = [f.stem for f in files]
    runner = None
    if p.runner in ("auto", "cli"):
        say(f"mailflow inbound classify --json over {len(files)} files ...")
        runner = run_cli(files)
    if runner is not None:
        results, seconds = runner
        how = "mailflow inbound classify --json (one process, start-up included)"
    else:
        say("falling back to classifying in process")
        results, seconds, how = run_in_process(files)
        how = f"in process: {how}"
    elapsed["mailflow"] = round(seconds, 2)
    cli_seconds = seconds if runner is not None else None
    if runner is not None:  # the classifier's own cost, without the CLI's interpreter start-up
        _, seconds, _ = run_in_process(files)
        elapsed["in_process"] = round(seconds, 2)
    flufl, flufl_seconds = run_flufl(files)
    elapsed["flufl"] = round(flufl_seconds, 2)
    counts, misses = compare(results, expected, names)
    bounces = [n for n in names if expected_kind(n) == "bounce"]
    with_address = sum(1 for n in bounces if any(r.get("address") for r in results.get(n, {}).get("recipients") or []))
    flufl_with = sum(1 for n in bounces if flufl.get(n, 0) > 0)
    complaints = [n for n in names if expected_kind(n) == "complaint"]
    autos = [n for n in names if expected_kind(n) == "auto_reply"]

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    out: dict[str, Any] = {
        "runner": how,
        "files": len(files),
        "labelled_files": counts["kind_n"],
        "labelled_rows": counts["rows"],
        "kind_accuracy": ratio(counts["kind_ok"], counts["kind_n"]),
        "kind_correct": counts["kind_ok"],
        "reason_agreement": ratio(counts["reason_ok"], counts["rows"]),
        "reason_agreeing_rows": counts["reason_ok"],
        "hard_agreement": ratio(counts["hard_ok"], counts["rows"]),
        "hard_agreeing_rows": counts["hard_ok"],
        "status_agreement": ratio(counts["status_ok"], counts["rows"]),
        "status_agreeing_rows": counts["status_ok"],
        "bounce_files": len(bounces),
        "bounces_with_address": ratio(with_address, len(bounces)),
        "bounces_with_address_count": with_address,
        "flufl_bounces_with_address": ratio(flufl_with, len(bounces)),
        "flufl_bounces_with_address_count": flufl_with,
        "complaints_found": sum(1 for n in complaints if results.get(n, {}).get("kind") == "complaint"),
        "complaint_files": len(complaints),
        "auto_replies_found": sum(1 for n in autos if results.get(n, {}).get("kind") == "auto_reply"),
        "auto_reply_files": len(autos),
        "ms_per_message": rnd(seconds * 1000 / len(files), 3),
        "cli_ms_per_message": rnd(cli_seconds * 1000 / len(files), 3) if cli_seconds is not None else None,
        "flufl_ms_per_message": rnd(flufl_seconds * 1000 / len(files), 3),
        "misses": len(misses),
    }
    if show_misses:
        for line in misses:
            print(line, file=sys.stderr)
    notes = {
        "agreement": "per expected row, by position within its file; a missing row counts as a disagreement",
        "ms_per_message": "classify() in process over all files (read beforehand), divided by the files",
        "cli_ms_per_message": "the one `mailflow inbound classify --json` run's wall time (start-up included) per file",
        "flufl": "flufl.bounce all_failures() (permanent and temporary) on the same files, in process",
    }
    return finish(out, GOALS, p, notes, load_start, elapsed, t_total)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--misses", action="store_true", help="print the disagreeing rows on stderr")
    ap.add_argument("--corpus", default=None, help="the corpus folder (default ../shared/corpus/bounces-sisimai)")
    ap.add_argument("--runner", choices=("auto", "cli", "in_process"), default="auto")
    args = ap.parse_args(argv)
    p = Params(runner=args.runner)
    if args.corpus:
        p.corpus = args.corpus
    res = run(p, args.misses)
    if args.json:
        sys.stdout.write(orjson.dumps(res).decode() + "\n")
    else:
        for k, v in res.items():
            if not isinstance(v, dict | list):
                print(f"{k:<34} {v}")
        for name, goal in res.get("goals", {}).items():
            print(f"{name:<34} goal {goal['goal']}: {'ok' if goal['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
