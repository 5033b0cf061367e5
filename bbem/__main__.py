import sys

from bbem.cli import main

sys.exit(main())
