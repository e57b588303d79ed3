import sys

from compress.cli.main import main

sys.exit(main())
