#!/usr/bin/env bash
# A real single-node Apache Kafka (KRaft, combined broker+controller) on 127.0.0.1, without Docker.
#
#   deploy/kafka/local-kafka.sh fetch    resolve kafka_2.13 + runtime deps + an SLF4J binding with Maven
#   deploy/kafka/local-kafka.sh up       fetch if needed, format storage once, start, wait until ready
#   deploy/kafka/local-kafka.sh down     stop (SIGTERM, then SIGKILL after 30 s)
#   deploy/kafka/local-kafka.sh status   exit 0 when running and accepting connections
#   deploy/kafka/local-kafka.sh reset    stop and delete the data folder
#   deploy/kafka/local-kafka.sh tools-fetch   resolve kafka-tools (Kafka's command-line tools) with Maven
#   deploy/kafka/local-kafka.sh tool NAME [ARG...]   run one of them as Kafka's bin/kafka-NAME.sh does
#                                   (fetching them first if needed); NAME, with or without kafka- and .sh:
#       console-producer  org.apache.kafka.tools.ConsoleProducer
#       console-consumer  org.apache.kafka.tools.consumer.ConsoleConsumer
#       consumer-groups   org.apache.kafka.tools.consumer.group.ConsumerGroupCommand
#       topics            org.apache.kafka.tools.TopicCommand
#       get-offsets       org.apache.kafka.tools.GetOffsetShell
#   e.g. deploy/kafka/local-kafka.sh tool console-consumer --bootstrap-server 127.0.0.1:9092 --topic shop.views
#
# Jars are cached outside the repository (the broker's in libs/, the tools' in tools/, each with a
# .complete marker); the data folder holds the log dirs, the generated server.properties, the pid
# file and the broker log. Settings (env):
#   SHOPSTREAM_KAFKA_VERSION  Apache Kafka version from Maven Central      (default 4.1.1)
#   SHOPSTREAM_KAFKA_HOME     where the jars are cached        (default ~/.cache/shopstream/kafka-VERSION)
#   SHOPSTREAM_KAFKA_DATA     data folder                        (default ~/.cache/shopstream/kafka-data)
#   SHOPSTREAM_KAFKA_PORT     client (PLAINTEXT) port                        (default 9092)
#   SHOPSTREAM_KAFKA_CONTROLLER_PORT  KRaft controller port                  (default 9093)
#   SHOPSTREAM_KAFKA_HEAP     JVM heap flags                      (default "-Xms512m -Xmx1g")
#   SHOPSTREAM_KAFKA_START_TIMEOUT  seconds to wait for readiness            (default 90)
#
# A SASL_SSL listener instead of PLAINTEXT (the client port, SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN;
# the broker talks to itself over it too; the controller port stays PLAINTEXT on 127.0.0.1). The
# names are the worker's, so one set of exports serves both sides:
#   SHOPSTREAM_KAFKA_SECURITY_PROTOCOL  PLAINTEXT or SASL_SSL                        (default PLAINTEXT)
#   SHOPSTREAM_KAFKA_SASL_USERNAME, SHOPSTREAM_KAFKA_SASL_PASSWORD  the one user, created when the
#                                 storage is formatted (no '"', '\' or newline in either)
#   SHOPSTREAM_KAFKA_SSL_CAFILE   CA (PEM) the broker trusts: its own chain and client certificates
#   SHOPSTREAM_KAFKA_BROKER_CERTFILE  the broker's certificate chain (PEM), naming 127.0.0.1
#   SHOPSTREAM_KAFKA_BROKER_KEYFILE   its private key (PEM, PKCS#8, unencrypted)
#   SHOPSTREAM_KAFKA_CLIENT_AUTH  none, requested or required: client certificates    (default none)
# A data folder is formatted for one protocol: use another SHOPSTREAM_KAFKA_DATA to switch.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=${SHOPSTREAM_KAFKA_VERSION:-4.1.1}
home=${SHOPSTREAM_KAFKA_HOME:-$HOME/.cache/shopstream/kafka-$version}
data=${SHOPSTREAM_KAFKA_DATA:-$HOME/.cache/shopstream/kafka-data}
port=${SHOPSTREAM_KAFKA_PORT:-9092}
cport=${SHOPSTREAM_KAFKA_CONTROLLER_PORT:-9093}
heap=${SHOPSTREAM_KAFKA_HEAP:-"-Xms512m -Xmx1g"}
timeout=${SHOPSTREAM_KAFKA_START_TIMEOUT:-90}
pidfile=$data/kafka.pid
logfile=$data/kafka.log
security=${SHOPSTREAM_KAFKA_SECURITY_PROTOCOL:-PLAINTEXT}

log() { echo "[local-kafka] $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

java_run() { java -Djava.awt.headless=true -cp "$home/libs/*" "$@"; }

# copy_deps WHAT POM DIR: the runtime dependencies POM resolves into DIR, with a .complete marker
copy_deps() {
  local what=$1 pom=$2 dir=$3
  if [ -f "$dir/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || { log "mvn not found: install Maven (apt-get install maven)"; exit 1; }
  command -v java >/dev/null || { log "java not found: install OpenJDK 17 (apt-get install openjdk-17-jre-headless)"; exit 1; }
  log "fetching $what from Maven Central into $home"
  rm -rf "$dir.tmp"
  mkdir -p "$home"
  # Maven's output to stderr: stdout is the tool's when `tool` fetches on first use
  mvn -q -B -f "$pom" -Dkafka.version="$version" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$dir.tmp" >&2
  # Kafka's pom pins slf4j-api 1.7, which cannot see the 2.x binding: keep only the 2.x API.
  find "$dir.tmp" -name 'slf4j-api-1.*.jar' -delete
  touch "$dir.tmp/.complete"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  log "fetched $(find "$dir" -name '*.jar' | wc -l) jars"
}

fetch() { copy_deps "Apache Kafka $version" "$here/pom.xml" "$home/libs"; }

tools_fetch() { copy_deps "Apache Kafka $version tools" "$here/tools-pom.xml" "$home/tools"; }

# tool NAME ARG...: the class Kafka's bin/kafka-NAME.sh runs, with its arguments, stdin and exit code
tool() {
  local name=${1:-} class
  name=${name#kafka-}; name=${name%.sh}
  case "$name" in
    console-producer) class=org.apache.kafka.tools.ConsoleProducer ;;
    console-consumer) class=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
    consumer-groups) class=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    topics) class=org.apache.kafka.tools.TopicCommand ;;
    get-offsets) class=org.apache.kafka.tools.GetOffsetShell ;;
    *) echo "usage: $0 tool console-producer|console-consumer|consumer-groups|topics|get-offsets [ARG...]" >&2; exit 2 ;;
  esac
  shift
  tools_fetch
  # as Kafka's scripts: a 512 MB heap for a console tool, warnings and errors only on stderr
  exec java -Xmx512m -Djava.awt.headless=true -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
    -cp "$home/tools/*" "$class" "$@"
}

write_config() {
  mkdir -p "$data/logs"
  cat > "$data/server.properties" <<EOF
# generated by deploy/kafka/local-kafka.sh: one combined broker+controller, tuned for a 2-core machine
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$data/logs
num.network.threads=2
num.io.threads=2
num.partitions=1
default.replication.factor=1
offsets.topic.num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.hours=168
log.cleaner.threads=1
EOF
  if [ "$security" = SASL_SSL ]; then secure_config; fi
}

# SASL_SSL: the listener, its TLS material and the JAAS logins replace the PLAINTEXT lines above.
secure_config() {
  local user=${SHOPSTREAM_KAFKA_SASL_USERNAME:-} pass=${SHOPSTREAM_KAFKA_SASL_PASSWORD:-}
  local ca=${SHOPSTREAM_KAFKA_SSL_CAFILE:-} cert=${SHOPSTREAM_KAFKA_BROKER_CERTFILE:-}
  local key=${SHOPSTREAM_KAFKA_BROKER_KEYFILE:-} auth=${SHOPSTREAM_KAFKA_CLIENT_AUTH:-none}
  [ -n "$user" ] && [ -n "$pass" ] || { log "SASL_SSL needs SHOPSTREAM_KAFKA_SASL_USERNAME and _PASSWORD"; exit 1; }
  case "$user$pass" in *'"'*|*'\'*|*$'\n'*) log "the SASL user name and password must not hold '\"', '\\' or a newline"; exit 1 ;; esac
  for f in "$ca" "$cert" "$key"; do
    [ -n "$f" ] && [ -f "$f" ] || { log "SASL_SSL needs SHOPSTREAM_KAFKA_SSL_CAFILE, _BROKER_CERTFILE and _BROKER_KEYFILE (files)"; exit 1; }
  done
  case "$auth" in none|requested|required) ;; *) log "SHOPSTREAM_KAFKA_CLIENT_AUTH: none, requested or required"; exit 1 ;; esac
  # a PEM key store is one file, the key then the chain; it and the config hold secrets
  (umask 077; cat "$key" "$cert" > "$data/broker-keystore.pem")
  chmod 600 "$data/server.properties"
  sed -i -e "s|^listeners=.*|listeners=SASL_SSL://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport|" \
    -e "s|^advertised.listeners=.*|advertised.listeners=SASL_SSL://127.0.0.1:$port|" \
    -e "s|^inter.broker.listener.name=.*|inter.broker.listener.name=SASL_SSL|" \
    -e "s|^listener.security.protocol.map=.*|listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL|" \
    "$data/server.properties"
  # on a SASL listener a bare ssl.client.auth is ignored: only the listener-prefixed one applies
  cat >> "$data/server.properties" <<EOF
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$user" password="$pass";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$user" password="$pass";
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="$user" password="$pass" user_$user="$pass";
ssl.keystore.type=PEM
ssl.keystore.location=$data/broker-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$ca
listener.name.sasl_ssl.ssl.client.auth=$auth
ssl.endpoint.identification.algorithm=https
EOF
}

# --add-scram arguments of the format step (SASL_SSL only): the user, for both SCRAM mechanisms
scram_args() {
  if [ "$security" != SASL_SSL ]; then return 0; fi
  local cred="name=$SHOPSTREAM_KAFKA_SASL_USERNAME,password=\"$SHOPSTREAM_KAFKA_SASL_PASSWORD\""
  printf '%s\n' --add-scram "SCRAM-SHA-512=[$cred]" --add-scram "SCRAM-SHA-256=[$cred]"
}

up() {
  if running && port_open "$port"; then log "already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; return 0; fi
  if port_open "$port"; then log "port $port is taken by another process"; exit 1; fi
  case "$security" in PLAINTEXT|SASL_SSL) ;; *) log "SHOPSTREAM_KAFKA_SECURITY_PROTOCOL: PLAINTEXT or SASL_SSL"; exit 1 ;; esac
  fetch
  write_config
  if [ ! -f "$data/logs/meta.properties" ]; then
    cluster_id=$(java_run kafka.tools.StorageTool random-uuid 2>/dev/null)
    log "formatting KRaft storage in $data/logs (cluster $cluster_id)"
    local scram=()
    mapfile -t scram < <(scram_args)
    if ! java_run kafka.tools.StorageTool format --standalone -t "$cluster_id" \
        -c "$data/server.properties" "${scram[@]}" >"$data/format.log" 2>&1; then
      tail -n 30 "$data/format.log" >&2; exit 1
    fi
    if [ "$security" != PLAINTEXT ]; then echo "$security" > "$data/security"; fi
  fi
  if [ "$(cat "$data/security" 2>/dev/null || echo PLAINTEXT)" != "$security" ]; then
    log "$data was formatted for $(cat "$data/security" 2>/dev/null || echo PLAINTEXT), not $security: use another SHOPSTREAM_KAFKA_DATA"
    exit 1
  fi
  log "starting broker on 127.0.0.1:$port (log: $logfile)"
  local started=$SECONDS
  # shellcheck disable=SC2086
  nohup java $heap -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dorg.slf4j.simpleLogger.showDateTime=true \
    -Dorg.slf4j.simpleLogger.log.org.apache.kafka.clients=warn \
    -cp "$home/libs/*" kafka.Kafka "$data/server.properties" >"$logfile" 2>&1 </dev/null &
  echo $! > "$pidfile"
  while ! { port_open "$port" && grep -q "Kafka Server started" "$logfile"; }; do
    if ! running; then log "broker exited during start; last lines of $logfile:"; tail -n 30 "$logfile" >&2; exit 1; fi
    if (( SECONDS - started > timeout )); then log "not ready after ${timeout}s; see $logfile"; down; exit 1; fi
    sleep 0.5
  done
  log "ready on 127.0.0.1:$port after $(( SECONDS - started ))s (pid $(cat "$pidfile"))"
}

down() {
  if ! running; then log "not running"; rm -f "$pidfile"; return 0; fi
  local pid; pid=$(cat "$pidfile")
  kill -TERM "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then log "did not stop in 30s, killing"; kill -KILL "$pid"; fi
  rm -f "$pidfile"
  log "stopped"
}

status() {
  if running && port_open "$port"; then log "running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; return 0; fi
  log "not running"; return 1
}

case "${1:-}" in
  fetch) fetch ;;
  tools-fetch) tools_fetch ;;
  tool) shift; tool "$@" ;;
  up) up ;;
  down) down ;;
  status) status ;;
  reset) down; rm -rf "$data"; log "deleted $data" ;;
  *) echo "usage: $0 fetch|up|down|status|reset|tools-fetch|tool NAME [ARG...]" >&2; exit 2 ;;
esac
