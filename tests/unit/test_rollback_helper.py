"""The roll-back helper (roles/preflight/files/signhost-rollback), run for real on temporary
files: whatever happens to its state, a restore never deletes the live file it protects.

It used to: a second `restore` (or an arming whose backup did not exist) found no saved
version and removed DEST, i.e. sshd_config, which locks every login out. systemctl,
systemd-run and logger are stand-ins that record their calls; the state directory is moved
with SIGNHOST_ROLLBACK_STATE."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

HELPER = Path(__file__).resolve().parents[2] / "roles/preflight/files/signhost-rollback"
STUB = "#!/bin/sh\necho \"$(basename \"$0\") $*\" >> \"$STUB_LOG\"\n"


@dataclass
class Box:
    root: Path
    env: dict[str, str]
    dest: Path
    applied: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(HELPER), *args], env=self.env, capture_output=True,
                              text=True, timeout=30)

    def arm(self, backup: str, name: str = "ssh") -> subprocess.CompletedProcess[str]:
        return self.run("arm", name, "90", str(self.dest), backup,
                        f"echo applied >> {self.applied}")

    def calls(self) -> str:
        log = self.root / "stub.log"
        return log.read_text() if log.exists() else ""

    def applies(self) -> int:
        return len(self.applied.read_text().splitlines()) if self.applied.exists() else 0


@pytest.fixture
def box(tmp_path: Path) -> Box:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("systemctl", "systemd-run", "logger"):
        (bin_dir / tool).write_text(STUB)
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(tmp_path / "stub.log"),
           "SIGNHOST_ROLLBACK_STATE": str(tmp_path / "state")}
    dest = tmp_path / "sshd_config"
    dest.write_text("new\n")
    return Box(tmp_path, env, dest, tmp_path / "applied")


def _backup(box: Box, text: str = "old\n") -> str:
    backup = box.root / "sshd_config.1234.bak"
    backup.write_text(text)
    return str(backup)


def test_restore_puts_the_previous_version_back_and_a_second_restore_changes_nothing(box: Box) -> None:
    assert box.arm(_backup(box)).returncode == 0
    assert "systemd-run" in box.calls() and box.applies() == 1
    first = box.run("restore", "ssh")
    assert first.returncode == 0, first.stderr
    assert box.dest.read_text() == "old\n" and box.applies() == 2
    assert "ROLLED BACK" in first.stderr
    second = box.run("restore", "ssh")
    assert second.returncode == 0, second.stderr
    assert box.dest.read_text() == "old\n", "the second restore touched the live file"
    assert "nothing armed" in second.stderr and box.applies() == 2


@pytest.mark.parametrize("backup", ["missing", ""], ids=["missing-backup", "empty-backup"])
def test_arming_without_a_backup_is_refused_and_the_live_file_stays(box: Box, backup: str) -> None:
    path = str(box.root / "sshd_config.gone.bak") if backup == "missing" else ""
    armed = box.arm(path)
    assert armed.returncode != 0
    assert "NOT armed" in armed.stderr
    assert "systemd-run" not in box.calls(), "a roll-back timer was armed without a backup"
    assert box.applies() == 0, "the new file was applied without a way back"
    # The timer of an earlier arming, or an operator, runs restore anyway: the file stays.
    restore = box.run("restore", "ssh")
    assert restore.returncode == 0
    assert box.dest.read_text() == "new\n"


def test_restore_with_nothing_armed_or_after_disarm_keeps_the_live_file(box: Box) -> None:
    assert box.run("restore", "ssh").returncode == 0
    assert box.dest.read_text() == "new\n"
    assert box.arm(_backup(box)).returncode == 0
    assert box.run("disarm", "ssh").returncode == 0
    assert box.run("restore", "ssh").returncode == 0
    assert box.dest.read_text() == "new\n" and box.applies() == 1


def test_restore_with_a_lost_saved_version_leaves_the_file_as_it_is(box: Box) -> None:
    assert box.arm(_backup(box)).returncode == 0
    (box.root / "state" / "ssh.prev").unlink()
    lost = box.run("restore", "ssh")
    assert lost.returncode != 0 and "NOT rolled back" in lost.stderr
    assert box.dest.read_text() == "new\n"
    assert box.run("restore", "ssh").returncode == 0  # and the arming is used up
    assert box.dest.read_text() == "new\n"


def test_a_file_that_was_new_is_moved_aside_only_when_armed_so(box: Box) -> None:
    """`none` says DEST did not exist before (a first ruleset): the roll-back takes it out of
    the way into the state directory, keeping it, and only once."""
    assert box.arm("none", name="firewall").returncode == 0
    restore = box.run("restore", "firewall")
    assert restore.returncode == 0, restore.stderr
    assert not box.dest.exists()
    assert (box.root / "state" / "firewall.rejected").read_text() == "new\n"
    box.dest.write_text("newer\n")  # applied again by a later run
    assert box.run("restore", "firewall").returncode == 0
    assert box.dest.read_text() == "newer\n"


def test_the_production_state_directory_is_the_default() -> None:
    text = HELPER.read_text()
    assert "STATE=${SIGNHOST_ROLLBACK_STATE:-/var/lib/signhost/rollback}" in text
    assert os.access(HELPER, os.X_OK)


def test_a_confirmation_after_the_roll_back_ran_fails(box: Box) -> None:
    """A probe that got through only after the timer restored the old file must not report the
    new one as confirmed: the play has to fail."""
    assert box.arm(_backup(box)).returncode == 0
    assert box.run("restore", "ssh").returncode == 0  # the timer fired first
    late = box.run("disarm", "ssh")
    assert late.returncode != 0 and "NOT confirmed" in late.stderr
    assert box.dest.read_text() == "old\n"
