#!/usr/bin/env bash
# scripts/install-build-deps.sh [--etcd]
#
# What building Ferry needs beyond cargo: `protoc` (Debian's protobuf-compiler), which the
# etcd client crate (etcd-client, cluster metadata) compiles its protocol with. With --etcd,
# also etcd itself (Debian's etcd-server, and etcdctl from etcd-client) for region clusters
# and their tests. Idempotent: installs only what is missing. Needs root or sudo for apt.
set -euo pipefail
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
if [ "${1:-}" = "--etcd" ]; then
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v etcdctl >/dev/null || missing+=(etcd-client)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
echo "[install-build-deps] apt-get install ${missing[*]}" >&2
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
  $SUDO apt-get update -qq >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
