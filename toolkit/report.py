"""The posture report: threats -> controls -> tests -> results, for one host.

`build()` is pure: it joins the registry (threats, controls), the test index (control markers
read from the test files) and one pytest run's results (toolkit.pytest_verify) into a model;
`markdown()`, `html()` and `write()` render it. The JSON file is that model, so tools and the
reader see the same thing.

Control status, per host kind (lab or production):
- passed: every applicable test that ran passed (skips are listed with their reasons);
- failed: a test failed or errored;
- waived: the control has a `waiver_lab` reason and the host is the lab;
- skipped: all its tests were skipped (lab-only tests on a production host, for instance);
- not run: it has tests, but none ran here (deselected with -k, or they live outside
  tests/posture, e.g. the end-to-end lab suite);
- untested: no test names it (`invoke threat-model.check` reports the same);
- n/a: the control applies only to the other kind of host;
- procedure: carried out by people; audited, not tested (threat-model/controls/procedures.yml);
- undefined: a threat names it but no controls/*.yml defines it.
A run fails when any applicable control failed, any test failed, or nothing could be tested.
"""

from __future__ import annotations

import datetime as dt
import html as html_mod
import json
from pathlib import Path
from typing import Any

from toolkit import registry
from toolkit.registry import TIMES, Registry, TestRef

STATUSES = (
    "failed",
    "passed",
    "waived",
    "skipped",
    "not run",
    "untested",
    "n/a",
    "procedure",
    "undefined",
)
TEST_BAD = ("failed", "error")


def _base(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def _short(nodeid: str) -> str:
    """tests/posture/test_ssh.py::test_x[a] -> test_ssh.py::test_x[a]"""
    path, sep, rest = nodeid.partition("::")
    return f"{path.rsplit('/', 1)[-1]}{sep}{rest}"


def _control_entry(
    control: registry.Control,
    reg: Registry,
    refs: list[TestRef],
    results: list[dict[str, Any]],
    kind: str,
    keyword: str | None,
) -> dict[str, Any]:
    listed = {_base(n) for n in control.tests}
    mine = [r for r in results if _base(r["nodeid"]) in listed or control.id in r["controls"]]
    entry: dict[str, Any] = {
        "id": control.id,
        "title": control.title,
        "kind": control.kind,
        "source": control.source,
        "applies_to": control.applies_to,
        "implemented_in": list(control.implemented_in),
        "threats": [t.id for t in reg.threats_of(control.id)],
        "tests": [{k: r[k] for k in ("nodeid", "outcome", "duration", "message")} for r in mine],
        "status": "",
        "reason": "",
    }
    if control.kind == "procedure":
        entry["status"] = "procedure"
        who = ", ".join(x for x in (control.owner, control.frequency) if x)
        entry["reason"] = "audited by people, not tested" + (f" ({who})" if who else "")
        entry["procedure"] = control.procedure
        return entry
    if not control.applies(kind):
        entry["status"] = "n/a"
        entry["reason"] = f"applies to {control.applies_to} hosts only"
        return entry
    if kind == "lab" and control.waiver_lab:
        entry["status"] = "waived"
        entry["reason"] = control.waiver_lab
        return entry
    outcomes = [r["outcome"] for r in mine]
    if not mine:
        known = registry.tests_of(reg, refs, control.id)
        if not known:
            entry["status"], entry["reason"] = "untested", "no test names this control"
        elif keyword:
            entry["status"], entry["reason"] = "not run", f"deselected by -k {keyword!r}"
        else:
            entry["status"] = "not run"
            entry["reason"] = "proven outside this suite: " + ", ".join(known[:3])
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


def _threat_status(statuses: list[str]) -> str:
    technical = [s for s in statuses if s not in ("procedure", "n/a")]
    if any(s in ("failed", "undefined") for s in technical):
        return "at risk"
    if technical and all(s == "passed" for s in technical):
        return "covered"
    if technical and all(s in ("passed", "waived") for s in technical) and "passed" in technical:
        return "covered with waivers"
    if not technical:
        return "procedural"
    return "partly evidenced"


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
) -> dict[str, Any]:
    """The report model for one host."""
    results: list[dict[str, Any]] = run.get("tests", [])
    controls = {
        cid: _control_entry(c, reg, refs, results, kind, keyword)
        for cid, c in sorted(reg.controls.items(), key=lambda kv: registry._id_key(kv[0]))
    }
    threats: list[dict[str, Any]] = []
    for t in sorted(reg.active, key=lambda t: (-t.risk, t.id)):
        for cid in t.controls:
            if cid not in controls:
                controls[cid] = _undefined(cid, reg, refs, results, kind, keyword)
        res = t.residual
        threats.append(
            {
                "id": t.id,
                "title": t.title,
                "stride": list(t.stride),
                "likelihood": t.likelihood,
                "impact": t.impact,
                "risk": t.risk,
                "band": t.band,
                "residual": None
                if res is None
                else {
                    "accepted": res.accepted,
                    "risk": res.risk,
                    "band": registry.band(res.risk) if res.risk else None,
                    "owner": res.owner,
                    "rationale": res.rationale,
                },
                "controls": list(t.controls),
                "status": _threat_status([controls[c]["status"] for c in t.controls]),
            }
        )
    controls = dict(sorted(controls.items(), key=lambda kv: registry._id_key(kv[0])))
    known = set(reg.controls)
    unmapped = [r for r in results if not r["controls"] or not set(r["controls"]) & known]
    counts = {s: 0 for s in STATUSES}
    for c in controls.values():
        counts[c["status"]] += 1
    tcounts: dict[str, int] = {}
    for r in results:
        tcounts[r["outcome"]] = tcounts.get(r["outcome"], 0) + 1
    threat_counts: dict[str, int] = {}
    for entry in threats:
        threat_counts[entry["status"]] = threat_counts.get(entry["status"], 0) + 1
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
    return {
        "host": host,
        "kind": kind,
        "target": target,
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration": run.get("duration"),
        "keyword": keyword,
        "ok": not problems,
        "problems": problems,
        "warnings": warnings,
        "summary": {
            "controls": counts,
            "tests": tcounts,
            "threats": {"total": len(threats), **threat_counts},
        },
        "threats": threats,
        "controls": controls,
        "unmapped_tests": unmapped,
        "collect_errors": run.get("collect_errors", []),
        "auditors": auditors,
    }


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


# --- Markdown -------------------------------------------------------------------------------

ICON = {
    "passed": "PASS",
    "failed": "**FAIL**",
    "error": "**ERROR**",
    "waived": "waived",
    "skipped": "skipped",
    "not run": "not run",
    "untested": "**untested**",
    "n/a": "n/a",
    "procedure": "procedure",
    "undefined": "**undefined**",
    "xfailed": "xfail",
    "xpassed": "xpass",
}


def _md(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _auditor_lines(aud: dict[str, Any]) -> list[str]:
    lines = ["| auditor | figures | when | note |", "|---|---|---|---|"]
    details: list[str] = []
    for name, data in aud.items():
        if not isinstance(data, dict):
            continue
        figures = ", ".join(f"{k}: {v}" for k, v in data.get("figures", {}).items())
        note = data.get("error") or data.get("note") or ""
        lines.append(f"| {name} | {_md(figures) or '-'} | {data.get('ran_at', '')} | {_md(note)} |")
        if data.get("details"):
            details += ["", f"{name}:", ""] + [f"- {_md(d)}" for d in data["details"]]
    lines += [""] + [f"- {y}" for y in yardsticks(aud)]
    return lines + details


def markdown(m: dict[str, Any]) -> str:
    s = m["summary"]
    c = s["controls"]
    verdict = "PASS" if m["ok"] else "FAIL"
    out = [
        f"# Posture report: {m['host']} ({m['kind']})",
        "",
        f"**{verdict}** - generated {m['generated']} against `{m['target']}`"
        + (f" in {m['duration']:.0f} s" if m.get("duration") else "")
        + (f", tests selected with `-k {m['keyword']}`" if m.get("keyword") else ""),
        "",
    ]
    notes = [f"- {p}" for p in m["problems"]] + [f"- warning: {w}" for w in m["warnings"]]
    out += notes + ([""] if notes else [])
    technical = sum(c[k] for k in ("passed", "failed", "waived", "skipped", "not run", "untested"))
    out += [
        "## Summary",
        "",
        "| | count |",
        "|---|---|",
        f"| technical controls applicable here | {technical} |",
        f"| passed | {c['passed']} |",
        f"| failed | {c['failed']} |",
        f"| waived (with reason) | {c['waived']} |",
        f"| skipped (with reason) | {c['skipped']} |",
        f"| not run here / untested | {c['not run']} / {c['untested']} |",
        f"| not applicable to a {m['kind']} host | {c['n/a']} |",
        f"| procedures (audited by people) | {c['procedure']} |",
        f"| named by a threat but undefined | {c['undefined']} |",
        f"| threats covered (every technical control passed) | "
        f"{s['threats'].get('covered', 0)} of {s['threats']['total']} |",
        f"| threats covered except for waived controls | "
        f"{s['threats'].get('covered with waivers', 0)} |",
        "| threats at risk (a control failed or is undefined) | "
        f"{s['threats'].get('at risk', 0)} |",
        "| tests | " + ", ".join(f"{v} {k}" for k, v in sorted(s["tests"].items())) + " |",
        "",
    ]
    failed = [x for x in m["controls"].values() if x["status"] == "failed"]
    if failed:
        out += ["### Failed controls", "", "| control | title | why |", "|---|---|---|"]
        out += [f"| {x['id']} | {_md(x['title'])} | {_md(x['reason'])} |" for x in failed]
        out.append("")
    reasons = [
        x
        for x in m["controls"].values()
        if x["status"] in ("waived", "skipped", "not run", "untested", "undefined")
    ]
    if reasons:
        out += [
            "### Waived, skipped, not run or untested, with reasons",
            "",
            "| control | status | reason |",
            "|---|---|---|",
        ]
        out += [f"| {x['id']} | {x['status']} | {_md(x['reason'])} |" for x in reasons]
        out.append("")
    if m.get("auditors"):
        out += ["## Independent auditors", "", *_auditor_lines(m["auditors"]), ""]
    out += ["## Threats, highest risk first", ""]
    for t in m["threats"]:
        res = t["residual"]
        rtxt = f", residual {res['risk']} ({res['band']}), owner: {res['owner']}" if res else ""
        out += [
            f"### {t['id']} {t['title']}",
            "",
            f"Risk **{t['risk']}** ({t['band']}: likelihood {t['likelihood']} {TIMES} impact "
            f"{t['impact']}), STRIDE {''.join(t['stride'])}{rtxt}. Status: **{t['status']}**.",
            "",
            "| control | title | status | tests |",
            "|---|---|---|---|",
        ]
        for cid in t["controls"]:
            x = m["controls"][cid]
            tests = (
                "<br>".join(
                    f"{ICON.get(r['outcome'], r['outcome'])} `{_short(r['nodeid'])}`"
                    for r in x["tests"]
                )
                or _md(x["reason"])[:200]
            )
            out.append(f"| {cid} | {_md(x['title'])} | {ICON[x['status']]} | {tests} |")
        out.append("")
    if m["unmapped_tests"]:
        out += ["## Tests that name no known control", ""]
        out += [f"- `{r['nodeid']}`: {r['outcome']}" for r in m["unmapped_tests"]]
        out.append("")
    if m["collect_errors"]:
        out += ["## Collection errors", ""]
        for e in m["collect_errors"]:
            out += [f"`{e['nodeid']}`:", "", "```", e["message"], "```", ""]
    procs = [x for x in m["controls"].values() if x["status"] == "procedure"]
    if procs:
        out += ["## Procedural controls (audited, not tested)", ""]
        out += [f"- **{x['id']}** {x['title']}" for x in procs]
        out.append("")
    return "\n".join(out)


# --- HTML -----------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:75em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top;text-align:left}th{background:#f4f4f4}code{font-size:90%}
.s-passed{color:#176b2c}.s-failed,.s-error,.s-undefined,.s-untested{color:#b00020;font-weight:600}
.s-waived,.s-skipped,.s-not-run{color:#8a5a00}.verdict{font-size:1.4em;font-weight:700}
.bad{color:#b00020}.good{color:#176b2c}details{margin:.3em 0}
"""


def _h(text: Any) -> str:
    return html_mod.escape(str(text))


def _cls(status: str) -> str:
    return "s-" + status.replace(" ", "-").replace("/", "")


def html(m: dict[str, Any]) -> str:
    s = m["summary"]
    c = s["controls"]
    rows = []
    # The same statuses as the Markdown summary, passed first.
    for key in ("passed", *(k for k in STATUSES if k != "passed")):
        rows.append(f"<tr><td class='{_cls(key)}'>{_h(key)}</td><td>{c[key]}</td></tr>")
    verdict = "<span class='good'>PASS</span>" if m["ok"] else "<span class='bad'>FAIL</span>"
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>Posture report: {_h(m['host'])}</title><style>{CSS}</style>",
        f"<h1>Posture report: {_h(m['host'])} ({_h(m['kind'])})</h1>",
        f"<p class='verdict'>{verdict}</p>",
        f"<p>Generated {_h(m['generated'])} against <code>{_h(m['target'])}</code>"
        + (f", tests selected with <code>-k {_h(m['keyword'])}</code>" if m.get("keyword") else "")
        + "</p>",
    ]
    if m["problems"] or m["warnings"]:
        parts.append(
            "<ul>"
            + "".join(f"<li class='bad'>{_h(p)}</li>" for p in m["problems"])
            + "".join(f"<li>warning: {_h(w)}</li>" for w in m["warnings"])
            + "</ul>"
        )
    parts += [
        "<h2>Summary</h2><table><tr><th>controls</th><th>count</th></tr>",
        *rows,
        "</table>",
        f"<p>Threats covered: {s['threats'].get('covered', 0)} of {s['threats']['total']} "
        f"(and {s['threats'].get('covered with waivers', 0)} except for waived controls); "
        f"at risk: {s['threats'].get('at risk', 0)}. Tests: "
        + _h(", ".join(f"{v} {k}" for k, v in sorted(s["tests"].items())))
        + "</p>",
    ]
    notable = [
        x
        for x in m["controls"].values()
        if x["status"] in ("failed", "waived", "skipped", "not run", "untested", "undefined")
    ]
    if notable:
        parts.append(
            "<h3>Controls that did not pass, with reasons</h3><table>"
            "<tr><th>control</th><th>status</th><th>reason</th></tr>"
        )
        parts += [
            f"<tr><td>{_h(x['id'])} {_h(x['title'])}</td><td class='{_cls(x['status'])}'>"
            f"{_h(x['status'])}</td><td>{_h(x['reason'])}</td></tr>"
            for x in notable
        ]
        parts.append("</table>")
    if m.get("auditors"):
        parts.append(
            "<h2>Independent auditors</h2><table><tr><th>auditor</th><th>figures</th>"
            "<th>when</th><th>note</th></tr>"
        )
        for name, data in m["auditors"].items():
            if isinstance(data, dict):
                figures = ", ".join(f"{k}: {v}" for k, v in data.get("figures", {}).items())
                details = "".join(f"<li>{_h(d)}</li>" for d in data.get("details") or [])
                parts.append(
                    f"<tr><td>{_h(name)}</td><td>{_h(figures)}"
                    + (
                        f"<details><summary>details</summary><ul>{details}</ul></details>"
                        if details
                        else ""
                    )
                    + f"</td><td>{_h(data.get('ran_at', ''))}</td>"
                    f"<td>{_h(data.get('error') or data.get('note') or '')}</td></tr>"
                )
        parts.append("</table>")
        parts.append(
            "<ul>" + "".join(f"<li>{_h(y)}</li>" for y in yardsticks(m["auditors"])) + "</ul>"
        )
    parts.append("<h2>Threats, highest risk first</h2>")
    for t in m["threats"]:
        res = t["residual"]
        parts.append(
            f"<h3 id='{_h(t['id'])}'>{_h(t['id'])} {_h(t['title'])}</h3><p>Risk <b>{t['risk']}</b>"
            f" ({_h(t['band'])}: L{t['likelihood']} {TIMES} I{t['impact']}), STRIDE "
            f"{_h(''.join(t['stride']))}"
            + (
                f"; residual {res['risk']} ({_h(res['band'])}), owner {_h(res['owner'])}"
                if res
                else ""
            )
            + f". Status: <b class='{_cls(t['status'])}'>{_h(t['status'])}</b>.</p>"
        )
        parts.append("<table><tr><th>control</th><th>status</th><th>tests</th></tr>")
        for cid in t["controls"]:
            x = m["controls"][cid]
            tests = (
                "<br>".join(
                    f"<span class='{_cls(r['outcome'])}'>{_h(r['outcome'])}</span> "
                    f"<code>{_h(_short(r['nodeid']))}</code>"
                    + (f"<br><small>{_h(r['message'])}</small>" if r["message"] else "")
                    for r in x["tests"]
                )
                or f"<small>{_h(x['reason'])}</small>"
            )
            parts.append(
                f"<tr><td>{_h(cid)} {_h(x['title'])}</td>"
                f"<td class='{_cls(x['status'])}'>{_h(x['status'])}</td><td>{tests}</td></tr>"
            )
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def write(m: dict[str, Any], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{m['host']}.{ext}" for ext in ("json", "md", "html")]
    paths[0].write_text(json.dumps(m, indent=1, sort_keys=False) + "\n")
    paths[1].write_text(markdown(m))
    paths[2].write_text(html(m))
    return paths
