"""`invoke timings`: where the last runs of each play spent their time (toolkit.runner.timings)."""

from __future__ import annotations

from pathlib import Path

from invoke.context import Context
from invoke.tasks import task

from toolkit.runner.timings import LOG_DIR, plays_recorded, report


@task(help={
    "play": "provision, harden, harden-check, deploy (default: every play with runs)",
    "top": "how many of the slowest tasks to list (default 12)",
    "log_dir": f"where the runs' events files are (default {LOG_DIR})",
})
def timings(c: Context, play: str = "", top: int = 12, log_dir: str = "") -> None:
    """Where the last runs of each play spent their time; second/first run ratios."""
    directory = Path(log_dir) if log_dir else LOG_DIR
    plays = [play] if play else plays_recorded(directory)
    if not plays:
        print(f"no runs recorded in {directory}")
        return
    for name in plays:
        print(report(name, top, directory))
