#!/usr/bin/env python3
"""Submit-to-start latency and sustained placements per second on 5 loopback agents.

    bench/submit_latency.py [--jobs 1000] [--agents 5] [--concurrency 1] [--rate R]

Starts 5 agents on 127.0.0.1 (--dev style: mDNS off, each with its own --data-dir, API port
and listen port; agents 1..4 join through --seed of agent 0), waits until every agent sees all
of them alive, then submits `--jobs` no-op batch jobs (`true`, 10 millicores, no memory limit)
round-robin over the agents' APIs, as fast as the acknowledgements come back (one client, or
`--concurrency` clients each taking every C-th job), or at `--rate` jobs per second.

Figures (one JSON line on stdout, a summary on stderr):
- latency: the job's run `started_ms` (the agent stamps it when the process is spawned) minus
  the client's wall-clock time just before it sent the POST, in ms. Same machine, same clock.
  The earliest run of the instance counts. p50, p99, max, and the p50 of each tenth of the
  run (rising: a backlog, submissions outpace placements).
- ack: POST round trip (the reply comes once the job is durable on the accepting agent).
- placements_per_s: succeeded jobs / (the last run's `finished_ms` - the first POST's send
  time), in seconds: jobs placed, run and reported succeeded per second over the whole run.
  Also the rate of the middle 80 % of starts (by `started_ms`), which leaves out ramp-up and
  tail.
Python 3, standard library only. Not run in CI.
"""

import argparse
import json
import os
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as b  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=1, help="parallel submitting clients")
    parser.add_argument("--rate", type=float, default=0,
                        help="submissions per second over all clients (default 0: as fast as acknowledged)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for all jobs to finish")
    args = parser.parse_args()

    m = b.machine()
    cluster = b.LoopbackCluster(args.agents, cpu_millis=4000, memory_mb=4096)
    cluster.start()
    agents = cluster.agents
    ids = [a.node_id for a in agents]
    b.wait_for("every agent to see every agent alive", 60,
               lambda: all((s := b.node_states(a.api)) and all(s.get(i) == "alive" for i in ids) for a in agents),
               interval=0.1)
    b.log(f"{args.agents} agents up and joined; submitting {args.jobs} jobs")

    sent = {}  # job id -> (send ms, ack ms, job number k)
    errors = []
    lock = threading.Lock()
    t_start = b.now_ms()

    def submitter(c):
        # One connection per (client, agent).
        apis = [b.Api(a.api.host, a.api.port, timeout=30) for a in agents]
        for k in range(c, args.jobs, args.concurrency):
            if args.rate > 0:
                # Job k goes out at k / rate seconds after the start, whoever sends it.
                delay = t_start / 1000 + k / args.rate - time.time()
                if delay > 0:
                    time.sleep(delay)
            i = k % len(agents)
            spec = {"name": f"noop-{k}", "command": "true", "count": 1,
                    "resources": {"cpu_millis": 10, "memory_mb": 0}, "kind": "batch"}
            t_send = b.now_ms()
            try:
                status, body = apis[i].call("POST", "/v1/jobs", spec)
            except OSError as e:
                with lock:
                    errors.append(str(e))
                continue
            t_ack = b.now_ms()
            if status != 201 or not isinstance(body, dict) or "id" not in body:
                with lock:
                    errors.append(f"HTTP {status}: {body}")
                continue
            with lock:
                sent[body["id"]] = (t_send, t_ack, k)
        for api in apis:
            api.close()

    threads = [threading.Thread(target=submitter, args=(c,)) for c in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_submitted = b.now_ms()
    b.log(f"submitted {len(sent)} jobs in {(t_submitted - t_start) / 1000:.2f} s ({len(errors)} refused or failed)")

    # Wait until every acknowledged job is finished, as agent 0 sees the table.
    watcher = b.Api(agents[0].api.host, agents[0].api.port, timeout=60)
    deadline = time.monotonic() + args.timeout
    while True:
        jobs = watcher.get("/v1/jobs") or []
        by_id = {j["id"]: j for j in jobs if j.get("id") in sent}
        finished = [j for j in by_id.values() if j.get("status") in ("succeeded", "failed", "stopped")]
        if len(finished) == len(sent):
            break
        if time.monotonic() > deadline:
            sys.exit(f"only {len(finished)} of {len(sent)} jobs finished within {args.timeout} s")
        time.sleep(0.5)

    latencies, acks, starts, finishes, failed, duplicates, never_ran = [], [], [], [], 0, 0, 0
    by_order = []  # (job number, latency)
    for job_id, (t_send, t_ack, k) in sent.items():
        job = by_id[job_id]
        acks.append(t_ack - t_send)
        duplicates += job.get("duplicate_runs", 0)
        if job["status"] != "succeeded":
            failed += 1
        runs = [r for inst in job.get("instances", []) for r in inst.get("runs", [])]
        if not runs:
            never_ran += 1
            continue
        started = min(r["started_ms"] for r in runs)
        latencies.append(started - t_send)
        by_order.append((k, started - t_send))
        starts.append(started)
        finishes.extend(r["finished_ms"] for r in runs if r.get("finished_ms"))
    succeeded = len(sent) - failed
    first_send = min(t for t, _, _ in sent.values())
    window_s = (max(finishes) - first_send) / 1000 if finishes else float("nan")
    starts.sort()
    lo, hi = starts[len(starts) // 10], starts[(len(starts) * 9) // 10 - 1]
    middle_rate = (len(starts) * 0.8) / ((hi - lo) / 1000) if hi > lo else None

    # Latency p50 of each tenth of the submissions in order: flat means a per-job cost,
    # rising means a backlog (submissions outpace placements).
    by_order.sort()
    tenths = [by_order[len(by_order) * t // 10:len(by_order) * (t + 1) // 10] for t in range(10)]
    p50_by_tenth = [round(b.percentile([x for _, x in part], 50)) for part in tenths if part]

    result = {
        "bench": "submit_latency",
        "agents": args.agents,
        "jobs": args.jobs,
        "acknowledged": len(sent),
        "refused_or_failed_submissions": len(errors),
        "concurrency": args.concurrency,
        "rate_limit_per_s": args.rate or None,
        "succeeded": succeeded,
        "failed": failed,
        "never_ran": never_ran,
        "duplicate_runs": duplicates,
        "latency_ms": b.summary(latencies),
        "latency_p50_ms_by_tenth": p50_by_tenth,
        "ack_ms": b.summary(acks),
        "submit_per_s": round(len(sent) / ((t_submitted - t_start) / 1000), 1),
        "placements_per_s": round(succeeded / window_s, 1),
        "placements_per_s_middle_80pct": round(middle_rate, 1) if middle_rate else None,
        "how": "latency = earliest run started_ms - client send time; placements_per_s = succeeded jobs / "
               "(last run finished_ms - first send time)",
        "machine": m,
    }
    print(json.dumps(result), flush=True)
    lat, ack = result["latency_ms"], result["ack_ms"]
    b.log(f"\n{len(sent)} no-op jobs over {args.agents} loopback agents ({args.concurrency} client(s)):")
    b.log(f"  submit -> process start: p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms"
          f" (p50 per tenth of the run: {p50_by_tenth})")
    b.log(f"  submit acknowledged (durable): p50 {ack['p50']} ms, p99 {ack['p99']} ms; {result['submit_per_s']} submissions/s")
    b.log(f"  sustained: {result['placements_per_s']} jobs succeeded/s over the run "
          f"({result['placements_per_s_middle_80pct']} starts/s in the middle 80 %); "
          f"{failed} failed, {never_ran} never ran, {duplicates} duplicate runs")
    b.log(f"machine: {b.machine_line(m)}")
    if errors:
        b.log(f"first submission error: {errors[0]}")


if __name__ == "__main__":
    main()
