"""Fixtures: one SoftHSM2 token per test session (keys generated on it by `signer keys`), and a
fresh daemon per test with its own config, audit log and state."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from toolkit import local_signer as signer_lab
from toolkit.local_signer import Lab

MiB = 1 << 20

CLIENTS = ["build1", "build2"]
CUSTODIANS = ["alice", "bob", "carol", "mallory"]


def profiles(lab: Lab) -> dict[str, dict[str, Any]]:
    c = lab.certs

    def p(key: str, algorithm: str = "ecdsa-p256", **kw: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"key": f"pkcs11:token=signer;object={key};type=private",
                                "algorithm": algorithm, "formats": ["cms", "raw"],
                                "max_size": MiB, "clients": ["build1"], "budget_count": 10000,
                                "budget_window": 3600}
        base.update(kw)
        return base

    return {
        "dev": p("dev", cert=str(c / "dev.pem")),
        "rsa": p("rsa", "rsa3072-pkcs1", cert=str(c / "rsa.pem")),
        "pss": p("rsa", "rsa3072-pss", cert=str(c / "rsa.pem")),
        "rawonly": p("dev", formats=["raw"]),
        "small": p("dev", cert=str(c / "dev.pem"), max_size=1024, budget_count=3),
        "release": p("release", cert=str(c / "release.pem"), formats=["cms", "raw"],
                     approvals=2, custodians=["alice", "bob", "carol"]),
        "imported": p("imported", formats=["raw"]),
    }


def config(lab: Lab, name: str, ps: dict[str, dict[str, Any]], *args: Any, **kw: Any) -> Path:
    """lab.config, with a key of its own for each client: `Lab.config` gives every client the
    same placeholder key, which `config check` refuses (one key, one name)."""
    path = lab.config(name, ps, CLIENTS, CUSTODIANS, *args, **kw)
    text = path.read_text()
    for i, c in enumerate(CLIENTS):
        placeholder = f'"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA {c}"'
        assert placeholder in text
        text = text.replace(placeholder, f'"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA{i:04d} {c}"')
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = signer_lab.available()
    if why:
        pytest.skip(why)
    lab = Lab(tmp_path_factory.mktemp("signer-lab"))
    lab.init_token()
    cfg = config(lab, "setup", profiles(lab))
    # `signer keys generate` and `selfsign` for each key, in one process (start-up time); the
    # command line itself is tested in test_keys.
    script = (
        "import sys\nfrom pathlib import Path\nfrom signer import config, keys\n"
        "cfg = config.load(Path(sys.argv[1]))\n"
        "for p in ('dev', 'rsa', 'release', None):\n"
        "    keys.generate(cfg, p, False, sys.stdout)\n"
        "    keys.selfsign(cfg, p, None, 30, None, False, sys.stdout)\n")
    r = subprocess.run([sys.executable, "-c", script, str(cfg)], env=lab.env,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    lab.import_key("imported")
    yield lab
    lab.stop()


@dataclass
class Signer:
    """A running daemon and the ways to talk to it."""

    lab: Lab
    config: Path

    @property
    def socket(self) -> Path:
        return Lab.socket_of(self.config)

    @property
    def audit_log(self) -> Path:
        return self.config.parent / "audit.jsonl"

    def gw(self, command: str | bytes, stdin: bytes = b"", client: str | None = "build1",
           custodian: str | None = None, declare_size: bool = True
           ) -> subprocess.CompletedProcess[bytes]:
        """The gateway; a `sign` without `--size` declares the length of `stdin` (as `signer
        submit` does) unless `declare_size=False`."""
        return self.lab.gateway(self.config, command, stdin, client=client, custodian=custodian,
                                declare_size=declare_size)

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e["event"] == event]

    @property
    def log(self) -> str:
        return (self.config.parent / "daemon.log").read_text()

    def start(self, wait: bool = True) -> None:
        self.lab.start(self.config, wait=wait)

    def stop(self, sig: int = 15) -> int | None:
        return self.lab.stop(self.config, sig)


class MakeSigner(Protocol):
    """The `make_signer` fixture: a daemon with its own config (profiles changed or added by
    `profile_overrides`, principals bound to local `accounts`, `[daemon]` keys from `daemon`),
    started unless `start=False`; stopped at the end of the test."""

    def __call__(self, start: bool = True,
                 profile_overrides: dict[str, dict[str, Any]] | None = None,
                 accounts: dict[str, str] | None = None, **daemon: Any) -> Signer: ...


@pytest.fixture
def make_signer(lab: Lab, request: pytest.FixtureRequest) -> Iterator[MakeSigner]:
    """make_signer(start=True, profiles=..., **daemon_overrides) -> Signer"""
    count = 0

    def make(start: bool = True, profile_overrides: dict[str, dict[str, Any]] | None = None,
             accounts: dict[str, str] | None = None, **daemon: Any) -> Signer:
        nonlocal count
        count += 1
        ps = profiles(lab)
        for name, over in (profile_overrides or {}).items():
            ps[name] = {**ps.get(name, ps["dev"]), **over}
        name = f"{request.node.originalname[:40]}-{secrets.token_hex(3)}-{count}"
        s = Signer(lab, config(lab, name, ps, accounts, **daemon))
        if start:
            s.start()
        return s

    made: list[Signer] = []

    def tracked(*args: Any, **kwargs: Any) -> Signer:
        s = make(*args, **kwargs)
        made.append(s)
        return s

    yield tracked
    for s in made:
        s.stop()


@pytest.fixture
def signer(make_signer: MakeSigner) -> Signer:
    """A fresh daemon (own audit log and state) for tests that look at state or the log."""
    s: Signer = make_signer()
    return s


@pytest.fixture(scope="module")
def shared(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Signer]:
    """One daemon for a whole module of tests that only need signatures and refusals."""
    name = f"shared-{request.module.__name__.rsplit('.', 1)[-1]}"
    s = Signer(lab, config(lab, name, profiles(lab)))
    s.start()
    yield s
    s.stop()


def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for `condition` (polled every 5 ms); AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def one_line_error(r: subprocess.CompletedProcess[bytes]) -> str:
    """The gateway's failure contract: non-zero exit, nothing on stdout, exactly one line on
    stderr, no traceback. Returns the line."""
    assert r.returncode != 0
    assert r.stdout == b""
    err = r.stderr.decode()
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("signer: ")
    return err
