"""`invoke inventory.check`: is an inventory fit to run the plays, without touching a host.

Two kinds of rule, both on the values a play would see (hostaccess.hostvars: Ansible's own
inventory, templating and vault, role defaults underneath):

- the roles' argument specs (roles/*/meta/argument_specs.yml), checked with Ansible's own
  validator for the roles that the host's plays run, as the play would check them before its
  first task; here they are checked before anything else runs;
- the rules no single role can see: custodians' SSH keys unique, every profile's clients and
  custodians defined, approvals not above the profile's custodians, names the signer accepts
  (its own NAME_RE), each SSH key line one valid public key (ssh-keygen reads it), each `from`
  pattern one that fits in the authorized_keys line (the signer role's own rule, from its
  filter plugin, which the role applies again before it writes anything).

Every problem is one line that starts with the host's name. A variable whose lookup fails here
(a key file missing on this controller) is such a problem, named by its variable: the play
would fail on it too, later and half-way.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from invoke.exceptions import Exit

from hostaccess import hostvars
from signer import ceremony
from signer.config import NAME_RE, SSH_KEY_RE, key_identity
from toolkit import exitcodes

ROOT = hostvars.ROOT
PLAYBOOKS = ROOT / "playbooks"
ROLES = hostvars.ROLES
_YAML_ERROR = re.compile(
    r"Syntax Error while loading YAML\.\s*(?P<what>.*?)\s*The error appears to be in "
    r"'(?P<file>[^']*)': line (?P<line>\d+), column (?P<col>\d+)"
)
_VAULT_HINT = " (give --vault-password-file or $ANSIBLE_VAULT_PASSWORD_FILE)"  # as hostvars says
# Variables a release renamed or removed: an inventory that still sets one would have its value
# silently ignored (a collector no longer configured, a gate no longer applied), so it is refused
# with the new name.
RENAMED: dict[str, str] = {
    "auditing_watches": "auditd_watches",
    "auditing_syscalls": "auditd_syscalls",
    "auditing_immutable": "auditd_immutable",
    "auditing_remote_server": "auditd_remote_server",
    "auditing_remote_port": "auditd_remote_port",
    "signer_gateway_user": "signer_client_account_prefix (one account per build client)",
}
_INCLUDE = {
    "include_role",
    "import_role",
    "ansible.builtin.include_role",
    "ansible.builtin.import_role",
}


@dataclass(frozen=True)
class Play:
    hosts: str
    roles: tuple[tuple[str, str], ...]  # (role, entry point)


@dataclass
class Result:
    inventory: str
    hosts: list[str]
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def lines(self) -> list[str]:
        return [f"{h}: {p}" for h in self.hosts for p in self.problems.get(h, [])]


def plays(playbooks: Path = PLAYBOOKS) -> list[Play]:
    """Every play of the playbooks, with the roles (and entry points) it runs."""
    out: list[Play] = []
    for path in sorted(playbooks.glob("*.yml")):
        for play in yaml.safe_load(path.read_text()) or []:
            if not isinstance(play, dict) or "hosts" not in play:
                continue
            roles: list[tuple[str, str]] = []
            for r in play.get("roles") or []:
                name = r.get("role") or r.get("name") if isinstance(r, dict) else r
                if isinstance(name, str):
                    roles.append((name, "main"))
            for section in ("pre_tasks", "tasks", "post_tasks", "handlers"):
                roles += _included_roles(play.get(section) or [])
            out.append(Play(str(play["hosts"]), tuple(roles)))
    return out


def _included_roles(tasks: list[Any]) -> list[tuple[str, str]]:
    """The roles a task list includes or imports, inside blocks (and their rescue) too."""
    found: list[tuple[str, str]] = []
    for t in tasks:
        if not isinstance(t, dict):
            continue
        for key in _INCLUDE & set(t):
            args = t[key] or {}
            found.append((args["name"], args.get("tasks_from", "main")))
        for part in ("block", "rescue", "always"):
            found += _included_roles(t.get(part) or [])
    return found


def argument_specs(role: str, roles: Path = ROLES) -> dict[str, Any]:
    """entry point -> its options, from the role's meta/argument_specs.yml (empty if none)."""
    path = roles / role / "meta" / "argument_specs.yml"
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {ep: (spec or {}).get("options") or {} for ep, spec in data["argument_specs"].items()}


def check(
    inventory: str,
    limit: str | None = None,
    *,
    vault_password_file: str | None = None,
    playbooks: Path = PLAYBOOKS,
    roles: Path = ROLES,
) -> Result:
    """Load the inventory (InventoryError if it cannot be used at all) and check every host."""
    _plugins_ready()
    with _warnings() as warned:
        try:
            inv = hostvars.load(inventory, limit, vault_password_file=vault_password_file)
        except hostvars.InventoryError as exc:
            # Ansible gives the parser's reason (line, column) only as a warning.
            why = [w for w in warned if "with yaml plugin" in w or "with ini plugin" in w]
            if why:
                reason = " ".join(why[0].split(":", 1)[-1].split())
                m = _YAML_ERROR.search(reason)
                if m:
                    reason = f"YAML: {m['what']} at {m['file']} line {m['line']}, column {m['col']}"
                raise hostvars.InventoryError(f"{exc} ({reason[:300]})") from exc
            raise
        result = Result(inventory, list(inv.hosts))
        all_plays = plays(playbooks)
        specs = {r: argument_specs(r, roles) for p in all_plays for r, _ in p.roles}
        for host in inv.hosts:
            result.problems[host] = _check_host(inv, host, all_plays, specs)
    return result


@contextmanager
def _warnings() -> Iterator[list[str]]:
    """Ansible's warnings while reading the inventory, collected instead of printed.

    The check says what is wrong in its own lines; Ansible's multi-line warnings about the
    same thing ("Could not match supplied host pattern") would only bury them.
    """
    from ansible.utils.display import Display

    display = Display()
    seen: list[str] = []
    original = display.warning
    display.warning = lambda msg, formatted=False: seen.append(str(msg))
    try:
        yield seen
    finally:
        display.warning = original


def _check_host(
    inv: hostvars.Inventory, host: str, all_plays: list[Play], specs: dict[str, dict[str, Any]]
) -> list[str]:
    from ansible.errors import AnsibleError
    from ansible.parsing.yaml.objects import AnsibleVaultEncryptedUnicode

    problems: list[str] = []
    failed: set[str] = set()
    try:
        # Reading the host's variables decrypts whole vault files (group_vars/all/vault.yml):
        # a missing or wrong vault password fails here, for the host, not in a traceback.
        raw = inv.raw(host)
    except hostvars.InventoryError as exc:
        return [f"variables: {str(exc).removeprefix(host + ': ')}"]
    except AnsibleError as exc:
        msg = " ".join(str(exc).split())[:300]
        if "vault secrets" in msg:
            msg += _VAULT_HINT
        return [f"variables: {msg}"]

    def value(name: str, default: Any = None) -> Any:
        if name in failed:
            return default
        try:
            got = inv.get(host, name, default)
            # The templar hands a vaulted value back still encrypted: decrypt it here, so a
            # wrong or missing vault password is this variable's error.
            return str(got) if isinstance(got, AnsibleVaultEncryptedUnicode) else got
        except hostvars.InventoryError as exc:
            failed.add(name)
            problems.append(f"{name}: {_reason(exc)}")
        except AnsibleError as exc:
            failed.add(name)
            problems.append(f"{name}: {' '.join(str(exc).split())[:300]}")
        return default

    problems += [f"{name}: renamed to {RENAMED[name]}; this inventory's value would be ignored"
                 for name in sorted(raw) if name in RENAMED]

    # The roles this host's plays run, each entry point once.
    seen: list[tuple[str, str]] = []
    targeted = False
    for play in all_plays:
        if host in _pattern_hosts(inv, play.hosts):
            targeted = True
            seen += [r for r in play.roles if r not in seen]
    if not targeted:
        patterns = sorted({p.hosts for p in all_plays})
        problems.append(f"no play runs on this host (the plays run on: {', '.join(patterns)})")
    for role, entry in seen:
        options = specs.get(role, {}).get(entry)
        if options is None:
            continue
        params = {n: value(n) for n in options if inv.has(host, n) and n not in failed}
        # A variable that could not be templated is reported once, by its lookup error.
        params = {n: v for n, v in params.items() if n not in failed}
        spec = {n: o for n, o in options.items() if n not in failed}
        problems += [f"{role}: {m}" for m in _validate(spec, params)]

    # Vaulted values (`!vault`) no role lists, the become password among them: a wrong vault
    # password must fail here, not when the play first connects.
    for name in sorted(raw):
        if isinstance(raw[name], AnsibleVaultEncryptedUnicode):
            value(name)

    signer = {n: value(n, []) for n in ("signer_clients", "signer_custodians", "signer_profiles")}
    if not failed & set(signer):  # rules across variables need all of them
        problems += cross_rules(*signer.values())
        pin = {n: value(n, d) for n, d in (("token_pin_source", "file"),
                                           ("token_pin_shares", 0),
                                           ("token_pin_share_holders", []),
                                           ("token_pin_share_recipients", {}))}
        if not failed & set(pin):
            problems += pin_share_rules(
                pin["token_pin_source"], pin["token_pin_shares"],
                pin["token_pin_share_holders"], pin["token_pin_share_recipients"],
                signer["signer_custodians"], signer["signer_profiles"])
        if "token_cards" not in failed:
            problems += card_rules(value("token_cards", []), signer["signer_profiles"])
            if "token_pin_share_recipients" not in failed:
                problems += card_pin_rules(value("token_cards", []),
                                           value("token_pin_share_recipients", {}),
                                           signer["signer_custodians"],
                                           signer["signer_profiles"])
    keys: list[tuple[str, Any]] = [
        (f"preflight_operator_public_keys[{i}]", k)
        for i, k in enumerate(_list(value("preflight_operator_public_keys", [])))
    ]
    for user in _dicts(value("base_admin_users", [])):
        for i, k in enumerate(_list(user.get("public_keys"))):
            keys.append((f"base_admin_users[{user.get('name')}].public_keys[{i}]", k))
    problems += [f"{where}: {p}" for where, k in keys if (p := key_problem(k))]
    return problems


def _reason(exc: hostvars.InventoryError) -> str:
    """The innermost reason of a templating error, on one line.

    Ansible wraps a failed lookup once per variable that refers to it ("An unhandled exception
    occurred while templating ... original message: ..."); the operator needs the last one.
    """
    text = str(exc.__cause__ or exc)
    marker = "original message: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    text = " ".join(text.replace(", use -vvvvv to see paths searched", "").split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return text + _VAULT_HINT if _VAULT_HINT in str(exc) and _VAULT_HINT not in text else text


def _plugins_ready() -> None:
    """Ansible's plugin loader, as its CLIs set it up (else every lookup is "not found")."""
    from ansible.plugins.loader import init_plugin_loader
    from ansible.utils.collection_loader import AnsibleCollectionConfig

    if AnsibleCollectionConfig.collection_finder is None:
        init_plugin_loader()


def _pattern_hosts(inv: hostvars.Inventory, pattern: str) -> set[str]:
    """The hosts a play's `hosts:` pattern selects (Ansible's own matching)."""
    return {h.name for h in inv._inv.get_hosts(pattern)}


def _validate(spec: dict[str, Any], params: dict[str, Any]) -> list[str]:
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

    # Ansible's role argument validation does the same: the spec's options, the play's values.
    result = ArgumentSpecValidator(spec).validate(params)
    return [" ".join(str(m).split()) for m in result.error_messages]


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _dicts(v: Any) -> Iterator[dict[str, Any]]:
    return (d for d in _list(v) if isinstance(d, dict))


def _names(items: Iterable[dict[str, Any]]) -> list[str]:
    return [str(d.get("name")) for d in items]


def cross_rules(clients: Any, custodians: Any, profiles: Any) -> list[str]:
    """The signer's rules across variables (each item's own fields are the arg specs' job)."""
    problems: list[str] = []
    client_list, custodian_list, profile_list = (
        list(_dicts(clients)),
        list(_dicts(custodians)),
        list(_dicts(profiles)),
    )
    for var, items in (
        ("signer_clients", client_list),
        ("signer_custodians", custodian_list),
        ("signer_profiles", profile_list),
    ):
        names = _names(items)
        for name in names:
            if not NAME_RE.fullmatch(name):
                problems.append(
                    f"{var}: name {name!r} is not a signer name ([a-z][a-z0-9_-]{{0,63}})"
                )
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"{var}: name {name!r} is defined more than once")
    both = set(_names(client_list)) & set(_names(custodian_list))
    for name in sorted(both):
        problems.append(f"signer_custodians: {name!r} is a client's name too")

    for var, items in (("signer_clients", client_list), ("signer_custodians", custodian_list)):
        for d in items:
            problems += [f"{var}[{d.get('name')}].from: {p}"
                         for p in _authorized_keys_rule("from_problems")(d.get("from"))]

    # One key, one person: a custodian whose key another custodian (or a build client) also
    # holds is not an independent approval. Compared as keys (the signer's own rule), not as
    # text: the same key in another encoding is the same key to sshd.
    owners: dict[str, list[str]] = {}
    for var, items in (("signer_clients", client_list), ("signer_custodians", custodian_list)):
        for d in items:
            key = d.get("ssh_key")
            where = f"{var}[{d.get('name')}].ssh_key"
            if (why := key_problem(key)) is not None:
                problems.append(f"{where}: {why}")
                continue
            owners.setdefault(key_identity(_key_blob(str(key))), []).append(
                f"{'client' if var == 'signer_clients' else 'custodian'} {d.get('name')}"
            )
    for who in owners.values():
        if len(who) > 1 and any(w.startswith("custodian") for w in who):
            problems.append(f"signer_custodians: one SSH key under {len(who)} names: "
                            + ", ".join(who))

    client_names, custodian_names = set(_names(client_list)), set(_names(custodian_list))
    for p in profile_list:
        where = f"signer_profiles[{p.get('name')}]"
        for c in _list(p.get("clients")):
            if c not in client_names:
                problems.append(f"{where}.clients: {c!r} is not in signer_clients")
        custs = _list(p.get("custodians"))
        for c in custs:
            if c not in custodian_names:
                problems.append(f"{where}.custodians: {c!r} is not in signer_custodians")
        approvals = p.get("approvals", 0)
        if isinstance(approvals, int) and approvals > len(set(map(str, custs))):
            problems.append(
                f"{where}.approvals: {approvals} approvals but {len(set(map(str, custs)))} "
                "custodians"
            )
    return problems


def pin_share_rules(pin_source: Any, k: Any, holders: Any, recipients: Any, custodians: Any,
                    profiles: Any, prefix: str = "token_") -> list[str]:
    """The PIN as k-of-n custodian shares (token_pin_shares = k, token_pin_share_holders: the
    n custodians who hold one; empty: every custodian): 2 <= k <= n, holders are custodians,
    each with a key age can encrypt their share to (token_pin_share_recipients, else their
    SSH key), and shares replace the typed PIN only (pin_source prompt). k = 0 keeps the whole
    PIN. The same rules for a card's PIN (`card_pin_rules`): `prefix` names its variables."""
    if not isinstance(k, int) or isinstance(k, bool) or k == 0:
        return []  # a wrong type is the argument spec's to report
    names = _names(_dicts(custodians))
    holder_list = [str(h) for h in _list(holders)] or names
    n = len(set(holder_list))
    release = [str(p.get("name")) for p in _dicts(profiles)
               if isinstance(p.get("approvals"), int) and p.get("approvals", 0) > 0]
    problems: list[str] = []
    what = f" (release profile {release[0]!r})" if release else ""
    if k < 2:
        problems.append(f"{prefix}pin_shares: {k}: k-of-n shares need k >= 2{what}: with one "
                        "share, one custodian holds the PIN (0 keeps the whole PIN)")
    if k > n:
        problems.append(f"{prefix}pin_shares: {k} shares needed but {n} holders{what} "
                        f"({prefix}pin_share_holders, else signer_custodians): k > n never "
                        "unlocks")
    if pin_source != "prompt":
        problems.append(f"{prefix}pin_shares: needs {prefix}pin_source: prompt (shares "
                        "replace the typed PIN, not a PIN file)")
    for h in sorted({h for h in holder_list if h not in names}):
        problems.append(f"{prefix}pin_share_holders: {h!r} is not in signer_custodians")
    for h in sorted({h for h in holder_list if holder_list.count(h) > 1}):
        problems.append(f"{prefix}pin_share_holders: {h!r} is listed twice (one share each)")
    keys = {str(c.get("name")): c.get("ssh_key") for c in _dicts(custodians)}
    if isinstance(recipients, dict):
        keys |= {str(n): r for n, r in recipients.items()}
    for h in sorted({h for h in holder_list if h in keys}):
        key = keys[h]
        why = ceremony.recipient_problem(key.strip()) if isinstance(key, str) else "not a string"
        if why is not None:
            problems.append(f"token_pin_share_recipients[{h}]: the share cannot be encrypted to "
                            f"{h}'s key: {why}; give an age recipient")
    return problems


def card_pin_rules(cards: Any, recipients: Any, custodians: Any, profiles: Any) -> list[str]:
    """Each card of token_cards whose PIN its custodians give (pin_source: prompt, pin_shares:
    k, pin_share_holders): the daemon's own token's rules (`pin_share_rules`), a release
    profile being one on that card."""
    problems: list[str] = []
    for card in _dicts(cards):
        name = str(card.get("name"))
        source = card.get("pin_source", "file")
        if source not in ("file", "prompt"):
            continue  # the token role's argument spec says so
        on_card = [p for p in _dicts(profiles) if str(p.get("token")) == name]
        problems += pin_share_rules(source, card.get("pin_shares", 0),
                                    card.get("pin_share_holders", []), recipients, custodians,
                                    on_card, f"token_cards[{name}].")
    return problems


def card_rules(cards: Any, profiles: Any) -> list[str]:
    """A profile on a card (`token:`) names one of token_cards, gives its key's URI on that
    card's label, and its certificate as a file from the CA (deploy makes nothing on a card);
    a profile on the host's own token does neither."""
    problems: list[str] = []
    by_name = {str(c.get("name")): c for c in _dicts(cards)}
    for p in _dicts(profiles):
        where = f"signer_profiles[{p.get('name')}]"
        token = p.get("token")
        if token is None:
            if p.get("cert") == "file" or "key" in p:
                problems.append(f"{where}: cert file and key are for a profile on a card "
                                "(token:); the host's own token gets its keys from deploy")
            continue
        card = by_name.get(str(token))
        if card is None:
            problems.append(f"{where}.token: {token!r} is not in token_cards")
            continue
        key = str(p.get("key", ""))
        if not key.startswith("pkcs11:"):
            problems.append(f"{where}.key: the card key's PKCS#11 URI is required")
        elif "token=" not in key:
            problems.append(f"{where}.key: name the card's label (token=)")
        if p.get("cert") != "file" or not p.get("cert_file"):
            problems.append(f"{where}.cert: a card profile takes its certificate from its CA "
                            "(cert: file, cert_file: the certificate on the controller)")
    return problems


@cache
def _authorized_keys_rule(name: str) -> Callable[[Any], list[str]]:
    """A rule of the signer role's authorized_keys check (one rule, two places that apply it)."""
    path = ROLES / "signer" / "filter_plugins" / "signer_authorized_keys.py"
    spec = importlib.util.spec_from_file_location("signer_authorized_keys", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rule: Callable[[Any], list[str]] = getattr(module, name)
    return rule


def _key_blob(line: str) -> str:
    """The key itself (type and base64), without options or comment."""
    parts = line.split()
    for i, part in enumerate(parts[:-1]):
        if SSH_KEY_RE.fullmatch(f"{part} {parts[i + 1]}"):
            return f"{part} {parts[i + 1]}"
    return line.strip()


def key_problem(line: Any) -> str | None:
    """Why `line` is not one valid OpenSSH public key line (None when it is)."""
    if not isinstance(line, str):
        return f"not a public key line (a {type(line).__name__})"
    text = line.rstrip("\r\n")
    if "\n" in text or "\r" in text:
        return "more than one line (one public key per entry)"
    if not SSH_KEY_RE.fullmatch(text.strip()):
        return "not an OpenSSH public key line (type, base64 key, optional comment)"
    with tempfile.NamedTemporaryFile("w", suffix=".pub") as fh:
        fh.write(text.strip() + "\n")
        fh.flush()
        proc = subprocess.run(
            ["ssh-keygen", "-l", "-f", fh.name], capture_output=True, text=True, timeout=30
        )
    if proc.returncode != 0:
        return "not a valid public key (ssh-keygen cannot read it)"
    return None


def report(result: Result) -> str:
    """What `invoke inventory.check` prints (problems first, one line each)."""
    lines = result.lines()
    n = len(result.hosts)
    head = f"inventory {result.inventory}: {n} host{'s' if n != 1 else ''}"
    if not lines:
        return f"{head}: OK"
    bad = sum(1 for h in result.hosts if result.problems.get(h))
    return "\n".join([*lines, f"{head}: {len(lines)} problem(s) on {bad} host(s)"])


DEFAULT = str(ROOT / "inventory" / "lab")


def checked(
    task_name: str,
    inventory: str | None,
    limit: str | None = None,
    vault_password_file: str | None = None,
    *,
    quiet: bool = False,
) -> Result:
    """inventory.check, in process; stops the task (exit 2) with its problems, one per line."""
    try:
        result = check(
            inventory or DEFAULT, limit, vault_password_file=vault_password_file
        )
    except hostvars.InventoryError as exc:
        raise Exit(f"{task_name}: {exc}", code=exitcodes.BAD_INPUT) from None
    if not result.ok:
        lines = report(result).splitlines()
        raise Exit(
            "\n".join(f"{task_name}: {line}" for line in lines)
            + f"\n{task_name}: the inventory does not pass inventory.check; nothing was run",
            code=exitcodes.BAD_INPUT,
        )
    if not quiet:
        print(f"==> {task_name}: {report(result)}", flush=True)
    return result
