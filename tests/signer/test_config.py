"""The config schema: every error names the file, the key and the problem on one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from signer import config, uri
from signer.errors import SignerError
from toolkit.local_signer import toml

BASE: dict[str, dict[str, object]] = {
    "daemon": {
        "socket": "/run/signer/signer.sock", "audit_log": "/var/lib/signer/audit.jsonl",
        "state_dir": "/var/lib/signer/state", "token_module": "/usr/lib/softhsm/libsofthsm2.so",
        "token_label": "signer", "pin_source": "file:/etc/signer/pin",
        "audit_key": "pkcs11:token=signer;object=audit;type=private",
    },
    "profiles.dev": {
        "key": "pkcs11:token=signer;object=dev;type=private", "algorithm": "ecdsa-p256",
        "cert": "/etc/signer/certs/dev.pem", "formats": ["cms", "raw"], "max_size": 1024,
        "clients": ["build1"], "budget_count": 10, "budget_window": 60,
    },
    "profiles.release": {
        "key": "pkcs11:object=release", "algorithm": "rsa3072-pss", "formats": ["raw"],
        "max_size": 1024, "clients": ["build1"], "approvals": 2,
        "custodians": ["alice", "bob"], "budget_count": 10, "budget_window": 60,
    },
    "clients.build1": {"ssh_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA build1"},
    "custodians.alice": {"ssh_key": "sk-ssh-ed25519@openssh.com AAAAGnNr alice@yubikey"},
    "custodians.bob": {"ssh_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAbob0 bob"},
}


def parse(**changes: dict[str, object] | None) -> config.Config:
    tables = {k: dict(v) for k, v in BASE.items()}
    for table, values in changes.items():
        name = table.replace("__", ".")
        if values is None:
            tables.pop(name)
        else:
            tables.setdefault(name, {}).update(values)
    return config.parse(toml(tables), Path("/etc/signer/signer.toml"))


def test_the_example_parses() -> None:
    cfg = parse()
    assert set(cfg.profiles) == {"dev", "release"}
    assert cfg.profiles["release"].approvals == 2
    assert cfg.daemon.pin_file == Path("/etc/signer/pin")
    assert cfg.daemon.checkpoint_interval == 1000


@pytest.mark.parametrize(("changes", "where", "problem"), [
    ({"daemon": {"sockett": "/x"}}, "daemon.sockett", "unknown key"),
    ({"daemon": {"socket": "run/x"}}, "daemon.socket", "absolute path"),
    ({"daemon": {"pin_source": "env:PIN"}}, "daemon.pin_source", "'prompt' or 'file:"),
    ({"daemon": {"audit_key": "pkcs11:object=audit;pin-value=1234"}}, "daemon.audit_key",
     "unknown or malformed"),
    ({"daemon": {"audit_key": "pkcs11:object=audit?pin-value=1234"}}, "daemon.audit_key",
     "query attributes"),
    ({"profiles__dev": {"key": "pkcs11:token=other;object=dev"}}, "profiles.dev.key",
     "is neither daemon.token_label"),
    ({"profiles__dev": {"key": "pkcs11:object=audit"}}, "profiles.dev.key",
     "must not sign artifacts"),
    ({"profiles__dev": {"algorithm": "rsa1024"}}, "profiles.dev.algorithm", "must be one of"),
    ({"profiles__dev": {"formats": ["pem"]}}, "profiles.dev.formats", "non-empty list"),
    ({"profiles__dev": {"clients": ["nobody"]}}, "profiles.dev.clients",
     "unknown client 'nobody'"),
    ({"profiles__dev": {"max_size": 0}}, "profiles.dev.max_size", ">= 1"),
    ({"profiles__dev": {"max_size": True}}, "profiles.dev.max_size", "integer"),
    ({"profiles__release": {"approvals": 3}}, "profiles.release.approvals",
     "needs 3 custodians, 2 listed"),
    ({"profiles__release": {"formats": ["cms"]}}, "profiles.release.cert",
     "required when formats include cms"),
    ({"profiles__release": {"formats": ["authenticode"], "cert": "/etc/signer/r.pem"}},
     "profiles.release.algorithm", "rsa3072-pss cannot sign authenticode"),
    ({"profiles__release": {"formats": ["authenticode"], "algorithm": "rsa3072-pkcs1"}},
     "profiles.release.cert", "required when formats include authenticode"),
    ({"profiles__dev": {"chain": "certs/ca.pem"}}, "profiles.dev.chain", "absolute path"),
    ({"profiles__dev": {"require_timestamp": "yes"}}, "profiles.dev.require_timestamp",
     "must be true or false"),
    ({"profiles__dev": {"require_timestamp": True}}, "profiles.dev.require_timestamp",
     "format raw carries no timestamp"),
    ({"profiles__Dev": {"key": "pkcs11:object=x"}}, "profiles.Dev", "bad name"),
    ({"clients__build1": {"ssh_key": "not a key"}}, "clients.build1.ssh_key",
     "not an OpenSSH public key"),
    ({"custodians__build1": {"ssh_key": "ssh-ed25519 AAAA x"}}, "custodians",
     "used by a client too"),
    ({"custodians__carol": {"ssh_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAbob0 carol"}},
     "custodians.carol.ssh_key", "the same key as custodians.bob"),
    ({"custodians__carol": {"ssh_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA other"}},
     "custodians.carol.ssh_key", "the same key as clients.build1"),
    ({"profiles__release": {"max_queued": 0}}, "profiles.release.max_queued", ">= 1"),
    ({"extra": {"x": 1}}, "extra", "unknown section"),
    ({"daemon": None}, "daemon", "missing table"),
])
def test_config_errors_name_file_key_and_problem(changes: dict[str, dict[str, object] | None],
                                                 where: str, problem: str) -> None:
    with pytest.raises(SignerError) as exc:
        parse(**changes)
    message = exc.value.message
    assert exc.value.code == 78
    assert message.startswith(f"/etc/signer/signer.toml: {where}: "), message
    assert problem in message
    assert "\n" not in message


def rsa_key_lines() -> tuple[str, str]:
    """One RSA key as two OpenSSH lines that differ in text: the second writes the public
    exponent with a leading zero byte, which OpenSSH (sshd, ssh-keygen) reads as the same key."""
    import base64
    import struct

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(65537, 2048).public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()
    blob = base64.b64decode(line.split()[1])
    fields = []
    while blob:
        (n,), blob = struct.unpack(">I", blob[:4]), blob[4:]
        fields.append(blob[:n])
        blob = blob[n:]
    kind, e, n = fields
    other = b"".join(struct.pack(">I", len(x)) + x for x in (kind, b"\0" + e, n))
    return line, f"ssh-rsa {base64.b64encode(other).decode()}"


def test_one_key_in_two_encodings_is_one_key() -> None:
    """Two custodians whose lines differ only in how the key is encoded hold one key: one
    person could meet a 2-of-N alone. `config check` compares the keys, not the text."""
    line, again = rsa_key_lines()
    assert line.split()[1] != again.split()[1]
    with pytest.raises(SignerError) as exc:
        parse(custodians__bob={"ssh_key": line + " bob"},
              custodians__carol={"ssh_key": again + " carol"})
    assert exc.value.message == ("/etc/signer/signer.toml: custodians.carol.ssh_key: the same "
                                 "key as custodians.bob")
    with pytest.raises(SignerError, match=r"the same key as clients\.build1"):
        parse(clients__build1={"ssh_key": again}, custodians__bob={"ssh_key": line})
    assert config.key_identity(line) == config.key_identity(again + " comment")
    other = rsa_key_lines()[0]
    assert config.key_identity(other) != config.key_identity(line)
    parse(custodians__bob={"ssh_key": line + " bob"}, custodians__carol={"ssh_key": other})


def test_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[daemon\nsocket = 1\n")
    with pytest.raises(SignerError) as exc:
        config.load(path)
    assert exc.value.message.startswith(f"{path}: (syntax): ")


def test_uris_round_trip_and_refuse_pins() -> None:
    u = uri.parse("pkcs11:token=my%20token;object=dev;id=%01%02;type=private")
    assert (u.token, u.label, u.key_id) == ("my token", "dev", b"\x01\x02")
    assert uri.parse(str(u)) == u
    for bad in ("pkcs11:object=a;object=b", "pkcs11:token=t", "file:/x",
                "pkcs11:object=a;type=weird"):
        with pytest.raises(uri.URIError):
            uri.parse(bad)


def test_config_check_command(tmp_path: Path) -> None:
    from signer.cli import main

    good = tmp_path / "signer.toml"
    good.write_text(toml(BASE))
    assert main(["config", "check", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(toml({**BASE, "profiles.dev": {**BASE["profiles.dev"], "formats": []}}))
    assert main(["config", "check", str(bad)]) == 78


def test_config_check_loads_neither_the_client_nor_the_daemon(tmp_path: Path) -> None:
    """`signer config check` (deploy's validation, the posture suite's SGN-08 test: a slow
    host pays every import) loads the configuration's modules only, not the client's, the
    daemon's or the audit chain's, nor the token's."""
    import subprocess
    import sys

    good = tmp_path / "signer.toml"
    good.write_text(toml(BASE))
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print(' '.join(sorted(sys.modules))))\n"
             "from signer.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", probe, "config", "check", str(good)],
                       capture_output=True, text=True, check=False,
                       cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "signer.config" in loaded
    # (cryptography it needs: the clients' and custodians' SSH keys are parsed)
    heavy = {"signer.client", "signer.daemon", "signer.audit", "signer.keys", "signer.service",
             "pkcs11"}
    assert not heavy & loaded, sorted(heavy & loaded)


def test_a_card_profile_is_bound_to_its_token_by_label_and_serial() -> None:
    """[tokens.*]: a profile whose key names a card's label is that card's; a serial= in the
    URI must be the card's configured serial; two tokens of one label are refused."""
    card: dict[str, object] = {"module": "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
                               "label": "EV token", "serial": "0123",
                               "pin_source": "file:/etc/signer/pin-ev"}
    key = "pkcs11:token=EV%20token;serial=0123;object=sign;type=private"
    profile: dict[str, object] = {"key": key}
    cfg = parse(tokens__ev=card, profiles__dev=profile)
    assert cfg.profiles["dev"].token == "ev" and cfg.tokens["ev"].serial == "0123"
    assert cfg.profiles["dev"].key.serial == "0123"
    with pytest.raises(SignerError, match="serial '9999' is not the serial configured"):
        parse(tokens__ev=card, profiles__dev={"key": key.replace("0123", "9999")})
    with pytest.raises(SignerError, match="another token's label"):
        parse(tokens__ev={**card, "label": "signer"})
    with pytest.raises(SignerError, match="must be 'prompt' or 'file:/absolute/path'"):
        parse(tokens__ev={**card, "pin_source": "/etc/signer/pin-ev"})


def test_a_card_takes_the_pin_from_custodians_by_the_daemons_rules() -> None:
    """[tokens.*] with pin_source prompt: the whole PIN or k-of-n shares, refused as for the
    daemon's own token when one custodian alone would hold it, when a PIN file is given
    shares, or when there are fewer custodians than k."""
    card: dict[str, object] = {"module": "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
                               "label": "EV token", "pin_source": "prompt"}
    cfg = parse(tokens__ev={**card, "pin_shares": 2, "pin_share_window": 60})
    ev = cfg.tokens["ev"]
    assert (ev.pin_file, ev.pin_shares, ev.pin_share_window) == (None, 2, 60)
    assert parse(tokens__ev=card).tokens["ev"].pin_shares == 0  # one custodian, whole PIN
    cases: list[tuple[dict[str, object], str]] = [
        ({"pin_shares": 1}, "tokens.ev.pin_shares: must be 0 .* or k >= 2"),
        ({"pin_shares": 2, "pin_source": "file:/etc/signer/pin-ev"},
         "tokens.ev.pin_shares: needs pin_source = 'prompt'"),
        ({"pin_shares": 9}, "tokens.ev.pin_shares: needs 9 custodians"),
        ({"pin_share_window": 0}, "tokens.ev.pin_share_window: must be >= 1")]
    for bad, why in cases:
        with pytest.raises(SignerError, match=why):
            parse(tokens__ev={**card, **bad})
