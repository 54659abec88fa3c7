"""The token PIN as k-of-n custodian shares, on the deployed host (issue 23: "k-of-n unlock
after a restart"; "a share or PIN never found in the host's logs").

tests/signer proves the shares against a real daemon and SoftHSM2 on the controller; here the
same path runs as an operator runs it on the signing host of the inventory under test:

1. the key ceremony, `invoke token.split-pin`, splits the PIN the deploy uses (token_pin_dir/
   user-pin on the controller) into one age-encrypted share per holder, k = 2 of the
   inventory's custodians whose keys the lab holds;
2. a tagged deploy switches the daemon's token to `token_pin_source: prompt` with that k and
   those holders (extra vars): it renders the configuration, removes the PIN file from the host
   and restarts the daemon, which is then locked: a build client's request fails with
   UNAVAILABLE and the words of the missing step;
3. one custodian's share (decrypted with their own key, sent through their own account) does
   not unlock; the second does; a signature made then verifies with openssl;
4. the signer's audit log names who sent each share and holds no share; the host's journal,
   sudo's log, auditd's log and the signer's audit log hold neither a share nor the PIN
   (searched on the controller: toolkit.assurance.log_search);
5. always: a tagged deploy back to the inventory's own PIN source (the PIN file again), the
   daemon signing, the AIDE baseline clean under what the test changed.

The same two deploys carry one more story (SGN-01), to spare two deploys of its own: the
prompt deploy's inventory has one more build client, with a key made for the test, and gets
its account; the restore's inventory no longer has it, and its account, home and key are
gone (a retired client's home is root's, which `userdel -r` refuses: the role removes it
itself).

Which parts play which role comes from the inventory (`target`), never the lab's names. The
split-pin ceremony reads its k and holders from an inventory: the test gives it the inventory
under test with one more host_vars file on top (an overlay of symlinks in a temporary
directory), the same values the deploy gets as extra vars.

Cost: two tagged deploys (SGN-08 renders the configuration and restarts the daemon through its
handler, TOK-03 writes or removes the PIN file), ~90 s each under TCG: a third of it the
daemon's restart, a fifth preflight's facts, the rest the AIDE comparison and baseline that
every deploy runs; then seven SSH round trips and one search of the host's logs (~15 s).
About 280 s in all on lab4 (two cores shared with two other VMs' work).
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from hostaccess import hostvars
from lab.target import Party, Target
from signer.ceremony import SUFFIX
from tests.lab import test_signer_e2e as e2e
from tests.lab.aide import HELPER, limit
from toolkit.assurance.log_search import SHARE_MARKER, Secret, search_host_logs
from toolkit.runner.ansible_run import ROOT, PlayOptions, build_command, run_playbook

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# The build client's and the custodians' ways in, as the signer's end-to-end tests have them.
build = e2e.build
custodian = e2e.custodian
token_dir = e2e.token_dir

K = 2  # shares that unlock: the least inventory.check allows for a release profile
# The smallest deploy that switches the PIN source: SGN-08 renders signer.toml (its handler
# restarts the daemon), TOK-03 reads the PIN on the controller and writes or removes the PIN
# file on the host (and the keys probe, which finds the keys in place and leaves the token).
# SGN-01 too: the same two deploys carry a second story (a build client added for the test is
# gone from the inventory at the restore: its account, home and key go with it).
TAGS = "SGN-01,SGN-08,TOK-03"
INVOKE = ROOT / ".venv" / "bin" / "invoke"


def _deploy(target: Target, tmp_path: Path, name: str,
            extra: dict[str, Any] | None = None) -> None:
    log = tmp_path / f"deploy-{name}.log"
    r = run_playbook(build_command("deploy.yml", PlayOptions(
        tags=TAGS, extra_vars=extra, inventory=target.inventory,
        vault_password_file=target.vault_password_file)), log)
    assert r.returncode == 0, f"the {name} deploy failed: {' '.join(log.read_text().split()[-300:])}"


def _overlay(target: Target, dest: Path, values: dict[str, Any]) -> Path:
    """The inventory under test, with `values` as one more host_vars file of its host (the
    highest-precedence file of the inventory), as symlinks under `dest`."""
    src = Path(target.inventory).resolve()
    base = src if src.is_dir() else src.parent
    dest.mkdir()
    for entry in base.iterdir():
        if entry.name != "host_vars":
            (dest / entry.name).symlink_to(entry)
    mine = dest / "host_vars" / target.host
    mine.mkdir(parents=True)
    theirs = base / "host_vars"
    if theirs.is_dir():
        for entry in theirs.iterdir():
            stem = entry.name.rsplit(".", 1)[0] if entry.is_file() else entry.name
            if stem != target.host:
                (dest / "host_vars" / entry.name).symlink_to(entry)
            elif entry.is_dir():
                for inner in sorted(entry.iterdir()):
                    (mine / inner.name).symlink_to(inner)
            else:
                (mine / f"00-{entry.name}").symlink_to(entry)
    (mine / "zz-pin-shares.yml").write_text(yaml.safe_dump(values))
    return dest if src.is_dir() else dest / src.name


def _split_pin(target: Target, tmp_path: Path, values: dict[str, Any]) -> Path:
    """`invoke token.split-pin` on the inventory with `values`: the shares' directory."""
    inv = _overlay(target, tmp_path / "inventory", values)
    seen = hostvars.load(str(inv), vault_password_file=target.vault_password_file)
    for name, want in values.items():
        assert seen.get(target.host, name) == want, \
            f"{name}: the overlay's host_vars do not win over the inventory's own value"
    out = tmp_path / "shares"
    argv = [str(INVOKE), "token.split-pin", "--inventory", str(inv), "--out", str(out)]
    if target.vault_password_file:
        argv += ["--vault-password-file", target.vault_password_file]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def _share(shares: Path, holder: Party) -> bytes:
    """`holder`'s share, decrypted with their own key (age reads OpenSSH keys). Never printed:
    the assertions below name a share, never show it."""
    r = subprocess.run(["age", "-d", "-i", str(holder.key), str(shares / f"{holder.name}{SUFFIX}")],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    value = r.stdout.strip()
    assert value.startswith(SHARE_MARKER), "a decrypted share that is not a share"
    return value


def _send(custodian: e2e.Gateway, holder: Party,
          share: bytes) -> subprocess.CompletedProcess[bytes]:
    """As the holder types it: `age -d ... | ssh ACCOUNT@HOST unlock --share` (stdin)."""
    return custodian(holder, "unlock --share", share + b"\n")


def _audit_tail(target: Target, after: int) -> list[dict[str, Any]]:
    log = shlex.quote(str(target.values["signer_audit_log"]))
    rc, out, err = target.root_output(f"tail -n +{after + 1} {log}")
    assert rc == 0, err
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


def _aide_paths(target: Target) -> list[str]:
    """What the test's deploys change on the host: the configuration and the PIN file, and
    their directories (an entry more or less)."""
    files = [str(target.values["signer_config"]), str(target.values["token_pin_file"])]
    return sorted(set(files) | {posixpath.dirname(f) for f in files})


def _restore(target: Target, tmp_path: Path, build: e2e.Gateway, sign: str) -> list[str]:
    """The host as the pipeline left it: the inventory's own PIN source, the daemon signing,
    the AIDE baseline clean under what the test changed. What is still wrong, one line each."""
    problems: list[str] = []
    try:
        _deploy(target, tmp_path, "restore")
    except AssertionError as exc:
        problems.append(str(exc)[-2000:])
    r = build(sign, b"signed again after the restore")
    if r.returncode != 0:
        problems.append(f"the daemon does not sign after the restore: {r.stderr.decode()}")
    paths = _aide_paths(target)
    whole = limit(paths)
    rc, out, _err = target.root_output(f"{HELPER} compare {whole}")
    if rc != 0:
        # The deploys take their own writes in (BASE-07); a deploy that stopped part way may
        # not have: the test's own changes, exactly these paths, and nothing else.
        target.root_output(f"{HELPER} take {limit(paths, whole=False)} && {HELPER} clear")
        rc, out, _err = target.root_output(f"{HELPER} compare {whole}")
        if rc != 0:
            problems.append(f"differs from the AIDE baseline: {out.decode()[-1500:]}")
    return problems


def _retiree(target: Target, tmp_path: Path) -> dict[str, Any]:
    """A build client for the prompt deploy only (a key of its own, the first client's
    addresses): the restore deploy, without it, retires it."""
    key = tmp_path / "retiree"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "retiree@build",
                    "-f", str(key)], check=True)
    first = target.values["signer_clients"][0]
    return {"name": f"retiree{os.getpid() % 10000}",
            "ssh_key": key.with_suffix(".pub").read_text().strip(), "from": first["from"]}


def _account(target: Target, name: str) -> tuple[str, bool]:
    """The account's passwd line ("" when there is none) and whether its home exists."""
    rc, out, err = target.root_output(f"getent passwd {shlex.quote(name)}")
    assert rc in (0, 2), f"getent passwd {name}: rc {rc}: {err}"  # 2: no such account
    home, _o, _e = target.root_output(f"test -e /home/{shlex.quote(name)}")
    return out.decode().strip(), home == 0


@pytest.mark.control("TOK-03", "SGN-05", "SGN-09", "SGN-01")
def test_k_custodian_shares_unlock_the_daemon_after_a_restart_and_no_log_holds_one(
        target: Target, build: e2e.Gateway, custodian: e2e.Gateway,
        signing: tuple[Party, str], token_dir: Path, tmp_path: Path) -> None:
    if target.values.get("token_pin_source") != "file":
        pytest.skip(f"{target.inventory}: the daemon's token takes "
                    f"{target.values.get('token_pin_source')!r}: the test switches a PIN-file "
                    "host to shares and back, and could not leave this one as it found it")
    holders = target.custodians
    if len(holders) < K:
        pytest.skip(f"{target.inventory}: fewer than {K} custodians whose keys the lab holds")
    pin = Secret((Path(str(target.values["token_pin_dir"])) / "user-pin").read_bytes().strip())
    assert len(pin), "the deploy's PIN on the controller is empty"
    os.environ.setdefault("SIGNLAB_INSTANCE", target.lab.raw["instance"])
    prompt = {"token_pin_source": "prompt", "token_pin_shares": K,
              "token_pin_share_holders": [h.name for h in holders],
              "token_pin_share_recipients": {}}  # to each holder's SSH key, which the lab holds
    retiree = _retiree(target, tmp_path)
    retiree_account = f"{target.values['signer_client_account_prefix']}{retiree['name']}"
    profile = signing[1]
    sign = f"sign --profile {profile} --format raw"
    log = shlex.quote(str(target.values["signer_audit_log"]))
    pin_file = shlex.quote(str(target.values["token_pin_file"]))

    # 1. The key ceremony, on the controller: one share per holder, each for their key only.
    shares_dir = _split_pin(target, tmp_path, prompt)
    assert sorted(p.name for p in shares_dir.iterdir()) == sorted(
        f"{h.name}{SUFFIX}" for h in holders)
    first, second = holders[0], holders[1]
    shares = {h.name: _share(shares_dir, h) for h in holders}
    assert len(set(shares.values())) == len(holders), "two holders with the same share"

    rc, out, err = target.root_output(f"wc -l < {log}")
    assert rc == 0, err
    before = int(out.decode().strip() or 0)
    passed = False
    try:
        # 2. Deployed with shares: no PIN file on the host, and the restarted daemon is locked.
        _deploy(target, tmp_path, "prompt", {
            **prompt, "signer_clients": [*target.values["signer_clients"], retiree]})
        passwd, home = _account(target, retiree_account)
        assert passwd.endswith(":" + str(target.values["signer_gateway_shell"])) and home, \
            f"the added client's account: {passwd!r}, home {home}"
        rc, _out, _err = target.root_output(f"test ! -e {pin_file}")
        assert rc == 0, f"{pin_file} is still on the host with pin_source prompt"
        locked = build(sign, b"while locked")
        assert locked.returncode == e2e.EX_UNAVAILABLE, locked.stderr.decode()
        assert locked.stdout == b""
        said = locked.stderr.decode()
        assert f"{K} more custodians must each send their share with `unlock --share`" in said, \
            said

        # 3. One share is not enough; a second custodian's is.
        one = _send(custodian, first, shares[first.name])
        assert one.returncode == 0, one.stderr.decode()
        assert f"1 of {K}" in (one.stdout + one.stderr).decode(), (one.stdout + one.stderr)
        still = build(sign, b"one share in")
        assert still.returncode == e2e.EX_UNAVAILABLE, still.stderr.decode()
        said = still.stderr.decode()
        assert "1 more custodian must send their share" in said and first.name in said, said
        two = _send(custodian, second, shares[second.name])
        assert two.returncode == 0, two.stderr.decode()
        assert "unlocked" in (two.stdout + two.stderr).decode(), (two.stdout + two.stderr)

        art = e2e._artifact(tmp_path)
        r = build(sign, art.read_bytes())
        assert r.returncode == 0, r.stderr.decode()
        sig = tmp_path / "artifact.sig"
        sig.write_bytes(r.stdout)
        pub = e2e._pubkey_of_cert(token_dir / f"{profile}.pem", tmp_path / "profile.pub")
        ok = e2e._openssl("dgst", "-sha256", "-verify", str(pub), "-signature", str(sig),
                          str(art))
        assert ok.returncode == 0, (ok.stdout + ok.stderr).decode()

        # 4. Who sent a share, in the audit log; the shares and the PIN in no log of the host.
        entries = _audit_tail(target, before)
        sent = [(e.get("custodian"), e.get("have"), e.get("need")) for e in entries
                if e.get("event") == "unlock-share"]
        assert sent == [(first.name, 1, K), (second.name, 2, K)], sent
        unlock = [e for e in entries if e.get("event") == "unlock"]
        assert unlock and sorted(unlock[-1].get("custodians") or []) == sorted(
            [first.name, second.name]), unlock
        secrets = {f"{name}'s PIN share": Secret(s) for name, s in shares.items()}
        secrets |= {"the token PIN": pin, "a PIN share (its marker)": Secret(SHARE_MARKER)}
        paths = ["/var/log", str(target.values["signer_audit_log"])]
        if target.values.get("base_sudo_logfile"):
            paths.append(str(target.values["base_sudo_logfile"]))
        found = search_host_logs(target.root_output, paths, secrets)
        assert found.searched > 0, "no log was searched"
        assert not found.unsearched, "not searched: " + "; ".join(found.unsearched)
        assert not found.hits, f"{len(found.hits)} place(s): " + "; ".join(found.hits[:20])
        passed = True
    finally:
        # 5. Always: the inventory's own PIN source, the daemon signing, the baseline clean.
        problems = _restore(target, tmp_path, build, sign)
        # 6. The client the restore's inventory no longer has: no account, no home, no key.
        passwd, home = _account(target, retiree_account)
        if passwd or home:
            problems.append(f"the retired client keeps its account ({passwd!r}) or its home "
                            f"(/home/{retiree_account}: {home})")
        if problems and passed:
            pytest.fail("the host is not left as the pipeline left it: " + "; ".join(problems))
        for p in problems:
            warnings.warn(f"restore after a failure: {p}", stacklevel=1)
