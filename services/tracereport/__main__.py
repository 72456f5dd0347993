"""`python -m services.tracereport FILE...`: the trace report from the command line."""

import sys

from services.tracereport.cli import main

sys.exit(main())
