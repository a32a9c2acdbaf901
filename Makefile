# Quick start on a fresh Debian 12 machine, as root:
#   make demo    # the network-namespace lab: a client reaches a service through the gateway
#   make test    # the whole test suite (unit, kernel, end to end), then the docs build
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# iptables: its nf_tables backend plays NetManager's chains beside ours in the tests (it has no
# service to start and changes no ruleset when installed).
APT_PACKAGES := nftables python3-nftables conntrack iproute2 python3-venv python3-pip \
                e2fsprogs util-linux procps curl iputils-ping socat iptables
PYTEST_ARGS ?=
# `make test` runs the suite on this many workers (pytest-xdist), one unit at a time each (a
# module, or the booted-node tests together: tests/conftest.py): most of the suite waits on
# daemons, timers and the kernel, so two workers share two cores well. TEST_WORKERS=0: one
# process.
TEST_WORKERS ?= 2

.PHONY: setup deps venv test test-unit demo bench bench-deps mqtt-deps ha-deps docs docs-deps clean

setup: deps venv

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Debian's nftables bindings match its libnftables: the venv sees system site-packages.
venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,docs,bench]'
	touch $@

test: setup node-prepare bench-deps mqtt-deps ha-deps docs-deps
	tests/run-isolated $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir $$(mktemp -d)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/oakestra-gw demo

# The benchmarks (tests/bench): about 12 minutes (the whole port space is half of it); rewrites docs/performance.md and docs/img/bench-*.
# wrk and nginx come from Debian; nginx is installed without being started or enabled (the
# benchmark runs its own instance inside a network namespace). BENCH_ARGS: e.g. --reps 9.
# prometheus is there for its promtool (tests/api/test_prometheus.py checks a real scrape and
# the shipped alerting rules); its server is never started or enabled either. iperf3 measures
# TCP throughput and UDP packets/s through the gateway (tests/bench/limit.py), in namespaces;
# its packaged daemon is never started or enabled.
BENCH_APT_PACKAGES := wrk nginx-light prometheus iperf3
BENCH_ARGS ?=
bench: setup bench-deps
	tests/run-isolated $(PY) -m tests.bench $(BENCH_ARGS)

bench-deps:
	$(call apt_no_start,$(BENCH_APT_PACKAGES),nginx.service prometheus.service prometheus-node-exporter.service iperf3.service)

# Installs Debian packages without starting or enabling their services: the tests run their own
# instances inside network namespaces. $(1): the packages, $(2): the units to disable.
define apt_no_start
@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
if [ -n "$$missing" ]; then \
  echo "installing:" $$missing; \
  made_policy=; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1; fi; \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; rc=$$?; \
  [ -z "$$made_policy" ] || rm -f /usr/sbin/policy-rc.d; \
  if [ -d /run/systemd/system ]; then systemctl disable --now $(2) >/dev/null 2>&1 || true; fi; \
  exit $$rc; \
fi
endef

# The MQTT front end's tests (tests/mqtt) start Debian's mosquitto broker in the lab's
# namespaces and talk to it with mosquitto_pub/mosquitto_sub; the packaged service stays off.
MQTT_APT_PACKAGES := mosquitto mosquitto-clients
mqtt-deps:
	$(call apt_no_start,$(MQTT_APT_PACKAGES),mosquitto.service)

# High availability (tests/ha): the shared exposure table runs on Debian's etcd (etcd-server
# for the members the tests start in namespaces, etcd-client for etcdctl); keepalived (VRRP
# moves the floating addresses) and conntrackd (syncs the flows) run inside the HA lab's
# namespaces, one of each per gateway. No packaged service is started or enabled.
HA_APT_PACKAGES := etcd-server etcd-client keepalived conntrackd
ha-deps:
	$(call apt_no_start,$(HA_APT_PACKAGES),etcd.service keepalived.service conntrackd.service)

# The screenshot test of the built docs (tests/docs) renders every page with Debian's headless
# Chromium; installed the same way (it brings no service of its own).
DOCS_APT_PACKAGES := chromium fonts-dejavu-core
docs-deps:
	$(call apt_no_start,$(DOCS_APT_PACKAGES),)

docs: setup
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site build *.egg-info

# The gateway node test (tests/node): a Debian 12 root file system booted with systemd-nspawn,
# provisioned by the Ansible role. node-prepare needs network (debootstrap from the Debian
# mirror, dependency wheels from PyPI) and caches both under /var/cache/oakestra-gw-test, so it
# runs before the isolated (network-less) test run; later runs reuse the cache.
NODE_APT_PACKAGES := debootstrap systemd-container
.PHONY: node-prepare test-node
node-prepare: setup
	@missing=$$(for p in $(NODE_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	$(PY) -c 'import ansible, ansiblelint' 2>/dev/null || $(PY) -m pip install -q ansible ansible-lint
	$(PY) tests/node/nodelab.py prepare

test-node: node-prepare
	tests/run-isolated $(PY) -m pytest tests/node -m node $(PYTEST_ARGS)
