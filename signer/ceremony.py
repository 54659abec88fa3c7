"""`signer pin split`: the key ceremony's last step for `pin_source = "prompt"` with
`pin_shares = k`: the token's user PIN becomes n shares (signer/shares.py), one per custodian,
each written encrypted to that custodian's SSH public key (the key they approve with), so the
file is one only they can read, wherever it is carried; Vault's `operator init -pgp-keys` is
the model. The encryption is age's (`age -R`, which takes OpenSSH ed25519 and RSA keys): a
kept tool, on the controller only, never on the signing host.

The PIN comes from a file only its owner can read (`--pin-file`, the token role's
controller-side PIN file) or from the terminal; each share goes to age on its stdin, never in
argv or the environment, and no share is written in clear. A custodian sends theirs with

    age -d -i ~/.ssh/id_ed25519 alice.share.age | ssh custodian-alice@HOST unlock --share

(a pipe: no file, argv or shell history holds it). A card's PIN ([tokens.NAME] with
`pin_source = "prompt"`, set by whoever provisioned the card: the ceremony only splits it) is
split with `--token NAME`: its shares name the card and count for no other token (the
daemon's own, another card), and its custodians send them with `unlock --token NAME --share`.

Run on the controller, where the PIN was made; after the ceremony the PIN itself should leave
the controller (the threat model, TOK-03).
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from signer import config, pin, shares
from signer.errors import Exit, SignerError

SUFFIX = ".share.age"


def read_pin(path: Path | None) -> bytes:
    if path is not None:
        return pin.read_file(path).encode("utf-8")
    if sys.stdin.isatty():
        return pin.check(getpass.getpass("token user PIN: ").encode(), "PIN").encode("utf-8")
    raise SignerError(Exit.USAGE, "no PIN: give --pin-file FILE (mode 0600 or 0400) or run on "
                      "a terminal")


def parse_custodian(text: str) -> tuple[str, str]:
    """NAME=PUBKEY_FILE -> (name, the OpenSSH public key line or age recipient in the
    file)."""
    name, sep, path = text.partition("=")
    if not sep or not config.NAME_RE.fullmatch(name):
        raise SignerError(Exit.USAGE, f"--custodian {text!r}: want NAME=SSH_PUBLIC_KEY_FILE")
    try:
        line = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SignerError(Exit.USAGE, f"--custodian {name}: cannot read {path}: {exc}") \
            from None
    return name, line


# age's own recipients (X25519, and plugins' such as age-plugin-yubikey's `age1yubikey1...`)
AGE_RECIPIENT = re.compile(r"age1[0-9a-z]{20,200}")


def recipient_problem(line: str) -> str | None:
    """Why age cannot encrypt to `line` (None: it can). It takes an ssh-ed25519 or ssh-rsa
    key, or an age recipient. A FIDO2 (`sk-`) SSH key is none of these: its holder gives an
    age recipient instead (a YubiKey's, through age-plugin-yubikey, keeps the share behind the
    hardware too)."""
    if AGE_RECIPIENT.fullmatch(line):
        return None
    if not config.SSH_KEY_RE.fullmatch(line) or not line.startswith(("ssh-ed25519 ",
                                                                       "ssh-rsa ")):
        return ("not an ssh-ed25519 or ssh-rsa public key line nor an age recipient (age1...),"
                " what age encrypts to (a FIDO2 sk- SSH key cannot be encrypted to)")
    return None


def _check_recipient(name: str, line: str) -> None:
    if (why := recipient_problem(line)) is not None:
        raise SignerError(Exit.USAGE, f"custodian {name}: {why}")


def unlock_command(token: str = "") -> str:
    """What a custodian runs on the host with their share (`ssh ACCOUNT@HOST ...`)."""
    return f"unlock --token {token} --share" if token else "unlock --share"


def split(pin_bytes: bytes, k: int, recipients: list[tuple[str, str]], out_dir: Path,
          out: TextIO, age: str | None = None, token: str = "") -> list[Path]:
    """Write one encrypted share per custodian into `out_dir` (created 0700; refuses to
    replace a share already there: a second ceremony must not silently half-replace one).
    `token`: the [tokens.*] name of the card whose PIN this is ("": the daemon's own)."""
    for name, line in recipients:
        _check_recipient(name, line)
    names = [n for n, _ in recipients]
    if len(set(names)) != len(names):
        raise SignerError(Exit.USAGE, "a custodian is named twice: one share each")
    if len({line if AGE_RECIPIENT.fullmatch(line) else config.key_identity(line)
            for _, line in recipients}) != len(recipients):
        raise SignerError(Exit.USAGE, "two custodians have the same SSH key: one holder "
                          "would get two shares")
    try:
        shares.check_counts(k, len(recipients))
        if token and not shares.token_name_ok(token):
            raise shares.ShareError(f"--token {token!r}: not a [tokens.*] name "
                                    "([a-z][a-z0-9_-]{0,63})")
    except shares.ShareError as exc:
        raise SignerError(Exit.USAGE, str(exc)) from None
    age = age or shutil.which("age")
    if age is None:
        raise SignerError(Exit.UNAVAILABLE, "age not found: apt install age (it encrypts each "
                          "share to its custodian's SSH key)")
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    targets = [out_dir / f"{name}{SUFFIX}" for name in names]
    for t in targets:
        if t.exists():
            raise SignerError(Exit.EXISTS, f"{t} exists: move the last ceremony's shares away "
                              "first")
    made = shares.split(pin_bytes, k, len(recipients), token)
    written: list[Path] = []
    try:
        with tempfile.TemporaryDirectory(prefix="signer-ceremony-") as tmp:
            for (name, line), share, target in zip(recipients, made, targets, strict=True):
                keyfile = Path(tmp) / name
                keyfile.write_text(line + "\n")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
                written.append(target)
                r = subprocess.run([age, "--encrypt", "-R", str(keyfile), "-o", str(target)],
                                   input=share.line().encode("ascii") + b"\n",
                                   capture_output=True, check=False)
                if r.returncode != 0:
                    raise SignerError(Exit.SOFTWARE, f"age failed for {name}: "
                                      f"{r.stderr.decode(errors='replace').strip()[:200]}")
                out.write(f"share {share.index} of {share.n} for {name}: {target} "
                          f"(encrypted to their key)\n")
    except BaseException:
        for t in written:
            t.unlink(missing_ok=True)
        raise
    what = f"token {token}" if token else "the signer"
    out.write(f"any {k} of these {len(recipients)} custodians unlock {what}; each runs: "
              f"age -d -i ~/.ssh/KEY NAME{SUFFIX} | ssh ACCOUNT@HOST "
              f"{unlock_command(token)}\n")
    return written
