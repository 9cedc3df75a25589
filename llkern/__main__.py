import sys

from llkern.cli import main

sys.exit(main())
