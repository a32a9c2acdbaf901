"""`oakestra-gw`: the daemon, a client of its API, and tools that work without it.

Exit codes: 0 success; 1 failure (an API error, the daemon unreachable, not ready, the kernel
differs from the store for `rules diff`); 2 a usage or configuration error (one line naming the
key) or, for `rules diff`, trouble.

One module per topic, in click's own shape: `root` is the group `oakestra-gw` with the daemon's
commands and adds the others (`expose`, `status`, `rules`, `config`, `store`, `teardown`);
`common` holds what they share, `client` the API client, `output` how an exposure is printed.
"""

from .root import main

__all__ = ["main"]
