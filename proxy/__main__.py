"""``python -m proxy``: the ``rightsizer`` command."""

from proxy.programs.cli import main

raise SystemExit(main())
