import sys

from squeeze.cli.main import main

sys.exit(main())
