//! Three Colony nodes embedded in one process share 100 work items; one of them leaves
//! halfway through, and every item still gets done.
//!
//! ```sh
//! cargo run --release --example embed
//! ```
//!
//! Each work item is a batch job for the in-process driver `partition`, its argument the item
//! number ("partition-7"). The handler sleeps 20–50 ms and records the completion in a map
//! shared by the three nodes. Each node offers room for four items at a time, so the work
//! spreads. Once half the items are done, node `c` shuts down gracefully: it announces its
//! departure, its running items are cancelled and claimed again by `a` or `b`.
//!
//! Colony runs work at least once: an item whose handler finished just as its node left can
//! run again elsewhere. Such repeats are counted and printed. The process exits with status 1
//! if any item is missing at the end. `RUST_LOG=info` shows what the nodes do.

use colony::crdt::{JobStatus, NodeState, Resources};
use colony::{driver_fn, JobSpec, Node, TaskContext};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ITEMS: u32 = 100;
const DEADLINE: Duration = Duration::from_secs(50);

/// Item number → names of the nodes that completed it (once per completion).
type Done = Arc<Mutex<BTreeMap<u32, Vec<String>>>>;

/// The in-process handler of one node: does item `spec.args[0]`.
fn partition_driver(node: &'static str, done: Done) -> impl colony::Driver {
    driver_fn(move |ctx: TaskContext| {
        let done = done.clone();
        async move {
            let Some(item) = ctx.spec.args.first().and_then(|a| a.parse::<u32>().ok()) else {
                return 2; // a malformed job: fail it
            };
            // 20–50 ms of "work", different per item.
            let work = Duration::from_millis(20 + u64::from(item * 7 % 31));
            tokio::select! {
                () = tokio::time::sleep(work) => {
                    done.lock().unwrap().entry(item).or_default().push(node.to_string());
                    0
                }
                // The node is leaving (or the job was stopped): give the item back.
                () = ctx.cancel.cancelled() => 143,
            }
        }
    })
}

async fn start(name: &'static str, seed: Option<colony::Multiaddr>, done: &Done) -> Result<Node, colony::Error> {
    let mut builder = Node::builder()
        .name(name)
        .in_memory()
        .listen("/ip4/127.0.0.1/tcp/0".parse().expect("a valid multiaddr"))
        .mdns(false)
        .cpu_millis(2_000) // four items of 500 at a time
        .memory_mb(1_024)
        .driver("partition", partition_driver(name, done.clone()));
    if let Some(seed) = seed {
        builder = builder.seed(seed);
    }
    builder.start().await
}

async fn everyone_alive(nodes: &[&Node]) -> bool {
    for node in nodes {
        match node.nodes().await {
            Ok(seen) if seen.len() == nodes.len() && seen.iter().all(|n| n.state == NodeState::Alive) => {}
            _ => return false,
        }
    }
    true
}

fn count(done: &Done) -> usize {
    done.lock().unwrap().len()
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<ExitCode, colony::Error> {
    let started = Instant::now();
    let deadline = started + DEADLINE;
    let done: Done = Arc::default();

    let a = start("a", None, &done).await?;
    let seed = a.listen_addrs().first().cloned();
    let b = start("b", seed.clone(), &done).await?;
    let c = start("c", seed, &done).await?;
    while !everyone_alive(&[&a, &b, &c]).await {
        if Instant::now() > deadline {
            eprintln!("the three nodes did not join");
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let names: BTreeMap<String, &str> =
        [(&a, "a"), (&b, "b"), (&c, "c")].into_iter().map(|(n, name)| (n.id().to_string(), name)).collect();
    println!("3 nodes joined in {:?}", started.elapsed());

    // Every item is a job, submitted on `a`; they run wherever the cluster places them.
    let work_started = Instant::now();
    let mut jobs = Vec::new();
    for item in 0..ITEMS {
        let mut spec = JobSpec::command(format!("partition-{item}"), [item.to_string()]);
        spec.driver = "partition".into();
        spec.resources = Resources { cpu_millis: 500, memory_mb: 64 };
        jobs.push(a.submit(spec).await?);
    }
    println!("{ITEMS} items submitted on a in {:?}", work_started.elapsed());

    // Halfway: `c` leaves the cluster gracefully.
    while count(&done) < ITEMS as usize / 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let running_on_c = c.running_tasks().await.unwrap_or(0);
    let done_at_leave = count(&done);
    c.shutdown().await;
    println!(
        "c shut down after {:?}: {done_at_leave} items done, {running_on_c} running on c (handed back)",
        work_started.elapsed()
    );

    // Wait for every item, and for `a` to see every job succeeded.
    loop {
        let mut all_succeeded = count(&done) == ITEMS as usize;
        if all_succeeded {
            for id in &jobs {
                if !a.job(id).await.is_ok_and(|j| j.status == JobStatus::Succeeded) {
                    all_succeeded = false;
                    break;
                }
            }
        }
        if all_succeeded || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = work_started.elapsed();

    // What happened, from the table as `a` sees it.
    let mut duplicate_runs = 0;
    let mut stopped: BTreeMap<String, usize> = BTreeMap::new();
    let mut ran_on: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &jobs {
        let job = a.job(id).await?;
        duplicate_runs += job.duplicate_runs;
        for instance in &job.instances {
            for run in &instance.runs {
                if run.status == colony::crdt::RunStatus::Stopped {
                    let on = names.get(&run.node_id).copied().unwrap_or("?");
                    let why = run.reason.as_deref().unwrap_or("-");
                    *stopped.entry(format!("on {on}: {why}")).or_default() += 1;
                }
            }
            if let Some(owner) = &instance.node_id {
                *ran_on.entry(names.get(owner).copied().unwrap_or("?")).or_default() += 1;
            }
        }
    }
    a.shutdown().await;
    b.shutdown().await;

    let done = done.lock().unwrap().clone();
    let missing: Vec<u32> = (0..ITEMS).filter(|i| !done.contains_key(i)).collect();
    let repeats: Vec<(u32, &Vec<String>)> =
        done.iter().filter(|(_, by)| by.len() > 1).map(|(item, by)| (*item, by)).collect();
    let mut completions: BTreeMap<&str, usize> = BTreeMap::new();
    for by in done.values() {
        for node in by {
            *completions.entry(node.as_str()).or_default() += 1;
        }
    }

    println!("items done:     {}/{ITEMS}", done.len());
    println!("repeats:        {} (items done more than once)", repeats.len());
    for (item, by) in &repeats {
        println!("  partition-{item}: done by {}", by.join(", "));
    }
    println!("completions:    {completions:?} (by node)");
    println!("final owners:   {ran_on:?} (by node, as a sees the table)");
    // `drained`: cancelled because c left, the item handed to a or b. `superseded`: a copy
    // that lost a claim race to a concurrent one (see `duplicate runs`).
    println!("stopped runs:   {} (by node and reason)", stopped.values().sum::<usize>());
    for (why, n) in &stopped {
        println!("  {n} {why}");
    }
    println!("duplicate runs: {duplicate_runs} (runs beyond one per attempt: the superseded and drained ones)");
    println!("time taken:     {took:?} (from the first submission)");
    if missing.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        println!("MISSING:        {missing:?}");
        Ok(ExitCode::FAILURE)
    }
}
