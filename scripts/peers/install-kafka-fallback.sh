#!/usr/bin/env bash
# scripts/peers/install-kafka-fallback.sh [--force]
#
# Fallback for shared/peers/install-kafka.sh, with the same logic and the same result
# layout ($PEERS_HOME/opt/kafka-$KAFKA_VERSION/{libs,config,classes.env,.installed}),
# so kafka-up.sh, kafka-perf.sh --tool java, client-smoke.sh, mm2-up.sh and lib.sh's
# kafka_tool work unchanged.
#
# Why: Maven Central serves org.apache.kafka:connect-mirror and connect-mirror-client
# only up to 4.3.1 (no 4.4.0), so install-kafka.sh's single POM (everything at 4.4.0)
# cannot resolve. Here:
#   1. every artifact install-kafka.sh asks for except connect-mirror*, all at
#      $KAFKA_VERSION (broker, controller, tools, clients, connect-runtime), resolved
#      and laid out exactly as install-kafka.sh does;
#   2. MirrorMaker 2 comes from a whole Kafka $KAFKA_MIRROR_VERSION (default 4.3.1, the
#      newest connect-mirror served) installed beside it by the unchanged shared
#      install-kafka.sh (KAFKA_VERSION=4.3.1 -> $PEERS_HOME/opt/kafka-4.3.1). 4.3.1's
#      connect-mirror cannot join 4.4.0's libs/ (it does not link against kafka-clients
#      4.4.0), so MM2_MAIN is ferry.peers.Mm2Launcher (Mm2Launcher.java, compiled into
#      libs/ferry-mm2-launcher.jar), which runs 4.3.1's MirrorMaker in an isolated class
#      loader over the jars named by $KAFKA_HOME_DIR/mirror.libs. mm2-up.sh works as is.
#      If that fails, Kafka is installed without MirrorMaker 2 (MM2_MAIN empty; mm2-up.sh
#      then says "MirrorMaker 2 classes are not in ...").
# KAFKA_MIRROR_VERSION=none skips step 2. The MirrorMaker version is written to
# $KAFKA_HOME_DIR/mirror.version (.installed keeps install-kafka.sh's format).
# Env: FERRY_SHARED (the shared/ dir; default: beside the repo checkout), PEERS_HOME,
#      KAFKA_VERSION, LOG4J_VERSION, MDEP_VERSION, M2_REPO as in install-kafka.sh.
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
MIRROR_VERSION="${KAFKA_MIRROR_VERSION:-4.3.1}"

if [ "${1:-}" = "--force" ]; then rm -f "$KAFKA_HOME_DIR/.installed"; fi
if kafka_installed; then
  log "Kafka $KAFKA_VERSION already installed ($(ls "$KAFKA_LIBS" | wc -l) jars)"
  echo "$KAFKA_HOME_DIR"; exit 0
fi
command -v mvn >/dev/null || die "mvn not found (apt-get install -y maven)"
command -v unzip >/dev/null || die "unzip not found (apt-get install -y unzip)"

t0=$(date +%s)
W="$KAFKA_HOME_DIR/work"
mkdir -p "$W" "$KAFKA_HOME_DIR/config" "$M2_REPO"
rm -rf "$W/libs.tmp" "$W/mirror.libs"

dep() { printf '    <dependency><groupId>%s</groupId><artifactId>%s</artifactId><version>%s</version>%s</dependency>\n' "$1" "$2" "$3" "${4:-}"; }
pom() { # pom ARTIFACT_ID_OF_BUNDLE VERSION ARTIFACTS...
  local name="$1" ver="$2"; shift 2
  cat <<POM
<?xml version="1.0" encoding="UTF-8"?>
<project>
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.peers</groupId><artifactId>$name</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
POM
  local a
  for a in "$@"; do dep org.apache.kafka "$a" "$ver"; done
  echo '  </dependencies>'
  echo '</project>'
}

MVN=(mvn -B -q -Dstyle.color=never -Dmaven.repo.local="$M2_REPO" -f)
mvn_fail_hint() {
  if grep -qE 'UnknownHostException|Could not transfer|No plugin found|Connect(ion)? (refused|timed out)' "$1" 2>/dev/null; then
    die "Maven Central cannot be reached from this machine (mvn could not download anything). Apache Kafka's jars come only from Maven Central."
  fi
  die "mvn failed; see $1"
}

# --- pass 1: everything but MirrorMaker, at $KAFKA_VERSION -----------------------------
pom kafka-bundle "$KAFKA_VERSION" kafka_2.13 kafka-server kafka-storage kafka-metadata kafka-raft \
  kafka-group-coordinator kafka-transaction-coordinator kafka-share-coordinator kafka-tools \
  kafka-clients connect-runtime >"$W/pom.xml"
log "resolving org.apache.kafka:*:$KAFKA_VERSION (without connect-mirror) with mvn (log: $W/mvn-deps.log)"
quiet_run "$W/mvn-deps.log" "${MVN[@]}" "$W/pom.xml" "$MDEP:copy-dependencies" \
  -DoutputDirectory="$W/libs.tmp" -DincludeScope=runtime -Dmdep.useRepositoryLayout=false \
  || mvn_fail_hint "$W/mvn-deps.log"

# --- MirrorMaker 2 from Kafka $MIRROR_VERSION, on a class path of its own ---------------
# connect-mirror 4.3.1 does not link against kafka-clients 4.4.0 (classes such as
# org.apache.kafka.common.utils.Exit and AppInfoParser moved to ...utils.internals), so
# its jars cannot simply join libs/. Instead the shared installer installs all of Kafka
# $MIRROR_VERSION beside this one (unchanged script, KAFKA_VERSION=$MIRROR_VERSION), and a
# small launcher (Mm2Launcher.java, compiled into libs/) runs that version's MirrorMaker
# in an isolated class loader: MM2_MAIN=ferry.peers.Mm2Launcher, so mm2-up.sh works as is.
mirror_used=none
if [ "$MIRROR_VERSION" != none ] && [ "$MIRROR_VERSION" != "$KAFKA_VERSION" ]; then
  log "MirrorMaker 2: installing Kafka $MIRROR_VERSION with the shared install-kafka.sh"
  if ! command -v javac >/dev/null; then
    log "WARNING: javac not found; installing Kafka without MirrorMaker 2"
  elif mdir="$(env -u KAFKA_HOME_DIR KAFKA_VERSION="$MIRROR_VERSION" PEERS_HOME="$PEERS_HOME" \
                 "$PEERS_DIR/install-kafka.sh")" \
       && grep -qx 'MM2_MAIN=org.apache.kafka.connect.mirror.MirrorMaker' "$mdir/classes.env"; then
    rm -rf "$W/mm2-launcher"; mkdir -p "$W/mm2-launcher/classes"
    quiet_run "$W/javac-mm2.log" javac --release 17 -d "$W/mm2-launcher/classes" "$HERE/Mm2Launcher.java" \
      && quiet_run "$W/jar-mm2.log" jar cf "$W/libs.tmp/ferry-mm2-launcher.jar" -C "$W/mm2-launcher/classes" . \
      || die "could not build the MirrorMaker 2 launcher (see $W/javac-mm2.log)"
    echo "$mdir/libs" >"$W/mirror.libs"
    mirror_used="$MIRROR_VERSION"
  else
    log "WARNING: Kafka $MIRROR_VERSION (for MirrorMaker 2) could not be installed; installing Kafka without MirrorMaker 2"
  fi
fi

# A logging backend: Kafka's POMs do not carry one. Pick the SLF4J binding that matches
# the slf4j-api version Kafka resolved to, and use the log4j-api version already there.
if ! ls "$W/libs.tmp" | grep -qE '^(log4j-slf4j2?-impl|slf4j-reload4j|slf4j-log4j12|logback-classic|slf4j-simple)-[0-9]'; then
  slf="$(ls "$W/libs.tmp" | sed -nE 's/^slf4j-api-([0-9][^-]*)\.jar$/\1/p' | head -1)"
  l4j="$(ls "$W/libs.tmp" | sed -nE 's/^log4j-api-([0-9][^-]*)\.jar$/\1/p' | head -1)"
  l4j="${l4j:-$LOG4J_VERSION}"
  case "$slf" in 1.*) binding=log4j-slf4j-impl ;; *) binding=log4j-slf4j2-impl ;; esac
  log "adding logging: log4j-core $l4j + $binding (slf4j-api ${slf:-none})"
  {
    cat <<POM
<?xml version="1.0" encoding="UTF-8"?>
<project>
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.peers</groupId><artifactId>kafka-logging</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
POM
    dep org.apache.logging.log4j log4j-core "$l4j"
    dep org.apache.logging.log4j "$binding" "$l4j"
    echo '  </dependencies>'
    echo '</project>'
  } >"$W/logging-pom.xml"
  quiet_run "$W/mvn-logging.log" "${MVN[@]}" "$W/logging-pom.xml" "$MDEP:copy-dependencies" \
    -DoutputDirectory="$W/libs.tmp" -DincludeScope=runtime -DexcludeArtifactIds=slf4j-api \
    || mvn_fail_hint "$W/mvn-logging.log"
fi

rm -rf "$KAFKA_LIBS"
mv "$W/libs.tmp" "$KAFKA_LIBS"

# Index class names, then find the entry points (they moved between Kafka versions).
for j in "$KAFKA_LIBS"/*.jar; do unzip -Z1 "$j" 2>/dev/null | grep '\.class$' || true; done | sort -u >"$W/classes.txt"
find_class() {
  local c
  for c in "$@"; do grep -qxF "${c//.//}.class" "$W/classes.txt" && { echo "$c"; return 0; }; done
  return 1
}
find_any() { # last resort: any package, given simple class name
  grep -E "(^|/)$1\.class$" "$W/classes.txt" | grep -v '\$' | head -1 | sed 's/\.class$//; s#/#.#g'
}
KAFKA_MAIN="$(find_class kafka.Kafka org.apache.kafka.server.Kafka || true)"
STORAGE_TOOL="$(find_class kafka.tools.StorageTool org.apache.kafka.tools.StorageTool || find_any StorageTool)"
PRODUCER_PERF="$(find_class org.apache.kafka.tools.ProducerPerformance || find_any ProducerPerformance)"
CONSUMER_PERF="$(find_class org.apache.kafka.tools.ConsumerPerformance kafka.tools.ConsumerPerformance || find_any ConsumerPerformance)"
TOPIC_CMD="$(find_class org.apache.kafka.tools.TopicCommand kafka.admin.TopicCommand || true)"
GET_OFFSETS="$(find_class org.apache.kafka.tools.GetOffsetShell kafka.tools.GetOffsetShell || true)"
CONSOLE_PRODUCER="$(find_class org.apache.kafka.tools.ConsoleProducer kafka.tools.ConsoleProducer || true)"
CONSOLE_CONSUMER="$(find_class org.apache.kafka.tools.consumer.ConsoleConsumer kafka.tools.ConsoleConsumer || true)"
MM2_MAIN="$(find_class org.apache.kafka.connect.mirror.MirrorMaker ferry.peers.Mm2Launcher || true)"
for v in KAFKA_MAIN STORAGE_TOOL PRODUCER_PERF CONSUMER_PERF; do
  [ -n "${!v}" ] || die "could not find the $v entry point in the downloaded jars"
done
{
  for v in KAFKA_MAIN STORAGE_TOOL PRODUCER_PERF CONSUMER_PERF TOPIC_CMD GET_OFFSETS CONSOLE_PRODUCER CONSOLE_CONSUMER MM2_MAIN; do
    printf '%s=%q\n' "$v" "${!v}"
  done
} >"$KAFKA_HOME_DIR/classes.env"

# Logging configs (log4j2 first; log4j 1 files in case a version ships reload4j).
cat >"$KAFKA_HOME_DIR/config/server-log4j2.properties" <<'L'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.zk.name = org.apache.zookeeper
logger.zk.level = WARN
L
cat >"$KAFKA_HOME_DIR/config/tools-log4j2.properties" <<'L'
status = warn
appender.err.type = Console
appender.err.name = ERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = ERR
L
printf 'log4j.rootLogger=INFO, stdout\nlog4j.appender.stdout=org.apache.log4j.ConsoleAppender\nlog4j.appender.stdout.layout=org.apache.log4j.PatternLayout\nlog4j.appender.stdout.layout.ConversionPattern=[%%d] %%p %%m (%%c)%%n\n' >"$KAFKA_HOME_DIR/config/server-log4j.properties"
printf 'log4j.rootLogger=WARN, stderr\nlog4j.appender.stderr=org.apache.log4j.ConsoleAppender\nlog4j.appender.stderr.Target=System.err\nlog4j.appender.stderr.layout=org.apache.log4j.PatternLayout\nlog4j.appender.stderr.layout.ConversionPattern=[%%d] %%p %%m (%%c)%%n\n' >"$KAFKA_HOME_DIR/config/tools-log4j.properties"

# Self-test: the storage tool must run and print a cluster id.
. "$KAFKA_HOME_DIR/classes.env"
JAVA_BIN="$(pick_java)"
cid="$(kafka_tool "$STORAGE_TOOL" random-uuid 2>"$W/selftest.err" | tail -1 || true)"
[[ "$cid" =~ ^[A-Za-z0-9_-]{22}$ ]] || { tail -20 "$W/selftest.err" | scrub >&2; die "self-test failed: $STORAGE_TOOL random-uuid printed '$cid'"; }

echo "$mirror_used" >"$KAFKA_HOME_DIR/mirror.version"
if [ -f "$W/mirror.libs" ] && [ "$mirror_used" != none ]; then mv "$W/mirror.libs" "$KAFKA_HOME_DIR/mirror.libs"; else rm -f "$W/mirror.libs" "$KAFKA_HOME_DIR/mirror.libs"; fi
t1=$(date +%s)
{
  echo "kafka_version=$KAFKA_VERSION"
  echo "java=$JAVA_BIN ($(java_feature_version "$JAVA_BIN"))"
  echo "jars=$(ls "$KAFKA_LIBS" | wc -l)"
  echo "size=$(du -sh "$KAFKA_LIBS" | cut -f1)"
  echo "install_seconds=$((t1 - t0))"
  echo "installed_at=$(date -u +%FT%TZ)"
} >"$KAFKA_HOME_DIR/.installed"
log "installed Kafka $KAFKA_VERSION (MirrorMaker 2: $mirror_used): $(ls "$KAFKA_LIBS" | wc -l) jars, $(du -sh "$KAFKA_LIBS" | cut -f1), $((t1 - t0)) s, java $(java_feature_version "$JAVA_BIN")"
log "entry points: $(tr '\n' ' ' <"$KAFKA_HOME_DIR/classes.env")"
echo "$KAFKA_HOME_DIR"
