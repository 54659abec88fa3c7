"""`signer`: the command line (see signer/README.md for the table of commands and exit codes).

Every failure is one line on stderr, `signer: ...`, and an exit code from `signer.errors`; a
traceback is a bug."""

from __future__ import annotations

import sys

from signer.errors import Exit, SignerError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    import argparse
    from pathlib import Path
    from typing import NoReturn

# Each command imports what it needs. The gateway runs once per SSH request and must not pay
# for PKCS#11, cryptography and asn1crypto, nor even for argparse: `main` hands `gateway` to
# signer.gateway's own small parser before anything else is imported.


UNLOCK_HELP = """\
After each start the signer is locked when its token's PIN comes from custodians
(pin_source = "prompt"), and so is each card ([tokens.NAME]) with pin_source = "prompt", at
each start and again each time the card is pulled and plugged back: its PIN is kept nowhere.
A refused signature (exit 69) says which step is missing.

The whole PIN (pin_shares = 0): one custodian sends it on stdin.
k-of-n shares (pin_shares = k): each of k custodians sends their own share, within the
window (pin_share_window); a custodian counts once; a share made for one token (the
daemon's, or a card's: `signer pin split --token NAME`) counts for no other. The k-th share
logs the token in, unless the shares do not open the ceremony's seal (nothing is tried on
the token) or the token has one PIN try left (the signer never spends it); a wrong PIN is
tried once, and the custodians start again. The audit log records who sent a share, never
the share.

  age -d -i ~/.ssh/id_ed25519 alice.share.age \\
    | signer unlock --host custodian-alice@signhost --token card --share

is the same as `... | ssh custodian-alice@signhost unlock --token card --share`.
"""


def _parser() -> argparse.ArgumentParser:
    import argparse
    from pathlib import Path

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise SignerError(Exit.USAGE, f"{self.prog}: {message}")

    p = _Parser(prog="signer", description="code-signing service: daemon, gateway, client")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="run the daemon (foreground)")
    s.add_argument("--config", type=Path, required=True)

    s = sub.add_parser("gateway", help="SSH forced command (reads SSH_ORIGINAL_COMMAND)")
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument("--client")
    who.add_argument("--custodian")
    s.add_argument("--config", type=Path)
    s.add_argument("--socket", type=Path)

    s = sub.add_parser("config", help="configuration")
    csub = s.add_subparsers(dest="action", required=True, parser_class=_Parser)
    c = csub.add_parser("check", help="validate a configuration file")
    c.add_argument("file", type=Path)

    s = sub.add_parser("keys", help="keys on the token")
    ksub = s.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for name in ("generate", "list", "check", "selfsign", "csr", "import-cert", "openpgp"):
        k = ksub.add_parser(name, help="the profile key's OpenPGP certificate (primary key, "
                            "user ID, self-signature by the token), for signed-by= keyrings"
                            if name == "openpgp" else None)
        k.add_argument("--config", type=Path, required=True)
        k.add_argument("--pin-file", type=Path,
                       help="a file (mode 0400) holding the user PIN, when the config's "
                            "pin_source is 'prompt' and there is no terminal")
        if name in ("generate", "selfsign"):
            which = k.add_mutually_exclusive_group(required=True)
            if name == "generate":  # several profiles' keys in one run (one start-up, deploy)
                which.add_argument("--profile", action="append")
            else:
                which.add_argument("--profile")
            which.add_argument("--audit", action="store_true")
            k.add_argument("--if-missing", action="store_true")
        if name in ("csr", "import-cert", "openpgp"):
            k.add_argument("--profile", required=True)
        if name == "openpgp":
            k.add_argument("--uid", required=True, help="the user ID, e.g. 'Example Releases "
                           "<releases@example.org>'")
            k.add_argument("--out", type=Path, help="write here (binary, as apt's signed-by= "
                           "and gpgv --keyring read it; default: armoured on stdout)")
            k.add_argument("--armor", action="store_true", help="armoured in --out too")
        if name == "check":  # only these profiles' keys (repeat), e.g. those on one card
            k.add_argument("--profile", action="append",
                           help="check only this profile's key (repeatable)")
        if name in ("selfsign", "csr"):
            k.add_argument("--subject")
            k.add_argument("--out", type=Path)
        if name == "selfsign":
            k.add_argument("--days", type=int, default=365)
        if name == "import-cert":
            k.add_argument("cert", type=Path)

    s = sub.add_parser("pin", help="the token PIN as k-of-n custodian shares (key ceremony)")
    psub = s.add_subparsers(dest="action", required=True, parser_class=_Parser)
    k = psub.add_parser("split", help="split the PIN into one share per custodian, each "
                        "encrypted to the custodian's SSH key with age")
    k.add_argument("--threshold", "-k", type=int, required=True, metavar="K",
                   help="shares needed to unlock (the config's daemon.pin_shares), >= 2")
    k.add_argument("--custodian", action="append", required=True,
                   metavar="NAME=KEY_FILE", help="one per custodian (n in all): a file "
                   "holding their ssh-ed25519 or ssh-rsa public key, or an age recipient")
    k.add_argument("--pin-file", type=Path, help="the PIN (a file only you can read); "
                   "default: asked on the terminal")
    k.add_argument("--out", type=Path, required=True,
                   help="directory for the encrypted shares (NAME.share.age)")
    k.add_argument("--token", metavar="NAME", default="",
                   help="the PIN is that of the card [tokens.NAME] (pin_source prompt; its "
                        "pin_shares is K): its shares count for that card only, sent with "
                        "`unlock --token NAME --share`; default: the daemon's own token")

    s = sub.add_parser("audit", help="the audit log")
    asub = s.add_subparsers(dest="action", required=True, parser_class=_Parser)
    a = asub.add_parser("verify")
    a.add_argument("file", type=Path, nargs="+",
                   help="the log (its closed segments next to it count too), a directory of "
                        "segments, or segments one by one")
    key = a.add_mutually_exclusive_group()
    key.add_argument("--cert", type=Path)
    key.add_argument("--pubkey", type=Path)
    key.add_argument("--chain-only", action="store_true",
                     help="check the hash chain alone (proves nothing against a forger)")
    a.add_argument("--live", action="store_true")
    a = asub.add_parser("adopt", help="take on, after review, entries no checkpoint vouches "
                        "for as verified (daemon stopped; needs the token PIN)")
    a.add_argument("--config", type=Path, required=True)
    a.add_argument("--seqs", required=True, metavar="FIRST-LAST")
    a.add_argument("--operator", required=True, metavar="NAME", help="who reviewed them")
    a.add_argument("--pin-file", type=Path)
    a = asub.add_parser("compare", help="the host's log against the collector's copy")
    a.add_argument("local", type=Path, help="the log: a file (with its closed segments next "
                   "to it), a directory of segments")
    a.add_argument("copy", type=Path, help="the collector's copy: entries one per line")
    a.add_argument("--cert", type=Path, help="the audit certificate: checkpoints are checked")
    a.add_argument("--from", dest="since", type=int, default=0, metavar="SEQ",
                   help="compare from this seq on (the copy started later)")
    a.add_argument("--max-lag", type=int, default=None, metavar="N",
                   help="entries of LOCAL not yet in COPY before the copy lags (exit 4; "
                   "default 1000)")
    a.add_argument("--max-lag-seconds", type=float, default=None, metavar="S",
                   help="age of the oldest entry not yet in COPY before the copy lags "
                   "(exit 4; default 600)")
    a.add_argument("--json", action="store_true", help="one JSON object")
    a = asub.add_parser("show")
    a.add_argument("file", type=Path)
    a.add_argument("--last", type=int)

    s = sub.add_parser("submit", help="send an artifact for signing (over ssh)")
    s.add_argument("--host", required=True,
                   help="the signing host as ssh reaches it: your gateway account, e.g. "
                        "sign-build@signhost (keys and options from your ssh config)")
    s.add_argument("--profile", required=True, help="the signing profile (its key, formats, "
                                                     "budget and approvals)")
    s.add_argument("--format", choices=("cms", "raw", "authenticode", "openpgp",
                                        "openpgp-cleartext"), default="cms",
                   help="cms: detached CMS (.p7s); raw: the bare signature (.sig); "
                        "authenticode: signs the Windows file in place (PE .exe/.dll/.sys, "
                        ".cab, .msi, .ps1; only its Authenticode digest travels); "
                        "openpgp: detached "
                        "OpenPGP signature (.sig, .asc with --armor); openpgp-cleartext: the "
                        "cleartext-signed text (Release becomes InRelease)")
    s.add_argument("--armor", action="store_true",
                   help="openpgp: write the ASCII-armoured signature (.asc)")
    s.add_argument("--name", help="the name the audit log records (default: the file's)")
    s.add_argument("--out", type=Path, help="where the result goes (default: the artifact's "
                                            "name + .p7s/.sig/.asc; authenticode: the "
                                            "artifact itself, signed in place)")
    s.add_argument("--timestamp", metavar="URL",
                   help="add an RFC 3161 timestamp from this TSA (cms, authenticode)")
    s.add_argument("--cafile", type=Path,
                   help="authenticode: trust anchors the signed file must chain to "
                        "(default: the system's)")
    s.add_argument("--wait", action="store_true",
                   help="a profile with approvals: wait for the custodians, then fetch")
    s.add_argument("--poll", type=float, default=5.0,
                   help="seconds between `fetch` polls with --wait")
    s.add_argument("--ssh", default="ssh", help="the ssh client to run (default: ssh)")
    s.add_argument("artifact", type=Path, help="the file to sign (cms, raw, openpgp: streamed "
                                               "to the host, which hashes it and keeps none "
                                               "of it; authenticode: only the request "
                                               "osslsigncode computes is sent)")

    s = sub.add_parser("approve", help="approve a request (custodians, over ssh)")
    s.add_argument("--host", required=True)
    s.add_argument("--key", type=Path, required=True)
    s.add_argument("--artifact", type=Path)
    s.add_argument("--yes", action="store_true")
    s.add_argument("--ssh", default="ssh")
    s.add_argument("id")

    s = sub.add_parser(
        "unlock", help="send the token PIN, or your share of it, to a locked signer "
        "(custodians, over ssh)", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=UNLOCK_HELP)
    s.add_argument("--host", required=True,
                   help="your custodian account on the signing host, e.g. "
                        "custodian-alice@signhost (keys and options from your ssh config)")
    s.add_argument("--share", action="store_true",
                   help="stdin is your share (one line, from `age -d ... NAME.share.age`), "
                        "not the whole PIN")
    s.add_argument("--token", metavar="NAME",
                   help="unlock the card [tokens.NAME] (pin_source prompt), not the "
                        "daemon's own token")
    s.add_argument("--ssh", default="ssh", help="the ssh client to run (default: ssh)")

    s = sub.add_parser("verify", help="verify a signature offline")
    s.add_argument("--format", choices=("cms", "raw"), required=True)
    key = s.add_mutually_exclusive_group(required=True)
    key.add_argument("--cert", type=Path)
    key.add_argument("--pubkey", type=Path)
    s.add_argument("--pss", action="store_true")
    s.add_argument("artifact", type=Path)
    s.add_argument("signature", type=Path)
    return p


def _audit_show(path: Path, last: int | None) -> int:
    import json
    from collections import deque

    from signer import audit

    def show(line: bytes) -> None:
        try:
            entry = json.loads(line)
            text = audit.show(entry) if isinstance(entry, dict) else None
        except ValueError:
            text = None
        print(text or f"?? unreadable line {json.dumps(line.decode('latin-1'))}")

    try:
        with path.open("rb") as f:
            for line in deque(f, maxlen=last) if last else f:
                show(line)
    except OSError as exc:
        raise SignerError(Exit.USAGE, f"{path}: {exc.strerror}") from None
    return Exit.OK


# `audit compare`: 0 consistent, 1 LOCAL and COPY disagree, 2 usage or unreadable, 3 empty
# copy, 4 the copy lags, 5 LOCAL's oldest segments missing (signer.compare.EXIT)
COMPARE_USAGE = 2


def _audit_compare(args: argparse.Namespace) -> int:
    import zlib

    from signer import certs, compare

    try:
        spki = certs.load_public_key(args.cert) if args.cert else None
        bounds: dict[str, float] = {}
        if args.max_lag is not None:
            bounds["max_lag"] = args.max_lag
        if args.max_lag_seconds is not None:
            bounds["max_lag_seconds"] = args.max_lag_seconds
        if any(v < 0 for v in bounds.values()):
            raise ValueError("--max-lag and --max-lag-seconds must not be negative")
        result = compare.compare([args.local], args.copy, spki, args.since,
                                 int(bounds.get("max_lag", compare.DEFAULT_MAX_LAG)),
                                 bounds.get("max_lag_seconds", compare.DEFAULT_MAX_LAG_SECONDS))
    except (OSError, ValueError, EOFError, zlib.error, SignerError) as exc:
        why = exc.message if isinstance(exc, SignerError) else \
            exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        sys.stderr.write(f"signer: audit compare: {where}{why}\n")
        return COMPARE_USAGE
    sys.stdout.write((result.json() if args.json else result.text()) + "\n")
    return result.exit_code


def dispatch(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    if args.command == "gateway":
        from signer import gateway

        role, name = ("client", args.client) if args.client else ("custodian", args.custodian)
        return gateway.main(role, name, args.config, args.socket)
    # Each branch imports only what it runs: `config check` and `keys check` run in the
    # posture suite and in deploy's validation, where the client's and the daemon's imports
    # cost seconds on a slow host.
    if args.command == "serve":
        import logging

        from signer import config, daemon, service

        cfg = config.load(args.config)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(service.EscapingFormatter("%(levelname)s %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        daemon.run(cfg)
        return Exit.OK
    if args.command == "config":
        from signer import config

        cfg = config.load(args.file)
        out.write(f"{args.file}: ok ({len(cfg.profiles)} profiles, {len(cfg.clients)} clients, "
                  f"{len(cfg.custodians)} custodians)\n")
        return Exit.OK
    if args.command == "keys":
        from signer import config, keys

        cfg = keys.with_pin_file(config.load(args.config), args.pin_file)
        profile = getattr(args, "profile", None)
        if args.action == "generate":
            for one in profile or [None]:
                keys.generate(cfg, one, args.if_missing, out)
            return Exit.OK
        if args.action == "list":
            return keys.list_keys(cfg, out)
        if args.action == "check":
            return keys.check(cfg, out, profile)
        if args.action == "selfsign":
            return keys.selfsign(cfg, profile, args.subject, args.days, args.out,
                                 args.if_missing, out)
        if args.action == "csr":
            return keys.csr(cfg, args.profile, args.subject, args.out, out)
        if args.action == "openpgp":
            return keys.openpgp_cert(cfg, args.profile, args.uid, args.out, args.armor, out)
        return keys.import_cert(cfg, args.profile, args.cert, out)
    if args.command == "pin":
        from signer import ceremony

        recipients = [ceremony.parse_custodian(c) for c in args.custodian]
        ceremony.split(ceremony.read_pin(args.pin_file), args.threshold, recipients, args.out,
                       out, token=args.token)
        return Exit.OK
    if args.command == "audit":
        if args.action == "show":
            return _audit_show(args.file, args.last)
        if args.action == "compare":
            return _audit_compare(args)
        if args.action == "adopt":
            from signer import adopt, config, keys

            cfg = keys.with_pin_file(config.load(args.config), args.pin_file)
            return adopt.adopt(cfg, adopt.parse_range(args.seqs), args.operator, out)
        from signer import audit, certs

        key_file = args.cert or args.pubkey
        spki = certs.load_public_key(key_file) if key_file else None
        ok, message = audit.verify_file(list(args.file), spki, args.live, args.chain_only)
        out.write(message + "\n")
        return Exit.OK if ok else Exit.INVALID
    from signer import client

    if args.command == "submit":
        return client.submit(args.host, args.profile, args.format, args.name, args.out,
                             args.wait, args.ssh, args.artifact, err, args.poll,
                             args.timestamp, args.cafile, args.armor)
    if args.command == "approve":
        return client.approve(args.host, args.key, args.id, args.artifact, args.yes, args.ssh,
                              out, err)
    if args.command == "unlock":
        return client.unlock(args.host, args.share, args.token, args.ssh, err)
    key_file = args.cert or args.pubkey
    return client.verify(args.format, key_file, args.pss, args.artifact, args.signature, out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gateway"]:
        from signer import gateway

        return gateway.main_argv(argv[1:])
    try:
        args = _parser().parse_args(argv)
        return dispatch(args)
    except SignerError as exc:
        sys.stderr.write(f"signer: {' '.join(exc.message.splitlines())}\n")
        # `audit compare` keeps the 0/1/2 of diff and cmp: a collector script reads it
        return COMPARE_USAGE if argv[:2] == ["audit", "compare"] else exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
