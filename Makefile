# Renderflow: `make run` starts the stack, `make test` runs the whole suite.
# Every target installs what it needs first, so both work on a fresh machine.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROTO_SRC := $(wildcard protos/renderflow/v1/*.proto)
PROTO_STAMP := protos/renderflow/v1/.generated
INSTALL_STAMP := $(VENV)/.installed

.PHONY: install proto run test test-stress lint format bench chaos clean

install: $(INSTALL_STAMP) $(PROTO_STAMP)

$(INSTALL_STAMP): pyproject.toml client/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[local,dev]' -e ./client
	touch $@

proto: $(INSTALL_STAMP)
	rm -f $(PROTO_STAMP)
	$(MAKE) $(PROTO_STAMP)

# Generated code and its typed stubs land beside the .proto files, in the package
# `renderflow.v1`; they are never edited nor committed.
$(PROTO_STAMP): $(PROTO_SRC) $(INSTALL_STAMP)
	find protos/renderflow -name '*_pb2*.py*' -delete
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	    --python_out=protos --grpc_python_out=protos \
	    --mypy_out=protos --mypy_grpc_out=protos $(PROTO_SRC)
	touch protos/renderflow/__init__.py protos/renderflow/v1/__init__.py $@

run: install
	$(BIN)/renderflow run

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole suite five times in a row beside a busy process: no test may fail under load.
test-stress: install
	$(BIN)/python -m tests.stress --runs $(or $(RUNS),5) -- $(PYTEST_ARGS)

# Benchmarks side by side (ceilings, the seed design, procrastinate); results in bench-results/.
bench: install
	$(BIN)/python -m tests.bench.run_all

# Faults under steady load; exits non-zero when an invariant breaks.
chaos: install
	$(BIN)/python -m tests.chaos

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache
	find protos/renderflow -name '*_pb2*.py*' -delete
	rm -f $(PROTO_STAMP)
