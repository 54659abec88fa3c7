"""`python -m signer`: the same as the `signer` command."""

import sys

from signer.cli import main

sys.exit(main())
