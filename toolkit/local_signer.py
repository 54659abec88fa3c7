"""A throw-away signer on this machine: a SoftHSM2 token in a temporary directory, a config,
keys generated on the token, and the daemon as a subprocess. Used by tests/signer and
toolkit/bench/signer.py; nothing here runs on a signing host.

PINs are generated per lab and kept in 0600 files; the only place one appears in argv is
`softhsm2-util --init-token`, which has no other way to take it (lab only).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

SOFTHSM_MODULE = Path(os.environ.get("SOFTHSM2_MODULE", "/usr/lib/softhsm/libsofthsm2.so"))
TOKEN_LABEL = "signer"  # noqa: S105 (a label, not a secret)


def available() -> str | None:
    """Why a lab cannot be built here (None: it can)."""
    if not SOFTHSM_MODULE.exists():
        return f"SoftHSM2 module {SOFTHSM_MODULE} not found (apt install softhsm2)"
    for tool in ("softhsm2-util", "openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


class Lab:
    """One token (shared by the daemons started from it) and one daemon at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens = root / "tokens"
        self.conf = root / "softhsm2.conf"
        self.pin_file = root / "pin"
        self.certs = root / "certs"
        self.ssh = root / "ssh"
        self.env = {**os.environ, "SOFTHSM2_CONF": str(self.conf)}
        self.env.pop("SSH_ORIGINAL_COMMAND", None)
        self.daemons: dict[Path, subprocess.Popen[bytes]] = {}
        self.run_dir = root / "run"
        self.custodian_keys: dict[str, Path] = {}
        self.custodian_pubs: dict[str, str] = {}

    # --- the token -----------------------------------------------------------------------

    def init_token(self) -> None:
        for d in (self.tokens, self.certs, self.ssh, self.run_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.conf.write_text(f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\n"
                             "log.level = ERROR\nslots.removable = false\n")
        pin = secrets.token_hex(8)
        fd = os.open(self.pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pin + "\n")
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
                        "--pin", pin, "--so-pin", secrets.token_hex(8)],
                       env=self.env, check=True, capture_output=True)

    def import_key(self, label: str) -> None:
        """A key made outside the token and imported: what residency checks must refuse."""
        pem = self.root / f"{label}.key.pem"
        subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-out", str(pem)], check=True,
                       capture_output=True)
        subprocess.run(["softhsm2-util", "--import", str(pem), "--token", TOKEN_LABEL, "--label",
                        label, "--id", secrets.token_hex(4),
                        "--pin", self.pin_file.read_text().strip()],
                       env=self.env, check=True, capture_output=True)
        pem.unlink()

    def custodian(self, name: str) -> Path:
        key = self.ssh / name
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                            str(key)], check=True, capture_output=True)
        self.custodian_keys[name] = key
        self.custodian_pubs[name] = Path(f"{key}.pub").read_text().strip()
        return key

    # --- the config ----------------------------------------------------------------------

    def config(self, name: str, profiles: Mapping[str, Mapping[str, Any]],
               clients: Sequence[str], custodians: Sequence[str],
               accounts: Mapping[str, str] | None = None, **daemon: Any) -> Path:
        """Write a config; each config gets its own socket, audit log and state."""
        base = self.root / name
        base.mkdir(mode=0o700, exist_ok=True)
        tables: dict[str, dict[str, Any]] = {"daemon": {
            "socket": str(self.run_dir / f"{name}.sock"),
            "socket_group": "",
            "audit_log": str(base / "audit.jsonl"),
            "state_dir": str(base / "state"),
            "token_module": str(SOFTHSM_MODULE),
            "token_label": TOKEN_LABEL,
            "pin_source": f"file:{self.pin_file}",
            "checkpoint_interval": 1000,
            "audit_key": f"pkcs11:token={TOKEN_LABEL};object=audit;type=private",
            "audit_cert": str(self.certs / "audit.pem"),
            **daemon,
        }}
        for pname, p in profiles.items():
            tables[f"profiles.{pname}"] = dict(p)
        accounts = accounts or {}
        for c in clients:
            tables[f"clients.{c}"] = {"ssh_key": f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA {c}"}
        for c in custodians:
            self.custodian(c)
            tables[f"custodians.{c}"] = {"ssh_key": self.custodian_pubs[c]}
        for who, account in accounts.items():
            kind = "clients" if who in clients else "custodians"
            tables[f"{kind}.{who}"]["account"] = account
        path = base / "signer.toml"
        path.write_text(toml(tables))
        return path

    # --- running things ------------------------------------------------------------------

    def signer(self, *args: str | Path, input: bytes | None = None,
               env: Mapping[str, str] | None = None, timeout: float = 60
               ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "signer", *map(str, args)],
                              input=input, capture_output=True, env={**self.env, **(env or {})},
                              timeout=timeout, check=False)

    def gateway(self, config: Path, command: str | bytes, stdin: bytes = b"",
                client: str | None = "build1", custodian: str | None = None,
                timeout: float = 60, declare_size: bool = True
                ) -> subprocess.CompletedProcess[bytes]:
        """The gateway as sshd runs it: the forced command with SSH_ORIGINAL_COMMAND set. A
        `sign` without `--size` gets the length of `stdin` declared, as `signer submit` does
        (the gateway requires it); `declare_size=False` sends the command as given."""
        role = ["--custodian", custodian] if custodian else ["--client", str(client)]
        env = {k: v for k, v in self.env.items() if k != "SOFTHSM2_CONF"}
        envb = {k.encode(): v.encode() for k, v in env.items()}
        raw = command if isinstance(command, bytes) else command.encode()
        if declare_size and stdin and raw.split(b" ", 1)[0] == b"sign" and b"--size" not in raw:
            raw += b" --size %d" % len(stdin)
        envb[b"SSH_ORIGINAL_COMMAND"] = raw
        return subprocess.run(forced_command(role, self.socket_of(config)), input=stdin,
                              capture_output=True, env=envb, timeout=timeout, check=False)

    def start(self, config: Path, wait: bool = True, **popen: Any) -> subprocess.Popen[bytes]:
        """Start `signer serve` for a config (stopping the one already running for it); its
        stderr (the journal on a host) goes to daemon.log beside the config."""
        self.stop(config)
        log_path = config.parent / "daemon.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "signer", "serve", "--config",
                                     str(config)], env=self.env, stderr=log,
                                    stdout=subprocess.DEVNULL, **popen)
        self.daemons[config] = proc
        if wait:
            self.wait_ready(config)
        return proc

    def wait_ready(self, config: Path, timeout: float = 20) -> None:
        proc, sock = self.daemons[config], self.socket_of(config)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = (config.parent / "daemon.log").read_text()[-2000:]
                raise RuntimeError(f"daemon exited {proc.returncode}: {log}")
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    return
                except OSError:
                    time.sleep(0.02)
        raise RuntimeError("daemon did not start")

    def stop(self, config: Path | None = None, sig: int = signal.SIGTERM) -> int | None:
        """Stop the daemon of `config` (all daemons when None); its exit code."""
        code = None
        for cfg in [config] if config is not None else list(self.daemons):
            proc = self.daemons.pop(cfg, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(sig)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        return code

    @staticmethod
    def socket_of(config: Path) -> Path:
        return Path(tomllib.loads(config.read_text())["daemon"]["socket"])


def forced_command(role: list[str], socket: Path, *flags: str) -> list[str]:
    """argv of the gateway as the signer role's authorized_keys line runs it (`python -I -c
    FORCED_COMMAND_CODE --client NAME --socket PATH`), without -I: isolated, this checkout's
    interpreter would import the signer the virtual environment has installed, not this tree
    (run from the tree's root, as the tests and the bench are)."""
    from signer.gateway import FORCED_COMMAND_CODE

    return [sys.executable, *flags, "-c", FORCED_COMMAND_CODE, *role, "--socket", str(socket)]


def sign_over_socket(sock_path: Path, profile: str, data: bytes, fmt: str = "cms",
                     client: str = "build1", name: str = "") -> tuple[int, str, bytes]:
    """One `sign` request through the gateway's own protocol code, without a process per
    request (for concurrency tests and the benchmark)."""
    import io

    from signer import gateway, wire

    header = {"v": wire.VERSION, "role": "client", "caller": client, "cmd": "sign",
              "profile": profile, "format": fmt, "name": name, "size": len(data)}
    with gateway.connect(sock_path) as sock:
        return gateway.exchange(sock, header, io.BytesIO(data), None, len(data))


def write_pe(path: Path, code_size: int = 4096) -> Path:
    """A minimal, valid Windows PE32+ console executable (x86-64; its entry point returns at
    once) with a `.text` section of about `code_size` random bytes. Made here, so that no test
    binary is downloaded; osslsigncode, signify and Windows' own parser read it like any
    linker's output (headers in the order and alignment the PE/COFF specification gives)."""
    import struct

    file_align, section_align = 0x200, 0x1000
    raw = b"\xc3" + os.urandom(max(code_size - 1, 0))  # ret, then filler
    raw_size = max(file_align, -(-len(raw) // file_align) * file_align)
    raw = raw.ljust(raw_size, b"\0")
    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, len(dos))  # e_lfanew: the PE header follows
    coff = struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 240, 0x22)  # AMD64, 1 section
    image_size = -(-(section_align + raw_size) // section_align) * section_align
    optional = struct.pack(
        "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII", 0x20B, 14, 0, raw_size, 0, 0, section_align,
        section_align, 0x140000000, section_align, file_align, 6, 0, 0, 0, 6, 0, 0,
        image_size, file_align, 0, 3, 0x8160, 0x100000, 0x1000, 0x100000, 0x1000, 0, 16,
    ) + b"\0" * 16 * 8  # 16 empty data directories (the certificate table is #4)
    section = struct.pack("<8sIIIIIIHHI", b".text", raw_size, section_align, raw_size,
                          file_align, 0, 0, 0, 0, 0x60000020)
    headers = bytes(dos) + b"PE\0\0" + coff + optional + section
    path.write_bytes(headers.ljust(file_align, b"\0") + raw)
    return path


def write_cab(path: Path, files: Mapping[str, bytes]) -> Path:
    """A Microsoft cabinet (MS-CAB) holding `files` uncompressed in one folder, made here for
    the same reason as write_pe. Data blocks of at most 32 KiB without checksums (0: "none",
    which the format allows); expand.exe, cabextract and osslsigncode read it."""
    import struct

    payload = b"".join(files.values())
    blocks = [payload[i:i + 0x8000] for i in range(0, len(payload), 0x8000)] or [b""]
    entries = b""
    offset = 0
    for name, data in files.items():
        # date 2026-01-01, time 00:00; attribute: archive
        entries += struct.pack("<IIHHHH", len(data), offset, 0, (46 << 9) | (1 << 5) | 1, 0,
                               0x20) + name.encode("ascii") + b"\0"
        offset += len(data)
    header_size, folder_size = 36, 8
    first_data = header_size + folder_size + len(entries)
    data = b"".join(struct.pack("<IHH", 0, len(b), len(b)) + b for b in blocks)
    header = struct.pack("<4sIIIIIBBHHHHH", b"MSCF", 0, first_data + len(data), 0,
                         header_size + folder_size, 0, 3, 1, 1, len(files), 0, 0x1234, 0)
    folder = struct.pack("<IHH", first_data, len(blocks), 0)
    path.write_bytes(header + folder + entries + data)
    return path


# A WiX 3 source of the smallest installer Windows Installer takes: one product, one feature,
# one component holding the files under Program Files, the cabinet embedded in the MSI.
_WXS = """<?xml version="1.0" encoding="utf-8"?>
<Wix xmlns="http://schemas.microsoft.com/wix/2006/wi">
  <Product Id="*" Name="{name}" Language="1033" Version="1.0.0" Manufacturer="Example Corp"
           UpgradeCode="{upgrade}">
    <Package InstallerVersion="200" Compressed="yes" InstallScope="perMachine"/>
    <Media Id="1" Cabinet="product.cab" EmbedCab="yes"/>
    <Directory Id="TARGETDIR" Name="SourceDir">
      <Directory Id="ProgramFiles64Folder">
        <Directory Id="INSTALLDIR" Name="{name}">
          <Component Id="Files" Guid="{component}" Win64="yes">
{files}
          </Component>
        </Directory>
      </Directory>
    </Directory>
    <Feature Id="Complete" Level="1"><ComponentRef Id="Files"/></Feature>
  </Product>
</Wix>
"""


def write_msi(path: Path, files: Mapping[str, bytes], name: str = "Example") -> Path:
    """A Windows Installer package (MSI) holding `files`, built here with wixl (Debian package
    `wixl`, msitools) from a small WiX source, as a build server would: no test installer is
    downloaded. `files` become one component under Program Files, the first file its key
    path; the cabinet is embedded. osslsigncode hashes and signs it like any MSI."""
    import uuid
    from xml.sax.saxutils import escape, quoteattr

    if shutil.which("wixl") is None:
        raise RuntimeError("wixl not found: install it on this machine (Debian: apt install "
                           "wixl)")
    if not files:
        raise ValueError("an MSI needs at least one file")
    with TemporaryDirectory(prefix="msi-") as tmp:
        work = Path(tmp)
        rows = []
        for i, (fname, data) in enumerate(files.items()):
            if "/" in fname or fname in ("", ".", ".."):
                raise ValueError(f"{fname!r}: a plain file name, please")
            (work / fname).write_bytes(data)
            key = ' KeyPath="yes"' if i == 0 else ""
            rows.append(f"            <File Id=\"F{i}\" Name={quoteattr(fname)} "
                        f"Source={quoteattr(fname)}{key}/>")
        (work / "product.wxs").write_text(_WXS.format(
            name=escape(name, {'"': "&quot;"}), upgrade=uuid.uuid4(), component=uuid.uuid4(),
            files="\n".join(rows)))
        r = subprocess.run(["wixl", "-a", "x64", "-o", str(path.resolve()), "product.wxs"],
                           cwd=work, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"wixl: {(r.stderr or r.stdout).strip()}")
    return path
