"""``python -m cluster.selector``: run the cache-selection service (cluster.selector.server)."""

from cluster.selector.server import main

raise SystemExit(main())
