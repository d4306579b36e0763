"""``python -m detector`` runs the rnnsentry command line."""

from detector.cli import main

raise SystemExit(main())
