"""The posture report's renderings: `markdown()`, `html()` and `junit()` render one model
(toolkit/assurance/report_model.py builds it; Jinja2 templates in toolkit/assurance/templates/
for the two a person reads), and `write()` puts the four files in a run directory (the JSON
file is the model itself). The console's lines of `invoke verify --diff` (`change_lines`) are
here too. It decides nothing: statuses and auditors' results come in the model.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET  # writes XML, parses none
from pathlib import Path
from typing import Any

import jinja2

from toolkit.assurance.report_model import SCHEMA_VERSION, build
from toolkit.controls import registry
from toolkit.controls.posture_status import (
    CONTROL_STATUSES,
    PLACES,
    TEST_STATUSES,
    THREAT_STATUSES,
    VERDICTS,
    base_nodeid,
    colour,
    short_nodeid,
)
from toolkit.controls.tables import TIMES

# Besides its own, the names callers have always found here: the model and its statuses.
__all__ = [
    "COLOUR_EMOJI", "CONTROL_STATUSES", "SCHEMA_VERSION", "TEMPLATES", "TEST_STATUSES",
    "THREAT_STATUSES", "VERDICTS", "auditor_evidence", "build", "change_lines", "colour", "files",
    "html", "junit", "markdown", "sections", "write",
]

TEMPLATES = Path(__file__).resolve().parent / "templates"

COLOUR_EMOJI = {
    "green": "\U0001f7e2",
    "red": "\U0001f534",
    "amber": "\U0001f7e0",
    "yellow": "\U0001f7e1",
    "blue": "\U0001f535",
    "purple": "\U0001f7e3",
    "grey": "\u26aa",
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


def auditor_evidence(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Every outside auditor's figure judged against its control's threshold, in control order
    (the model holds them under each control: toolkit/controls/auditors.py judged them)."""
    return [e for c in m["controls"].values() for e in c.get("auditors") or []]


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
        base = base_nodeid(r["nodeid"])
        param = r["nodeid"][len(base) + 1 : -1] if r["nodeid"] != base else ""
        key = (base, r["outcome"], r.get("message") or "")
        g = groups.setdefault(key, {"outcome": r["outcome"], "name": short_nodeid(base),
                                    "params": [], "message": r.get("message") or ""})
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
                  key=lambda c: (order.index(c["status"]), registry.id_key(c["id"])))


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
    env.filters.update(md=_md, mdcode=_mdcode, short=short_nodeid, cls=_cls, emoji=_emoji,
                       colour=colour)
    env.globals.update(
        CONTROL_STATUSES=CONTROL_STATUSES, THREAT_STATUSES=THREAT_STATUSES, TIMES=TIMES,
        auditor_evidence=auditor_evidence, PLACES=PLACES, provenance_rows=provenance_rows,
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
