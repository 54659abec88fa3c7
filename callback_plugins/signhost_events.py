"""Ansible callback: one JSON line per task result, so a run can say which controls it applied.

Enabled by ansible.cfg (`callbacks_enabled`); silent unless $SIGNHOST_EVENTS names a file. The
toolkit sets it for every play it runs (toolkit/runner/ansible_run.py) and reads the file back
(toolkit/controls/play_status.py) to tell the operator, per host and per control id, which controls
the run applied, changed or failed and which are not in place. Each result carries the task's
effective tags, control ids among them. Normal output (the stdout callback) is not touched.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: signhost_events
    type: aggregate
    short_description: task results as JSON lines for the signhost toolkit
    description:
      - Writes one JSON object per task result to the file named by $SIGNHOST_EVENTS.
    requirements:
      - enabled in ansible.cfg (callbacks_enabled)
"""


class CallbackModule(CallbackBase):  # type: ignore[misc]  # Ansible's, untyped
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "signhost_events"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        path = os.environ.get("SIGNHOST_EVENTS")
        self._fh = open(path, "a", encoding="utf-8") if path else None
        self._playbook: str | None = None

    def _emit(self, event: dict[str, Any]) -> None:
        if self._fh is None:
            return
        event["t"] = round(time.time(), 3)
        self._fh.write(json.dumps(event, sort_keys=True) + "\n")
        self._fh.flush()

    @staticmethod
    def _task(task: Any) -> dict[str, Any]:
        role = task._role.get_name() if getattr(task, "_role", None) else None
        return {
            "role": role,
            "task": task.name or task.action,
            "tags": sorted(set(task.tags or [])),
        }

    def v2_playbook_on_start(self, playbook: Any) -> None:
        self._playbook = os.path.basename(playbook._file_name or "")

    def v2_playbook_on_play_start(self, play: Any) -> None:
        # The playbook and the tag selection let the toolkit tell, per control id, the tasks
        # this run selected from those it left out (toolkit/controls/play_status.py).
        self._emit(
            {
                "event": "play",
                "play": play.get_name(),
                "playbook": self._playbook,
                "roles": [r.get_name() for r in play.get_roles()],
                "only_tags": sorted(getattr(play, "only_tags", None) or ["all"]),
                "skip_tags": sorted(getattr(play, "skip_tags", None) or []),
            }
        )

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        # The start of each task, so `invoke timings` can say where a run spends its time.
        self._emit({"event": "task", **self._task(task)})

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self._emit({"event": "task", "handler": True, **self._task(task)})

    def _result(self, result: Any, status: str, **extra: Any) -> None:
        event: dict[str, Any] = {"event": "result", "host": result._host.get_name(),
                                 "status": status}
        event.update(self._task(result._task))
        event.update(extra)
        if status in ("failed", "unreachable"):
            msg = result._result.get("msg") or result._result.get("stderr") or ""
            event["msg"] = str(msg)[:500]
        self._emit(event)

    def v2_runner_on_ok(self, result: Any) -> None:
        self._result(result, "changed" if result._result.get("changed") else "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._result(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._result(result, "skipped")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._result(result, "unreachable")

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._emit({"event": "end"})
        if self._fh is not None:
            self._fh.close()
            self._fh = None
