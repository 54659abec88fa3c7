"""Invoke entry point. Thin on purpose: it only composes the collections.

Run `invoke --list` for every task, `invoke --help TASK` for its options.
"""

from invoke import Collection

from lab.tasks import ns as lab_ns
from toolkit import tasks_playbooks

ns = Collection()
ns.add_collection(lab_ns, "lab")
ns.add_task(tasks_playbooks.provision)
ns.add_task(tasks_playbooks.harden)
ns.add_task(tasks_playbooks.deploy)
