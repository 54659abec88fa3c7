"""Signature formats, one module each behind `base.Format`; REGISTRY is the list the daemon, the
config and the client use. `cms` and `raw` take the artifact's SHA-256 (never the artifact);
`authenticode` takes the small Authenticode request the build server computed."""

from __future__ import annotations

from signer.formats import authenticode, cms, raw
from signer.formats.base import Format, FormatError, Job
from signer.request import FORMATS

REGISTRY: dict[str, Format] = {f.name: f for f in (cms.FORMAT, raw.FORMAT, authenticode.FORMAT)}
assert tuple(REGISTRY) == FORMATS, "signer.request.FORMATS lists the registry (gateway start-up)"

__all__ = ["REGISTRY", "Format", "FormatError", "Job"]
