"""Exit codes of the invoke tasks (the README's "Exit codes" table lists them per task).

One meaning per number, the same in every task, so that a script can tell "the host is not
as it should be" from "I gave the wrong input" from "the host did not answer".
"""

OK = 0
FAILED = 1  # a play task, a posture test, an auditor or a command on the host failed
BAD_INPUT = 2  # an option, a file or the inventory is unusable; nothing was run
NOT_READY = 3  # a precondition or an expectation is not met (lab not up, --expect-unchanged)
UNREACHABLE = 4  # a host did not answer (and no other host failed); nothing is claimed for it
