"""After verify: each control's and threat's status on one host, and what each status means
(toolkit/assurance/report_model.py assembles them into the report's model,
toolkit/assurance/report.py only renders it).

Where a control is proven: on this host (tests/posture, this run), in CI (tests/signer and
tests/unit prove the signer's own behaviour; tests/lab the end-to-end paths on the lab VM), or
by procedure (people, audited). A control that can be proven on the host is proven there; CI
evidence is named as such and never counted as a result of this run.

Control status, per host kind (lab or production): see CONTROL_STATUSES. Threat status: see
THREAT_STATUSES. `control_statuses()` and `threat_statuses()` give them for every control and
threat of the registry; an outside auditor's result is shown under its control
(toolkit/controls/auditors.py) and never changes its status.
"""

from __future__ import annotations

from typing import Any

from toolkit.controls import auditors, ci_record, registry
from toolkit.controls.registry import Registry, TestRef

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
    return (TEST_STATUSES.get(status) or VERDICTS.get(status)
            or auditors.AUDITOR_COLOURS.get(status, ""))


def base_nodeid(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def short_nodeid(nodeid: str) -> str:
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
    for nodeid in dict.fromkeys([*known, *(base_nodeid(n) for n in ran)]):
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


def control_entry(
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
    mine = [r for r in results if base_nodeid(r["nodeid"]) in listed or control.id in r["controls"]]
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
        "auditors": [],  # toolkit/controls/auditors.py: outside auditors' figures, judged
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
                short_nodeid(n) for n in proof["host"][:3])
        return entry
    if any(o in TEST_BAD for o in outcomes):
        bad = [r for r in mine if r["outcome"] in TEST_BAD]
        entry["status"] = "failed"
        entry["reason"] = "; ".join(
            f"{short_nodeid(r['nodeid'])}: {r['message'] or r['outcome']}" for r in bad
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


def undefined_entry(
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
    entry = control_entry(stub, reg, refs, results, kind, keyword)
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
    return ", ".join(short_nodeid(x) for x in nodes[:n]) + (", ..." if len(nodes) > n else "")


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


def threat_status(
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


def residual_risk(
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


# --- every control and threat of the registry on one host ------------------------------------


def control_statuses(reg: Registry, refs: list[TestRef], results: list[dict[str, Any]],
                     kind: str, keyword: str | None, ci: ci_record.Evidence | None = None,
                     figures: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every control of the registry and every one a threat names, in id order, each with its
    status on this host and its outside auditors' results (`figures`: by auditor, as
    `invoke audit` files them)."""
    controls = {
        cid: control_entry(c, reg, refs, results, kind, keyword, ci)
        for cid, c in sorted(reg.controls.items(), key=lambda kv: registry.id_key(kv[0]))
    }
    for t in reg.active:
        for cid in t.controls:
            if cid not in controls:
                controls[cid] = undefined_entry(cid, reg, refs, results, kind, keyword)
    for cid, entries in auditors.judge(reg.controls.values(), figures).items():
        controls[cid]["auditors"] = entries
    return dict(sorted(controls.items(), key=lambda kv: registry.id_key(kv[0])))


def threat_statuses(reg: Registry, controls: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The active threats, highest risk first, each with its status on this host."""
    threats: list[dict[str, Any]] = []
    for t in sorted(reg.active, key=lambda t: (-t.risk, t.id)):
        status, note, blocking = threat_status(t, controls)
        absent = [c for c in dict.fromkeys(t.controls)
                  if controls[c]["status"] == "procedure" and not controls[c]["applies_here"]]
        residual, here = residual_risk(t, status, blocking, absent)
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
    return threats
