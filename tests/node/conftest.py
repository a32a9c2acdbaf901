"""Markers of the provisioning and node tests (tests/node)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "node: boots a Debian 12 gateway node with systemd-nspawn and provisions it "
                   "with the Ansible role (make test-node)")
