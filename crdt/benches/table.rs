//! Benchmarks of the replicated table and the claim rule.
//!
//! - `claim`: how many claim decisions a node makes per second (`evaluate_instance` + `winner`
//!   on a job with 3–5 claims), and the ranking of 100 nodes (`placement_score`).
//! - `push` / `sync`: the cost of one new change against table size (100, 1,000, 10,000
//!   jobs): pushed as change bytes, or carried by a per-document sync session.
//! - `saved_bytes`: bytes per job in the saved table (printed), and the cost of `snapshot()`.
//!
//! Every group is short (10 samples, ≤ 3 s) so `cargo bench -p colony-crdt` stays within a
//! few minutes on 2 cores.

use colony_crdt::rules::{evaluate_instance, placement_score, winner};
use colony_crdt::{
    Claim, DocId, JobHeader, JobRecord, JobSpec, NodeState, Resources, Run, RunStatus, SyncState, Table,
};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

fn short<M: criterion::measurement::Measurement>(g: &mut criterion::BenchmarkGroup<'_, M>) {
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
}

fn job_id(i: usize) -> String {
    format!("{:032x}", (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
}

fn spec() -> JobSpec {
    let mut spec = JobSpec::command("/usr/bin/worker", ["--input", "s3://bucket/key", "--threads", "4"]);
    spec.resources = Resources { cpu_millis: 500, memory_mb: 256 };
    spec
}

fn header(i: usize) -> JobHeader {
    JobHeader { spec: spec(), submitted_by: "node-0".into(), submitted_at_ms: 1_700_000_000_000 + i as u64 }
}

fn claim(attempt: u32, at_ms: u64) -> Claim {
    Claim { attempt, boot: 0x5eed, at_ms }
}

fn running(started_ms: u64) -> Run {
    Run { status: RunStatus::Running, boot: 0x5eed, started_ms, finished_ms: None, exit_code: None, reason: None }
}

fn table(node: &str, actor: u8) -> Table {
    Table::new(node.to_string(), [actor; 16])
}

// ---------------------------------------------------------------- (a) claim decisions

fn claim_decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("claim");
    short(&mut g);
    let spec = spec();
    let job = job_id(7);
    let alive = |n: &str| if n == "node-dead" { NodeState::Dead } else { NodeState::Alive };
    for claims in 3..=5usize {
        let mut rec = JobRecord { header: Some(std::sync::Arc::new(header(7))), ..JobRecord::default() };
        for n in 0..claims {
            let node = if n == 0 { "node-dead".to_string() } else { format!("node-{n}") };
            rec.claims.insert((0, node.clone()), claim(0, 100));
            rec.runs.insert((0, 0, node), running(200));
        }
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("evaluate_instance+winner", claims), &rec, |b, rec| {
            b.iter(|| {
                let view = evaluate_instance(&job, black_box(rec), &spec, 0, &alive);
                let w = winner(&job, rec, 0, view.attempt, &alive);
                black_box((view, w))
            })
        });
    }
    let nodes: Vec<(String, Resources, Resources)> = (0..100)
        .map(|i| {
            let cap = Resources { cpu_millis: 8_000, memory_mb: 16_384 };
            let used = Resources { cpu_millis: (i * 73) % 8_000, memory_mb: (i * 997) % 16_384 };
            (format!("12D3KooWNode{i:04}"), cap, used)
        })
        .collect();
    g.throughput(Throughput::Elements(nodes.len() as u64));
    g.bench_function("placement_score/100_nodes", |b| {
        b.iter(|| {
            let best = nodes
                .iter()
                .map(|(n, cap, used)| (placement_score(&job, 0, 0, n, *cap, *used), n))
                .max_by(|a, b| a.0.total_cmp(&b.0));
            black_box(best)
        })
    });
    g.finish();
}

// ---------------------------------------------------------------- (b) sync cost vs table size

/// A writer table with `jobs` jobs (spec + one claim each), and a replica holding all of it.
fn converged_pair(jobs: usize) -> (Table, Table) {
    let mut a = table("node-a", 1);
    let mut b = table("node-b", 2);
    for i in 0..jobs {
        let id = job_id(i);
        a.create_job(&id, &header(i));
        a.write_claim(&id, 0, &claim(0, 1_000 + i as u64));
    }
    for (doc, bytes) in a.take_outbox() {
        b.apply_changes(&doc, &[bytes]).expect("valid change");
    }
    a.take_persist_records();
    b.take_persist_records();
    assert_eq!(a.digest(), b.digest());
    (a, b)
}

fn sync_round(a: &mut Table, b: &mut Table, doc: &DocId, sa: &mut SyncState, sb: &mut SyncState) -> (usize, usize) {
    let (mut messages, mut bytes) = (0, 0);
    loop {
        let mut quiet = true;
        if let Some(m) = a.generate_sync(doc, sa) {
            bytes += m.len();
            b.receive_sync(doc, sb, &m).expect("valid sync message");
            messages += 1;
            quiet = false;
        }
        if let Some(m) = b.generate_sync(doc, sb) {
            bytes += m.len();
            a.receive_sync(doc, sa, &m).expect("valid sync message");
            messages += 1;
            quiet = false;
        }
        if quiet {
            return (messages, bytes);
        }
    }
}

fn sync_cost(c: &mut Criterion) {
    for jobs in [100usize, 1_000, 10_000] {
        let (mut a, mut b) = converged_pair(jobs);
        let ids: Vec<String> = (0..jobs).map(job_id).collect();

        let mut g = c.benchmark_group("push");
        short(&mut g);
        g.throughput(Throughput::Elements(1));
        // One new claim, rotating over the jobs so no one document's history dominates.
        let mut k = 0u64;
        g.bench_function(BenchmarkId::new("write_claim+take_outbox+apply_changes", jobs), |bench| {
            bench.iter(|| {
                k += 1;
                let id = &ids[(k as usize) % jobs];
                a.write_claim(id, 0, &claim(0, 10_000 + k));
                for (doc, bytes) in a.take_outbox() {
                    black_box(b.apply_changes(&doc, &[bytes]).expect("valid change"));
                }
            })
        });
        g.finish();
        assert_eq!(a.digest(), b.digest());
        a.take_persist_records();
        b.take_persist_records();

        // One changed document carried by a sync session, kept across rounds (as a node keeps
        // a peer's state) or fresh (a reconnect that did not keep it).
        let mut g = c.benchmark_group("sync");
        short(&mut g);
        g.throughput(Throughput::Elements(1));
        let mut states: Vec<Option<(SyncState, SyncState)>> = (0..jobs).map(|_| None).collect();
        let mut k = 0u64;
        let mut sample = (0, 0);
        g.bench_function(BenchmarkId::new("round_kept_state", jobs), |bench| {
            bench.iter(|| {
                k += 1;
                let i = (k as usize) % jobs;
                let doc = DocId::Job(ids[i].clone());
                let (sa, sb) = states[i].get_or_insert_with(Default::default);
                a.write_claim(&ids[i], 0, &claim(0, 20_000 + k));
                a.take_outbox();
                sample = sync_round(&mut a, &mut b, &doc, sa, sb);
            })
        });
        eprintln!("sync/round_kept_state/{jobs}: last round {} messages, {} bytes", sample.0, sample.1);
        g.bench_function(BenchmarkId::new("round_fresh_state", jobs), |bench| {
            bench.iter(|| {
                k += 1;
                let i = (k as usize) % jobs;
                let doc = DocId::Job(ids[i].clone());
                a.write_claim(&ids[i], 0, &claim(0, 20_000 + k));
                a.take_outbox();
                sample = sync_round(&mut a, &mut b, &doc, &mut SyncState::default(), &mut SyncState::default());
            })
        });
        eprintln!("sync/round_fresh_state/{jobs}: last round {} messages, {} bytes", sample.0, sample.1);
        g.finish();
        assert_eq!(a.digest(), b.digest());
    }
}

// ---------------------------------------------------------------- (c) bytes per job

/// 1,000 jobs, each with its spec, a claim, and two run writes (running, then succeeded).
fn finished_jobs(jobs: usize) -> Table {
    let mut t = table("node-a", 1);
    for i in 0..jobs {
        let id = job_id(i);
        t.create_job(&id, &header(i));
        t.write_claim(&id, 0, &claim(0, 1_000));
        t.write_run(&id, 0, 0, &running(2_000));
        t.write_run(
            &id,
            0,
            0,
            &Run {
                status: RunStatus::Succeeded,
                boot: 0x5eed,
                started_ms: 2_000,
                finished_ms: Some(9_000),
                exit_code: Some(0),
                reason: None,
            },
        );
    }
    t.take_outbox();
    t
}

fn saved_bytes(c: &mut Criterion) {
    const JOBS: usize = 1_000;
    let mut t = finished_jobs(JOBS);
    let records: usize = t.take_persist_records().iter().map(Vec::len).sum();
    let snapshot = t.snapshot().len();
    let spec_json = serde_json::to_string(&header(0)).map(|s| s.len()).unwrap_or(0);
    eprintln!(
        "saved_bytes: {JOBS} jobs (spec + claim + 2 runs): snapshot {snapshot} B = {} B/job; \
         persist records {records} B = {} B/job; header JSON alone {spec_json} B",
        snapshot / JOBS,
        records / JOBS,
    );
    let mut g = c.benchmark_group("saved_bytes");
    short(&mut g);
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(JOBS as u64));
    g.bench_function("snapshot/1000_jobs", |b| b.iter(|| black_box(t.snapshot().len())));
    let snap = t.snapshot();
    g.bench_function("restore/1000_jobs", |b| {
        b.iter(|| {
            let mut r = table("node-a", 3);
            r.restore(Some(&snap), &[]).expect("valid snapshot");
            black_box(r.digest())
        })
    });
    g.finish();
}

criterion_group!(benches, claim_decisions, sync_cost, saved_bytes);
criterion_main!(benches);
