"""The kernel reader every test compares the daemon against (tests/oracle.py) is not the
daemon's own parser: what the daemon never wrote into our table shows up in it."""

from __future__ import annotations

import pytest

from tests.api.harness import docs_set
from tests.helpers import doc, ex

pytestmark = pytest.mark.kernel

FOREIGN_ELEMENT = '{ tcp . 9999 comment "not ours" : 10.30.0.9 . 80 }'
FOREIGN_MAP = "{ type inet_service : ipv4_addr; elements = { 1 : 10.0.0.1 } }"


def test_the_kernel_reader_sees_elements_the_daemon_did_not_write(gw, api):
    assert api.add(ex(8080)).status == 201
    assert gw.kernel_docs() == docs_set(api.list()) == {doc(8080)}
    gw.nft("add", "element", "inet", "oakestra_gw", "expose_v4", FOREIGN_ELEMENT)
    gw.nft("add", "map", "inet", "oakestra_gw", "intruder", FOREIGN_MAP)
    try:
        kernel = gw.kernel_docs()
        # A "kernel == store" check would now fail, as it must.
        assert kernel != docs_set(api.list())
        assert doc(8080) in kernel
        foreign = sorted(item[:2] for item in kernel if item[0] == "foreign")
        assert foreign == [("foreign", "expose_v4"), ("foreign", "intruder")], kernel
    finally:
        gw.nft("delete", "element", "inet", "oakestra_gw", "expose_v4", "{ tcp . 9999 }")
        gw.nft("delete", "map", "inet", "oakestra_gw", "intruder")
    assert gw.kernel_docs() == {doc(8080)}
