import sys

from cache_builder.cli import main

sys.exit(main())
