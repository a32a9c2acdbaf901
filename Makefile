# Quick start on a fresh Debian 12 machine, as root:
#   make demo    # the network-namespace lab: a client reaches a service through the gateway
#   make test    # the whole test suite (unit, kernel, end to end), then the docs build
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := nftables python3-nftables conntrack iproute2 python3-venv python3-pip \
                e2fsprogs util-linux procps curl iputils-ping socat
PYTEST_ARGS ?=

.PHONY: setup deps venv test test-unit demo bench docs clean

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
	$(PY) -m pip install -q -e '.[test,docs]'
	touch $@

test: setup
	tests/run-isolated $(PY) -m pytest $(PYTEST_ARGS)
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir $$(mktemp -d)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/oakestra-gw demo

bench: setup
	tests/run-isolated $(PY) -m tests.bench

docs: setup
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site build *.egg-info
