"""`python -m lineguard.deploy.demo`."""

import sys

from lineguard.deploy.demo.cli import main

sys.exit(main())
