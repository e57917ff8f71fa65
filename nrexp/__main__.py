import sys

from nrexp.cli import main

sys.exit(main())
