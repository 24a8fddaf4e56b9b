#!/usr/bin/env bash
# A real RabbitMQ cluster loses a node under load, and no job is lost.
#
# Starts a throwaway 3-node RabbitMQ cluster on this machine (nodes fwc1..3@localhost, AMQP on
# 127.0.0.1:5681-5683, distribution on 25681-25683, everything under one temp dir, its own Erlang
# cookie), two workers with `queue_type = "quorum"` and the three node URLs against a mock
# provider and a fresh Postgres database, publishes JOBS jobs at RATE per second, SIGKILLs the
# node that leads the jobs queue once KILL_AFTER are confirmed, and checks that every confirmed
# job is answered. Prints one line of figures; exits 0 only when none is lost.
#
#   scripts/cluster-test.sh                      # as root: the nodes run as the rabbitmq user
#   JOBS=600 RATE=50 KILL_AFTER=200 scripts/cluster-test.sh
#   QUEUE_TYPE=classic scripts/cluster-test.sh   # fails: the classic jobs queue dies with its node
#
# The machine's own broker (rabbit@localhost on 5672, its data and its cookie) is not touched:
# the test nodes have their own config, data, log and cookie, and the tools are called past the
# Debian wrappers in /usr/sbin (which cd to /var/lib/rabbitmq and would pick its cookie, and
# write the system node's startup log). Everything is stopped and removed on exit, pass or fail.
set -euo pipefail

JOBS=${JOBS:-300}
RATE=${RATE:-30}
KILL_AFTER=${KILL_AFTER:-$((JOBS / 3))}
BASE_PORT=${BASE_PORT:-5681}
DIST_BASE_PORT=${DIST_BASE_PORT:-$((BASE_PORT + 20000))}
RMQ_BIN=${RMQ_BIN:-/usr/lib/rabbitmq/bin}
# `classic` shows what the test guards against: the jobs queue dies with its node.
QUEUE_TYPE=${QUEUE_TYPE:-quorum}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
NODES=(1 2 3)

ctl() {
  local node=$1; shift
  # From the test's own directory: the Erlang VM looks up code in its working directory, and
  # the checkout may be one the rabbitmq user cannot read (CI clones into a root-only temp dir).
  (cd "$dir" && runuser -u rabbitmq -- env -i PATH=/usr/bin:/bin HOME="$dir/home" LC_ALL=C.UTF-8 \
    timeout 60 "$RMQ_BIN/rabbitmqctl" -q -n "$node" "$@")
}

# The node that holds llm.jobs, asking `node`: a quorum queue's leader, or a classic queue's home
# (the node in its process id, `<fwc1@localhost.1.2.3>`).
jobs_leader() {
  ctl "$1" list_queues name leader pid 2>/dev/null | awk -F '\t' '$1 == "llm.jobs" {
    if ($2 ~ /@/) { print $2 } else { sub(/^</, "", $3); sub(/\..*/, "", $3); print $3 } }'
}

# The Erlang VM of test node `i`, if it runs: the pid its file names, checked against the
# process's environment (RabbitMQ 3.10 keeps the node name out of the command line), so a
# recycled pid is never signalled.
node_pid() {
  local pid
  pid=$(cat "$dir/n$1/pid" 2>/dev/null) || return 1
  tr '\0' '\n' 2>/dev/null < "/proc/$pid/environ" | grep -qx "RABBITMQ_NODENAME=fwc$1@localhost" && echo "$pid"
}

# The node-killing half, run by the checker at the chosen moment: finds the jobs queue's leader
# (asking each node in turn) and SIGKILLs that node's Erlang VM.
if [ "${1:-}" = "--kill-leader" ]; then
  dir=${FWC_DIR:?}
  leader=""
  for i in "${NODES[@]}"; do
    leader=$(jobs_leader "fwc$i@localhost") || true
    [ -n "$leader" ] && break
  done
  [ -n "$leader" ] || { echo "no node named the jobs queue's leader" >&2; exit 1; }
  index=${leader#fwc}; index=${index%%@*}
  pid=$(node_pid "$index") || { echo "$leader is not running" >&2; exit 1; }
  kill -KILL "$pid"
  echo "$index" > "$dir/killed"
  echo "SIGKILLed $leader (pid $pid), which held llm.jobs"
  exit 0
fi

cd "$(dirname "$0")/.."
repo=$(pwd)
log() { printf '[cluster-test %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: the test nodes run as the rabbitmq user (runuser)"
id rabbitmq >/dev/null 2>&1 || die "no rabbitmq user (apt-get install rabbitmq-server)"
[ -x "$RMQ_BIN/rabbitmq-server" ] && [ -x "$RMQ_BIN/rabbitmqctl" ] || die "no $RMQ_BIN/rabbitmq-server (set RMQ_BIN)"
command -v psql >/dev/null || die "no psql"
command -v python3 >/dev/null || die "no python3"
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for i in "${NODES[@]}"; do
  for port in $((BASE_PORT + i - 1)) $((DIST_BASE_PORT + i - 1)); do
    ! port_open "$port" || die "port $port is taken (set BASE_PORT)"
  done
done

log "building the worker and the checker"
cargo build --locked --quiet --bin fallback-worker --example cluster_check
bin=$repo/target/debug/fallback-worker
checker=$repo/target/debug/examples/cluster_check

dir=$(mktemp -d /tmp/fw-cluster.XXXXXX)
chmod 755 "$dir"
database="fwc_$(basename "$dir" | tr -dc 'a-zA-Z0-9' | tr 'A-Z' 'a-z')"
pids=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # Workers drain and stop on SIGTERM; whatever is left after 15 s is killed.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 150); do
    alive=""
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do { kill -KILL "$pid" && wait "$pid"; } 2>/dev/null || true; done
  node_pids=()
  for i in "${NODES[@]}"; do
    pid=$(node_pid "$i") && kill -KILL "$pid" 2>/dev/null && node_pids+=("$pid")
  done
  # Gone before their directories are removed (at most 10 s).
  for pid in "${node_pids[@]}"; do
    for _ in $(seq 1 100); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
  done
  if [ "$status" != 0 ]; then
    for f in "$dir"/worker*.log; do [ -f "$f" ] && { log "last lines of $f:"; tail -n 15 "$f" >&2; }; done
  fi
  psql "$PG_ADMIN_URL" -qAtc "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1 || true
  # The nodes' files are the rabbitmq user's; only this run's directory is removed.
  [ -n "${KEEP_DIR:-}" ] && log "kept $dir" || rm -rf -- "$dir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

node_env() {
  local i=$1
  echo HOME="$dir/home" LC_ALL=C.UTF-8 PATH=/usr/bin:/bin \
    RABBITMQ_NODENAME="fwc$i@localhost" \
    RABBITMQ_NODE_PORT=$((BASE_PORT + i - 1)) RABBITMQ_DIST_PORT=$((DIST_BASE_PORT + i - 1)) \
    RABBITMQ_CONFIG_FILE="$dir/n$i/rabbitmq.conf" RABBITMQ_CONF_ENV_FILE="$dir/n$i/rabbitmq-env.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/n$i/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/n$i/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/n$i/mnesia" RABBITMQ_LOG_BASE="$dir/n$i/log" \
    RABBITMQ_PID_FILE="$dir/n$i/pid" ERL_EPMD_ADDRESS=127.0.0.1
}
log "starting 3 RabbitMQ nodes under $dir"
mkdir -p "$dir/home"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/home/.erlang.cookie"
chmod 400 "$dir/home/.erlang.cookie"
for i in "${NODES[@]}"; do
  mkdir -p "$dir/n$i/mnesia" "$dir/n$i/log"
  printf 'listeners.tcp.local = 127.0.0.1:%s\n' $((BASE_PORT + i - 1)) > "$dir/n$i/rabbitmq.conf"
  echo '[].' > "$dir/n$i/enabled_plugins"
  : > "$dir/n$i/rabbitmq-env.conf"
done
chown -R rabbitmq:rabbitmq "$dir/home" "$dir"/n*
started_at=$(date +%s)
for i in "${NODES[@]}"; do
  # One scheduler each and distribution on loopback only: three nodes share a small machine.
  # shellcheck disable=SC2046
  (cd "$dir" && runuser -u rabbitmq -- env -i $(node_env "$i") \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='+S 1:1 -kernel inet_dist_use_interface {127,0,0,1}' \
    "$RMQ_BIN/rabbitmq-server" -detached)
done
for i in "${NODES[@]}"; do
  ok=""
  for _ in $(seq 1 60); do
    if ctl "fwc$i@localhost" await_startup --timeout 5 >/dev/null 2>&1; then ok=1; break; fi
    sleep 1
  done
  [ -n "$ok" ] || die "node fwc$i did not start (log: $dir/n$i/log)"
done
log "3 nodes booted in $(( $(date +%s) - started_at ))s; joining fwc2 and fwc3 to fwc1"
for i in 2 3; do
  for step in stop_app "join_cluster fwc1@localhost" start_app; do
    # shellcheck disable=SC2086
    ctl "fwc$i@localhost" $step >> "$dir/join.log" 2>&1 || { cat "$dir/join.log" >&2; die "fwc$i: $step failed"; }
  done
done
running=$(ctl fwc1@localhost cluster_status --formatter json |
  python3 -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))')
[ "$running" = 3 ] || die "the cluster has $running running nodes, not 3"
log "cluster of 3 up in $(( $(date +%s) - started_at ))s"

psql "$PG_ADMIN_URL" -qAtc "CREATE DATABASE \"$database\"" >/dev/null
database_url="${PG_ADMIN_URL%/*}/$database?sslmode=disable"

mock_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
RUST_LOG=warn "$bin" mock-provider --listen "127.0.0.1:$mock_port" --profile groq --latency 200ms \
  > "$dir/mock.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do port_open "$mock_port" && break; sleep 0.1; done
port_open "$mock_port" || die "the mock provider did not listen"

urls=()
for i in "${NODES[@]}"; do urls+=("\"amqp://guest:guest@127.0.0.1:$((BASE_PORT + i - 1))/%2f\""); done
cat > "$dir/worker.toml" <<EOF
[amqp]
url = [$(IFS=,; echo "${urls[*]}")]
queue_type = "$QUEUE_TYPE"
prefetch = 16
confirm_timeout = "10s"

[postgres]
url = "$database_url"

[http]
addr = ""

[worker]
drain_timeout = "10s"

[[providers]]
name = "mock-groq"
base_url = "http://127.0.0.1:$mock_port/v1"
model = "llama-3.3-70b-versatile"
free = true
timeout = "5s"

[chains.default]
providers = ["mock-groq"]
EOF
for w in 1 2; do
  env -u AMQP_URL -u DATABASE_URL -u HTTP_ADDR RUST_LOG=info LOG_FORMAT=text NO_COLOR=1 \
    "$bin" --config "$dir/worker.toml" worker > "$dir/worker$w.log" 2>&1 &
  pids+=($!)
done
worker_pids=("${pids[@]:1}")
for w in 1 2; do
  ok=""
  for _ in $(seq 1 300); do grep -q "consuming jobs" "$dir/worker$w.log" && { ok=1; break; }; sleep 0.1; done
  [ -n "$ok" ] || die "worker $w did not start consuming"
done
leader=$(jobs_leader fwc1@localhost)
[ -n "$leader" ] || die "llm.jobs has no leader"
described=$(ctl fwc1@localhost list_queues name type members | awk -F '\t' '$1 == "llm.jobs" { print $2 " queue, members " ($3 == "" ? "none" : $3) }')
log "2 workers consuming; llm.jobs is a $described, held by $leader"

# The checker reads and publishes through the nodes that will survive first, so what it measures
# is the service's recovery, not its own.
leader_index=${leader#fwc}; leader_index=${leader_index%%@*}
checker_urls=()
for i in "${NODES[@]}"; do [ "$i" = "$leader_index" ] || checker_urls+=("amqp://guest:guest@127.0.0.1:$((BASE_PORT + i - 1))/%2f"); done
checker_urls+=("amqp://guest:guest@127.0.0.1:$((BASE_PORT + leader_index - 1))/%2f")
log "publishing $JOBS jobs at $RATE/s; the leader's node is killed after $KILL_AFTER"
set +e
FWC_DIR=$dir timeout 600 "$checker" --urls "$(IFS=,; echo "${checker_urls[*]}")" \
  --jobs "$JOBS" --rate "$RATE" --kill-after "$KILL_AFTER" \
  --kill-command "FWC_DIR=$dir RMQ_BIN=$RMQ_BIN $repo/scripts/cluster-test.sh --kill-leader" \
  > "$dir/figures" 2> "$dir/checker.log"
checked=$?
set -e
grep -v '^reader: .*not answered' "$dir/checker.log" | tail -n 20 >&2 || true
[ -f "$dir/killed" ] || die "no node was killed"
for pid in "${worker_pids[@]}"; do kill -0 "$pid" 2>/dev/null || die "a worker exited (pid $pid)"; done
moved=$(cat "$dir"/worker*.log | grep -c "broker session lost" || true)
survivor=$(( leader_index % 3 + 1 ))
new_leader=$(jobs_leader "fwc$survivor@localhost" || true)
log "workers alive, $moved broker session(s) rebuilt on another node; llm.jobs is now held by ${new_leader:-no node}"
figures=$(cat "$dir/figures")
[ -n "$figures" ] || die "the checker printed no figures"
echo "cluster-test ($QUEUE_TYPE): killed fwc$(cat "$dir/killed")@localhost, which held llm.jobs; $figures"
[ "$checked" = 0 ] || die "jobs were lost or failed (checker exit $checked)"
log "PASS"
