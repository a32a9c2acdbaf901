"""The gateway's state machine, one body for two kernels: random sequences of adds, deletes,
restarts and foreign changes, after each of which the kernel's maps equal the store, which
equals a model of what was acknowledged.

The unit tier runs it against gw.kernel.fake.FakeNft, without root; the kernel tier runs the
same machine against nftables itself. Both passing is what shows the fake honest: it refuses
what the kernel refuses (the foreign changes below make the gateway's retry paths run), so
the gateway takes the same paths on both."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import tempfile

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gw.core import ruleset
from gw.core.config import parse_config
from gw.core.errors import Conflict, NotFound
from gw.core.exposure import DeleteRequest, Exposure
from gw.kernel.fake import FakeNft
from gw.kernel.firewall import Firewall
from gw.kernel.nft import NoSuchObject
from gw.service.gateway import Gateway
from gw.store.local import LocalStore
from tests import oracle

SETTINGS = parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                     "internal_ipv6": "fdff::ffff:1"}})
MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=25, deadline=None,
                            suppress_health_check=list(HealthCheck))


def ex(port, ip, service_port=80, proto="tcp", service_id=None):
    return Exposure(port, proto, ipaddress.ip_address(ip), service_port, service_id)


def by_key(elements) -> dict:
    """Elements as tests/oracle.py reads them, by key; a foreign element is a key of its own,
    so it never compares equal."""
    return {item[:3]: item[3:] for item in elements or ()}


def store_state(store) -> dict:
    return {e.key: (str(e.service_ip), e.service_port) for e in store.exposures()}


class RealKernel:
    """nftables in the test's network namespace, changed behind the gateway's back with the
    nft tool and read with tests/oracle.py (nothing from gw/)."""

    def __init__(self):
        self._nft("table inet oakestra_gw\ndelete table inet oakestra_gw")

    @staticmethod
    def _nft(*args: str) -> None:
        subprocess.run(["nft", *args], check=True)

    def session(self):
        from gw.kernel.nft import NftSession

        return NftSession()

    def state(self) -> dict:
        return by_key(oracle.read())

    def flush_map(self, family: str) -> None:
        self._nft("flush", "map", "inet", "oakestra_gw", ruleset.MAPS[family])

    def delete_table(self) -> None:
        self._nft("delete", "table", "inet", "oakestra_gw")

    def add_rule(self, chain: str, text: str) -> None:
        self._nft("add", "rule", "inet", "oakestra_gw", chain, *text.split())

    def foreign_add(self, e: Exposure) -> None:
        self._nft("add", "element", "inet", "oakestra_gw", ruleset.MAPS[e.family],
                  f"{{ {ruleset.element(e)} }}")

    def foreign_delete(self, e: Exposure) -> None:
        self._nft("delete", "element", "inet", "oakestra_gw", ruleset.MAPS[e.family],
                  f"{{ {e.protocol} . {e.exposed_port} }}")


class FakeKernel:
    """The in-memory nftables: one for the machine's whole run, as the kernel outlives a
    restart of the gateway; changed behind its back by transactions of its own."""

    def __init__(self):
        self.nft = FakeNft()

    def session(self):
        return self.nft

    def state(self) -> dict:
        try:
            listing = self.nft.list_table()
        except NoSuchObject:
            return {}
        return by_key(oracle.elements(json.dumps(listing)))

    def flush_map(self, family: str) -> None:
        self.nft.flush_map(family)

    def delete_table(self) -> None:
        self.nft.apply((ruleset.DeleteTable(),))

    def add_rule(self, chain: str, text: str) -> None:
        self.nft.add_rule(chain, text)

    def foreign_add(self, e: Exposure) -> None:
        self.nft.apply(ruleset.change_tx(add=[e]))

    def foreign_delete(self, e: Exposure) -> None:
        self.nft.apply(ruleset.change_tx(remove=[e]))


ports = st.integers(1, 40)
ips = st.sampled_from(["10.30.0.1", "10.30.0.2", "fdff:2000::1", "fdff:2000::2"])
protos = st.sampled_from(["tcp", "udp"])


class GatewayMachine(RuleBasedStateMachine):
    Kernel: type = FakeKernel  # a subclass names the kernel it runs against

    def __init__(self):
        super().__init__()
        self.kernel = self.Kernel()
        self.dir = tempfile.TemporaryDirectory()
        self.path = f"{self.dir.name}/exposures.json"
        self.gw = self.open()
        self.model: dict = {}

    def open(self) -> Gateway:
        self.commits: list[tuple[str, bool]] = []  # (kind, accepted), as the metrics see them
        gw = Gateway(LocalStore(self.path),
                     Firewall(self.kernel.session(), ruleset.skeleton_vars(SETTINGS),
                              observe=lambda kind, seconds, ok: self.commits.append((kind, ok))))
        gw.load()
        return gw

    def close(self) -> None:
        self.gw.store.close()
        self.gw.firewall.session.close()

    @rule(port=ports, ip=ips, service_port=st.integers(1, 3), proto=protos)
    def add(self, port, ip, service_port, proto):
        e = ex(port, ip, service_port, proto)
        try:
            self.gw.add([e])
        except Conflict:
            assert self.model[e.key] != (str(e.service_ip), service_port)
        else:
            assert self.model.setdefault(e.key, (str(e.service_ip), service_port)) == (
                str(e.service_ip), service_port)

    @rule(port=ports, proto=protos, family=st.sampled_from([None, "ipv4", "ipv6"]))
    def delete(self, port, proto, family):
        request = DeleteRequest(port, proto, family)
        expected = {k for k in self.model if request.matches(k)}
        try:
            deleted = self.gw.delete(request)
        except NotFound:
            assert not expected
        else:
            assert {e.key for e in deleted} == expected
            for key in expected:
                del self.model[key]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def a_lost_element_is_deleted(self, data):
        """Someone deleted the element: the gateway's delete is refused (no such element),
        asks which keys are there, and converges."""
        key = data.draw(st.sampled_from(sorted(self.model)))
        ip, port = self.model[key]
        self.kernel.foreign_delete(ex(key[2], ip, port, key[1]))
        [deleted] = self.gw.delete(DeleteRequest(key[2], key[1], key[0]))
        assert deleted.key == key
        assert self.commits[-2:] == [("change", False), ("change", True)]
        del self.model[key]

    @rule(port=st.integers(41, 50), ip=ips, proto=protos)
    def a_stale_element_is_overwritten(self, port, ip, proto):
        """Someone added the key with another target: the gateway's add is refused (the
        element exists), and the retry replaces it."""
        e = ex(port, ip, 1, proto)
        if e.key in self.model:
            return  # ours: the kernel refuses another target for it, to anyone
        self.kernel.foreign_add(ex(port, ip, 9, proto))
        self.gw.add([e])
        assert self.commits[-2:] == [("change", False), ("change", True)]
        self.model[e.key] = (ip, 1)

    @rule()
    def tamper_and_reconcile(self):
        self.kernel.flush_map("ipv4")
        self.gw.reconcile()

    @rule()
    def a_chain_edit_is_seen_and_repaired(self):
        self.kernel.add_rule("forward", "tcp dport 9 accept")
        assert self.gw.diff().chains_changed == ["forward"]
        self.gw.reconcile()
        assert not self.gw.diff()

    @rule()
    def restart(self):
        self.close()
        self.gw = self.open()

    @precondition(lambda self: self.model)
    @rule()
    def restart_with_empty_kernel(self):
        self.close()
        self.kernel.delete_table()
        self.gw = self.open()

    @invariant()
    def kernel_equals_store_equals_model(self):
        assert self.kernel.state() == store_state(self.gw.store) == self.model

    def teardown(self):
        self.close()
        self.dir.cleanup()
