# One set of commands for people and CI: `make run`, `make test`, `make lint`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BENCH_POSTGRES ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)

.PHONY: install run test lint typecheck pytest screenshots bench bench-quick bench-scale bench-metrics drill-kills drill-redis lock clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev tools

run: install ## Run the API, workers, Redis and a .eml SMTP server locally
	$(BIN)/dispatcher run

lint: install ## ruff, mypy --strict and the import contracts on the packages
	$(BIN)/ruff check dispatcher workers devstack tests bench
	$(BIN)/ruff format --check dispatcher workers devstack tests bench
	$(BIN)/mypy dispatcher workers devstack bench
	$(BIN)/lint-imports

pytest: install ## The test suite only
	$(BIN)/pytest

test: lint pytest ## Lint, type-check and run every test (the README's test command)

screenshots: install ## Screenshots of every page at desktop and phone width into docs/screenshots/ (Chromium)
	SCREENSHOTS=1 $(BIN)/pytest -q -p no:cacheprovider tests/web/test_screenshots.py

lock: install ## Pin what is installed now into requirements.lock (after changing pyproject.toml)
	@{ echo "# Exact versions CI and 'make install' install (constraints for pyproject's ranges)."; \
	  echo "# Regenerate with 'make lock' after changing dependencies in pyproject.toml."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^command-email-dispatcher'; \
	} > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .dispatcher

bench: install ## Every performance figure beside its ceiling, SQLite and PostgreSQL, ~20-25 min (not a test; ARGS="--help")
	$(BIN)/python -m bench $(ARGS)

bench-quick: install ## The same benchmark with small sizes: a smoke run of a couple of minutes
	$(BIN)/python -m bench --quick $(ARGS)

bench-scale: install ## The scale curve on PostgreSQL up to a 1,000,000-recipient campaign (long)
	$(BIN)/python -m bench --sections scale --million --database-url $(BENCH_POSTGRES) $(ARGS)

bench-metrics: install ## What one GET /metrics costs with 1,000,000 sends stored, SQLite and PostgreSQL (~2 min)
	$(BIN)/python -m bench.scrape --database-url $(BENCH_POSTGRES) $(ARGS)

drill-kills: install ## SIGKILL campaign workers 20 times during a 3,000-recipient campaign and check what it cost (not a test; ARGS="--help")
	$(BIN)/python -m tests.drills.campaign_kills $(ARGS)

drill-redis: install ## Kill Redis mid-stream under 400 SmartPlan sends on 300 credits, 10 runs (not a test; ARGS="--runs 3")
	$(BIN)/python -m tests.drills.redis_loss $(ARGS)
