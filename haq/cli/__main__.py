"""`python -m haq.cli`."""
import sys

from haq.cli import main

sys.exit(main())
