"""Invoke entry point. Thin on purpose: it only composes the collections.

Run `invoke --list` for every task, `invoke --help TASK` for its options.
"""

from importlib.util import find_spec

from invoke import Collection

from lab.tasks import ns as lab_ns
from toolkit import bench, tasks_ci, tasks_playbooks

ns = Collection()
ns.add_collection(lab_ns, "lab")
ns.add_task(tasks_ci.up)
ns.add_task(tasks_ci.ci)
ns.add_task(tasks_playbooks.provision)
ns.add_task(tasks_playbooks.harden)
ns.add_task(tasks_playbooks.deploy)
ns.add_task(bench.bench)

if find_spec("toolkit.tasks_verify"):
    from toolkit import tasks_verify

    ns.add_task(tasks_verify.verify)
    ns.add_task(tasks_verify.audit)
    ns.add_collection(tasks_verify.threat_model_ns, "threat-model")
if find_spec("toolkit.tasks_token"):
    from toolkit import tasks_token

    ns.add_collection(tasks_token.ns, "token")
