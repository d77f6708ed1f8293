"""``python -m rdmamig`` is the ``rdmamig`` command."""

from .cli import main

raise SystemExit(main())
