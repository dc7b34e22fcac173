"""``python -m ce_pretrain`` is the ``ce-pretrain`` command."""

import sys

from .cli import main

sys.exit(main())
