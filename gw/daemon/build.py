"""Where the daemon's store and gateway are put together: the store on local disk, the
firewall on a libnftables session, the flusher, and (for the crash tests only, see `faults`)
what injects faults into them."""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from ..kernel.conntrack import Flusher, delete_entries
from ..kernel.firewall import Firewall
from ..service.gateway import Gateway
from . import faults
from .metrics import Metrics


def store(settings, on_poisoned=None, environ: Mapping[str, str] = os.environ):
    """The store [store] names: TinyDB at `path`, or the table on etcd (its metadata and the
    local copy of the table in TinyDB at `path`)."""
    from ..store.local import LocalStore  # noqa: PLC0415 - so that `config check` stays light

    local = LocalStore(settings.path, calls=faults.file_calls(environ), on_poisoned=on_poisoned)
    if settings.backend != "etcd":
        return local
    from ..store.etcd import EtcdStore  # noqa: PLC0415
    from ..store.etcd_client import EtcdClient  # noqa: PLC0415

    client = EtcdClient(settings.endpoints, timeout=settings.timeout, ca_file=settings.ca_file,
                        cert_file=settings.cert_file, key_file=settings.key_file)
    try:
        return EtcdStore(client, settings.prefix, local).open()
    except BaseException:
        local.close()
        raise


def group_max(settings) -> int:
    """Pure: the most requests one group commit takes, from the [store] settings. On etcd each
    change stays one transaction of its own: a transaction is refused whole when another
    gateway wrote any key it compares, so a group would fail and be decided again for one
    contended key, each member paying etcd's round trip again; and its operations are capped
    (--max-txn-ops, set to one batch). Locally a group is one journal record, with none of
    that."""
    return 1 if settings.backend == "etcd" else settings.group_commit


def gateway(store, variables: dict[str, str], metrics: Metrics, own_addresses: Iterable[str],
            environ: Mapping[str, str] = os.environ, group_max: int = 64) -> Gateway:
    """`group_max`: the most requests one group commit takes (see `group_max`)."""
    from ..kernel.nft import NftSession  # noqa: PLC0415 - needs python3-nftables

    firewall = Firewall(NftSession(), variables, observe=metrics.observe_firewall)
    store, firewall = faults.wrap(store, firewall, environ)
    flusher = Flusher(faults.flush_delete(delete_entries, environ))
    gw = Gateway(store, firewall, flusher, on_change=metrics.on_change,
                 own_addresses=own_addresses, group_max=group_max)
    gw.committer.observe = metrics.observe_group
    return gw
