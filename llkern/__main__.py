import sys

from llkern.cli.main import main

sys.exit(main())
