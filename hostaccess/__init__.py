"""How a host is reached and what its inventory says: below both the toolkit and the lab.

`hostvars` reads an inventory as Ansible does, `connection` builds the ssh command line and finds
the sudo password a play would use, `expectations` picks what the posture suite expects of a host.
It imports nothing else of ours (ARCHITECTURE.md), so that `lab/` and `toolkit/` both stand on it.
"""
