"""Ansible's linear strategy run through Mitogen (ansible.cfg `strategy = mitogen_linear`).

Why: the lab guest runs under software emulation (TCG, ~30x slower than native) and a real
signing host is often a small machine. Plain Ansible starts a new Python on the host for every
task and loop item and compiles its module_utils there each time (zipimport keeps no bytecode):
3-10 s per task under TCG. Mitogen keeps one Python per connection for the length of the play
and sends each module's code once. Measured on the lab VM (`invoke timings`, same machine): see
threat-model/decisions.md "Mitogen" for the figures and what this changes for the host.

What it does not change: the connection is the same OpenSSH client with the inventory's settings
(user, key, ProxyJump), privilege is the same sudo (password on its stdin, never on a command
line), tasks and their results are the same. Nothing is installed on the host: the interpreter
lives in memory and ends with the connection.

The plugin file lives here so that ansible.cfg names a path in the project, not in a virtual
environment whose location depends on the Python version.
"""

from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule

__all__ = ["StrategyModule"]
