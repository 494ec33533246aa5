import sys

from cellmux.cli import main

sys.exit(main())
