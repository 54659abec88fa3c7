"""Signature formats, one module each behind `base.Format`; REGISTRY is the list the daemon, the
config and the client use. `cms` and `raw` take the artifact's SHA-256 (never the artifact);
`authenticode` takes the small Authenticode request the build server computed; `openpgp` and
`openpgp-cleartext` stream the artifact and sign their own hash of it (formats/openpgp.py)."""

from __future__ import annotations

from signer.formats import authenticode, cms, openpgp, raw
from signer.formats.base import Context, Format, FormatError, Job
from signer.request import FORMATS

REGISTRY: dict[str, Format] = {f.name: f for f in (cms.FORMAT, raw.FORMAT, authenticode.FORMAT,
                                                   openpgp.FORMAT, openpgp.CLEARTEXT)}
assert tuple(REGISTRY) == FORMATS, "signer.request.FORMATS lists the registry (gateway start-up)"

__all__ = ["REGISTRY", "Context", "Format", "FormatError", "Job"]
