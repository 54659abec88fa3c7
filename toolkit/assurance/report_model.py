"""The posture report's model: threats -> controls -> tests -> results, for one host.

`build()` is pure: it joins the registry (threats, controls), the test index (control markers
read from the test files), one pytest run's results (toolkit.assurance.pytest_verify) and the
outside auditors' figures into a model; each control's and threat's status, and each auditor's
result under its control, are decided in toolkit/controls (posture_status, auditors).
`changes()` compares a model with the previous run's. The JSON file of a run is this model, so
tools and the reader see the same thing; `SCHEMA_VERSION` changes when a key changes meaning or
goes. A run fails when any applicable control failed, any test failed, or nothing could be
tested.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from toolkit.controls import ci_record, registry
from toolkit.controls.auditors import MISSED
from toolkit.controls.posture_status import (
    STATUSES,
    TEST_BAD,
    THREAT_STATUSES,
    control_statuses,
    short_nodeid,
    threat_statuses,
)
from toolkit.controls.registry import Registry, TestRef

# 2: provenance, signature, per-control proof, threat notes and residual conditions,
# procedures, changes since the previous run (1 had no schema_version key).
SCHEMA_VERSION = 2


def build(
    reg: Registry,
    refs: list[TestRef],
    run: dict[str, Any],
    *,
    host: str,
    kind: str,
    target: str,
    keyword: str | None = None,
    auditors: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
    generated: str | None = None,
    ci: ci_record.Evidence | None = None,
) -> dict[str, Any]:
    """The report model for one host; `previous` is the last run's model on that host; `ci`
    the CI record that may vouch for controls only the toolkit's own tests can prove."""
    results: list[dict[str, Any]] = run.get("tests", [])
    controls = control_statuses(reg, refs, results, kind, keyword, ci, auditors)
    threats = threat_statuses(reg, controls)
    procedures = _procedures(reg, kind)
    known = set(reg.controls)
    unmapped = [r for r in results if not r["controls"] or not set(r["controls"]) & known]
    counts = {s: 0 for s in STATUSES}
    for c in controls.values():
        counts[c["status"]] += 1
    tcounts: dict[str, int] = {}
    for r in results:
        tcounts[r["outcome"]] = tcounts.get(r["outcome"], 0) + 1
    threat_counts = {s: 0 for s in THREAT_STATUSES}
    for entry in threats:
        threat_counts[entry["status"]] += 1
    problems = _problems(run, results, counts)
    warnings = _warnings(run, counts, ci)
    warnings += [f"{e['control']}: {e['text']}: an outside auditor misses the threshold of the "
                 "control (its tests decide its status)"
                 for c in controls.values() for e in c["auditors"] if e["result"] == MISSED]
    facts = run.get("host_facts") or {}
    prov = dict(provenance or {})
    skew = clock_skew(prov.get("started"), facts.get("clock"), run.get("duration"))
    if skew:
        warnings.append(skew)
    prov["host_facts"] = facts
    prov["ci_record"] = (ci or ci_record.Evidence()).as_dict()
    model: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "host": host,
        "kind": kind,
        "target": target,
        "generated": generated or dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration": run.get("duration"),
        "keyword": keyword,
        "ok": not problems,
        "verdict": "PASS" if not problems else "FAIL",
        "problems": problems,
        "warnings": warnings,
        "provenance": prov,
        "signature": {"signed": False, "reason": "not requested"},
        "summary": {
            "controls": counts,
            "tests": tcounts,
            "threats": {"total": len(threats), **threat_counts},
        },
        "threats": threats,
        "controls": controls,
        "procedures": procedures,
        "unmapped_tests": unmapped,
        "collect_errors": run.get("collect_errors", []),
        "auditors": auditors,
    }
    model["changes"] = changes(previous, model)
    return model


def _procedures(reg: Registry, kind: str) -> list[dict[str, Any]]:
    """The controls carried out by people, and whether each applies to this kind of host."""
    return [
        {
            "id": c.id,
            "title": c.title,
            "owner": c.owner,
            "frequency": c.frequency,
            "evidence": c.evidence,
            "where": c.where,
            "applies_to": c.applies_to,
            "applies_here": c.applies(kind),
            "threats": [t.id for t in reg.threats_of(c.id)],
            "procedure": c.procedure or "",
        }
        for c in sorted(reg.controls.values(), key=lambda c: registry.id_key(c.id))
        if c.kind == "procedure"
    ]


def _problems(run: dict[str, Any], results: list[dict[str, Any]], counts: dict[str, int]
              ) -> list[str]:
    """Why the run fails (none: it passes)."""
    failing_tests = [r for r in results if r["outcome"] in TEST_BAD]
    problems: list[str] = []
    if counts["failed"]:
        problems.append(f"{counts['failed']} applicable control(s) failed")
    if failing_tests:
        problems.append(f"{len(failing_tests)} test(s) failed or errored")
    for err in run.get("collect_errors", []):
        problems.append(f"collection error in {err['nodeid'] or 'the suite'}")
    if run.get("error"):
        problems.append(str(run["error"]))
    elif not results:
        problems.append("no posture test ran")
    return problems


def _warnings(run: dict[str, Any], counts: dict[str, int], ci: ci_record.Evidence | None
              ) -> list[str]:
    """What a reader should know that does not fail the run."""
    warnings: list[str] = []
    if counts["undefined"]:
        warnings.append(
            f"{counts['undefined']} control(s) named by threats are not defined in "
            "threat-model/controls/ (run `invoke threat-model.check`)"
        )
    if counts["untested"]:
        warnings.append(f"{counts['untested']} applicable control(s) have no test at all")
    if counts["claimed"]:
        warnings.append(
            f"{counts['claimed']} control(s) rest on the toolkit's CI tests, but "
            f"{(ci or ci_record.Evidence()).why}")
    facts = run.get("host_facts") or {}
    if facts.get("error"):
        warnings.append(f"host facts could not be read: {facts['error']}")
    return warnings


# The host's clock is read at the start of the run; the controller's when verify started.
# Beyond this, log times on the host (audit, signer) cannot be matched with the world's.
CLOCK_TOLERANCE_S = 300


def clock_skew(started: str | None, clock: str | None, duration: float | None) -> str | None:
    """A warning when the host's clock disagrees with the controller's, else None."""
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    try:
        ours = dt.datetime.strptime(str(started), fmt)
        theirs = dt.datetime.strptime(str(clock), fmt)
    except ValueError:
        return None
    skew = (theirs - ours).total_seconds()
    if -CLOCK_TOLERANCE_S <= skew <= (duration or 0) + CLOCK_TOLERANCE_S:
        return None
    return (f"the host's clock ({clock}) is {abs(skew):.0f} s "
            f"{'ahead of' if skew > 0 else 'behind'} the controller's ({started})")


# --- history ----------------------------------------------------------------------------------

# Provenance facts whose change a reviewer wants to see (a reboot, an upgrade, a new toolkit).
_FACTS = (
    ("toolkit commit", ("provenance", "toolkit", "commit")),
    ("inventory", ("provenance", "inventory")),
    ("host OS", ("provenance", "host_facts", "os")),
    ("kernel", ("provenance", "host_facts", "kernel")),
    ("boot id", ("provenance", "host_facts", "boot_id")),
)


def _dig(m: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = m
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def changes(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """What changed since the previous run on the host: verdict, controls, threats, tests,
    host facts, auditor figures. Reads schema 1 models too (they lack provenance)."""
    if previous is None:
        return {"previous": None, "items": []}
    items: list[dict[str, Any]] = []

    def add(what: str, ident: str, before: Any, after: Any, title: str = "") -> None:
        if before != after:
            items.append({"what": what, "id": ident, "title": title,
                          "before": "-" if before is None else str(before),
                          "after": "-" if after is None else str(after)})

    add("verdict", current["host"], previous.get("verdict")
        or ("PASS" if previous.get("ok") else "FAIL"), current["verdict"])
    for label, path in _FACTS:
        before, after = _dig(previous, path), _dig(current, path)
        if before is not None and after is not None:
            add("host" if path[1] == "host_facts" else "provenance", label, before, after)
    pc, cc = previous.get("controls") or {}, current["controls"]
    for cid in dict.fromkeys([*cc, *pc]):
        add("control", cid, (pc.get(cid) or {}).get("status"), (cc.get(cid) or {}).get("status"),
            (cc.get(cid) or pc.get(cid) or {}).get("title", ""))
    pt = {t["id"]: t for t in previous.get("threats") or []}
    ct = {t["id"]: t for t in current["threats"]}
    for tid in dict.fromkeys([*ct, *pt]):
        add("threat", tid, (pt.get(tid) or {}).get("status"), (ct.get(tid) or {}).get("status"),
            (ct.get(tid) or pt.get(tid) or {}).get("title", ""))

    def outcomes(m: dict[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for c in (m.get("controls") or {}).values():
            for r in c.get("tests", []):
                out[r["nodeid"]] = r["outcome"]
        for r in m.get("unmapped_tests") or []:
            out[r["nodeid"]] = r["outcome"]
        return out

    po, co = outcomes(previous), outcomes(current)
    for nodeid in dict.fromkeys([*co, *po]):
        add("test", short_nodeid(nodeid), po.get(nodeid), co.get(nodeid))
    pa, ca = previous.get("auditors") or {}, current.get("auditors") or {}
    for name in dict.fromkeys([*ca, *pa]):
        pf = (pa.get(name) or {}).get("figures") or {}
        cf = (ca.get(name) or {}).get("figures") or {}
        for key in dict.fromkeys([*cf, *pf]):
            add("auditor", f"{name} {key}", pf.get(key), cf.get(key))
    prov = previous.get("provenance") or {}
    return {
        "previous": {
            "run": previous.get("run"),
            "generated": previous.get("generated"),
            "verdict": previous.get("verdict") or ("PASS" if previous.get("ok") else "FAIL"),
            "commit": (prov.get("toolkit") or {}).get("commit"),
        },
        "items": items,
    }
