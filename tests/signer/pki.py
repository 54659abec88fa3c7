"""Test fixtures, never product code: a CA made at run time (lab/ca.py; it issues certificates
from CSRs, e.g. the token key's, with the code-signing EKU) and an RFC 3161 time-stamping
authority on 127.0.0.1 (`openssl ts -reply` behind a small HTTP server). Keys live in a temporary directory
for one test session and are never committed."""

from __future__ import annotations

import http.server
import subprocess
import tempfile
import threading
from pathlib import Path

from lab.ca import CA, request


class LabCA(CA):
    """A root CA (RSA-3072, lab/ca.py) made in `root`; `issue` signs a CSR for a leaf with the
    given profile (lab.ca.PROFILES: code_signing or time_stamping), valid one day."""

    leaf_days = 1

    def __init__(self, root: Path, name: str = "signer lab CA") -> None:
        super().__init__(root)
        self.create(f"/CN={name}", 2)


class TSA:
    """An RFC 3161 time-stamping authority answering HTTP POSTs on 127.0.0.1 (`url`)."""

    def __init__(self, ca: LabCA, root: Path) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root
        self.key, self.cert = root / "tsa.key", root / "tsa.pem"
        csr = root / "tsa.csr"
        # P-256: generated in milliseconds; the TSA's key type is independent of the signer's
        ca.issue(request(self.key, csr, "/CN=signer lab TSA"), self.cert, "time_stamping")
        (root / "serial").write_text("01\n")
        self.config = root / "tsa.cnf"
        self.config.write_text(f"""\
[tsa]
default_tsa = lab
[lab]
serial = {root / 'serial'}
crypto_device = builtin
signer_cert = {self.cert}
certs = {ca.cert}
signer_key = {self.key}
signer_digest = sha256
default_policy = 1.3.6.1.4.1.99999.1
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = yes
ess_cert_id_alg = sha256
""")
        self.requests = 0
        self._lock = threading.Lock()
        tsa = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                query = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                reply = tsa.reply(query)
                self.send_response(200 if reply else 400)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reply(self, query: bytes) -> bytes:
        with self._lock, tempfile.TemporaryDirectory(dir=self.root) as tmp:
            q, r = Path(tmp) / "q.tsq", Path(tmp) / "r.tsr"
            q.write_bytes(query)
            done = subprocess.run(["openssl", "ts", "-reply", "-config", str(self.config),
                                   "-queryfile", str(q), "-out", str(r)],
                                  capture_output=True, check=False)
            self.requests += 1
            return r.read_bytes() if done.returncode == 0 and r.exists() else b""

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
