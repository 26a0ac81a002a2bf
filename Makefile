# LineGuard — the README names these targets.
#   make demo   set everything up (venv, packages, mosquitto when possible) and run the demo
#   make test   set everything up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# test processes: one per core, at most 4 (most tests wait on brokers, sockets and child
# processes, so two processes on two cores halve the wall time); one file stays in one process
WORKERS ?= auto

.PHONY: setup broker test lint demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[edge,train,dev]"
	touch $@

setup: $(VENV)/.installed

# mosquitto and ansible-core come from Debian; the tests start their own broker.
broker:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
	  (command -v apt-get >/dev/null && { $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q mosquitto ansible-core || \
	   ( $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q && $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q mosquitto ansible-core ); }) || \
	  echo "mosquitto could not be installed: broker tests will be skipped, the demo uses the outbox"

test: setup broker
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -n $(WORKERS) --maxprocesses 4 --dist loadfile

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Options: make demo DEMO_ARGS="--no-broker" (or --reuse-model, --epochs N, --out DIR; see --help)
demo: setup broker
	$(PY) -m lineguard.deploy.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs demo-out
