"""``python -m pydtls_ossl``: see ``pydtls_ossl.cli``."""

import sys

from .cli import main

sys.exit(main())
