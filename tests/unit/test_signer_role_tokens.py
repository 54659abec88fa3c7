"""The signer role's [tokens.*] tables (roles/signer/templates/etc/signer/signer.toml.j2), rendered
from token_cards entries as the inventory gives them and read back by the signer's own config
parser: a card whose custodians unlock it (pin_source prompt, pin_shares, pin_share_window)
and a card with a PIN file, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2

from signer import config

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "roles" / "signer" / "templates" / "etc" / "signer" / "signer.toml.j2"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHGlfnL7HQ9ZZUvEfAK/AS64olnaOPLaMuBRspW/ygbE"


def _render(tokens: list[dict[str, Any]]) -> config.Config:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True)
    env.filters["to_json"] = json.dumps
    variables: dict[str, Any] = {
        "ansible_managed": "managed", "signer_socket": "/run/signer/signer.sock",
        "signer_gateway_group": "signer-gw", "signer_audit_log": "/var/lib/signer/audit.jsonl",
        "signer_state_dir": "/var/lib/signer", "signer_token_module": "/usr/lib/p11.so",
        "signer_token_label": "signer", "signer_token_serial": "", "signer_pin_source": "file",
        "signer_pin_file": "/etc/signer/pin", "signer_pin_shares": 0,
        "signer_pin_share_window": 600, "signer_checkpoint_interval": 100,
        "signer_audit_cert": "/etc/signer/certs/audit.pem", "signer_tokens": tokens,
        "signer_profiles": [], "signer_clients": [], "signer_client_account_prefix": "sign-",
        "signer_cert_dir": "/etc/signer/certs",
        "signer_custodians": [{"name": n, "ssh_key": f"{KEY[:-1]}{c}"}
                              for n, c in (("carol", "A"), ("dave", "B"))],
    }
    text = env.from_string(TEMPLATE.read_text()).render(**variables)
    return config.parse(text, Path("/etc/signer/signer.toml"))


def test_a_card_unlocked_by_custodians_shares_is_rendered_with_its_k_and_window() -> None:
    cfg = _render([
        {"name": "release", "module": "/usr/lib/opensc-pkcs11.so", "label": "Release",
         "pin_source": "prompt", "pin_shares": 2},
        {"name": "whole", "module": "/usr/lib/opensc-pkcs11.so", "label": "Whole",
         "pin_source": "prompt", "pin_share_window": 60},
        {"name": "ev", "module": "/usr/lib/libeToken.so", "label": "EV", "serial": "01"},
    ])
    release, whole, ev = cfg.tokens["release"], cfg.tokens["whole"], cfg.tokens["ev"]
    assert (release.pin_source, release.pin_shares, release.pin_share_window) == \
        ("prompt", 2, 600)  # the window: the host token's unless the card gives its own
    assert (whole.pin_source, whole.pin_shares) == ("prompt", 0)
    assert ev.pin_file == Path("/etc/signer/pin-ev") and ev.pin_shares == 0
