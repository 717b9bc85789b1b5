"""``python -m memory_server``: the same entry point as the ``memory-server`` command."""

from .cli import main

raise SystemExit(main())
