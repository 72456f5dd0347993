"""`python -m tools.tracereport FILE...`: the trace report from the command line."""

import sys

from tools.tracereport.cli import main

sys.exit(main())
