"""The lab's log collector: rsyslog receiving the signer audit log over RELP with mutual TLS.

```
  VM: signerd -> audit.jsonl -> rsyslog imfile -> omrelp (TLS, disk-assisted queue)
    --(lab bridge, tcp COLLECTOR_PORT)--> slbN-collector ns: rsyslogd imrelp (TLS)
    -> <state>/collector/copies/<sender address>/signer-audit.jsonl
```

- The receiver is the stock Debian rsyslog (`rsyslog`, `rsyslog-relp`), run as a process of
  this lab inside the collector's network namespace, with its own configuration and work
  directory under `<state dir>/collector/`. No system service is involved: this machine's own
  syslog (if any) is not touched, and the config loads no local input (no /dev/log, no kernel
  log), only the RELP listener.
- A CA made here at run time (lab/ca.py: openssl, EC P-256, 30 days) issues the collector's server
  certificate and the signing host's client certificate; each side accepts only the other's
  name (`tls.authMode="name"`). The keys live in `<state dir>/collector/pki/` (0700) and go
  away with `lab.down`; the signing host's key reaches the VM through the inventory (deploy).
- The copy is filed by the sender's address as the collector's socket saw it (`fromhost-ip`),
  not by the hostname the sender writes into its messages. One line in, one line out: the
  entry exactly as the host wrote it (the message part of an RFC 5424 frame).
- `stop`/`start` end and restart only our rsyslogd (pid file and its -f config path), so the
  lab tests can take the collector away and bring it back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from lab.ca import CA, EC, CAError
from lab.config import COLLECTOR_PORT, Instance

DAYS = 30
PROGRAM = "signer-audit"  # the syslog tag the signing host gives its audit entries


class CollectorError(RuntimeError):
    pass


def pki_dir(inst: Instance) -> Path:
    return inst.collector_dir / "pki"


def make_pki(inst: Instance) -> None:
    """The lab CA and the two certificates it issues (kept when present)."""
    inst.collector_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = CA(pki_dir(inst))
    try:
        if not ca.exists():
            ca.create(f"/CN=signlab {inst.name} log collector CA", DAYS, key=EC)
        for who, profile in (("collector", "tls_server"), ("signhost", "tls_client")):
            if not (ca.root / f"{who}.pem").exists():
                ca.leaf(who, profile, DAYS, dns=inst.tls_name(who))
    except CAError as exc:
        raise CollectorError(str(exc)) from None


def config_path(inst: Instance) -> Path:
    return inst.collector_dir / "rsyslog.conf"


def pidfile(inst: Instance) -> Path:
    return inst.collector_dir / "rsyslogd.pid"


def receiver_config(d: Path, pki: Path, port: int, peer: str, title: str,
                    address: str | None = None) -> str:
    """The receiver's rsyslog configuration: RELP over mutual TLS on `port` (of `address`
    only, when given), accepting the client certificate named `peer` only; the copy is filed
    under `d/copies/<sender address>/`, rsyslogd's work files and own log in `d`; the TLS files
    are `pki`'s ca.pem, collector.pem and collector.key (make_pki's names). The lab's
    collector and the loopback pair of toolkit/local_forwarder.py run the same receiver."""
    listen = f' address="{address}"' if address else ""
    return f"""# {title}: lab/collector.py. RELP over mutual TLS only.
global(workDirectory="{d / 'work'}" maxMessageSize="64k")
module(load="imrelp")
input(type="imrelp"{listen} port="{port}" ruleset="from-signing-hosts"
      tls="on" tls.caCert="{pki / 'ca.pem'}" tls.myCert="{pki / 'collector.pem'}"
      tls.myPrivKey="{pki / 'collector.key'}" tls.authMode="name"
      tls.permittedPeer=["{peer}"])

template(name="copy-file" type="string"
         string="{d / 'copies'}/%fromhost-ip%/{PROGRAM}.jsonl")
template(name="entry-line" type="string" string="%msg%\\n")

ruleset(name="from-signing-hosts") {{
  if $programname == "{PROGRAM}" then {{
    action(type="omfile" dynaFile="copy-file" template="entry-line" dirCreateMode="0700"
           fileCreateMode="0600" flushOnTXEnd="on" asyncWriting="off")
  }} else {{
    action(type="omfile" file="{d / 'other.log'}" fileCreateMode="0600")
  }}
}}

# rsyslogd's own messages (start, stop, TLS and RELP errors)
*.* action(type="omfile" file="{d / 'rsyslogd.log'}" fileCreateMode="0600")
"""


def prepare_dir(d: Path) -> None:
    """The receiver's directory (0700) and the ones its configuration names."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.chmod(0o700)
    (d / "work").mkdir(exist_ok=True)
    (d / "copies").mkdir(mode=0o700, exist_ok=True)


def config_text(inst: Instance) -> str:
    return receiver_config(inst.collector_dir, pki_dir(inst), COLLECTOR_PORT,
                           inst.tls_name("signhost"), f"The lab's log collector ({inst.name})")


def write_config(inst: Instance) -> Path:
    """The configuration and the directories it names; its path."""
    prepare_dir(inst.collector_dir)
    conf = config_path(inst)
    conf.write_text(config_text(inst))
    return conf


def running_pid(inst: Instance) -> int | None:
    """The pid of our rsyslogd: from its pid file, and only if it runs our config."""
    try:
        pid = int(pidfile(inst).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(config_path(inst)).encode() in cmdline else None


def _listening(inst: Instance) -> bool:
    proc = subprocess.run(["ip", "netns", "exec", inst.netns("collector"), "ss", "-Hltn",
                           f"sport = :{COLLECTOR_PORT}"], capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def start(inst: Instance) -> int:
    """Start our rsyslogd in the collector's namespace (if it is not running); its pid."""
    pid = running_pid(inst)
    if pid is not None:
        return pid
    if shutil.which("rsyslogd") is None:
        raise CollectorError("rsyslogd is missing on this machine (packages rsyslog, "
                             "rsyslog-relp): run scripts/bootstrap")
    conf = write_config(inst)
    check = subprocess.run(["rsyslogd", "-N1", "-f", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise CollectorError(f"rsyslogd -N1 -f {conf}: {check.stderr.strip()[-400:]}")
    pidfile(inst).unlink(missing_ok=True)
    subprocess.run(["ip", "netns", "exec", inst.netns("collector"), "rsyslogd", "-f", str(conf),
                    "-i", str(pidfile(inst))], check=True, capture_output=True)
    for _ in range(100):
        pid = running_pid(inst)
        if pid is not None and _listening(inst):
            return pid
        time.sleep(0.1)
    raise CollectorError(f"the collector's rsyslogd did not start listening on "
                         f"{COLLECTOR_PORT}; see {inst.collector_dir / 'rsyslogd.log'}")


def stop(inst: Instance) -> int | None:
    """End our rsyslogd (by its pid, only if it is ours); the pid it had, or None."""
    pid = running_pid(inst)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    else:
        raise CollectorError(f"the collector's rsyslogd (pid {pid}) did not stop")
    return pid


def forget(inst: Instance, sender_ipv4: str) -> bool:
    """Drop the copy of a sender whose disk was thrown away (`lab.reset`): its new log starts
    at seq 0 again, a new history. rsyslogd is told to close its files (HUP), so the next
    entry makes a new copy instead of going to the removed one."""
    copy = inst.collector_copy(sender_ipv4)
    if not copy.exists():
        return False
    copy.unlink()
    pid = running_pid(inst)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)
    return True


def up(inst: Instance) -> None:
    make_pki(inst)
    start(inst)


def down(inst: Instance) -> list[str]:
    pid = stop(inst)
    return [f"collector rsyslogd (pid {pid})"] if pid else []
