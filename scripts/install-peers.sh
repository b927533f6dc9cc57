#!/usr/bin/env bash
# scripts/install-peers.sh [--force]
#
# Installs every real Kafka peer our tests and benchmarks use, through the shared
# peers scripts (shared/ sits beside the repo checkout; override with FERRY_SHARED):
#   0. scripts/install-build-deps.sh --etcd : protoc (the build needs it) and etcd (Debian's
#      etcd-server: region clusters and their tests)
#   1. shared/peers/install-clients.sh : kcat, confluent-kafka, kafka-python, aiokafka,
#      rdkafka_performance
#   2. Apache Kafka $KAFKA_VERSION (default 4.4.0): broker+controller, kafka-tools (perf
#      tools, console producer/consumer, topic/offset tools), MirrorMaker 2 when it can be
#      had, into $PEERS_HOME/opt/kafka-$KAFKA_VERSION, exactly where the peers scripts
#      (kafka-up.sh, kafka-perf.sh --tool java, client-smoke.sh, mm2-up.sh) look for it.
#      shared/peers/install-kafka.sh is tried first; when it fails (Maven Central serves
#      no connect-mirror 4.4.0: it stops at 4.3.1), scripts/peers/install-kafka-fallback.sh
#      installs the same 4.4.0 jars minus connect-mirror, and MirrorMaker 2 from a whole
#      Kafka 4.3.1 beside it ($PEERS_HOME/opt/kafka-4.3.1), started through a small
#      launcher (MM2_MAIN=ferry.peers.Mm2Launcher) so mm2-up.sh / mm2-bench.sh work as is.
# Idempotent: what is installed is kept. --force reinstalls Kafka.
# Env: FERRY_SHARED, PEERS_HOME, KAFKA_VERSION, KAFKA_MIRROR_VERSION (fallback only;
#      'none' = no MirrorMaker 2), FERRY_SKIP_CLIENTS=1, FERRY_SKIP_KAFKA=1.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FERRY_SHARED="${FERRY_SHARED:-$REPO/../shared}"
PEERS_DIR="$FERRY_SHARED/peers"
[ -x "$PEERS_DIR/install-clients.sh" ] || { echo "[install-peers] ERROR: $PEERS_DIR not found (set FERRY_SHARED to the shared/ dir)" >&2; exit 1; }
say() { printf '[install-peers] %s\n' "$*" >&2; }

FORCE=()
[ "${1:-}" = "--force" ] && FORCE=(--force)

say "build deps and etcd: scripts/install-build-deps.sh --etcd"
"$REPO/scripts/install-build-deps.sh" --etcd

if [ "${FERRY_SKIP_CLIENTS:-0}" != 1 ]; then
  say "clients: $PEERS_DIR/install-clients.sh"
  "$PEERS_DIR/install-clients.sh" >/dev/null
fi

if [ "${FERRY_SKIP_KAFKA:-0}" != 1 ]; then
  say "Kafka: trying $PEERS_DIR/install-kafka.sh"
  if kdir="$("$PEERS_DIR/install-kafka.sh" "${FORCE[@]}")"; then
    say "Kafka ready: $kdir$( [ -f "$kdir/mirror.version" ] && echo " (installed earlier by the fallback; MirrorMaker 2: $(cat "$kdir/mirror.version"))")"
  else
    say "shared install-kafka.sh failed (known cause: connect-mirror ${KAFKA_VERSION:-4.4.0} is not on Maven Central); using scripts/peers/install-kafka-fallback.sh"
    kdir="$("$REPO/scripts/peers/install-kafka-fallback.sh" "${FORCE[@]}")"
    say "Kafka installed by the fallback: $kdir (MirrorMaker 2: $(cat "$kdir/mirror.version" 2>/dev/null || echo '?'))"
  fi
fi
[ "${FERRY_SKIP_KAFKA:-0}" = 1 ] || { say "Kafka Streams (tests/e2e/test_streams.py): scripts/peers/install-streams.sh"; "$REPO/scripts/peers/install-streams.sh" "${FORCE[@]}" >/dev/null; }
say "done"
