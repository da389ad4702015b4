# The venv lives in .venv; every target creates it when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-k8s demo bench bench-full protos lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-k8s: $(STAMP)
	$(PY) -m pytest -q -m k8s tests/k8s

demo: $(STAMP)
	$(PY) -m epp.demo

bench: $(STAMP)
	$(PY) -m benchmarks.run --quick

bench-full: $(STAMP)
	$(PY) -m benchmarks.run --full

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/epp/v1/pick.proto

clean:
	rm -rf $(VENV) build *.egg-info
