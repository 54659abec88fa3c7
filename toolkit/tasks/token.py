"""`invoke token.csr` and `invoke token.import-cert`: the release certificate's round trip
(the work: toolkit.runner.signer_host); `invoke token.split-pin`: the PIN as k-of-n custodian
shares (the work: toolkit.runner.pin_ceremony)."""

from __future__ import annotations

from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from toolkit import exitcodes
from toolkit.runner.pin_ceremony import split_pin as split_pin_shares
from toolkit.runner.signer_host import PEM_CERT, SignerHost, fetch_csr
from toolkit.runner.signer_host import import_cert as install_cert

_HELP = {
    "profile": "signing profile whose key the certificate is for (default: release)",
    "inventory": "inventory path (default: inventory/lab, the local lab VM)",
    "limit": "the one host to talk to (Ansible --limit pattern; needed if the inventory has more)",
    "ask_become_pass": "ask for the sudo password once (it reaches Ansible through a pipe)",
    "vault_password_file": "vault password file (default: $ANSIBLE_VAULT_PASSWORD_FILE)",
}



@task(help=_HELP | {"out": "CSR file (default: <signer_controller_dir>/PROFILE-request.csr, "
                           "else ./PROFILE-request.csr)",
                    "subject": "subject of the request, e.g. 'CN=Example release signing'"})
def csr(c: Context, profile: str = "release", out: str | None = None, subject: str | None = None,
        inventory: str | None = None, limit: str | None = None, ask_become_pass: bool = False,
        vault_password_file: str | None = None) -> None:
    """Fetch a CSR for PROFILE's token key to the controller (for the CA)."""
    t = SignerHost("token.csr", inventory, limit, ask_become_pass, vault_password_file)
    dest = fetch_csr(t, profile, subject, out)
    print(f"token.csr: CSR for profile {profile!r} of {t.host} written to {dest}")


@task(positional=["cert"], iterable=["also"],
      help=_HELP | {"cert": "PEM certificate issued by the CA for the CSR",
                    "also": "PROFILE=CERT: another profile's certificate, installed in the same "
                            "round (one AIDE update, one restart); may be repeated"})
def import_cert(c: Context, cert: str, profile: str = "release", inventory: str | None = None,
                limit: str | None = None, ask_become_pass: bool = False,
                vault_password_file: str | None = None, also: list[str] | None = None) -> None:
    """Install the CA's certificate for PROFILE (checked against the token key), and any
    --also PROFILE=CERT in the same round, then restart signerd once."""
    if cert.startswith("-"):  # invoke hands `-h` to the positional argument, not to help
        raise Exit(f"token.import-cert: {cert!r} is an option, not a certificate file; "
                   "help: invoke --help token.import-cert", code=exitcodes.BAD_INPUT)
    certs = {profile: _read_cert(cert)}
    for pair in also or []:
        other, sep, path = pair.partition("=")
        if not (sep and other and path):
            raise Exit(f"token.import-cert: --also {pair!r}: expected PROFILE=CERT",
                       code=exitcodes.BAD_INPUT)
        if other in certs:
            raise Exit(f"token.import-cert: profile {other!r} is given twice",
                       code=exitcodes.BAD_INPUT)
        certs[other] = _read_cert(path)
    t = SignerHost("token.import-cert", inventory, limit, ask_become_pass, vault_password_file)
    out = install_cert(t, certs)
    print(out.strip() or f"token.import-cert: certificates installed for {', '.join(certs)} "
          f"on {t.host}")


def _read_cert(cert: str) -> bytes:
    try:
        pem = Path(cert).read_bytes()
    except OSError as exc:
        raise Exit(f"token.import-cert: {cert}: {exc.strerror}", code=exitcodes.BAD_INPUT) from None
    if not pem.lstrip().startswith(PEM_CERT):
        raise Exit(f"token.import-cert: {cert} is not a PEM certificate", code=exitcodes.BAD_INPUT)
    return pem


@task(help={k: v for k, v in _HELP.items() if k not in ("ask_become_pass", "profile")}
      | {"out": "directory for the encrypted shares (default: <token_pin_dir>/shares, "
                "<token_pin_dir>/shares/NAME with --token)",
         "token": "split the PIN of the card token_cards[NAME] (pin_source prompt, its "
                  "pin_shares and pin_share_holders) instead of the host token's"})
def split_pin(c: Context, inventory: str | None = None, limit: str | None = None,
              vault_password_file: str | None = None, out: str | None = None,
              token: str | None = None) -> None:
    """Split the host's token PIN (or a card's, --token NAME) into one share per holder
    (token_pin_shares of token_pin_share_holders; a card's own pin_shares and holders), each
    encrypted to the holder's SSH key with age (controller only).

    A holder unlocks with: age -d -i ~/.ssh/KEY NAME.share.age | ssh ACCOUNT@HOST unlock --share
    (a card's: ... unlock --token NAME --share)
    """
    made = split_pin_shares(inventory, limit, vault_password_file, out, token)
    print(f"token.split-pin: {len(made)} shares written; hand each file to its holder, then "
          "take the PIN itself off this controller (threat-model: the PIN as k-of-n shares)")


ns = Collection("token")
ns.add_task(csr)
ns.add_task(import_cert, name="import-cert")
ns.add_task(split_pin, name="split-pin")
