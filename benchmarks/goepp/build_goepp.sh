#!/usr/bin/env bash
# Build the upstream Go EPP (gateway-api-inference-extension v1.5.0) once, from Go modules,
# into a cache outside the repository, for `make bench-compare`. Later runs return at once.
#
# `go install sigs.k8s.io/gateway-api-inference-extension/cmd/epp@v1.5.0` does not work
# (the proxy refuses the module's version list), so the module is fetched with
# `go mod download` (pinned version, checked against the pinned go.sum hash below) and
# `./cmd/epp` is built inside the downloaded module directory, with its own go.mod/go.sum.
# The CRDs the EPP watches (config/crd/bases) are copied next to the binary.
#
# Environment:
#   EPP_GOEPP_CACHE  where the binary and CRDs go (default ~/.cache/epp-goepp)
#   EPP_K8S_CACHE    module and build caches shared with tests/k8s/build_apiserver.sh
#                    (default ~/.cache/epp-k8s: gomod/, gobuild/; many modules are common)
#   EPP_K8S_JOBS     parallel compile jobs (default 2; the machine has 2 cores)
#
# Prints two lines on success: the binary path and the CRD directory.
set -euo pipefail

module="sigs.k8s.io/gateway-api-inference-extension"
version="v1.5.0"
# h1: hash of the module zip, as `go mod download -json` reports it (and go.sum would).
module_sum="h1:w9Awt60cmI1vM7Y6N81h8wDCBP0WkmxpdI7GKY0v070="

cache="${EPP_GOEPP_CACHE:-$HOME/.cache/epp-goepp}"
k8s_cache="${EPP_K8S_CACHE:-$HOME/.cache/epp-k8s}"
jobs="${EPP_K8S_JOBS:-2}"
out="$cache/$version"
binary="$out/epp"
crds="$out/crd"

stamp_want="$(cat "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
stamp_file="$out/.stamp"
if [[ -x "$binary" && -d "$crds" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_want" ]]; then
  echo "$binary"
  echo "$crds"
  exit 0
fi

command -v go >/dev/null || { echo "build_goepp.sh: go is not installed" >&2; exit 2; }

mkdir -p "$out" "$k8s_cache/gomod" "$k8s_cache/gobuild"
export GOMODCACHE="$k8s_cache/gomod"
export GOCACHE="$k8s_cache/gobuild"
export GOWORK=off           # the module ships a go.work naming directories not in the zip
export GOFLAGS="-buildvcs=false -mod=mod -p=$jobs"
export GOMAXPROCS="$jobs"
export CGO_ENABLED=0
export GOTOOLCHAIN=local    # build with the installed Go (go.mod says go 1.25.0)

start=$(date +%s)
echo "build_goepp.sh: downloading $module@$version into $GOMODCACHE" >&2
info="$(nice -n 10 go mod download -json "$module@$version")"
dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$info")"
sum="$(sed -n 's/^[[:space:]]*"Sum": "\(.*\)",$/\1/p' <<<"$info")"
if [[ "$sum" != "$module_sum" ]]; then
  echo "build_goepp.sh: $module@$version has hash $sum, expected $module_sum" >&2
  exit 1
fi
echo "build_goepp.sh: downloading its dependencies (go.sum of the module pins them)" >&2
(cd "$dir" && nice -n 10 go mod download)
echo "build_goepp.sh: compiling ./cmd/epp (-p=$jobs); the first build takes a few minutes" >&2
(cd "$dir" && nice -n 10 go build -trimpath -ldflags="-s -w" -o "$binary.tmp" ./cmd/epp)
rm -rf "$crds" && mkdir -p "$crds"
cp "$dir"/config/crd/bases/*.yaml "$crds/"
chmod u+w "$crds"/*.yaml
mv "$binary.tmp" "$binary"
echo "$stamp_want" > "$stamp_file"
end=$(date +%s)

{
  echo "built $module $version $(date -u +%FT%TZ) in $((end - start)) s with -p=$jobs on $(nproc) cores, $(go version)"
  du -sh "$binary" 2>/dev/null
} >> "$cache/build.log"
tail -n 2 "$cache/build.log" >&2

echo "$binary"
echo "$crds"
