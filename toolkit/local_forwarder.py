"""A throw-away audit forwarder and collector on this machine's loopback, for the bench and the
tests: the signer role's forwarder configuration (its own template, rendered with the role's
defaults as deploy renders it) tailing a local daemon's audit log, and the lab collector's
receiver configuration (lab/collector.py) keeping the copy, two real rsyslogd processes talking
RELP over mutual TLS on 127.0.0.1.

```
  local daemon -> <dir>/audit.jsonl -> rsyslogd (roles/signer/templates/.../60-signer-audit-
  forward.conf.j2: imfile -> omrelp, TLS, disk-assisted queue)
    --(127.0.0.1, a free port)--> rsyslogd (lab/collector.py receiver_config: imrelp, TLS)
    -> <root>/collector/copies/127.0.0.1/signer-audit.jsonl
```

- The TLS files come from a CA made at run time in `<root>/pki` (lab/ca.py, EC P-256, one
  day); each side accepts only the other's name, as on a host. Nothing listens beyond loopback
  (imrelp's `address`), and no system service or system log is touched: both rsyslogd run in
  the foreground (`-n`) as children of this process, with their own work directories, and are
  ended by their pid.
- The forwarder's configuration is the role's file included from a small main file, as
  Debian's /etc/rsyslog.conf includes /etc/rsyslog.d/*.conf; the main file only sends
  rsyslogd's own messages (TLS or RELP errors) to `<root>/forwarder/rsyslogd.log`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from lab import collector
from lab.ca import CA, EC

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "roles" / "signer"
TEMPLATE = ROLE / "templates" / "etc" / "rsyslog.d" / "60-signer-audit-forward.conf.j2"
COLLECTOR_NAME = "collector.forward.test"
HOST_NAME = "signhost.forward.test"
LOOPBACK = "127.0.0.1"


class ForwardError(RuntimeError):
    pass


def available() -> str | None:
    """Why the pair cannot run here (None: it can)."""
    for tool in ("rsyslogd", "openssl", "ss"):
        if shutil.which(tool) is None:
            return f"{tool} not found (packages rsyslog, rsyslog-relp: scripts/bootstrap)"
    for module in ("imfile", "imrelp", "omrelp"):
        if not any(Path(d, f"{module}.so").exists() for d in
                   ("/usr/lib/x86_64-linux-gnu/rsyslog", "/usr/lib/rsyslog")):
            return f"rsyslog module {module} not found (packages rsyslog, rsyslog-relp)"
    return None


def render_forwarder(variables: dict[str, Any]) -> str:
    """The role's forwarder template rendered as deploy renders it (Ansible's templating) with
    the role's defaults, `variables` overriding them."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    templar = Templar(DataLoader(), variables={**defaults, "ansible_managed": "rendered by "
                                               "toolkit/local_forwarder.py", **variables})
    return str(templar.template(TEMPLATE.read_text()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Forwarding:
    """The pair for one audit log. `start_collector`, `start_forwarder`, `stop_forwarder`,
    `wait_for(seq)`; `close` ends both (the daemon that writes the log is the caller's)."""

    def __init__(self, root: Path, audit_log: Path) -> None:
        self.root = root
        self.audit_log = audit_log
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.pki = root / "pki"
        self.collector_dir = root / "collector"
        self.forwarder_dir = root / "forwarder"
        self.port = _free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._seqs: set[int] = set()
        self._read = 0  # bytes of the copy read into _seqs
        ca = CA(self.pki)
        ca.create("/CN=forwarding test CA", 1, key=EC)
        ca.leaf("collector", "tls_server", 1, dns=COLLECTOR_NAME)
        ca.leaf("signhost", "tls_client", 1, dns=HOST_NAME)
        collector.prepare_dir(self.collector_dir)
        self.collector_conf = self.collector_dir / "rsyslog.conf"
        self.collector_conf.write_text(collector.receiver_config(
            self.collector_dir, self.pki, self.port, HOST_NAME,
            "The loopback collector of toolkit/local_forwarder.py", address=LOOPBACK))
        self._write_forwarder()

    @property
    def copy(self) -> Path:
        """The collector's copy of the log."""
        return self.collector_dir / "copies" / LOOPBACK / f"{collector.PROGRAM}.jsonl"

    def _write_forwarder(self) -> None:
        d = self.forwarder_dir
        tls = d / "tls"
        for sub in (d, tls, d / "work"):
            sub.mkdir(mode=0o700, parents=True, exist_ok=True)
        for src, dest in (("ca.pem", "ca.pem"), ("signhost.pem", "client.pem"),
                          ("signhost.key", "client.key")):
            shutil.copy(self.pki / src, tls / dest)
        (tls / "client.key").chmod(0o600)
        self.role_conf = d / "60-signer-audit-forward.conf"
        self.role_conf.write_text(render_forwarder({
            "signer_audit_log": str(self.audit_log),
            "signer_audit_collector": LOOPBACK,
            "signer_audit_collector_port": self.port,
            "signer_audit_collector_name": COLLECTOR_NAME,
            "signer_audit_forward_dir": str(tls),
            "signer_audit_forward_workdir": str(d / "work"),
        }))
        self.forwarder_conf = d / "rsyslog.conf"
        self.forwarder_conf.write_text(
            "# toolkit/local_forwarder.py: the signer role's file, as rsyslog.conf includes it\n"
            f'include(file="{self.role_conf}")\n'
            "# rsyslogd's own messages (start, stop, TLS and RELP errors)\n"
            f'*.* action(type="omfile" file="{d / "rsyslogd.log"}" fileCreateMode="0600")\n')

    # --- processes -----------------------------------------------------------------------

    def _start(self, name: str, conf: Path) -> subprocess.Popen[bytes]:
        if name in self.procs and self.procs[name].poll() is None:
            return self.procs[name]
        check = subprocess.run(["rsyslogd", "-N1", "-f", str(conf)], capture_output=True,
                               text=True, check=False)
        if check.returncode != 0:
            raise ForwardError(f"rsyslogd -N1 -f {conf}: {check.stderr.strip()[-600:]}")
        proc = subprocess.Popen(["rsyslogd", "-n", "-f", str(conf), "-i",
                                 str(conf.with_suffix(".pid"))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[name] = proc
        return proc

    def start_collector(self) -> int:
        """Start the collector and wait until it listens; its pid."""
        proc = self._start("collector", self.collector_conf)
        for _ in range(200):
            if proc.poll() is not None:
                raise ForwardError(f"the collector's rsyslogd exited {proc.returncode}: "
                                   f"{self._tail(self.collector_dir / 'rsyslogd.log')}")
            ss = subprocess.run(["ss", "-Hltn", f"sport = :{self.port}"], capture_output=True,
                                text=True, check=False)
            if ss.stdout.strip():
                return proc.pid
            time.sleep(0.05)
        raise ForwardError(f"the collector did not listen on {LOOPBACK}:{self.port}")

    def start_forwarder(self) -> int:
        """Start the forwarder (it resumes from its saved offset); its pid."""
        proc = self._start("forwarder", self.forwarder_conf)
        time.sleep(0.1)
        if proc.poll() is not None:
            raise ForwardError(f"the forwarder's rsyslogd exited {proc.returncode}: "
                               f"{self._tail(self.forwarder_dir / 'rsyslogd.log')}")
        return proc.pid

    def _stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_forwarder(self) -> None:
        self._stop("forwarder")

    def stop_collector(self) -> None:
        self._stop("collector")

    def close(self) -> None:
        self.stop_forwarder()
        self.stop_collector()

    def __enter__(self) -> Forwarding:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- the copy ------------------------------------------------------------------------

    def received(self) -> set[int]:
        """The sequence numbers the copy holds so far (read on from where the last call
        stopped). A set, not the last line: the copy is not always in order (a rotation under
        load, the queue's disk part delivered after its memory part while catching up)."""
        try:
            with self.copy.open("rb") as f:
                f.seek(self._read)
                data = f.read()
        except FileNotFoundError:
            return self._seqs
        end = data.rfind(b"\n") + 1
        self._read += end
        for line in data[:end].splitlines():
            try:
                self._seqs.add(int(json.loads(line)["seq"]))
            except (ValueError, KeyError, TypeError):
                continue
        return self._seqs

    def last_seq(self) -> int | None:
        """The highest sequence number in the copy (None: none yet)."""
        seqs = self.received()
        return max(seqs) if seqs else None

    def missing(self, last: int) -> int:
        """How many of the entries 0..`last` the copy does not hold yet."""
        return sum(1 for s in range(last + 1) if s not in self.received())

    def wait_for(self, last: int, timeout: float = 60, every: bool = True) -> float:
        """Wait until the copy holds every entry 0..`last` (the host's last one), or with
        `every` false that one entry only (whether the others came is for `signer audit
        compare` to say); the seconds it took. ForwardError when they do not arrive within
        `timeout`."""
        started = time.monotonic()
        while True:
            missing = self.missing(last) if every else int(last not in self.received())
            if not missing:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise ForwardError(
                    f"the collector's copy misses {missing} of the entries 0..{last} after "
                    f"{timeout:.0f} s (highest seq {self.last_seq()}); forwarder: "
                    f"{self._tail(self.forwarder_dir / 'rsyslogd.log')}; collector: "
                    f"{self._tail(self.collector_dir / 'rsyslogd.log')}")
            time.sleep(0.05)

    @staticmethod
    def _tail(path: Path) -> str:
        try:
            return " | ".join(path.read_text().strip().splitlines()[-3:]) or "(empty log)"
        except OSError:
            return "(no log)"
