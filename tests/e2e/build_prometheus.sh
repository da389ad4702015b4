#!/usr/bin/env bash
# Build a real Prometheus once, from its Go module, into a cache outside the repository,
# for the dashboard test (tests/e2e/test_dashboard_prometheus.py). Later runs find the
# binary and return at once.
#
# Pinned: github.com/prometheus/prometheus v0.316.0 (Prometheus 3.16.0; the Go module
# carries 0.x versions). Built with the `remove_all_sd` tag: the test scrapes static
# targets, and leaving out the cloud service-discovery providers (AWS, Azure, GCE,
# Kubernetes, ...) cuts the download and compile time by more than half. The web UI's
# assets are not embedded (no `builtinassets` tag); the HTTP API the test uses is
# unaffected.
#
# Environment:
#   EPP_PROM_CACHE   cache root (default ~/.cache/epp-prometheus): bin/, gomod/, gobuild/
#   EPP_PROM_JOBS    parallel compile jobs (default 2; the machine has 2 cores)
#
# Prints the binary path on success; progress and the build time go to stderr and
# $EPP_PROM_CACHE/build.log.
set -euo pipefail

version="v0.316.0"
cache="${EPP_PROM_CACHE:-$HOME/.cache/epp-prometheus}"
bin="$cache/bin"
jobs="${EPP_PROM_JOBS:-2}"

stamp_want="$(cat "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
stamp_file="$bin/.stamp"
if [[ -x "$bin/prometheus" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_want" ]]; then
  echo "$bin/prometheus"
  exit 0
fi

command -v go >/dev/null || { echo "build_prometheus.sh: go is not installed" >&2; exit 2; }

mkdir -p "$bin" "$cache/gomod" "$cache/gobuild"
export GOMODCACHE="$cache/gomod"
export GOCACHE="$cache/gobuild"
export GOFLAGS="-buildvcs=false -p=$jobs"
export GOMAXPROCS="$jobs"
export CGO_ENABLED=0

start=$(date +%s)
echo "build_prometheus.sh: building prometheus $version (-p=$jobs, modules into $GOMODCACHE); the first build takes a few minutes" >&2
# The module's v0.MNN.P is Prometheus M.NN.P: what `prometheus --version` should say.
x="${version#v0.}"; mm="${x%%.*}"; release="${mm:0:1}.${mm:1}.${x#*.}"
ver="github.com/prometheus/common/version"
GOBIN="$bin/prometheus.d" nice -n 10 go install -trimpath -tags remove_all_sd \
  -ldflags="-s -w -X $ver.Version=$release -X $ver.Branch=module" \
  "github.com/prometheus/prometheus/cmd/prometheus@$version"
mv "$bin/prometheus.d/prometheus" "$bin/prometheus" && rmdir "$bin/prometheus.d"
echo "$stamp_want" > "$stamp_file"
end=$(date +%s)

{
  echo "built prometheus $version $(date -u +%FT%TZ) in $((end - start)) s with -p=$jobs on $(nproc) cores, $(go version)"
  du -sh "$bin" "$cache/gomod" "$cache/gobuild" 2>/dev/null
} >> "$cache/build.log"
tail -n 4 "$cache/build.log" >&2
echo "$bin/prometheus"
