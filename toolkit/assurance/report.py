"""The posture report: threats -> controls -> tests -> results, for one host.

`build()` is pure: it joins the registry (threats, controls), the test index (control markers
read from the test files) and one pytest run's results (toolkit.assurance.pytest_verify) into a
model.
`changes()` compares a model with the previous run's. `markdown()`, `html()` and `junit()`
render that one model (Jinja2 templates in toolkit/assurance/templates/ for the two a person
reads), and
`write()` puts the four files in a run directory. The JSON file is the model, so tools and the
reader see the same thing; `SCHEMA_VERSION` changes when a key changes meaning or goes.

Where a control is proven: on this host (tests/posture, this run), in CI (tests/signer and
tests/unit prove the signer's own behaviour; tests/lab the end-to-end paths on the lab VM), or
by procedure (people, audited). A control that can be proven on the host is proven there; CI
evidence is named as such and never counted as a result of this run.

Control status, per host kind (lab or production): see CONTROL_STATUSES. Threat status: see
THREAT_STATUSES. A run fails when any applicable control failed, any test failed, or nothing
could be tested.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import xml.etree.ElementTree as ET  # writes XML, parses none
from pathlib import Path
from typing import Any

import jinja2

from toolkit.assurance import ci_record, registry
from toolkit.assurance.registry import TIMES, Registry, TestRef

# 2: provenance, signature, per-control proof, threat notes and residual conditions,
# procedures, changes since the previous run (1 had no schema_version key).
SCHEMA_VERSION = 2
TEMPLATES = Path(__file__).resolve().parent / "templates"

# status -> (colour, what it means). The order is the summary's.
CONTROL_STATUSES: dict[str, tuple[str, str]] = {
    "passed": ("green", "every applicable test of it ran on this host and passed"),
    "failed": ("red", "a test of it failed or errored on this host"),
    "in CI": ("blue", "no test can run on the host; the toolkit's tests passed in a CI run of "
                      "the toolkit commit that made this report (the record is named), not "
                      "re-run here"),
    "claimed": ("amber", "no test can run on the host; the toolkit's CI tests should prove it, "
                         "but no CI record of this toolkit commit shows them passing"),
    "waived": ("yellow", "lab host only: the control cannot exist in the lab (written reason)"),
    "skipped": ("amber", "its tests ran but all skipped, each with its reason"),
    "not run": ("amber", "it has tests on the host, but none ran in this run"),
    "untested": ("amber", "no test names it: nothing proves it"),
    "undefined": ("red", "a threat names it but the registry does not define it"),
    "n/a": ("grey", "applies only to the other kind of host"),
    "procedure": ("purple", "carried out by people and audited (see Procedures), not tested"),
}
STATUSES = tuple(CONTROL_STATUSES)

THREAT_STATUSES: dict[str, tuple[str, str]] = {
    "at risk": ("red", "a control failed or is undefined: the residual risk does not hold"),
    "incomplete": ("amber", "a technical control is skipped, not run, untested here, or "
                            "claimed without a CI record"),
    "covered with waivers": ("yellow", "every technical control passed except those waived "
                                       "in the lab"),
    "covered": ("green", "every technical control is proven (on this host, or in CI)"),
    "covered + procedures": ("green", "every technical control is proven and the rest are "
                                      "procedures: the best a run can attest"),
    "procedures only": ("purple", "no technical control applies here; it rests on procedures"),
    "accepted": ("grey", "no control; the residual risk is accepted"),
}

TEST_STATUSES: dict[str, str] = {
    "passed": "green",
    "failed": "red",
    "error": "red",
    "skipped": "amber",
    "xfailed": "grey",
    "xpassed": "amber",
}

COLOUR_EMOJI = {
    "green": "\U0001f7e2",
    "red": "\U0001f534",
    "amber": "\U0001f7e0",
    "yellow": "\U0001f7e1",
    "blue": "\U0001f535",
    "purple": "\U0001f7e3",
    "grey": "\u26aa",
}

TEST_BAD = ("failed", "error")
# Where a test lives says where it proves its control.
PLACES = {
    "host": "on this host",
    "ci_unit": "in CI (unit tests)",
    "ci_lab": "in CI (lab VM)",
    "procedure": "by procedure",
}


VERDICTS = {"PASS": "green", "FAIL": "red", "UNREACHABLE": "red"}


def colour(status: str) -> str:
    """The colour of any status the report shows ("" for a value that is not a status)."""
    for table in (CONTROL_STATUSES, THREAT_STATUSES):
        if status in table:
            return table[status][0]
    return TEST_STATUSES.get(status) or VERDICTS.get(status, "")


def _base(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def _short(nodeid: str) -> str:
    """tests/posture/test_ssh.py::test_x[a] -> test_ssh.py::test_x[a]"""
    path, sep, rest = nodeid.partition("::")
    return f"{path.rsplit('/', 1)[-1]}{sep}{rest}"


def _place(nodeid: str) -> str:
    if nodeid.startswith("tests/posture/"):
        return "host"
    if nodeid.startswith("tests/lab/"):
        return "ci_lab"
    return "ci_unit"


def _proof(known: list[str], ran: list[str]) -> dict[str, list[str]]:
    """Node ids that prove a control, by place."""
    out: dict[str, list[str]] = {"host": [], "ci_unit": [], "ci_lab": []}
    for nodeid in dict.fromkeys([*known, *(_base(n) for n in ran)]):
        out[_place(nodeid)].append(nodeid)
    return out


def implemented(control: registry.Control) -> list[str]:
    """Where the control lives, one short phrase per place: the role whose tasks carry its tag,
    the signer module, or what the registry says is outside this repository (procedures: the
    Procedures section says who and where)."""
    out: list[str] = []
    for place in control.implemented_in:
        if control.kind == "procedure":
            continue
        if place.get("role"):
            out.append(f"role {place['role']} (tag {place.get('tag', control.id)})")
        elif place.get("play"):
            out.append(f"play {place['play']} (tag {place.get('tag', control.id)})")
        elif place.get("module"):
            out.append(str(place["module"]))
        elif place.get("where"):
            out.append(str(place["where"]))
    return list(dict.fromkeys(out))


def _control_entry(
    control: registry.Control,
    reg: Registry,
    refs: list[TestRef],
    results: list[dict[str, Any]],
    kind: str,
    keyword: str | None,
    ci: ci_record.Evidence | None = None,
) -> dict[str, Any]:
    known = registry.tests_of(reg, refs, control.id)
    listed = set(known)
    mine = [r for r in results if _base(r["nodeid"]) in listed or control.id in r["controls"]]
    proof = _proof(known, [r["nodeid"] for r in mine])
    entry: dict[str, Any] = {
        "id": control.id,
        "title": control.title,
        "kind": control.kind,
        "source": control.source,
        "applies_to": control.applies_to,
        "threats": [t.id for t in reg.threats_of(control.id)],
        "implemented_in": implemented(control),
        "tests": [{k: r[k] for k in ("nodeid", "outcome", "duration", "message")} for r in mine],
        "proof": proof,
        "where": [PLACES[p] for p in ("host", "ci_unit", "ci_lab") if proof[p]],
        "status": "",
        "reason": "",
    }
    entry["applies_here"] = control.applies(kind)
    if control.kind == "procedure":
        entry["where"] = [PLACES["procedure"]]
        entry["status"] = "procedure"
        who = ", ".join(x for x in (control.owner, control.frequency) if x)
        entry["reason"] = "audited by people, not tested" + (f" ({who})" if who else "")
        entry["procedure"] = control.procedure
        return entry
    if not control.applies(kind):
        if proof["host"]:
            entry["where"][0] = f"on {control.applies_to} hosts"
        entry["status"] = "n/a"
        entry["reason"] = f"applies to {control.applies_to} hosts only"
        return entry
    if kind == "lab" and control.waiver_lab:
        entry["status"] = "waived"
        entry["reason"] = control.waiver_lab
        return entry
    outcomes = [r["outcome"] for r in mine]
    if not mine:
        elsewhere = proof["ci_unit"] + proof["ci_lab"]
        if not known:
            entry["status"], entry["reason"] = "untested", "no test names this control"
        elif not proof["host"]:
            entry["status"], entry["reason"] = _ci_status(elsewhere, ci)
        elif keyword:
            entry["status"], entry["reason"] = "not run", f"deselected by -k {keyword!r}"
        else:
            entry["status"] = "not run"
            entry["reason"] = "its tests did not run: " + ", ".join(
                _short(n) for n in proof["host"][:3])
        return entry
    if any(o in TEST_BAD for o in outcomes):
        bad = [r for r in mine if r["outcome"] in TEST_BAD]
        entry["status"] = "failed"
        entry["reason"] = "; ".join(
            f"{_short(r['nodeid'])}: {r['message'] or r['outcome']}" for r in bad
        )[:500]
    elif any(o in ("passed", "xpassed") for o in outcomes):
        entry["status"] = "passed"
        skipped = [r for r in mine if r["outcome"] in ("skipped", "xfailed")]
        if skipped:
            entry["reason"] = f"{len(skipped)} of {len(mine)} tests skipped: " + "; ".join(
                sorted({r["message"] for r in skipped})
            )
    else:
        entry["status"] = "skipped"
        entry["reason"] = "; ".join(sorted({r["message"] or r["outcome"] for r in mine}))
    return entry


def _undefined(
    cid: str,
    reg: Registry,
    refs: list[TestRef],
    results: list[dict[str, Any]],
    kind: str,
    keyword: str | None,
) -> dict[str, Any]:
    """A control a threat names but no controls/*.yml defines: judged by the tests that name it
    in their markers, and flagged, so that a missing registry entry never hides a result."""
    stub = registry.Control(
        id=cid, title="(not in threat-model/controls/)", kind="technical", source=""
    )
    entry = _control_entry(stub, reg, refs, results, kind, keyword)
    entry["registered"] = False
    if entry["status"] == "untested":
        entry["status"] = "undefined"
        entry["reason"] = "a threat names it but no controls/*.yml defines it and no test names it"
    else:
        entry["reason"] = ("not defined in controls/*.yml; " + entry["reason"]).rstrip("; ")
    return entry


def _ids(ids: list[str]) -> str:
    return ", ".join(ids)


def _names(nodes: list[str], n: int = 3) -> str:
    return ", ".join(_short(x) for x in nodes[:n]) + (", ..." if len(nodes) > n else "")


def _ci_status(tests: list[str], ci: ci_record.Evidence | None) -> tuple[str, str]:
    """A control only the toolkit's own tests can prove: "in CI" only with a CI record of this
    toolkit commit in which they passed; "failed" if one failed there; else "claimed"."""
    ev = ci or ci_record.Evidence()
    head = f"not testable on the host; {len(tests)} test(s) of the toolkit prove it in CI"
    if not ev.usable:
        return "claimed", f"{head}, but {ev.why}: {_names(tests)}"
    seen = {t: ev.outcomes[t] for t in tests if t in ev.outcomes}
    failed = [t for t, o in seen.items() if o == "failed"]
    passed = [t for t, o in seen.items() if o == "passed"]
    absent = [t for t in tests if t not in seen]
    where = ev.describe()
    if failed:
        return "failed", f"its CI test(s) failed in {where}: {_names(failed)}"
    if not passed:
        return "claimed", (f"{head}, but none of them passed in the given record(s) {where} "
                           f"({len(absent)} not in them): {_names(tests)}")
    note = (f"; {len(absent)} more not in the given record(s) (e.g. {_names(absent, 2)})"
            if absent else "")
    return "in CI", (f"not testable on the host; {len(passed)} of {len(tests)} test(s) of the "
                     f"toolkit passed in CI, {where}: {_names(passed)}{note}")


def _threat_status(
    threat: registry.Threat, controls: dict[str, dict[str, Any]]
) -> tuple[str, str, list[str]]:
    """The threat's status, one sentence that says what it rests on, and the controls that keep
    it from being covered (failed, undefined, or not evidenced here)."""
    mine = [controls[c] for c in dict.fromkeys(threat.controls)]
    technical = [c for c in mine if c["status"] not in ("procedure", "n/a")]
    procedures = [c["id"] + ("" if c["applies_here"] else f" ({c['applies_to']} only)")
                  for c in mine if c["status"] == "procedure"]
    by: dict[str, list[str]] = {}
    for c in technical:
        by.setdefault(c["status"], []).append(c["id"])
    also = (f"; it also rests on procedure(s) {_ids(procedures)}, audited by people"
            if procedures else "")
    bad = by.get("failed", []) + by.get("undefined", [])
    if bad:
        why = "; ".join(f"{_ids(by[s])} {s}" for s in ("failed", "undefined") if by.get(s))
        return "at risk", f"{why}{also}", bad
    missing = (by.get("skipped", []) + by.get("not run", []) + by.get("untested", [])
               + by.get("claimed", []))
    if missing:
        return "incomplete", f"not evidenced here: {_ids(missing)}{also}", missing
    if not mine:
        return "accepted", "no control: the residual risk is accepted as it stands", []
    if not technical:
        return "procedures only", (
            f"no technical control applies to this host; it rests on procedure(s) "
            f"{_ids(procedures)}, audited by people"), []
    ci = by.get("in CI", [])
    proven = (f"all {len(technical)} technical control(s) proven"
              + (f" ({len(ci)} by CI's tests: {_ids(ci)})" if ci else ""))
    if by.get("waived"):
        return "covered with waivers", (
            f"{proven} except {_ids(by['waived'])}, waived in the lab{also}"), by["waived"]
    if procedures:
        return "covered + procedures", (
            f"complete as far as a run can attest: {proven}; the rest is procedure(s) "
            f"{_ids(procedures)}, audited by people (see Procedures)"), []
    return "covered", proven, []


def _residual(
    threat: registry.Threat, status: str, blocking: list[str], absent: list[str]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The residual risk as the threat model states it, whether it holds on this host, and
    the risk that applies here: the residual only while its controls hold (`absent`: its
    procedures that are not carried out for this kind of host, e.g. a lab VM's key ceremony)."""
    inherent = {"risk": threat.risk, "band": threat.band, "basis": "inherent"}
    res = threat.residual
    if res is None:
        return None, inherent
    fallback = f"the inherent risk {threat.risk} ({threat.band}) applies"
    holds, condition = {
        "covered": ("yes", "holds: every control it rests on is proven"),
        "accepted": ("yes", "holds: accepted as it stands"),
        "covered + procedures": (
            "if the procedures are carried out",
            "holds if its procedures are carried out: its technical controls are proven"),
        "procedures only": ("if the procedures are carried out",
                            "holds if its procedures are carried out"),
        "covered with waivers": (
            "not here",
            f"holds only where {_ids(blocking)} are in place (waived in the lab); here "
            + fallback),
        "at risk": ("no", f"does not hold: {_ids(blocking)} not in place; until fixed "
                          + fallback),
        "incomplete": ("unknown", f"not established: {_ids(blocking)} not evidenced here; "
                                  f"until proven {fallback}"),
    }[status]
    if absent and status in ("covered + procedures", "procedures only"):
        holds, condition = "not here", (
            f"holds where its procedures are carried out; {_ids(absent)} not for this kind "
            f"of host, so here {fallback}")
    band = registry.band(res.risk) if res.risk else None
    entry = {
        "accepted": res.accepted,
        "likelihood": res.likelihood,
        "impact": res.impact,
        "risk": res.risk,
        "band": band,
        "owner": res.owner,
        "rationale": res.rationale,
        "holds": holds,
        "condition": condition,
    }
    if res.risk is not None and holds in ("yes", "if the procedures are carried out"):
        return entry, {"risk": res.risk, "band": band, "basis": "residual"}
    if absent and holds == "not here":
        return entry, dict(inherent, basis="inherent: its procedures are not carried out here")
    return entry, inherent


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
    controls = {
        cid: _control_entry(c, reg, refs, results, kind, keyword, ci)
        for cid, c in sorted(reg.controls.items(), key=lambda kv: registry._id_key(kv[0]))
    }
    for t in reg.active:
        for cid in t.controls:
            if cid not in controls:
                controls[cid] = _undefined(cid, reg, refs, results, kind, keyword)
    controls = dict(sorted(controls.items(), key=lambda kv: registry._id_key(kv[0])))
    threats: list[dict[str, Any]] = []
    for t in sorted(reg.active, key=lambda t: (-t.risk, t.id)):
        status, note, blocking = _threat_status(t, controls)
        absent = [c for c in dict.fromkeys(t.controls)
                  if controls[c]["status"] == "procedure" and not controls[c]["applies_here"]]
        residual, here = _residual(t, status, blocking, absent)
        threats.append(
            {
                "id": t.id,
                "title": t.title,
                "description": t.description,
                "stride": list(t.stride),
                "likelihood": t.likelihood,
                "impact": t.impact,
                "risk": t.risk,
                "band": t.band,
                "residual": residual,
                "risk_here": here,
                "controls": list(dict.fromkeys(t.controls)),
                "status": status,
                "note": note,
            }
        )
    procedures = [
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
        for c in sorted(reg.controls.values(), key=lambda c: registry._id_key(c.id))
        if c.kind == "procedure"
    ]
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
        add("test", _short(nodeid), po.get(nodeid), co.get(nodeid))
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


def change_lines(m: dict[str, Any]) -> list[str]:
    """The changes since the previous run, for the console (`invoke verify --diff`)."""
    ch = m.get("changes") or {}
    prev = ch.get("previous")
    if not prev:
        return [f"{m['host']}: first report on this host, nothing to compare"]
    items = ch.get("items") or []
    head = (f"{m['host']}: {len(items)} change(s) since {prev.get('run') or prev['generated']} "
            f"({prev['verdict']})")
    return [head] + [f"  {i['what']} {i['id']}: {i['before']} -> {i['after']}" for i in items]


# --- auditors ---------------------------------------------------------------------------------

# The issues' targets for the outside yardsticks (harden: Lynis >= 85, ssh-audit clean;
# deploy: systemd exposure <= 2.0).
TARGETS = {"lynis_hardening_index": 85, "exposure": 2.0}


def yardsticks(aud: dict[str, Any]) -> list[str]:
    """Which targets of the issues are met: lines for the console."""
    out: list[str] = []
    ly = (aud.get("lynis") or {}).get("figures") or {}
    if ly.get("hardening_index") is not None:
        ok = ly["hardening_index"] >= TARGETS["lynis_hardening_index"]
        out.append(
            f"lynis hardening index {ly['hardening_index']} (target >= 85: "
            f"{'met' if ok else 'NOT met'}), {ly['warnings']} warnings"
        )
    sa = (aud.get("ssh-audit") or {}).get("figures") or {}
    if "fail" in sa:
        ok = sa["fail"] == 0 and sa["warn"] == 0
        out.append(
            f"ssh-audit {sa['fail']} fail, {sa['warn']} warn (target 0/0: "
            f"{'met' if ok else 'NOT met'})"
        )
    sy = (aud.get("systemd-analyze") or {}).get("figures") or {}
    if "exposure" in sy:
        ok = sy["exposure"] <= TARGETS["exposure"]
        out.append(
            f"systemd-analyze exposure {sy['exposure']} {sy['rating']} (target <= 2.0: "
            f"{'met' if ok else 'NOT met'})"
        )
    return out


# --- rendering --------------------------------------------------------------------------------


def _ci_text(rec: dict[str, Any]) -> str:
    """Which CI run vouches for the controls only the toolkit's tests prove, or why none does."""
    files = "; ".join(f"{Path(str(x.get('file'))).name} (commit {str(x.get('commit'))[:12]}, "
                      f"{x.get('tests')} tests, {x.get('failed')} failed)"
                      for x in rec.get("sources") or [])
    if rec.get("usable"):
        return files
    return f"none usable: {rec.get('why') or 'no CI record was given'}" + (
        f" ({files})" if files else "")


def _short_commit(toolkit: dict[str, Any]) -> str:
    commit = str(toolkit.get("commit") or "unknown")
    text = f"{toolkit.get('version') or '?'}, commit {commit[:12]}"
    if toolkit.get("dirty"):
        text += " (with uncommitted changes: not reproducible from the commit alone)"
    return text


def signature_text(m: dict[str, Any]) -> str:
    sig = m.get("signature") or {}
    if sig.get("signed"):
        return (f"signed by the operator's key {sig.get('key')} (ssh-keygen -Y sign, namespace "
                f"{sig.get('namespace')}); the signature covers every file of this run "
                f"({sig.get('file')}). This page cannot prove its own signature: check it "
                "with `invoke verify.check-signature`")
    return f"NOT signed: {sig.get('reason') or 'no signing key given'}"


def provenance_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    """Who produced the report, from what, about which host, when: label, value."""
    prov = m.get("provenance") or {}
    facts = prov.get("host_facts") or {}
    op = prov.get("operator") or {}
    rows = [
        ("host", f"{m['host']} ({m['kind']} host), reached as {m['target']}"),
        ("inventory", f"{prov.get('inventory') or '?'}"
                      + (f", host {prov['inventory_host']}" if prov.get("inventory_host") else "")),
    ]
    if facts.get("error"):
        rows.append(("host facts", f"could not be read: {facts['error']}"))
    elif not facts:
        rows.append(("host facts", "not read: no test reached the host"))
    else:
        rows += [
            ("host OS", str(facts.get("os") or "?")),
            ("kernel", str(facts.get("kernel") or "?")),
            ("boot id", str(facts.get("boot_id") or "?")),
            ("host name, host clock", f"{facts.get('hostname') or '?'}, "
                                      f"{facts.get('clock') or '?'}"),
        ]
    rows += [
        ("toolkit", _short_commit(prov.get("toolkit") or {})),
        ("CI record", _ci_text(prov.get("ci_record") or {})),
        ("generated", f"{m['generated']}"
                      + (f", the tests took {m['duration']:.0f} s" if m.get("duration") else "")),
        ("operator", f"{op.get('user') or '?'} on {op.get('controller') or '?'}"),
        ("tests", f"selected with -k {m['keyword']!r}" if m.get("keyword")
                  else "the whole posture suite (tests/posture)"),
        ("signature", signature_text(m)),
    ]
    return rows


def summary_rows(m: dict[str, Any]) -> dict[str, list[tuple[str, int, str]]]:
    """Counts by status with their meaning, for the summary tables (zero rows left out)."""
    s = m["summary"]
    controls = [(k, s["controls"].get(k, 0), v[1]) for k, v in CONTROL_STATUSES.items()
                if s["controls"].get(k)]
    threats = [(k, s["threats"].get(k, 0), v[1]) for k, v in THREAT_STATUSES.items()
               if s["threats"].get(k)]
    tests = [(k, v, "") for k, v in sorted(s["tests"].items())]
    return {"controls": controls, "threats": threats, "tests": tests}


def test_groups(tests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A control's tests, the parametrised cases of one test function with the same outcome
    and message folded into one line: `passed test_x.py::test_y [a, b, c]`."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in tests:
        base = _base(r["nodeid"])
        param = r["nodeid"][len(base) + 1 : -1] if r["nodeid"] != base else ""
        key = (base, r["outcome"], r.get("message") or "")
        g = groups.setdefault(key, {"outcome": r["outcome"], "name": _short(base), "params": [],
                                    "message": r.get("message") or ""})
        if param:
            g["params"].append(param)
    return list(groups.values())


_STEP = re.compile(r"(?:^|(?<=\s))(\d{1,2})\.\s+")


def steps(text: str) -> list[str]:
    """A procedure written as "1. ... 2. ..." as its numbered steps; else the text as one."""
    text = text.strip()
    marks: list[re.Match[str]] = []
    for match in _STEP.finditer(text):
        if int(match.group(1)) == len(marks) + 1:  # only 1, 2, 3, ... in order
            marks.append(match)
    if len(marks) < 2 or marks[0].start() != 0:
        return [text] if text else []
    ends = [m.start() for m in marks[1:]] + [len(text)]
    return [text[m.end() : e].strip() for m, e in zip(marks, ends, strict=True)]


def attention(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Applicable technical controls that are not proven here, worst first."""
    order = ("failed", "undefined", "untested", "not run", "claimed", "skipped", "waived")
    return sorted((c for c in m["controls"].values() if c["status"] in order),
                  key=lambda c: (order.index(c["status"]), registry._id_key(c["id"])))


def _md(text: Any) -> str:
    """Text for Markdown: one line, pipes escaped (table cells), and no raw HTML: a test's
    message is data, never markup."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def _mdcode(text: Any) -> str:
    """Text inside `code`: pipes escaped (a table cell), nothing else (no entities there)."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")


def _cls(status: str) -> str:
    return "c-" + (colour(status) or "none")


def _emoji(status: str) -> str:
    return COLOUR_EMOJI.get(colour(status), "")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        # HTML escapes everything it is given; Markdown has its own filters (md, mdcode).
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",),
                                            default_for_string=False, default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md=_md, mdcode=_mdcode, short=_short, cls=_cls, emoji=_emoji, colour=colour)
    env.globals.update(
        CONTROL_STATUSES=CONTROL_STATUSES, THREAT_STATUSES=THREAT_STATUSES, TIMES=TIMES,
        yardsticks=yardsticks, PLACES=PLACES, provenance_rows=provenance_rows,
        summary_rows=summary_rows, attention=attention, signature_text=signature_text,
        test_groups=test_groups, steps=steps,
    )
    return env


_ENV: jinja2.Environment | None = None


def _render(name: str, m: dict[str, Any]) -> str:
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV.get_template(name).render(m=m, sections=sections(m))


def sections(m: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's sections, in order, as (anchor, heading): both renderings follow this list,
    so they cannot drift apart. Optional ones appear only when they have content."""
    out = [
        ("provenance", "Provenance"),
        ("summary", "Summary"),
        ("changes", "Changes since the previous run"),
        ("controls", "Controls"),
        ("threats", "Threats, highest risk first"),
        ("procedures", "Procedures (audited by people, not tested)"),
        ("auditors", "Independent auditors"),
    ]
    if m["unmapped_tests"]:
        out.append(("unmapped", "Tests that name no known control"))
    if m["collect_errors"]:
        out.append(("collect-errors", "Collection errors"))
    out.append(("legend", "How to read the statuses"))
    return out


def markdown(m: dict[str, Any]) -> str:
    return _render("report.md.j2", m)


def html(m: dict[str, Any]) -> str:
    return _render("report.html.j2", m)


def junit(m: dict[str, Any]) -> str:
    """JUnit XML for CI systems: one suite of the posture tests, one of the controls (a failed
    control is a failure; every other status that is not a pass is a skip with its reason)."""
    prov = m.get("provenance") or {}
    props = {
        "schema_version": str(SCHEMA_VERSION),
        "host": m["host"],
        "kind": m["kind"],
        "verdict": m["verdict"],
        "generated": m["generated"],
        "toolkit_commit": str((prov.get("toolkit") or {}).get("commit") or ""),
        "boot_id": str((prov.get("host_facts") or {}).get("boot_id") or ""),
    }
    root = ET.Element("testsuites", name=f"posture {m['host']}")

    def suite(name: str) -> ET.Element:
        s = ET.SubElement(root, "testsuite", name=name, timestamp=m["generated"],
                          hostname=m["host"])
        pe = ET.SubElement(s, "properties")
        for k, v in props.items():
            ET.SubElement(pe, "property", name=k, value=v)
        return s

    def count(s: ET.Element, cases: int, fails: int, errors: int, skips: int,
              time: float) -> None:
        s.set("tests", str(cases))
        s.set("failures", str(fails))
        s.set("errors", str(errors))
        s.set("skipped", str(skips))
        s.set("time", f"{time:.3f}")

    tests = suite(f"posture tests: {m['host']}")
    seen: dict[str, dict[str, Any]] = {}
    controls_of: dict[str, list[str]] = {}
    for c in m["controls"].values():
        for r in c["tests"]:
            seen.setdefault(r["nodeid"], r)
            controls_of.setdefault(r["nodeid"], []).append(c["id"])
    for r in m["unmapped_tests"]:
        seen.setdefault(r["nodeid"], r)
    fails = errors = skips = 0
    total = 0.0
    for nodeid, r in seen.items():
        path, _, name = nodeid.partition("::")
        case = ET.SubElement(tests, "testcase", name=name or nodeid,
                             classname=path.removesuffix(".py").replace("/", "."),
                             file=path, time=f"{float(r.get('duration') or 0):.3f}")
        total += float(r.get("duration") or 0)
        if controls_of.get(nodeid):
            pe = ET.SubElement(case, "properties")
            for cid in controls_of[nodeid]:
                ET.SubElement(pe, "property", name="control", value=cid)
        message = r.get("message") or ""
        if r["outcome"] == "failed":
            fails += 1
            ET.SubElement(case, "failure", message=message.splitlines()[0] if message
                          else "failed").text = message
        elif r["outcome"] == "error":
            errors += 1
            ET.SubElement(case, "error", message=message.splitlines()[0] if message
                          else "error").text = message
        elif r["outcome"] in ("skipped", "xfailed"):
            skips += 1
            ET.SubElement(case, "skipped", message=message)
    for e in m["collect_errors"]:
        errors += 1
        case = ET.SubElement(tests, "testcase", name=f"collect {e['nodeid'] or 'the suite'}",
                             classname="collection")
        ET.SubElement(case, "error", message="collection error").text = e["message"]
    if not seen and not m["collect_errors"] and not m["ok"]:
        # A run that tested nothing must not read as green in CI.
        errors += 1
        case = ET.SubElement(tests, "testcase", name="posture run", classname="run")
        ET.SubElement(case, "error", message="; ".join(m["problems"]))
    count(tests, len(tests.findall("testcase")), fails, errors, skips, total)

    ctl = suite(f"controls: {m['host']}")
    cfails = cskips = 0
    for c in m["controls"].values():
        case = ET.SubElement(ctl, "testcase", name=f"{c['id']} {c['title']}",
                             classname=f"controls.{c['id'].split('-')[0]}", time="0")
        if c["status"] in ("failed", "undefined"):
            cfails += 1
            ET.SubElement(case, "failure", message=f"{c['status']}: {c['reason']}"[:500])
        elif c["status"] != "passed":
            cskips += 1
            ET.SubElement(case, "skipped", message=f"{c['status']}: {c['reason']}"[:500])
    count(ctl, len(m["controls"]), cfails, 0, cskips, 0.0)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def files(host: str) -> dict[str, str]:
    """The report files of a run directory, by format."""
    return {"json": f"{host}.json", "md": f"{host}.md", "html": f"{host}.html",
            "junit": f"{host}.junit.xml"}


def write(m: dict[str, Any], directory: Path) -> list[Path]:
    """The model's four renderings into one run directory: JSON, Markdown, HTML, JUnit."""
    directory.mkdir(parents=True, exist_ok=True)
    names = files(m["host"])
    paths = [directory / names[k] for k in ("json", "md", "html", "junit")]
    paths[0].write_text(json.dumps(m, indent=1, sort_keys=False) + "\n")
    paths[1].write_text(markdown(m))
    paths[2].write_text(html(m))
    paths[3].write_text(junit(m))
    return paths
