#!/usr/bin/env bash
# Build a real kube-apiserver and etcd once, into a cache outside the repository,
# for the `k8s` tests (make test-k8s). Later runs find the binaries and return at once.
#
# Versions are pinned by tests/k8s/apiserver/go.mod and go.sum: k8s.io/kubernetes
# v1.36.3 with every k8s.io staging module replaced by its published v0.36.3, and the
# etcd server module at the version that kubernetes release itself requires (v3.6.8).
# Also helm (helm.sh/helm/v3, a Go module; not packaged by Debian) for the chart tests.
#
# Environment:
#   EPP_K8S_CACHE   cache root (default ~/.cache/epp-k8s): bin/, gomod/, gobuild/
#   EPP_K8S_JOBS    parallel compile jobs (default 2; the machine has 2 cores)
#   EPP_K8S_KEEP_GO_CACHES=0  delete gomod/ and gobuild/ after a successful build
#
# Prints the binary paths on success. Build time and disk use go to
# $EPP_K8S_CACHE/build.log.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mod_dir="$here/apiserver"
cache="${EPP_K8S_CACHE:-$HOME/.cache/epp-k8s}"
bin="$cache/bin"
jobs="${EPP_K8S_JOBS:-2}"

# The stamp ties cached binaries to the exact go.mod/go.sum they came from.
helm_version="v3.22.0"
k8s_version="v1.36.3"
stamp_want="$(cat "$mod_dir/go.mod" "$mod_dir/go.sum" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
stamp_file="$bin/.stamp"
if [[ -x "$bin/kube-apiserver" && -x "$bin/etcd" && -x "$bin/helm" && -f "$stamp_file" \
      && "$(cat "$stamp_file")" == "$stamp_want" ]]; then
  echo "$bin/kube-apiserver"
  echo "$bin/etcd"
  echo "$bin/helm"
  exit 0
fi

command -v go >/dev/null || { echo "build_apiserver.sh: go is not installed" >&2; exit 2; }

mkdir -p "$bin" "$cache/gomod" "$cache/gobuild"
export GOMODCACHE="$cache/gomod"
export GOCACHE="$cache/gobuild"
export GOFLAGS="-buildvcs=false -mod=readonly -p=$jobs"
export GOMAXPROCS="$jobs"
export CGO_ENABLED=0

start=$(date +%s)
cd "$mod_dir"
echo "build_apiserver.sh: downloading modules into $GOMODCACHE" >&2
nice -n 10 go mod download
echo "build_apiserver.sh: compiling kube-apiserver and etcd (-p=$jobs); the first build takes a while" >&2
# The version variables are what `kubectl version` and /version report.
ver="k8s.io/component-base/version"
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
nice -n 10 go build -trimpath \
  -ldflags="-s -w -X $ver.gitVersion=$k8s_version -X $ver.gitMajor=1 -X $ver.gitMinor=$minor" \
  -o "$bin/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
nice -n 10 go build -trimpath -ldflags="-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3
echo "build_apiserver.sh: compiling helm $helm_version" >&2
GOBIN="$bin/helm.d" nice -n 10 go install -trimpath -ldflags="-s -w" "helm.sh/helm/v3/cmd/helm@$helm_version"
mv "$bin/helm.d/helm" "$bin/helm" && rmdir "$bin/helm.d"
mv "$bin/kube-apiserver.tmp" "$bin/kube-apiserver"
mv "$bin/etcd.tmp" "$bin/etcd"
echo "$stamp_want" > "$stamp_file"
end=$(date +%s)

{
  echo "built $(date -u +%FT%TZ) in $((end - start)) s with -p=$jobs on $(nproc) cores, $(go version)"
  du -sh "$bin" "$cache/gomod" "$cache/gobuild" 2>/dev/null
} >> "$cache/build.log"
tail -n 4 "$cache/build.log" >&2

if [[ "${EPP_K8S_KEEP_GO_CACHES:-1}" == "0" ]]; then
  chmod -R u+w "$cache/gomod" 2>/dev/null || true
  rm -rf "$cache/gomod" "$cache/gobuild"
fi

echo "$bin/kube-apiserver"
echo "$bin/etcd"
echo "$bin/helm"
