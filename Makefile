# The venv lives in .venv; every target creates it when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

TOOLS := $(HOME)/.cache/epp-tools/bin
GHZ_VERSION := v0.120.0

# xds-protos ships an old copy of the opentelemetry/proto package; whichever installs last
# wins. Reinstall opentelemetry-proto (same version) so the OTLP exporter finds its messages.
OTEL_PROTO_FIX = $(PY) -m pip install -q --no-deps --force-reinstall \
	"$$($(PY) -m pip list --format=freeze | grep '^opentelemetry-proto==')"

.PHONY: venv native test test-k8s test-tools fuzz demo bench bench-full bench-tools bench-compare redis-server protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	$(OTEL_PROTO_FIX)
	touch $(STAMP)

venv: $(STAMP) native

# The KV-event index in Rust (native/, epp.kvevents._native): cargo fetches its two crates
# (pyo3, xxhash-rust) from crates.io and builds in ~20 s cold. Without cargo, or when the
# build fails, the EPP uses the pure-Python index (same behaviour, ~3x the intake CPU).
NATIVE_SO := epp/kvevents/_native.abi3.so
NATIVE_SRC := native/Cargo.toml native/Cargo.lock $(wildcard native/src/*.rs)

native: $(NATIVE_SO)

$(NATIVE_SO): $(NATIVE_SRC) | $(STAMP)
	@if command -v cargo >/dev/null 2>&1; then \
		echo "native: building the KV-event index (cargo build --release in native/)"; \
		if PYO3_PYTHON="$(abspath $(PY))" cargo build --release --locked \
			--manifest-path native/Cargo.toml; then \
			cp native/target/release/libepp_native.so $@ && echo "native: built $@"; \
		else echo "native: BUILD FAILED; the EPP falls back to the pure-Python KV index" >&2; fi; \
	else echo "native: cargo not found; the EPP uses the pure-Python KV index"; fi

test: $(STAMP) native redis-server
	$(PY) -m pytest -q

# Property tests with a deep budget (tests/fuzz/conftest.py); `make test` runs them small.
fuzz: $(STAMP) native
	EPP_FUZZ=deep $(PY) -m pytest -q tests/fuzz
# For the observability tests: headless Chromium (Debian's package) for the status page,
# a real Prometheus built from its Go module (cached in ~/.cache/epp-prometheus) for the
# dashboard. Without them those tests skip; .ci/run makes sure they exist.
test-tools:
	@command -v chromium >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium)
	bash tests/e2e/build_prometheus.sh

# The state-sync tests run a real redis-server (Debian's package) and fail without it in CI.
redis-server:
	@command -v redis-server >/dev/null || test -x /usr/bin/redis-server || \
		(apt-get update -q && apt-get install -y -q redis-server)

test-k8s: $(STAMP)
	$(PY) -m pytest -q -m k8s tests/k8s

demo: $(STAMP) native
	$(PY) -m epp.demo

# Load generators: ghz from the Go module proxy, wrk and h2load from Debian's packages.
bench-tools:
	@command -v wrk >/dev/null && command -v h2load >/dev/null || \
		(apt-get update -q && apt-get install -y -q wrk nghttp2-client)
	@test -x $(TOOLS)/ghz || GOBIN=$(TOOLS) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

bench: $(STAMP) native bench-tools redis-server
	$(PY) -m benchmarks.run --quick

bench-full: $(STAMP) native bench-tools redis-server
	$(PY) -m benchmarks.run --full

# Side by side with the upstream Go EPP v1.5.0 serving an InferencePool from a real
# kube-apiserver (both built from Go modules into caches outside the repo; the first
# build takes a while). Not part of `make bench`: too expensive for CI.
bench-compare: $(STAMP) bench-tools
	bash tests/k8s/build_apiserver.sh >/dev/null
	bash benchmarks/goepp/build_goepp.sh >/dev/null
	$(PY) benchmarks/bench_compare.py

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/epp/v1/pick.proto

clean:
	rm -rf $(VENV) build *.egg-info native/target $(NATIVE_SO)
