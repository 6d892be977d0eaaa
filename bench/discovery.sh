#!/usr/bin/env bash
# Discovery time: start 5 agents in network namespaces (mDNS only, no --seed) and measure how
# long until every node lists every node as alive (each node's GET /v1/nodes, polled every
# 20 ms). Repeated N times with fresh identities; prints p50/max as one JSON line on stdout
# and a human summary on stderr.
#
#   sudo bench/discovery.sh [-n REPEATS] [-k HOSTS]      (defaults: 10 repeats, 5 hosts)
#
# Needs root, iproute2 and util-linux (nsenter). Uses $COLONY_BIN or target/release/colony
# (built if missing). Not run in CI.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

repeats=10
hosts=5
while getopts "n:k:h" opt; do
  case "$opt" in
    n) repeats="$OPTARG" ;;
    k) hosts="$OPTARG" ;;
    *) sed -n '2,11p' "$0"; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "discovery.sh needs root (network namespaces)" >&2; exit 1; }
for tool in ip nsenter python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

# The Python part removes what it makes on exit, SIGINT and SIGTERM; this trap is the
# backstop for a SIGKILLed Python: everything it made is named cb<its pid % 1000>....
child=""
cleanup() {
  [ -n "$child" ] || return 0
  kill -TERM "$child" 2>/dev/null && wait "$child" 2>/dev/null || true
  local tag
  tag="cb$(printf %03d $((child % 1000)))"
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$tag" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$tag" || true); do
    ip link del "$link" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 - "$here" "$repeats" "$hosts" <<'PY' &
import json, sys, time
sys.dont_write_bytecode = True  # no __pycache__ in the checkout
sys.path.insert(0, sys.argv[1])
import benchlib as b

repeats, n = int(sys.argv[2]), int(sys.argv[3])
m = b.machine()
cluster = b.NetnsCluster(n)
discovery, apis_up = [], []
for r in range(repeats):
    agents = cluster.agents if r == 0 else cluster.new_agents()
    t0 = time.monotonic()
    for a in agents:
        a.start()
    up_at = None
    while True:
        done, all_up = True, True
        for a in agents:
            states = b.node_states(a.api)
            if states is None:
                done = all_up = False
            elif len(states) != n or any(s != "alive" for s in states.values()):
                done = False
        now = time.monotonic()
        if all_up and up_at is None:
            up_at = now
        if done:
            break
        if now - t0 > 60:
            for a in agents:
                b.log(f"--- {a.name} ---\n{a.log_tail()}")
            sys.exit(f"repeat {r}: not every node saw every node alive within 60 s")
        time.sleep(0.02)
    discovery.append((now - t0) * 1000)
    apis_up.append((up_at - t0) * 1000)
    b.log(f"repeat {r + 1}/{repeats}: all APIs up after {apis_up[-1]:.0f} ms, full mesh alive after {discovery[-1]:.0f} ms")
    cluster.stop_agents()

result = {
    "bench": "discovery",
    "hosts": n,
    "repeats": repeats,
    "discovery_ms": b.summary(discovery),
    "apis_up_ms": b.summary(apis_up),
    "samples_ms": [round(x, 1) for x in discovery],
    "how": "from spawning the agents until every node's GET /v1/nodes lists all nodes alive; polled every 20 ms",
    "machine": m,
}
print(json.dumps(result), flush=True)
d, u = result["discovery_ms"], result["apis_up_ms"]
b.log(f"\ndiscovery of {n} agents in namespaces, mDNS only, {repeats} runs: p50 {d['p50']} ms, max {d['max']} ms"
      f" (of which starting until every API answers: p50 {u['p50']} ms, max {u['max']} ms)")
b.log(f"machine: {b.machine_line(m)}")
PY
child=$!
wait "$child"
