import sys

from sidetune.cli import main

sys.exit(main())
