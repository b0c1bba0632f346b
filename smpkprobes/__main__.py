"""`python -m smpkprobes` is the `smpkprobes` command."""

import sys

from .tools._cli import main

sys.exit(main())
