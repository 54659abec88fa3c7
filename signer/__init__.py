"""The signing service: a daemon that alone holds the PKCS#11 session, an SSH gateway, a client.

Exit codes are in `signer.errors`; the CLI, config schema and wire commands in `signer/README.md`.
"""
