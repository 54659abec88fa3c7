"""Invoke entry point. Thin on purpose: it only composes the collections.

The collections live in toolkit/tasks/, one module per namespace; they parse options and call
the modules that do the work (lab/, toolkit/runner/, toolkit/assurance/, toolkit/bench/).
Run `invoke --list` for every task, `invoke --help TASK` for its options.
"""

from invoke.collection import Collection

from toolkit.tasks import bench, ci, inventory, lab, plays, timings, token, verify

ns = Collection()
ns.add_collection(lab.ns, "lab")
ns.add_collection(inventory.ns, "inventory")
ns.add_task(ci.up)
ns.add_task(ci.ci)
ns.add_task(ci.ci_lane)
ns.add_task(plays.provision)
ns.add_task(plays.harden)
ns.add_task(plays.deploy)
ns.add_task(plays.lock_deps)
ns.add_collection(verify.verify_ns)
ns.add_task(verify.audit)
ns.add_collection(verify.threat_model_ns, "threat-model")
ns.add_collection(token.ns, "token")
ns.add_task(bench.bench)
ns.add_task(timings.timings)
