"""AUD-04 without a VM: the lab's log PKI (real openssl), the collector's rsyslog configuration
and the signer role's forwarder configuration, each checked by rsyslogd itself (-N1).

The forwarding itself (a real RELP/TLS session, the queue across a collector outage) is proven
on the lab VM: tests/lab/test_audit_collector.py and the AUD-04 posture tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lab import collector
from lab.config import Instance

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "roles/signer/templates/etc/rsyslog.d/60-signer-audit-forward.conf.j2"

needs_rsyslogd = pytest.mark.skipif(shutil.which("rsyslogd") is None,
                                    reason="rsyslogd is not installed (scripts/bootstrap)")


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Instance:
    inst = Instance("lab7", tmp_path_factory.mktemp("state"))
    collector.make_pki(inst)
    return inst


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True)


@pytest.mark.parametrize(("who", "purpose", "wrong"), [("collector", "sslserver", "sslclient"),
                                                       ("signhost", "sslclient", "sslserver")])
def test_the_lab_ca_issues_each_side_a_certificate_for_its_role_only(inst, who, purpose, wrong):  # type: ignore[no-untyped-def]
    pki = collector.pki_dir(inst)
    ok = _openssl("verify", "-CAfile", str(pki / "ca.pem"), "-purpose", purpose,
                  str(pki / f"{who}.pem"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _openssl("verify", "-CAfile", str(pki / "ca.pem"), "-purpose", wrong,
                   str(pki / f"{who}.pem"))
    assert bad.returncode != 0
    text = _openssl("x509", "-in", str(pki / f"{who}.pem"), "-noout", "-ext",
                    "subjectAltName").stdout
    assert f"DNS:{inst.tls_name(who)}" in text


def test_the_keys_are_readable_by_their_owner_only(inst):  # type: ignore[no-untyped-def]
    keys = sorted(collector.pki_dir(inst).glob("*.key"))
    assert [k.name for k in keys] == ["ca.key", "collector.key", "signhost.key"]
    assert all(k.stat().st_mode & 0o077 == 0 for k in keys)
    assert collector.pki_dir(inst).stat().st_mode & 0o077 == 0


def test_the_collector_accepts_only_the_signing_hosts_certificate_over_tls(inst):  # type: ignore[no-untyped-def]
    conf = collector.config_text(inst)
    assert 'tls="on"' in conf and 'tls.authMode="name"' in conf
    assert f'tls.permittedPeer=["{inst.tls_name("signhost")}"]' in conf
    assert "imuxsock" not in conf and "imklog" not in conf  # no local input on the controller


@needs_rsyslogd
def test_rsyslogd_accepts_the_collectors_configuration(inst):  # type: ignore[no-untyped-def]
    path = collector.write_config(inst)
    r = subprocess.run(["rsyslogd", "-N1", "-f", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _render(inst: Instance, tls_dir: Path) -> str:
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    templar = Templar(DataLoader(), variables={
        "ansible_managed": "managed", "signer_audit_log": "/var/lib/signer/audit.jsonl",
        "signer_audit_forward_tag": "signer-audit", "signer_audit_collector": "192.0.2.60",
        "signer_audit_collector_port": 2514,
        "signer_audit_collector_name": inst.tls_name("collector"),
        "signer_audit_forward_dir": str(tls_dir), "signer_audit_forward_queue_max": "1g",
        "signer_audit_forward_workdir": str(tls_dir),
        "signer_audit_forward_retry_seconds": 10})
    return str(templar.template(TEMPLATE.read_text()))


def test_the_forwarder_tails_the_audit_log_into_a_queued_tls_relp_action(inst, tmp_path):  # type: ignore[no-untyped-def]
    conf = _render(inst, tmp_path)
    # the active file and its closed segments (audit.<seq>.jsonl), each from its saved offset
    assert 'file="/var/lib/signer/audit*.jsonl"' in conf
    assert 'persistStateAfterSubmission="on"' in conf and 'sortFiles="on"' in conf
    assert 'type="omrelp"' in conf and 'target="192.0.2.60" port="2514"' in conf
    assert 'tls="on"' in conf and f'tls.permittedPeer=["{inst.tls_name("collector")}"]' in conf
    # disk-assisted, one worker (order), never gives up, saved at shutdown
    for setting in ('queue.filename="signer-audit-forward"', 'queue.workerThreads="1"',
                    'action.resumeRetryCount="-1"', 'queue.saveOnShutdown="on"'):
        assert setting in conf


@needs_rsyslogd
def test_rsyslogd_accepts_the_forwarders_configuration(inst, tmp_path):  # type: ignore[no-untyped-def]
    pki = collector.pki_dir(inst)
    for src, dest in (("ca.pem", "ca.pem"), ("signhost.pem", "client.pem"),
                      ("signhost.key", "client.key")):
        shutil.copy(pki / src, tmp_path / dest)
    path = tmp_path / "forward.conf"
    path.write_text(_render(inst, tmp_path))  # alone, as the role's validate: runs it
    r = subprocess.run(["rsyslogd", "-N1", "-f", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
