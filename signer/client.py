"""The build server's and the custodian's side: thin wrappers around plain `ssh`, which stays
usable on its own (`ssh build1@signer sign --profile dev < app.bin > app.bin.p7s`), and the
offline verifier."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from signer import approval, certs, osslsigncode, timestamp
from signer.errors import Exit, SignerError
from signer.formats import cms, openpgp, raw
from signer.policy import FORMAT_FIELDS, Request

_QUEUED_RE = re.compile(r"queued ([0-9a-f]{32})")


def _ssh(ssh: str, host: str, remote: list[str], stdin: Any = subprocess.DEVNULL,
         data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    argv = [*shlex.split(ssh), host, shlex.join(remote)]
    try:
        if data is not None:
            return subprocess.run(argv, input=data, capture_output=True, check=False)
        return subprocess.run(argv, stdin=stdin, capture_output=True, check=False)
    except OSError as exc:
        raise SignerError(Exit.UNAVAILABLE, f"cannot run {argv[0]}: {exc.strerror}") from None


def _relay(r: subprocess.CompletedProcess[bytes], err: TextIO) -> None:
    text = r.stderr.decode("utf-8", "replace").strip()
    if text:
        err.write(text + "\n")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


def sha256_file(path: Path) -> tuple[bytes, int]:
    h = hashlib.sha256()
    size = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.digest(), size


def submit(host: str, profile: str, fmt: str, name: str | None, out: Path | None, wait: bool,
           ssh: str, artifact: Path, err: TextIO, poll: float, tsa: str | None = None,
           cafile: Path | None = None, armor: bool = False) -> int:
    """Sign `artifact` and write the result: a detached signature (cms, raw, openpgp; ASCII-
    armoured with `armor`), the cleartext-signed text (openpgp-cleartext: Release becomes
    InRelease) or, for authenticode, the signed file itself (in place unless --out), as
    signtool does."""
    if tsa is not None and fmt not in ("cms", "authenticode"):
        raise SignerError(Exit.USAGE, "--timestamp needs --format cms or authenticode")
    if armor and fmt != "openpgp":
        raise SignerError(Exit.USAGE, "--armor needs --format openpgp (openpgp-cleartext is "
                          "always armoured)")
    if fmt in ("openpgp", "openpgp-cleartext"):
        return _submit_openpgp(host, profile, fmt, name, out, wait, ssh, artifact, err, poll,
                               armor)
    if fmt != "authenticode":
        dest = out or artifact.with_name(artifact.name + (".p7s" if fmt == "cms" else ".sig"))
        code, sig = _sign_remote(host, profile, fmt, name or artifact.name, wait, ssh,
                                 artifact, err, poll, tsa is not None)
        if code != Exit.OK:
            return code
        _write_atomic(dest, timestamp.add_to_cms(sig, tsa) if tsa else sig)
        err.write(f"wrote {dest}\n")
        return Exit.OK
    # Authenticode: only the request (the file's Authenticode digest in a few hundred bytes)
    # travels; the file is signed here, by osslsigncode, with the host's signature.
    dest = out or artifact
    with tempfile.TemporaryDirectory(prefix="signer-") as tmp:
        work = Path(tmp)
        content = osslsigncode.extract(artifact, work / "request.der")
        err.write(f"{artifact}: Authenticode {content.subject} {content.label}\n")
        code, sig = _sign_remote(host, profile, fmt, name or artifact.name, wait, ssh,
                                 work / "request.der", err, poll, tsa is not None)
        if code != Exit.OK:
            return code
        (work / "signature.p7").write_bytes(sig)
        signed = work / f"signed{artifact.suffix}"
        osslsigncode.attach(artifact, work / "signature.p7", signed, cafile)
        if tsa:
            stamped = work / f"stamped{artifact.suffix}"
            osslsigncode.timestamp(signed, tsa, stamped)
            signed = stamped
        tmp_dest = dest.with_name(dest.name + ".part")
        shutil.copyfile(signed, tmp_dest)
        tmp_dest.replace(dest)
    err.write(f"wrote {dest}\n")
    return Exit.OK


def _submit_openpgp(host: str, profile: str, fmt: str, name: str | None, out: Path | None,
                    wait: bool, ssh: str, artifact: Path, err: TextIO, poll: float,
                    armor: bool) -> int:
    """The host streams the artifact and returns one signature packet; the armour and the
    cleartext framework around it are made here."""
    if fmt == "openpgp-cleartext":
        default = artifact.with_name("InRelease" if artifact.name == "Release"
                                     else artifact.name + ".asc")
    else:
        default = artifact.with_name(artifact.name + (".asc" if armor else ".sig"))
    dest = out or default
    try:
        # the text is read before it is sent: what is wrapped is what was signed
        text = artifact.read_bytes() if fmt == "openpgp-cleartext" else b""
    except OSError as exc:
        raise SignerError(Exit.USAGE, f"{artifact}: {exc.strerror}") from None
    code, sig = _sign_remote(host, profile, fmt, name or artifact.name, wait, ssh, artifact,
                             err, poll)
    if code != Exit.OK:
        return code
    if fmt == "openpgp-cleartext":
        if hashlib.sha256(text).digest() != sha256_file(artifact)[0]:
            raise SignerError(Exit.DATA, f"{artifact} changed while it was signed: not "
                              "writing the signed text")
        data = openpgp.cleartext(text, sig)
    else:
        data = openpgp.armor(sig) if armor else sig
    _write_atomic(dest, data)
    err.write(f"wrote {dest}\n")
    return Exit.OK


def _sign_remote(host: str, profile: str, fmt: str, name: str, wait: bool, ssh: str,
                 body: Path, err: TextIO, poll: float, timestamped: bool = False
                 ) -> tuple[int, bytes]:
    """`sign` over ssh with `body` on stdin (and `fetch` polls with --wait): (0, signature)
    or (exit code, b"") with the host's message relayed to `err`. `timestamped`: this
    client adds a timestamp afterwards (a profile that requires one refuses a request
    without it, before anything is signed)."""
    remote = ["sign", "--profile", profile, "--format", fmt, "--name", name]
    if timestamped:
        remote.append("--timestamped")
    try:
        with body.open("rb") as f:
            # The size, declared up front, lets the gateway refuse a stream cut short (a
            # connection dropped mid-upload) instead of signing its prefix.
            remote += ["--size", str(os.fstat(f.fileno()).st_size)]
            r = _ssh(ssh, host, remote, stdin=f)
    except OSError as exc:
        raise SignerError(Exit.USAGE, f"{body}: {exc.strerror}") from None
    if r.returncode == Exit.QUEUED:
        _relay(r, err)
        match = _QUEUED_RE.search(r.stderr.decode("ascii", "replace"))
        if not wait or match is None:
            return Exit.QUEUED, b""
        rid = match.group(1)
        while r.returncode == Exit.QUEUED:
            time.sleep(poll)
            r = _ssh(ssh, host, ["fetch", rid])
    if r.returncode != 0 or not r.stdout:
        _relay(r, err)
        return r.returncode or Exit.SOFTWARE, b""
    return Exit.OK, r.stdout


def approve(host: str, key: Path, rid: str, artifact: Path | None, yes: bool, ssh: str,
            out: TextIO, err: TextIO) -> int:
    r = _ssh(ssh, host, ["requests"])
    if r.returncode != 0:
        _relay(r, err)
        return r.returncode
    item = None
    try:
        for line in r.stdout.decode("utf-8").splitlines():
            obj = json.loads(line)
            if isinstance(obj, dict) and obj.get("id") == rid:
                item = obj
    except ValueError:
        raise SignerError(Exit.SOFTWARE, f"unexpected answer to `requests` from {host}") \
            from None
    if item is None:
        raise SignerError(Exit.USAGE, f"no pending request {rid} for you on {host}")
    # Rebuild the statement from the fields: what is shown is exactly what gets signed.
    try:
        req = Request(id=rid, profile=str(item["profile"]), client=str(item["client"]),
                      sha256=str(item["sha256"]), size=int(item["size"]),
                      name=str(item["name"]), format=str(item["format"]),
                      requested=str(item["requested"]), expires=str(item["expires"]),
                      extra={k: str(item[k]) for k in FORMAT_FIELDS if k in item})
    except (KeyError, TypeError, ValueError):
        raise SignerError(Exit.SOFTWARE, f"unexpected answer to `requests` from {host}") \
            from None
    statement = req.statement()
    out.write(statement.decode("ascii"))
    if artifact is not None:
        _same_artifact(req, artifact)
        out.write(f"matches {artifact}\n")
    if not yes:
        out.write("approve this request? [y/N] ")
        out.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            err.write("not approved\n")
            return Exit.NOPERM
    try:
        sig = approval.sign(statement, key)
    except OSError as exc:
        raise SignerError(Exit.SOFTWARE, str(exc)) from None
    r = _ssh(ssh, host, ["approve", rid], data=sig)
    _relay(r, err)
    return r.returncode


def unlock(host: str, share: bool, token: str | None, ssh: str, err: TextIO) -> int:
    """`unlock [--token NAME] [--share]` over ssh, stdin (the PIN or the share) passed
    through to ssh as it is: never read here, never in argv."""
    remote = ["unlock", *(["--token", token] if token else []), *(["--share"] if share else [])]
    if sys.stdin.isatty():
        raise SignerError(Exit.USAGE, "the PIN or your share goes on stdin, from a pipe "
                          "(e.g. age -d -i KEY NAME.share.age | signer unlock ...): not typed "
                          "here, where a terminal would echo it")
    r = _ssh(ssh, host, remote, stdin=sys.stdin.buffer)
    _relay(r, err)
    return r.returncode


def _same_artifact(req: Request, artifact: Path) -> None:
    """The custodian's own copy of the release is the one the request is for: the same SHA-256
    and size, or for authenticode (where the host sees only the request) the same Authenticode
    digest, recomputed here from the file."""
    if req.format == "authenticode":
        with tempfile.TemporaryDirectory(prefix="signer-") as tmp:
            label = osslsigncode.extract(artifact, Path(tmp) / "request.der").label
        if label != req.extra.get("authenticode"):
            raise SignerError(Exit.DATA, f"{artifact} is not the artifact of request {req.id} "
                              f"(its Authenticode digest is {label}): not approving")
        return
    digest, size = sha256_file(artifact)
    if digest.hex() != req.sha256 or size != req.size:
        raise SignerError(Exit.DATA, f"{artifact} is not the artifact of request {req.id} "
                          "(digest or size differ): not approving")
    field = req.extra.get(openpgp.FIELD)
    if req.format in ("openpgp", "openpgp-cleartext"):
        # The digest the token will sign, recomputed over this copy with the trailer shown
        if field is None:
            raise SignerError(Exit.DATA, f"request {req.id} carries no openpgp field: not "
                              "approving")
        try:
            with artifact.open("rb") as f:
                mine = openpgp.recompute(field, iter(lambda: f.read(1 << 20), b"")).field()
        except openpgp.OpenPGPError as exc:
            raise SignerError(Exit.DATA, f"request {req.id}: {exc}: not approving") from None
        if mine != field:
            raise SignerError(Exit.DATA, f"the OpenPGP digest of {artifact} is not the one "
                              f"request {req.id} would sign: not approving")


def verify(fmt: str, key_file: Path, pss: bool, artifact: Path, signature: Path,
           out: TextIO) -> int:
    spki = certs.load_public_key(key_file)
    try:
        digest, _size = sha256_file(artifact)
        sig = signature.read_bytes()
    except OSError as exc:
        raise SignerError(Exit.USAGE, f"{exc.filename}: {exc.strerror}") from None
    if fmt == "raw":
        ok, why = raw.verify(digest, sig, spki, pss), "signature does not verify"
    else:
        try:
            cms.verify(digest, sig, spki)
            ok, why = True, ""
        except cms.CMSError as exc:
            ok, why = False, str(exc)
    out.write(f"valid: {artifact}\n" if ok else f"INVALID: {artifact}: {why}\n")
    return Exit.OK if ok else Exit.INVALID
