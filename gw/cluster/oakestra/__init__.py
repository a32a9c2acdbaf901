"""Joining the Oakestra cluster (docs/oakestra.md, "Joining the cluster").

1. ``POST {cluster_url}/api/gateway/register`` ``{"gateway_id", "gateway_ipv4", "gateway_ipv6"}``
   (the public addresses; the id is "" on a first start) -> ``{"gateway_id"}``.
2. ``GET {cluster_url}/api/gateway/<id>/ip``
   -> ``{"oakestra_gateway_ipv4", "oakestra_gateway_ipv6"}``.
3. The bridge carries the internal addresses; the server loads the table and binds the API.
4. ``POST {cluster_url}/api/gateway/<id>/ready`` ``{"oakestra_gateway_ipv4",
   "oakestra_gateway_ipv6", "api_port", "api_token"}``.

Every call is retried with capped exponential backoff, one log line per failed try.

- First start (no id and addresses in the store): steps 1 and 2 block the start. Connection
  failures, timeouts and 5xx/408/429 answers are retried until ``oakestra.give_up_after``
  seconds have passed; any other 4xx, or an answer that does not hold what the contract says,
  ends the start at once. Either way a `ClusterError` with a sentence saying what happened, and
  nothing was changed but the id `register` answered (kept in the store's meta, so the next
  start registers under it and not as a new gateway): no bridge, no address. Only after both
  answers are validated are the bridge set up and the addresses stored.
- Restart (id and addresses stored): the stored addresses are used at once, so the server loads
  the table and traffic flows without waiting for the cluster; step 1 runs in the background
  under the stored id, retried for as long as the process lives. Step 2 follows only when the
  cluster answers another id (a new registration): Oakestra's root service manager hands out a
  new address on every call, so asking again for the same registration would churn. Should
  the addresses differ, they are stored and applied live (the daemon's ``readdress``) before
  the next ready announcement.
- Step 4 always runs in the background once the API listens, after steps 1-2 succeeded, in
  one announcer thread: a newer announcement (a rotated token) replaces an older one.
- Standalone (no ``cluster_url``): the addresses come from the config; only step 3.
- A pair (``ha.enabled``): one gateway to the cluster, its id and floating internal addresses
  from the config (the same on both nodes). Only step 3 at start; the pair's master speaks
  (``speak(token)`` on each promotion): step 1 the first time in a process, then step 4, and
  step 4 again on every later promotion. A node that is not the master calls nothing, and
  one demoted while a call is retried drops it at the next try.
- Replicas (``cluster_url`` a list): every call goes to the orchestrator in use and moves to
  the next on a failure that may work elsewhere. Once ready, the one in use is probed every
  ``oakestra.probe_interval``; when it stops answering the gateway switches and announces
  itself to the next (steps 1, 2 and 4 again, under its id).

The daemon holds one `Membership` per process: ``bring_up()`` before the table is loaded,
``announce_ready(token)`` once the API listens (and after a token rotation), ``speak(token)``
when a pair's node becomes master, ``stop()`` at
shutdown; ``gateway_id`` and ``status()`` for the API.

- `client`: the orchestrator's HTTP API, one call per step, answers validated;
- `retry`: a call retried with capped exponential backoff;
- `membership`: the steps above, for the life of one process.
"""

from .client import (ClusterClient, ClusterError, ClusterGarbage, ClusterRefused,  # noqa: F401
                     ClusterUnreachable, Retryable)
from .membership import Joined, Membership  # noqa: F401
from .retry import Stopped, retry  # noqa: F401
