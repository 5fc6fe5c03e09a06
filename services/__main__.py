"""``python -m services COMMAND``: the ``cbmir`` command line, for when the script is not on PATH."""

from services.ops.cli import main

raise SystemExit(main())
