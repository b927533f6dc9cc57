#!/usr/bin/env bash
# scripts/peers/install-streams.sh [--force]
#
# Installs Apache Kafka Streams $KAFKA_VERSION (default 4.4.0) for the e2e tests
# (tests/e2e/test_streams.py) into its own directory,
#   $PEERS_HOME/opt/kafka-streams-$KAFKA_VERSION/{libs,.installed,rocksdb.jar}
# with the same Maven repository as install-kafka-fallback.sh ($PEERS_HOME/opt/m2):
#   1. org.apache.kafka:kafka-streams:$KAFKA_VERSION and its runtime dependencies
#      (kafka-clients, jackson, slf4j-api, compression codecs), without rocksdbjni;
#   2. a RocksDB JNI jar that loads here. Kafka Streams' POM names one rocksdbjni version
#      ($ROCKSDB_VERSION defaults to it); on Linux x86-64 with glibc its `linux64`
#      classifier (one native library, 28 MB) is tried first, then the universal jar (every
#      platform's library, 73 MB). Each candidate must open, write and read a RocksDB
#      database in a small Java probe before it is kept; the file kept is named in
#      rocksdb.jar;
#   3. a logging backend (log4j-core + the SLF4J binding matching slf4j-api), as
#      install-kafka-fallback.sh adds to Kafka's libs.
# Idempotent: a .installed marker makes a second run return at once. --force reinstalls.
# Prints the install directory on stdout (logs go to stderr).
# Needs mvn and a JDK (javac, for the RocksDB probe).
# Env: FERRY_SHARED (the shared/ dir; default: beside the repo checkout), PEERS_HOME,
#      KAFKA_VERSION, ROCKSDB_VERSION, LOG4J_VERSION, MDEP_VERSION, M2_REPO,
#      STREAMS_HOME_DIR (default $PEERS_HOME/opt/kafka-streams-$KAFKA_VERSION).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FERRY_SHARED="${FERRY_SHARED:-$HERE/../../../shared}"
PEERS_DIR="$FERRY_SHARED/peers"
[ -f "$PEERS_DIR/lib.sh" ] || { echo "[peers] ERROR: $PEERS_DIR/lib.sh not found (set FERRY_SHARED)" >&2; exit 1; }
# shellcheck source=/dev/null
. "$PEERS_DIR/lib.sh"

LOG4J_VERSION="${LOG4J_VERSION:-2.24.3}"
MDEP="org.apache.maven.plugins:maven-dependency-plugin:${MDEP_VERSION:-3.8.1}"
M2_REPO="${M2_REPO:-$PEERS_HOME/opt/m2}"
STREAMS_HOME_DIR="${STREAMS_HOME_DIR:-$PEERS_HOME/opt/kafka-streams-$KAFKA_VERSION}"
STREAMS_LIBS="$STREAMS_HOME_DIR/libs"

if [ "${1:-}" = "--force" ]; then rm -f "$STREAMS_HOME_DIR/.installed"; fi
if [ -f "$STREAMS_HOME_DIR/.installed" ] && [ -d "$STREAMS_LIBS" ]; then
  log "Kafka Streams $KAFKA_VERSION already installed ($(ls "$STREAMS_LIBS" | wc -l) jars, RocksDB: $(cat "$STREAMS_HOME_DIR/rocksdb.jar" 2>/dev/null || echo '?'))"
  echo "$STREAMS_HOME_DIR"; exit 0
fi
command -v mvn >/dev/null || die "mvn not found (apt-get install -y maven)"

t0=$(date +%s)
W="$STREAMS_HOME_DIR/work"
mkdir -p "$W" "$M2_REPO"
rm -rf "$W/libs.tmp" "$W/rocksdb" "$W/probe"

dep() { printf '    <dependency><groupId>%s</groupId><artifactId>%s</artifactId><version>%s</version>%s</dependency>\n' "$1" "$2" "$3" "${4:-}"; }
pom() { # pom NAME DEPENDENCY_LINES...
  local name="$1"; shift
  cat <<POM
<?xml version="1.0" encoding="UTF-8"?>
<project>
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.peers</groupId><artifactId>$name</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
POM
  printf '%s\n' "$@"
  echo '  </dependencies>'
  echo '</project>'
}

MVN=(mvn -B -q -Dstyle.color=never -Dmaven.repo.local="$M2_REPO" -f)
mvn_fail_hint() {
  if grep -qE 'UnknownHostException|Could not transfer|No plugin found|Connect(ion)? (refused|timed out)' "$1" 2>/dev/null; then
    die "Maven Central cannot be reached from this machine (mvn could not download anything). Kafka Streams' jars come only from Maven Central."
  fi
  die "mvn failed; see $1"
}

# --- 1. kafka-streams and its runtime dependencies, RocksDB aside -----------------------
pom kafka-streams-bundle "$(dep org.apache.kafka kafka-streams "$KAFKA_VERSION")" >"$W/pom.xml"
log "resolving org.apache.kafka:kafka-streams:$KAFKA_VERSION with mvn (log: $W/mvn-deps.log)"
quiet_run "$W/mvn-deps.log" "${MVN[@]}" "$W/pom.xml" "$MDEP:copy-dependencies" \
  -DoutputDirectory="$W/libs.tmp" -DincludeScope=runtime -Dmdep.useRepositoryLayout=false \
  -DexcludeArtifactIds=rocksdbjni \
  || mvn_fail_hint "$W/mvn-deps.log"
ls "$W/libs.tmp"/kafka-streams-"$KAFKA_VERSION".jar >/dev/null 2>&1 || die "kafka-streams-$KAFKA_VERSION.jar was not resolved (see $W/mvn-deps.log)"

# The rocksdbjni version Kafka Streams' own POM names (now in the local repository).
streams_pom="$M2_REPO/org/apache/kafka/kafka-streams/$KAFKA_VERSION/kafka-streams-$KAFKA_VERSION.pom"
pom_rocksdb="$(tr -d ' \n\r\t' <"$streams_pom" 2>/dev/null \
  | grep -oE '<artifactId>rocksdbjni</artifactId><version>[^<]+</version>' \
  | sed -E 's#.*<version>([^<]+)</version>#\1#' | head -1 || true)"
ROCKSDB_VERSION="${ROCKSDB_VERSION:-${pom_rocksdb:-10.1.3}}"

# --- 2. a rocksdbjni that loads here -----------------------------------------------------
JAVA_BIN="$(pick_java)"
JAVAC="$(dirname "$(readlink -f "$JAVA_BIN")")/javac"
[ -x "$JAVAC" ] || JAVAC="$(command -v javac || true)"
[ -n "$JAVAC" ] && [ -x "$JAVAC" ] || die "javac not found (a JDK is needed for the RocksDB probe and the Streams test app)"
mkdir -p "$W/probe/classes"
cat >"$W/probe/RocksProbe.java" <<'JAVA'
import org.rocksdb.Options;
import org.rocksdb.RocksDB;

/** Opens a RocksDB database in args[0], writes a key and reads it back. */
public class RocksProbe {
    public static void main(String[] args) throws Exception {
        RocksDB.loadLibrary();
        try (Options o = new Options().setCreateIfMissing(true); RocksDB db = RocksDB.open(o, args[0])) {
            db.put("k".getBytes(), "v".getBytes());
            byte[] v = db.get("k".getBytes());
            if (v == null || !"v".equals(new String(v))) throw new IllegalStateException("read back " + v);
            System.out.println("rocksdb-ok " + RocksDB.rocksdbVersion());
        }
    }
}
JAVA

candidates=()
if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ] && ldd --version 2>&1 | grep -qiE 'glibc|gnu libc'; then
  candidates+=("linux64")
fi
candidates+=("")   # the universal jar
kept=""
for cls in "${candidates[@]}"; do
  name="rocksdbjni-$ROCKSDB_VERSION${cls:+-$cls}"
  rm -rf "$W/rocksdb"; mkdir -p "$W/rocksdb"
  log "RocksDB: trying org.rocksdb:rocksdbjni:$ROCKSDB_VERSION${cls:+:jar:$cls}"
  if ! quiet_run "$W/mvn-$name.log" "${MVN[@]}" "$W/pom.xml" "$MDEP:copy" \
         -Dartifact="org.rocksdb:rocksdbjni:$ROCKSDB_VERSION:jar${cls:+:$cls}" \
         -DoutputDirectory="$W/rocksdb"; then
    log "RocksDB: $name could not be resolved"; continue
  fi
  jar="$(ls "$W/rocksdb"/rocksdbjni-*.jar 2>/dev/null | head -1)"
  [ -n "$jar" ] || { log "RocksDB: $name: no jar copied"; continue; }
  rm -rf "$W/probe/classes"/* "$W/probe/db"
  if quiet_run "$W/javac-probe.log" "$JAVAC" --release 17 -nowarn -d "$W/probe/classes" -cp "$jar" "$W/probe/RocksProbe.java" \
     && out="$("$JAVA_BIN" -Djava.io.tmpdir="$W/probe" -cp "$jar:$W/probe/classes" RocksProbe "$W/probe/db" 2>"$W/probe-$name.err")" \
     && [[ "$out" == rocksdb-ok* ]]; then
    log "RocksDB: $(basename "$jar") loads (${out#rocksdb-ok })"
    mv "$jar" "$W/libs.tmp/"
    kept="$(basename "$jar")"
    break
  fi
  log "RocksDB: $(basename "$jar") does not load here; last lines:"
  tail -n 5 "$W/probe-$name.err" 2>/dev/null | scrub >&2 || true
done
[ -n "$kept" ] || die "no rocksdbjni $ROCKSDB_VERSION jar loads on this machine (see $W/probe-*.err)"

# --- 3. a logging backend ----------------------------------------------------------------
if ! ls "$W/libs.tmp" | grep -qE '^(log4j-slf4j2?-impl|slf4j-reload4j|slf4j-log4j12|logback-classic|slf4j-simple)-[0-9]'; then
  slf="$(ls "$W/libs.tmp" | sed -nE 's/^slf4j-api-([0-9][^-]*)\.jar$/\1/p' | head -1)"
  l4j="$(ls "$W/libs.tmp" | sed -nE 's/^log4j-api-([0-9][^-]*)\.jar$/\1/p' | head -1)"
  l4j="${l4j:-$LOG4J_VERSION}"
  case "$slf" in 1.*) binding=log4j-slf4j-impl ;; *) binding=log4j-slf4j2-impl ;; esac
  log "adding logging: log4j-core $l4j + $binding (slf4j-api ${slf:-none})"
  pom kafka-streams-logging "$(dep org.apache.logging.log4j log4j-core "$l4j")" \
    "$(dep org.apache.logging.log4j "$binding" "$l4j")" >"$W/logging-pom.xml"
  quiet_run "$W/mvn-logging.log" "${MVN[@]}" "$W/logging-pom.xml" "$MDEP:copy-dependencies" \
    -DoutputDirectory="$W/libs.tmp" -DincludeScope=runtime -DexcludeArtifactIds=slf4j-api \
    || mvn_fail_hint "$W/mvn-logging.log"
fi

rm -rf "$STREAMS_LIBS"
mv "$W/libs.tmp" "$STREAMS_LIBS"
rm -rf "$W/rocksdb" "$W/probe/db"
echo "$kept" >"$STREAMS_HOME_DIR/rocksdb.jar"
t1=$(date +%s)
{
  echo "kafka_streams_version=$KAFKA_VERSION"
  echo "rocksdb_jar=$kept"
  echo "java=$JAVA_BIN ($(java_feature_version "$JAVA_BIN"))"
  echo "jars=$(ls "$STREAMS_LIBS" | wc -l)"
  echo "size=$(du -sh "$STREAMS_LIBS" | cut -f1)"
  echo "install_seconds=$((t1 - t0))"
  echo "installed_at=$(date -u +%FT%TZ)"
} >"$STREAMS_HOME_DIR/.installed"
log "installed Kafka Streams $KAFKA_VERSION: $(ls "$STREAMS_LIBS" | wc -l) jars, $(du -sh "$STREAMS_LIBS" | cut -f1), RocksDB $kept, $((t1 - t0)) s"
echo "$STREAMS_HOME_DIR"
