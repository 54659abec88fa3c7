"""Invoke entry point. Thin on purpose: it only composes the collections.

Run `invoke --list` for every task, `invoke --help TASK` for its options.
"""

from invoke.collection import Collection

from lab.tasks import ns as lab_ns
from toolkit import (
    bench,
    tasks_ci,
    tasks_inventory,
    tasks_playbooks,
    tasks_token,
    tasks_verify,
    timings,
)

ns = Collection()
ns.add_collection(lab_ns, "lab")
ns.add_collection(tasks_inventory.ns, "inventory")
ns.add_task(tasks_ci.up)
ns.add_task(tasks_ci.ci)
ns.add_task(tasks_playbooks.provision)
ns.add_task(tasks_playbooks.harden)
ns.add_task(tasks_playbooks.deploy)
ns.add_task(tasks_playbooks.lock_deps)
ns.add_collection(tasks_verify.verify_ns)
ns.add_task(tasks_verify.audit)
ns.add_collection(tasks_verify.threat_model_ns, "threat-model")
ns.add_collection(tasks_token.ns, "token")
ns.add_task(bench.bench)
ns.add_task(timings.timings)
