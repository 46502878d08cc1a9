"""`python -m tinygrad_llm ...` is the `tinygrad-llm` command."""
import sys

from .cli import main

sys.exit(main())
