# The two entry points of the README. Each installs what it needs first.
.PHONY: lab test setup

setup:
	@scripts/bootstrap

## Set everything up and run the main job on the lab VM:
## lab up -> provision -> harden -> deploy -> verify (reports in reports/).
lab: setup
	.venv/bin/invoke up

## Set everything up and run the tests: static checks, unit tests, and the
## whole pipeline against a fresh lab VM (the same as CI).
test: setup
	.venv/bin/invoke ci
