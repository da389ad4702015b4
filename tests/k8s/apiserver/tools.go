//go:build tools

// Package tools pins the two commands that build_apiserver.sh compiles, so that
// `go mod tidy` records every module they need in go.sum.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
