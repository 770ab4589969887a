"""``python -m gateway.cli``: the ``tensafe`` command."""
import sys

from . import main

sys.exit(main())
