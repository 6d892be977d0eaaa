#!/usr/bin/env python3
"""Healing time after a crash, and false deaths under CPU saturation, with 5 agents in
network namespaces (mDNS only, default engine timings).

    sudo bench/heal.py [--repeats 10] [--hosts 5] [--saturate-seconds 120] [--busy N]
                       [--skip-heal] [--skip-saturation]

Heal (repeated --repeats times): submit a service job (`sleep`), wait until it runs, then
`kill -9` the agent that runs it and measure from the kill
  (a) detection: until every survivor's GET /v1/nodes reports the node `dead` (all survivors
      polled every 20 ms; so a figure is late by up to one polling round, ~20-30 ms);
  (b) failover: until the service's new run started on another node (the new run's
      `started_ms`, stamped by the agent that spawned it, minus the kill time; same clock).
The killed agent is then restarted from its data dir (it rejoins with a new boot and kills
its orphaned task), the job is stopped, and the next repeat begins.

Saturation: fresh agents; --busy busy loops (`sh -c 'while :; do :; done'`, default one
per core) run outside the agents for --saturate-seconds while every agent's node list is
polled every 200 ms. A false death is a node some agent reported `dead` although nothing
was killed; counted three ways: nodes ever seen dead by polling, `node state ... Dead`
transitions in the agents' logs (every observer logs the state changes it sees), and the
incarnation increases over the run (each is a refutation of a suspicion or death).

One JSON line on stdout, a summary on stderr. Needs root, iproute2, util-linux (nsenter).
Not run in CI.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as b  # noqa: E402

DEADLINE_S = 30


def sleep_processes(arg):
    """Pids of live `sleep <arg>` processes (any namespace)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                parts = [p for p in f.read().split(b"\0") if p]
        except OSError:
            continue
        if len(parts) == 2 and parts[0].rsplit(b"/", 1)[-1] == b"sleep" and parts[1] == arg.encode():
            pids.append(int(entry))
    return pids


def wait_all_alive(cluster, what="every node alive everywhere"):
    everyone = range(len(cluster.agents))
    b.wait_for(what, DEADLINE_S, lambda: cluster.all_see(everyone, everyone, "alive"), interval=0.05)


def running_owner(api, job_id):
    """(owner node id, started_ms of its running run) of instance 0, or None."""
    job = api.get(f"/v1/jobs/{job_id}")
    if not isinstance(job, dict) or not job.get("instances"):
        return None
    inst = job["instances"][0]
    if inst.get("status") != "running" or not inst.get("node_id"):
        return None
    owner = inst["node_id"]
    runs = [r for r in inst.get("runs", []) if r.get("node_id") == owner and r.get("status") == "running"]
    if not runs:
        return None
    return owner, max(r["started_ms"] for r in runs)


def heal_runs(cluster, repeats):
    n = len(cluster.agents)
    detection, failover = [], []
    for r in range(repeats):
        arg = f"1000.{os.getpid()}{r}"
        submit_to = r % n
        spec = {"name": f"heal-{r}", "command": "sleep", "args": [arg], "count": 1,
                "resources": {"cpu_millis": 100, "memory_mb": 0}, "kind": "service"}
        status, body = cluster.agents[submit_to].api.call("POST", "/v1/jobs", spec)
        if status != 201:
            sys.exit(f"submission refused: {status} {body}")
        job_id = body["id"]
        owner, _ = b.wait_for("the service to run", DEADLINE_S,
                              lambda: running_owner(cluster.agents[submit_to].api, job_id), interval=0.05)
        victim = cluster.host_of(owner)
        b.wait_for("its process", DEADLINE_S, lambda: sleep_processes(arg), interval=0.05)
        survivors = [i for i in range(n) if i != victim]

        t_kill = b.now_ms()
        cluster.agents[victim].kill()
        dead_at, moved_at = None, None
        start = time.monotonic()
        while dead_at is None or moved_at is None:
            if dead_at is None and cluster.all_see(survivors, [victim], "dead"):
                dead_at = b.now_ms()
            if moved_at is None:
                seen = running_owner(cluster.agents[survivors[0]].api, job_id)
                if seen and seen[0] != owner:
                    moved_at = seen[1]
            if time.monotonic() - start > DEADLINE_S:
                sys.exit(f"repeat {r}: dead everywhere: {dead_at is not None}, moved: {moved_at is not None} "
                         f"after {DEADLINE_S} s")
            time.sleep(0.02)
        detection.append(dead_at - t_kill)
        failover.append(moved_at - t_kill)
        b.log(f"repeat {r + 1}/{repeats}: killed {cluster.agents[victim].name}; dead on every survivor after "
              f"{detection[-1]:.0f} ms, service restarted elsewhere after {failover[-1]:.0f} ms")

        # Bring the node back (same identity, new boot) and clear the job for the next round.
        cluster.agents[victim].start()
        cluster.agents[victim].wait_up()
        wait_all_alive(cluster, "the restarted node to be alive everywhere")
        cluster.agents[submit_to].api.call("DELETE", f"/v1/jobs/{job_id}")
        b.wait_for("the stopped service's processes to end", DEADLINE_S, lambda: not sleep_processes(arg),
                   interval=0.05)
    return detection, failover


DEAD_LINE = re.compile(r"node state.*node=(\S+).*state=(Dead|Suspect)")


def saturation_run(cluster, seconds, busy):
    cluster.stop_agents()
    cluster.new_agents()
    cluster.start()
    wait_all_alive(cluster)
    n = len(cluster.agents)
    ids = {a.node_id: a.name for a in cluster.agents}

    def incarnations():
        nodes = cluster.agents[0].api.get("/v1/nodes") or []
        return {x["id"]: x.get("incarnation", 0) for x in nodes}

    inc_before = incarnations()
    loops = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(busy)]

    def stop_loops():
        for p in loops:
            if p.poll() is None:
                p.kill()
            p.wait()

    b.on_exit(stop_loops)
    b.log(f"saturating with {busy} busy loops for {seconds} s ...")
    ever_dead, ever_suspect, polls, unreachable = set(), set(), 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for a in cluster.agents:
            states = b.node_states(a.api)
            polls += 1
            if states is None:
                unreachable += 1
                continue
            for node, state in states.items():
                if state == "dead":
                    ever_dead.add(node)
                elif state == "suspect":
                    ever_suspect.add(node)
        time.sleep(0.2)
    stop_loops()
    settled = True
    try:
        wait_all_alive(cluster, "every node alive again after the saturation")
    except TimeoutError:
        settled = False
    inc_after = incarnations()
    bumps = sum(max(0, inc_after.get(k, 0) - v) for k, v in inc_before.items())

    logged_dead, logged_suspect, logged_dead_nodes = 0, 0, set()
    for a in cluster.agents:
        try:
            with open(a.log_path, errors="replace") as f:
                for line in f:
                    m = DEAD_LINE.search(line)
                    if m:
                        if m.group(2) == "Dead":
                            logged_dead += 1
                            logged_dead_nodes.add(m.group(1))
                        else:
                            logged_suspect += 1
        except OSError:
            pass
    return {
        "seconds": seconds,
        "busy_loops": busy,
        "hosts": n,
        "false_deaths_nodes_polled": len(ever_dead),
        "false_deaths_nodes_logged": len(logged_dead_nodes),
        "dead_transitions_logged": logged_dead,
        "suspect_transitions_logged": logged_suspect,
        "nodes_ever_suspect_polled": len(ever_suspect),
        "incarnation_bumps": bumps,
        "dead_nodes": sorted(ids.get(x, x) for x in ever_dead | logged_dead_nodes),
        "polls": polls,
        "unreachable_polls": unreachable,
        "all_alive_after": settled,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--hosts", type=int, default=5)
    parser.add_argument("--saturate-seconds", type=float, default=120)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy loops (default: one per core)")
    parser.add_argument("--skip-heal", action="store_true")
    parser.add_argument("--skip-saturation", action="store_true")
    args = parser.parse_args()

    m = b.machine()
    cluster = b.NetnsCluster(args.hosts)
    cluster.start()
    wait_all_alive(cluster)
    result = {"bench": "heal", "hosts": args.hosts, "machine": m}
    if not args.skip_heal:
        detection, failover = heal_runs(cluster, args.repeats)
        result["repeats"] = args.repeats
        result["detection_ms"] = b.summary(detection)
        result["failover_ms"] = b.summary(failover)
        result["detection_samples_ms"] = [round(x) for x in detection]
        result["failover_samples_ms"] = [round(x) for x in failover]
    if not args.skip_saturation:
        result["saturation"] = saturation_run(cluster, args.saturate_seconds, args.busy)
    result["how"] = ("detection: kill -9 until every survivor's /v1/nodes says dead (polled every 20 ms); "
                     "failover: kill -9 until the new run's started_ms; false deaths: nodes reported dead "
                     "while only CPU was saturated")
    print(json.dumps(result), flush=True)

    b.log("")
    if "detection_ms" in result:
        d, f = result["detection_ms"], result["failover_ms"]
        b.log(f"kill -9 of the node running a service, {args.hosts} agents in namespaces, {args.repeats} runs:")
        b.log(f"  every survivor reports it dead after: p50 {d['p50']} ms, max {d['max']} ms")
        b.log(f"  the service runs on another node after: p50 {f['p50']} ms, max {f['max']} ms")
    if "saturation" in result:
        s = result["saturation"]
        b.log(f"CPU saturated by {s['busy_loops']} busy loops for {s['seconds']:.0f} s: "
              f"false deaths {s['false_deaths_nodes_polled']} (polled) / {s['false_deaths_nodes_logged']} (logged); "
              f"{s['dead_transitions_logged']} dead and {s['suspect_transitions_logged']} suspect transitions logged, "
              f"{s['incarnation_bumps']} refutations; all alive afterwards: {s['all_alive_after']}")
    b.log(f"machine: {b.machine_line(m)}")


if __name__ == "__main__":
    main()
