"""Parsing the outside auditors' output (recorded from real runs), and their figures judged
against the thresholds of the controls they are evidence for."""

from __future__ import annotations

import subprocess

import pytest

from toolkit.assurance import outside_auditors
from toolkit.assurance.verify import Target
from toolkit.controls import auditors, registry

# ssh-audit 3.9 -j against the stock lab VM (OpenSSH 9.2, Debian 12), trimmed.
SSH_AUDIT = {
    "banner": {"software": "OpenSSH_9.2p1"},
    "cves": [],
    "kex": [
        {"algorithm": "sntrup761x25519-sha512", "notes": {"info": ["default in OpenSSH 9.9"]}},
        {
            "algorithm": "curve25519-sha256",
            "notes": {"warn": ["does not provide protection against post-quantum attacks"]},
        },
        {
            "algorithm": "ecdh-sha2-nistp256",
            "notes": {
                "fail": ["using elliptic curves that are suspected as being backdoored"],
                "warn": ["does not provide protection against post-quantum attacks"],
            },
        },
    ],
    "key": [{"algorithm": "ssh-ed25519", "notes": {"info": ["available since OpenSSH 6.5"]}}],
    "enc": [{"algorithm": "chacha20-poly1305@openssh.com", "notes": {}}],
    "mac": [
        {
            "algorithm": "hmac-sha1",
            "notes": {
                "fail": ["using broken SHA-1 hash algorithm"],
                "warn": ["using encrypt-and-MAC mode"],
            },
        },
    ],
}

LYNIS_DAT = """\
# Lynis Report
report_version_major=1
lynis_version=3.0.8
hardening_index=62
lynis_tests_done=238
warning[]=SSH-7408|sshd option PermitRootLogin|-|-|
warning[]=PKGS-7392|Found one or more vulnerable packages.|-|-|
suggestion[]=BOOT-5122|Set a password on GRUB boot loader|-|-|
suggestion[]=KRNL-5820|Disable core dumps|-|-|
suggestion[]=AUTH-9230|Configure password hashing rounds|-|-|
"""

SYSTEMD = """\
  NAME                                                        DESCRIPTION                    EXPOSURE
✓ PrivateNetwork=                                             Service has no access to the host's network
✗ RestrictAddressFamilies=~AF_UNIX                            Service may allocate local sockets   0.1

→ Overall exposure level for signerd.service: 1.9 OK 🙂
"""


def test_ssh_audit_counts_fail_and_warn_lines_like_its_text_output() -> None:
    out = outside_auditors.parse_ssh_audit(SSH_AUDIT)
    assert out["figures"] == {"fail": 2, "warn": 3, "cves": 0, "server": "OpenSSH_9.2p1"}
    assert out["details"][0] == (
        "fail (kex) ecdh-sha2-nistp256: using elliptic curves that are suspected as being backdoored"
    )


def test_ssh_audit_cves_count_as_failures() -> None:
    out = outside_auditors.parse_ssh_audit({"cves": [{"name": "CVE-2024-6387"}]})
    assert out["figures"]["fail"] == 1 and out["figures"]["cves"] == 1


def test_lynis_report() -> None:
    out = outside_auditors.parse_lynis_report(LYNIS_DAT)
    assert out["figures"] == {
        "hardening_index": 62,
        "warnings": 2,
        "suggestions": 3,
        "tests_done": 238,
        "version": "3.0.8",
    }
    assert out["details"][0].startswith("warning SSH-7408|")
    assert out["details"][2] == "suggestion BOOT-5122|Set a password on GRUB boot loader|-|-|"
    assert len(out["details"]) == 5


def test_systemd_exposure() -> None:
    assert outside_auditors.parse_exposure(SYSTEMD) == {"figures": {"exposure": 1.9, "rating": "OK"}}
    assert outside_auditors.parse_exposure("Unit signerd.service not found.") is None


def test_each_figure_is_judged_against_the_threshold_of_its_control() -> None:
    """The console of `invoke audit`: one line per threshold, under its control, with the
    threshold as the control's YAML states it (read here, not copied)."""
    judged = auditors.judge(registry.load_controls().values(), {
        "lynis": outside_auditors.parse_lynis_report(LYNIS_DAT),
        "ssh-audit": outside_auditors.parse_ssh_audit(SSH_AUDIT),
        "systemd-analyze": outside_auditors.parse_exposure(SYSTEMD),
    })

    def th(cid: str, auditor: str, figure: str) -> str:
        return auditors.threshold(cid, auditor, figure).text

    assert auditors.lines(judged) == [
        f"BASE-01 lynis hardening_index 62 (threshold {th('BASE-01', 'lynis', 'hardening_index')}"
        ": NOT met)",
        f"SGN-06 systemd-analyze exposure 1.9 (threshold "
        f"{th('SGN-06', 'systemd-analyze', 'exposure')}: met)",
        f"SSH-05 ssh-audit fail 2 (threshold {th('SSH-05', 'ssh-audit', 'fail')}: NOT met)",
        f"SSH-05 ssh-audit warn 3 (threshold {th('SSH-05', 'ssh-audit', 'warn')}: NOT met)",
    ]
    assert [e["control"] for e in auditors.missed(judged)] == ["BASE-01", "SSH-05", "SSH-05"]


class FakeHost:
    """Stands in for `ssh HOST CMD`: answers by the first word that matches."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        self.answers = answers
        self.commands: list[str] = []

    def ssh(self, target: object, command: str, **kw: object) -> subprocess.CompletedProcess[str]:
        self.commands.append(command)
        for needle, (rc, out) in self.answers.items():
            if needle in command:
                return subprocess.CompletedProcess(command, rc, out, "")
        return subprocess.CompletedProcess(command, 1, "", "unexpected")


TARGET = Target("signhost", "signhost", "inventory/lab", "lab")


def test_lynis_runs_and_records_the_host_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost(
        {
            "sha256sum": (0, "abc\n"),
            "command -v": (0, "/usr/sbin/lynis"),
            "lynis audit system": (0, ""),
            "cat /var/tmp": (0, LYNIS_DAT),
        }
    )
    monkeypatch.setattr(outside_auditors, "ssh", host.ssh)
    out = outside_auditors.run_lynis(TARGET, None, fresh=False)
    assert out["figures"]["hardening_index"] == 62 and out["fingerprint"] == "abc"
    assert "error" not in out
    # Debian installs lynis in /usr/sbin, which only sudo's secure_path has, not the admin's PATH.
    assert "sudo -n sh -c 'command -v lynis'" in host.commands


def test_lynis_result_is_reused_while_the_host_is_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = FakeHost({"sha256sum": (0, "abc\n")})
    monkeypatch.setattr(outside_auditors, "ssh", host.ssh)
    cached = {"figures": {"hardening_index": 90}, "fingerprint": "abc", "ran_at": "yesterday"}
    out = outside_auditors.run_lynis(TARGET, cached, fresh=False)
    assert out["figures"]["hardening_index"] == 90
    assert out["note"] == "cached: host unchanged since yesterday"
    assert len(host.commands) == 1  # only the fingerprint


def test_lynis_runs_again_when_the_host_changed_or_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost({"sha256sum": (0, "def\n"), "command -v": (1, "")})
    monkeypatch.setattr(outside_auditors, "ssh", host.ssh)
    cached = {"figures": {"hardening_index": 90}, "fingerprint": "abc", "ran_at": "yesterday"}
    out = outside_auditors.run_lynis(TARGET, cached, fresh=False)
    assert out["error"] == "lynis is not installed on the host (Debian package `lynis`)"
