"""`invoke token.split-pin`: the key ceremony's PIN split, from the inventory (the work:
signer/ceremony.py).

On the controller, where the token role made the PIN (token_pin_dir/user-pin, 0600): k is
token_pin_shares, the holders are token_pin_share_holders (else every signer custodian), and
each holder's share is written to token_pin_dir/shares/NAME.share.age, encrypted to their
token_pin_share_recipients entry (an age recipient: what a custodian with a FIDO2 SSH key
gives), else to the SSH key the inventory gives them (signer_custodians[].ssh_key). Nothing
goes to the host: a share reaches the daemon only from its custodian's own `unlock --share`.

With `--token NAME`, the PIN is that of the card token_cards[NAME] (pin_source prompt; set by
whoever provisioned the card, kept at its pin_src, default token_pin_dir/NAME-user-pin): k is
its pin_shares, the holders its pin_share_holders (else every custodian), the shares go to
token_pin_dir/shares/NAME/ and name the card, so they count for it alone
(`unlock --token NAME --share`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from invoke.exceptions import Exit

from hostaccess import hostvars
from signer import ceremony, pin
from signer.errors import SignerError
from toolkit import exitcodes
from toolkit.runner.inventory_check import checked
from toolkit.runner.playbook import require_lab_if_default


def split_pin(inventory: str | None, limit: str | None, vault_password_file: str | None,
              out: str | None, token: str | None = None) -> list[Path]:
    name = "token.split-pin"
    require_lab_if_default(inventory)
    result = checked(name, inventory, limit, vault_password_file)
    if len(result.hosts) != 1:
        raise Exit(f"{name}: --limit must select one host; the inventory selects "
                   f"{', '.join(result.hosts)}", code=exitcodes.BAD_INPUT)
    host = result.hosts[0]
    inv = hostvars.load(result.inventory, host, vault_password_file=vault_password_file)
    try:
        v: dict[str, Any] = {n: inv.get(host, n) for n in (
            "token_pin_dir", "token_pin_source", "token_pin_shares", "token_pin_share_holders",
            "token_pin_share_recipients", "signer_custodians", "token_cards")}
    except hostvars.InventoryError as exc:
        raise Exit(f"{name}: {exc}", code=exitcodes.BAD_INPUT) from None
    pin_dir = Path(str(v["token_pin_dir"]))
    if token:
        cards = {str(c.get("name")): c for c in v["token_cards"] or []}
        card = cards.get(token)
        if card is None:
            raise Exit(f"{name}: --token {token}: not in token_cards of {host} "
                       f"({', '.join(cards) or 'none'})", code=exitcodes.BAD_INPUT)
        source, k = card.get("pin_source", "file"), int(card.get("pin_shares", 0))
        holder_names = card.get("pin_share_holders") or []
        pin_path = Path(str(card.get("pin_src") or pin_dir / f"{token}-user-pin"))
        what, hint = f"card {token}", ("set its pin_source: prompt and pin_shares: K in "
                                      "token_cards first")
        dest = Path(out) if out else pin_dir / "shares" / token
    else:
        source, k = v["token_pin_source"], int(v["token_pin_shares"])
        holder_names = v["token_pin_share_holders"]
        pin_path = pin_dir / "user-pin"
        what, hint = host, "set token_pin_source: prompt and token_pin_shares: K first"
        dest = Path(out) if out else pin_dir / "shares"
    if k == 0 or source != "prompt":
        raise Exit(f"{name}: {what} takes the whole PIN (pin_source {source!r}, pin_shares "
                   f"{k}): {hint}", code=exitcodes.BAD_INPUT)
    keys = {str(c["name"]): str(c["ssh_key"]).strip() for c in v["signer_custodians"]}
    keys |= {str(n): str(r).strip() for n, r in (v["token_pin_share_recipients"] or {}).items()}
    holders = [str(h) for h in holder_names] or list(keys)
    try:
        secret = pin.read_file(pin_path).encode("utf-8")
        made = ceremony.split(secret, k, [(h, keys[h]) for h in holders], dest, sys.stdout,
                              token=token or "")
    except SignerError as exc:
        raise Exit(f"{name}: {exc.message}", code=exitcodes.BAD_INPUT) from None
    return made
