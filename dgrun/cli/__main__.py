import sys

from dgrun.cli import main

sys.exit(main())
