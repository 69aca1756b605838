# liftoff: `make demo` and `make test` each do the whole set-up first (make setup).
SHELL := /bin/bash
ROOT := $(shell pwd)
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
LAB_PACKAGES := openssh-server openssh-client haproxy prometheus prometheus-alertmanager prometheus-pushgateway
BROWSER_PACKAGES := chromium chromium-driver  # the browser tests (tests/browser.py), not the lab
APT_PACKAGES := $(LAB_PACKAGES) $(BROWSER_PACKAGES)
ENV := source $(ROOT)/scripts/env.sh &&

.PHONY: setup apt venv airflow-db demo demo-stop test test-e2e test-unit lint bench lab-up lab-down lab-status clean

setup: apt venv airflow-db

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi; \
	for svc in haproxy prometheus prometheus-alertmanager prometheus-pushgateway ssh; do \
	  (command -v systemctl >/dev/null && systemctl is-active -q $$svc 2>/dev/null && systemctl stop $$svc) || true; \
	done

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

airflow-db: venv
	@$(ENV) mkdir -p "$$AIRFLOW_HOME" && airflow db migrate >"$$AIRFLOW_HOME/db-migrate.log" 2>&1 \
	  || { tail -30 "$$AIRFLOW_HOME/db-migrate.log"; exit 1; }

# Leaves the lab and an Airflow api-server on the demo's DB running (URLs printed); `make demo-stop`.
demo: setup
	$(ENV) python scripts/demo_api.py stop --quiet && python -m lab up
	$(ENV) python scripts/demo.py 2>&1 | tee .lab/demo.log | grep -v "^20[0-9][0-9]-" ; status=$${PIPESTATUS[0]}; \
	  python scripts/demo_api.py start || status=1; exit $$status

demo-stop: venv
	$(ENV) python scripts/demo_api.py stop; status=$$?; python -m lab down || status=1; exit $$status

# Two workers, a test file stays on one (its lab and Airflow stack are the file's), the files that
# start Airflow stacks all on one, first, the longest files first on the other (tests/conftest.py);
# a worker's session labs take octets of their own. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup
	$(ENV) python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30 tests

test-e2e: setup
	$(ENV) python -m pytest -q tests/e2e

test-unit: setup
	$(ENV) python -m pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check dags plugins include lab tests bench

bench: setup
	$(ENV) python bench/fleet_rollout.py

# liftoff and the Ansible playbook a user would write (bench/ansible/rollout.yml), side by side on
# the lab at 100 and 1,000 hosts; ansible goes into .bench/ansible on first use.
# HOSTS=100 for one size; ANSIBLE_BATCHES=1000:2 runs 2 of Ansible's 10 batches there and extrapolates.
.PHONY: bench-ansible
COMMA := ,
bench-ansible: setup
	$(ENV) python bench/compare_ansible.py --hosts $(or $(HOSTS),100$(COMMA)1000) $(if $(ANSIBLE_BATCHES),--ansible-batches $(ANSIBLE_BATCHES))

bench-fleet-view: setup
	$(ENV) python bench/fleet_view.py

# The rollout engine alone at 1,000 and 10,000 hosts on a simulated transport; FULL=1 adds 50,000.
.PHONY: bench-scale
bench-scale: venv
	$(ENV) python bench/fleet_scale.py $(if $(FULL),--full)

# The chaos soak (issue 14): RUNS runs (default 120) of random pipelines with random faults on a lab
# of its own (octet 75), the invariants checked after each; SEED=N replays one; MINUTES=M caps it.
.PHONY: soak
soak: setup
	@mkdir -p .lab
	$(ENV) python bench/soak.py --seed $(or $(SEED),1) --runs $(or $(RUNS),120) \
	  $(if $(MINUTES),--minutes $(MINUTES)) --json .lab/soak-$(or $(SEED),1).json

lab-up: setup
	$(ENV) python -m lab up

lab-down: venv
	$(ENV) python -m lab down

lab-status: venv
	$(ENV) python -m lab status

clean: lab-down
	rm -rf .airflow .lab
