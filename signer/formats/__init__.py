"""Signature formats. Each takes the artifact's SHA-256 (never the artifact) and a function that
signs a digest on the token, and has an offline verifier for `signer verify`."""
