"""The controls of the threat model, and everything that says whether one is in place.

Below both the play runner (toolkit/runner) and the assurance (toolkit/assurance), which both
import it; it imports neither, nor anything else of ours (ARCHITECTURE.md, LAYERS in
tests/unit/test_architecture.py).

- registry       threats and controls (threat-model/), the tests that prove each (markers)
- task_tags      the tasks that implement each (control ids as Ansible tags)
- check          `invoke threat-model.check`: every broken link between them
- tables         the generated tables of threat-model/README.md and CONTROL_IDS.md
- auditors       outside auditors' figures judged against the thresholds in the control's YAML
- play_status    after a play: which controls it applied on each host
- posture_status after verify: each control's and threat's status on a host
- ci_record      CI's record of the toolkit's own tests, evidence for what no host can show
"""
