import sys

from .builder import main

sys.exit(main())
