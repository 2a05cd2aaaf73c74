"""``python -m asyndm.bench {bench,report} ...``; works under ``accelerate launch -m``."""

import sys

from .cli import main

sys.exit(main())
