"""`signer keys ...`: generate keys on the token, check their residency, certificates and CSRs,
and the OpenPGP certificate of an openpgp profile's key.

Run as the daemon's user (the token store belongs to it). The PIN comes from the daemon's
`file:` PIN source, else from the file named by `--pin-file` (the deploy's transient 0400
file on tmpfs, pin_source prompt), else from the terminal; never from argv or the environment.
"""

from __future__ import annotations

import dataclasses
import getpass
import subprocess
import sys
from pathlib import Path
from typing import TextIO

from signer import certs, pin
from signer.algorithms import BY_NAME, ECDSA_P256, Algorithm
from signer.config import Config
from signer.errors import Exit, SignerError
from signer.token import Token
from signer.uri import PKCS11URI


def with_pin_file(cfg: Config, path: Path | None) -> Config:
    """`cfg` whose PIN comes from `path` (`--pin-file`) when its own pin_source is 'prompt'; a
    `file:` PIN source is the daemon's and stays."""
    if path is None or cfg.daemon.pin_file is not None:
        return cfg
    return dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon,
                                                               pin_source=f"file:{path}"))


def _pin(cfg: Config) -> str:
    path = cfg.daemon.pin_file
    if path is not None:
        return pin.read_file(path)
    if sys.stdin.isatty():
        return pin.check(getpass.getpass("token user PIN: ").encode(), "PIN")
    raise SignerError(Exit.CONFIG, "no PIN: the config's pin_source is 'prompt'; give "
                      "--pin-file FILE (mode 0400, holding the PIN), or run on a tty")


def open_token(cfg: Config, rw: bool = False, profile: str | None = None) -> Token:
    """The daemon's token, or the [tokens.*] card that holds `profile`'s key."""
    p = cfg.profiles.get(profile) if profile is not None else None
    if p is not None and p.token is not None:
        spec = cfg.tokens[p.token]
        if spec.pin_file is not None:
            secret = pin.read_file(spec.pin_file)
        elif sys.stdin.isatty():
            secret = pin.check(getpass.getpass(f"token {spec.name} user PIN: ").encode(),
                               "PIN")
        else:
            # A card whose PIN its custodians hold: no PIN file anywhere on the host, so no
            # deploy reads it; the daemon checks the card's keys at each unlock instead.
            raise SignerError(Exit.CONFIG, f"token {spec.name!r} takes its PIN from its "
                              "custodians (pin_source prompt): type it on a terminal; the "
                              "daemon checks its keys at each unlock")
        token = Token(spec.module, spec.label, spec.serial)
        token.login(secret, rw=rw)
        return token
    token = Token(cfg.daemon.token_module, cfg.daemon.token_label, cfg.daemon.token_serial)
    token.login(_pin(cfg), rw=rw)
    return token


def target(cfg: Config, profile: str | None) -> tuple[str, PKCS11URI, Algorithm]:
    """(description, key URI, algorithm) for --profile P or --audit (profile None)."""
    if profile is None:
        return "audit key", cfg.daemon.audit_key, ECDSA_P256
    p = cfg.profiles.get(profile)
    if p is None:
        raise SignerError(Exit.USAGE, f"unknown profile {profile!r} in {cfg.path}")
    return f"profile {profile}", p.key, BY_NAME[p.algorithm]


def generate(cfg: Config, profile: str | None, if_missing: bool, out: TextIO) -> int:
    what, uri, alg = target(cfg, profile)
    on_card = cfg.profiles[profile].token if profile is not None else None
    if on_card is not None:
        # A hardware token's keys come from its key ceremony (or its CA): never made here.
        raise SignerError(Exit.CONFIG, f"{what}'s key is on token {on_card!r}, provisioned "
                          "there: `signer keys` does not generate keys on it")
    token = open_token(cfg, rw=True)
    try:
        if if_missing and token.exists(uri.label):
            out.write(f"exists: {what}: {uri}\n")
            return Exit.OK
        token.generate(uri, alg)
        out.write(f"generated: {what}: {uri} ({alg.name}, on the token, not extractable)\n")
    finally:
        token.close()
    return Exit.OK


def list_keys(cfg: Config, out: TextIO) -> int:
    token = open_token(cfg)
    try:
        for k in token.keys():
            attrs = " ".join(f"{name}={value}" for name, value in k.residency.items())
            out.write(f"{k.object_class:7} {k.label!r} id={k.key_id.hex() or '-'} "
                      f"{k.key_type} {attrs}".rstrip() + "\n")
    finally:
        token.close()
    return Exit.OK


def check(cfg: Config, out: TextIO, profiles: list[str] | None = None) -> int:
    """Residency of every key (or of `profiles`' keys), each on the token that holds it.

    A process loads one PKCS#11 module (python-pkcs11): the keys of a card of another module
    are checked by a `signer keys check` of its own, as the daemon opens it in its own token
    process. Those run while this process checks its own tokens (a card's check is seconds of
    PC/SC on a slow host); their lines follow this process's own."""
    failed = False
    names: list[str | None] = [*cfg.profiles, None] if profiles is None else [*profiles]
    # one session per token: the daemon's, and each card's
    by_token: dict[str | None, list[str | None]] = {}
    for name in names:
        by_token.setdefault(cfg.profiles[name].token if name else None, []).append(name)
    daemon_module = cfg.daemon.token_module
    apart: dict[str, subprocess.Popen[str]] = {}
    try:
        for card, members in by_token.items():
            if card and cfg.tokens[card].module != daemon_module and len(by_token) > 1:
                argv = [sys.executable, "-m", "signer", "keys", "check", "--config",
                        str(cfg.path), *(f"--profile={m}" for m in members if m)]
                apart[card] = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True)
        for card, members in by_token.items():
            if card in apart:
                continue
            token = open_token(cfg, profile=members[0] if card else None)
            try:
                for name in members:
                    what, uri, alg = target(cfg, name)
                    problems = token.residency_problems(uri, alg)
                    failed = failed or bool(problems)
                    status = "FAIL" if problems else "ok"
                    detail = f": {'; '.join(problems)}" if problems else ""
                    out.write(f"{status} {what}: {uri}{detail}\n")
            finally:
                token.close()
        for card, proc in apart.items():
            stdout, stderr = proc.communicate()
            out.write(stdout)
            if proc.returncode not in (Exit.OK, Exit.NOPERM):
                raise SignerError(proc.returncode, stderr.strip().splitlines()[-1]
                                  if stderr.strip() else f"keys check of token {card} failed")
            failed = failed or proc.returncode != Exit.OK
    finally:
        for proc in apart.values():  # after an error: none is left behind
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return Exit.NOPERM if failed else Exit.OK


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def selfsign(cfg: Config, profile: str | None, subject: str | None, days: int,
             out_path: Path | None, if_missing: bool, out: TextIO) -> int:
    what, uri, alg = target(cfg, profile)
    dest = out_path or (cfg.profiles[profile].cert if profile else cfg.daemon.audit_cert)
    if dest is None:
        raise SignerError(Exit.USAGE, f"{what} has no certificate path in {cfg.path}: give --out")
    if dest.exists():
        if if_missing:
            out.write(f"exists: {dest}\n")
            return Exit.OK
        raise SignerError(Exit.EXISTS, f"{dest} exists: refusing to replace it")
    token = open_token(cfg, profile=profile)
    try:
        key = token.private_key(uri)
        cert = certs.self_signed(token.public_key_info(uri), alg,
                                 lambda d: token.sign_digest(key, alg, d),
                                 subject or f"signer {what}", days)
    finally:
        token.close()
    _write_public(dest, certs.to_pem(cert))
    out.write(f"wrote {dest}: self-signed certificate for {what}, {days} days\n")
    return Exit.OK


def csr(cfg: Config, profile: str, subject: str | None, out_path: Path | None,
        out: TextIO) -> int:
    what, uri, alg = target(cfg, profile)
    token = open_token(cfg, profile=profile)
    try:
        key = token.private_key(uri)
        req = certs.request(token.public_key_info(uri), alg,
                            lambda d: token.sign_digest(key, alg, d), subject or f"signer {what}")
    finally:
        token.close()
    data = certs.to_pem(req)
    if out_path is None:
        out.write(data.decode("ascii"))
    else:
        _write_public(out_path, data)
        out.write(f"wrote {out_path}\n")
    return Exit.OK


def import_cert(cfg: Config, profile: str, cert_path: Path, out: TextIO) -> int:
    what, uri, _alg = target(cfg, profile)
    dest = cfg.profiles[profile].cert
    if dest is None:
        raise SignerError(Exit.CONFIG, f"profiles.{profile}.cert is not set in {cfg.path}")
    cert = certs.load_cert(cert_path)
    token = open_token(cfg, profile=profile)
    try:
        spki = token.public_key_info(uri)
    finally:
        token.close()
    if not certs.matches(cert, spki):
        raise SignerError(Exit.DATA, f"{cert_path} is not a certificate for {what}'s key {uri}")
    _write_public(dest, certs.to_pem(cert))
    out.write(f"installed {cert_path} as {dest} for {what}; restart the daemon to use it\n")
    return Exit.OK


def openpgp_cert(cfg: Config, profile: str, user_id: str, out_path: Path | None, armor: bool,
                 out: TextIO) -> int:
    """The profile key as an OpenPGP certificate (primary key, `user_id`, its self-signature
    made by the token), for `signed-by=` keyrings and `gpgv --keyring`. Binary to `out_path`
    unless `armor`; armoured on stdout without `out_path`.

    The self-signature is dated at the key's creation time, not now: a verifier such as sqv
    wants a binding valid when each signature was made, so a certificate exported again
    later still vouches for every signature since the key's creation."""
    from signer.formats import openpgp

    what, uri, alg = target(cfg, profile)
    created = cfg.profiles[profile].openpgp_created
    if created is None:
        raise SignerError(Exit.CONFIG, f"profiles.{profile}.openpgp_created is not set in "
                          f"{cfg.path}: the key's OpenPGP creation time is part of its "
                          "fingerprint")
    if alg.name not in openpgp.ALGORITHMS:
        raise SignerError(Exit.CONFIG, f"{what} is {alg.name}: OpenPGP v4 takes "
                          f"{' or '.join(openpgp.ALGORITHMS)}")
    if not user_id or any(c in user_id for c in "\r\n\0"):
        raise SignerError(Exit.USAGE, "--uid must be one line, e.g. 'Example Releases "
                          "<releases@example.org>'")
    token = open_token(cfg)
    try:
        key = token.private_key(uri)
        pgp_key = openpgp.public_key(token.public_key_info(uri).dump(), created)
        try:
            data = openpgp.certificate(pgp_key, user_id, created,
                                       lambda d: token.sign_digest(key, alg, d))
        except openpgp.OpenPGPError as exc:
            raise SignerError(Exit.CONFIG, f"{what}: {exc}") from None
    finally:
        token.close()
    fpr = pgp_key.fingerprint.hex().upper()
    if out_path is None:
        out.write(openpgp.armor(data, "PUBLIC KEY BLOCK").decode("ascii"))
        return Exit.OK
    _write_public(out_path, openpgp.armor(data, "PUBLIC KEY BLOCK") if armor else data)
    out.write(f"wrote {out_path}: OpenPGP certificate of {what}, fingerprint {fpr}\n")
    return Exit.OK
