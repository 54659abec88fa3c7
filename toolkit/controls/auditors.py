"""Outside auditors as evidence of named controls, held to the thresholds the controls state.

`invoke audit` (toolkit/assurance/outside_auditors.py) runs Lynis, ssh-audit and
`systemd-analyze security` on a host and files their figures by auditor. A figure that says
something about a control is held to the bound in that control's `auditors:`
(threat-model/controls/*.yml: SGN-06 bounds systemd-analyze's exposure score), the one place a
threshold is written. This module judges figures against those bounds for everyone
who compares one: the console of `invoke audit` (and its --strict), the report (each control
shows its auditors' results under it) and the posture test that measures the same figure
(`threshold()`).

Why an auditor's miss does not change the control's status: the status is what the posture
tests prove on the host (behaviour, read by our own code); an auditor is a second, outside
opinion whose findings can be accepted on record (threat-model/README.md, "findings left open
on purpose": one ssh-audit warning is the inventory's interop choice on Debian 12). A miss is
shown under the control, becomes a warning of the report, and fails `invoke audit --strict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from toolkit.controls.registry import THREAT_MODEL, Control, Threshold, id_key, load_controls

MET, MISSED, NOT_RUN, ERROR, NO_FIGURE = "met", "NOT met", "not audited", "error", "no figure"
# result -> colour, as the report shows it. A miss is amber, not red: it does not fail the
# control (the module docstring says why).
AUDITOR_COLOURS = {MET: "green", MISSED: "amber", NOT_RUN: "grey", ERROR: "red", NO_FIGURE: "amber"}


def thresholds(controls: Iterable[Control]) -> list[Threshold]:
    """Every threshold of these controls, in control-id order."""
    return [th for c in sorted(controls, key=lambda c: id_key(c.id)) for th in c.auditors]


def threshold(control_id: str, auditor: str, figure: str, root: Path = THREAT_MODEL
              ) -> Threshold:
    """The one threshold a control states for an auditor's figure (for a test that measures the
    same figure itself); LookupError when the registry states none."""
    control = load_controls(root).get(control_id)
    found = [th for th in (control.auditors if control else ())
             if (th.auditor, th.figure) == (auditor, figure)]
    if len(found) != 1:
        raise LookupError(f"{control_id}: threat-model/controls/*.yml states "
                          f"{len(found)} threshold(s) for {auditor} {figure}, not one")
    return found[0]


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return value if ok else None


def judge(controls: Iterable[Control], aud: Mapping[str, Any] | None
          ) -> dict[str, list[dict[str, Any]]]:
    """Per control id (only those that name an auditor), one entry per threshold: the figure,
    the threshold, the result (met, NOT met, or why there is no figure) and one line of text."""
    out: dict[str, list[dict[str, Any]]] = {}
    for th in thresholds(controls):
        data = (aud or {}).get(th.auditor)
        value: float | None = None
        if not isinstance(data, Mapping):
            result, text = NOT_RUN, f"{th.auditor}: not run for this host (invoke audit)"
        elif data.get("error"):
            result, text = ERROR, f"{th.auditor}: could not run: {data['error']}"
        else:
            value = _number((data.get("figures") or {}).get(th.figure))
            if value is None:
                result, text = NO_FIGURE, f"{th.auditor}: no {th.figure} figure in its result"
            else:
                result = MET if th.met(value) else MISSED
                text = f"{th.auditor} {th.figure} {value} (threshold {th.text}: {result})"
        out.setdefault(th.control, []).append({
            "control": th.control, "auditor": th.auditor, "figure": th.figure,
            "threshold": th.text, "value": value, "result": result, "text": text,
            "ran_at": data.get("ran_at") if isinstance(data, Mapping) else None,
        })
    return out


def lines(judged: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """One console line per threshold: `CONTROL AUDITOR FIGURE VALUE (threshold BOUND: met)`."""
    return [f"{cid} {e['text']}" for cid, entries in judged.items() for e in entries]


def missed(judged: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The entries whose figure misses its threshold."""
    return [e for entries in judged.values() for e in entries if e["result"] == MISSED]
