# The two set-up commands (see README.md): `make demo` and `make test`. Both install what they need into .venv;
# `make plan` loads the sample in examples/ and shows the next recharge cycle's plan.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXAMPLE_DIR := recharged-example
DEMO_DIR := recharged-demo
EXAMPLE_AT := 2026-11-16T09:00:00Z
RUN := RECHARGED_DATABASE__URL=sqlite:///$(EXAMPLE_DIR)/recharged.db $(BIN)/recharged --config config.toml

.PHONY: demo plan test test-stripe soak lint install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Sixty simulated days of six customers on the embedded default (SQLite, the Stripe-compatible test server in
# process, emails as .eml files; no keys, no network): a summary, and a balance chart per account.
demo: $(BIN)/.installed
	$(BIN)/recharged demo --out $(DEMO_DIR)

# The sample in examples/ on the embedded default (SQLite, no keys): accounts, call records, then the plan.
plan: $(BIN)/.installed
	rm -rf $(EXAMPLE_DIR) && mkdir -p $(EXAMPLE_DIR)
	$(RUN) db upgrade
	$(RUN) accounts import examples/accounts.csv --actor "Example Admin"
	$(RUN) usage import examples/usage.csv --rejects $(EXAMPLE_DIR)/usage.rejected.csv --accept-rejects
	$(RUN) plan --at $(EXAMPLE_AT)
	@echo "The database is $(EXAMPLE_DIR)/recharged.db; try: $(RUN) accounts show delta-startup --at $(EXAMPLE_AT)"

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# promtool, which tests deploy/prometheus/: Debian's prometheus package unpacked into .venv (no service is started).
# Without apt-get, put a promtool on PATH: its tests are skipped without one (CI requires it).
$(BIN)/promtool: | $(BIN)/.installed
	rm -rf $(VENV)/prometheus-deb && mkdir -p $(VENV)/prometheus-deb
	cd $(VENV)/prometheus-deb && apt-get download prometheus && dpkg-deb -x prometheus_*.deb . \
		&& cp usr/bin/promtool $(abspath $@) || echo "no promtool: the tests of deploy/prometheus/ are skipped" >&2
	rm -rf $(VENV)/prometheus-deb

# Lint, type-check and the whole test suite; PostgreSQL too when RECHARGED_TEST_POSTGRES_URL is set.
test: lint $(BIN)/promtool
	$(BIN)/pytest -n 2 -q

# The payment tests again against real Stripe test mode (deselected in `make test`): needs a test key.
test-stripe: $(BIN)/.installed
	@case "$$RECHARGED_TEST_STRIPE_KEY" in sk_test_*) ;; *) echo "set RECHARGED_TEST_STRIPE_KEY=sk_test_..." >&2; exit 2;; esac
	$(BIN)/pytest -n 2 -q -m stripe

# The model of the whole system (tests/model) on random examples, in batches of SOAK_EXAMPLES until SOAK_SECONDS have
# passed, on SQLite and then on PostgreSQL when RECHARGED_TEST_POSTGRES_URL is set; `make test` runs a fixed seed.
SOAK_SECONDS ?= 600
SOAK_EXAMPLES ?= 20
SOAK_STEPS ?= 50
soak: $(BIN)/.installed
	RECHARGED_MODEL_SOAK=1 RECHARGED_MODEL_SECONDS=$(SOAK_SECONDS) RECHARGED_MODEL_EXAMPLES=$(SOAK_EXAMPLES) \
		RECHARGED_MODEL_STEPS=$(SOAK_STEPS) $(BIN)/pytest tests/model -p no:cacheprovider -q -s

clean:
	rm -rf $(EXAMPLE_DIR) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
