//! What embedding Colony costs: idle nodes, and the latency of in-process work.
//!
//! ```sh
//! cargo run --release --example embed_cost                     # 30 s idle window, 1,000 jobs
//! cargo run --release --example embed_cost -- --idle-secs 10 --jobs 200
//! ```
//!
//! (a) Idle: three nodes in this process (loopback, mDNS off, in memory, default timings) join,
//! then sit idle. Reported: resident memory (`VmRSS` of `/proc/self/status`) before the first
//! node starts, once they have joined and after the idle window; the process's CPU time over
//! the window (`utime + stime` of `/proc/self/stat`, in clock ticks of 10 ms) as a share of one
//! core; and the messages each node sent per second meanwhile.
//!
//! (b) Submit-to-handler latency of the in-process driver. Jobs are submitted on node `a`
//! one after another (each `submit` awaited, then the next); the clock starts before the
//! `submit` call and stops when the handler is entered, wherever it runs. Five runs, each on
//! three fresh nodes:
//!
//! 1. back to back with the default timings (15 ms settle window, 40 ms claim stagger);
//! 2. back to back with both set to 1 ms, which shows what the waits themselves cost (the
//!    settle window cannot go below the measured round-trip bound);
//! 3. `jobs / 2` of them at 100 submissions/s with the default timings;
//! 4. one at a time with the default timings: each job's handler is entered before the next
//!    is submitted (latency without queueing), `jobs / 5` of them;
//! 5. one at a time with both waits at 1 ms.
//!
//! Reported: p50, p99 and max (to the first handler entry of each job), split at the moment
//! the runner claimed the job (its own `claimed` event; events a lagging stream skipped are
//! left out of the split), the same per node that ran the jobs, duplicate runs, and messages
//! sent and dropped.
//! Linux only (`/proc`).

use colony::crdt::{InstanceStatus, NodeState};
use colony::{driver_fn, Event, JobSpec, Node, TaskContext, Timing};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, which is 100 on Linux.
const TICKS_PER_SEC: f64 = 100.0;
const JOIN_DEADLINE: Duration = Duration::from_secs(30);
const WORK_DEADLINE: Duration = Duration::from_secs(120);

/// Job id → (first handler entry, the id of the node that ran it, how many entries).
type Entries = Arc<Mutex<HashMap<String, (Instant, String, u32)>>>;
/// (job id, node id) → when that node's event stream reported its own claim of the job.
type Claims = Arc<Mutex<HashMap<(String, String), Instant>>>;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of the whole process (every thread), in seconds.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    ticks as f64 / TICKS_PER_SEC
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn start_three(timing: &Timing, entries: &Entries) -> Result<Vec<Node>, colony::Error> {
    let mut nodes: Vec<Node> = Vec::new();
    for name in ["a", "b", "c"] {
        let entries = entries.clone();
        let mut builder = Node::builder()
            .name(name)
            .in_memory()
            .listen("/ip4/127.0.0.1/tcp/0".parse().expect("a valid multiaddr"))
            .mdns(false)
            .timing(timing.clone())
            .driver(
                "probe",
                driver_fn(move |ctx: TaskContext| {
                    let entered = Instant::now();
                    let mut entries = entries.lock().unwrap();
                    entries.entry(ctx.job.clone()).or_insert((entered, ctx.node.clone(), 0)).2 += 1;
                    async { 0 }
                }),
            );
        if let Some(first) = nodes.first() {
            builder = builder.seed(first.listen_addrs()[0].clone());
        }
        nodes.push(builder.start().await?);
    }
    let deadline = Instant::now() + JOIN_DEADLINE;
    'wait: loop {
        assert!(Instant::now() < deadline, "the three nodes did not join within {JOIN_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        for node in &nodes {
            let seen = node.nodes().await?;
            if seen.len() != 3 || seen.iter().any(|n| n.state != NodeState::Alive) || node.health().await?.peers != 2 {
                continue 'wait;
            }
        }
        return Ok(nodes);
    }
}

async fn shutdown(nodes: Vec<Node>) {
    for node in nodes {
        node.shutdown().await;
    }
}

async fn idle_cost(idle: Duration) -> Result<(), colony::Error> {
    println!("== (a) idle cost: 3 nodes in one process, idle {idle:?} after joining");
    let rss_before = rss_kib();
    let threads_before = threads();
    let entries: Entries = Arc::default();
    let join_started = Instant::now();
    let cpu_join = cpu_secs();
    let nodes = start_three(&Timing::default(), &entries).await?;
    let joined_in = join_started.elapsed();
    let cpu_joined = cpu_secs();
    let rss_joined = rss_kib();
    let mut sends_before = Vec::new();
    for node in &nodes {
        sends_before.push(node.io_stats().await?.sends);
    }

    let t0 = Instant::now();
    let c0 = cpu_secs();
    tokio::time::sleep(idle).await;
    let c1 = cpu_secs();
    let wall = t0.elapsed().as_secs_f64();
    let rss_after = rss_kib();

    println!("joined in           {joined_in:?} ({:.2} s CPU to start and join)", cpu_joined - cpu_join);
    println!("threads             {threads_before} before, {} after", threads());
    println!("RSS before start    {:.1} MiB", mib(rss_before));
    println!(
        "RSS after joining   {:.1} MiB (+{:.1} MiB for 3 nodes)",
        mib(rss_joined),
        mib(rss_joined.saturating_sub(rss_before))
    );
    println!(
        "RSS after idling    {:.1} MiB (+{:.1} MiB over the window)",
        mib(rss_after),
        mib(rss_after.saturating_sub(rss_joined))
    );
    println!(
        "CPU while idle      {:.2} s over {wall:.1} s = {:.2} % of one core (3 nodes; {:.2} % each)",
        c1 - c0,
        100.0 * (c1 - c0) / wall,
        100.0 * (c1 - c0) / wall / 3.0
    );
    for (node, before) in nodes.iter().zip(sends_before) {
        let sends = node.io_stats().await?.sends - before;
        println!("messages sent       {}: {:.1}/s", node.name(), sends as f64 / wall);
    }
    shutdown(nodes).await;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(latencies: &mut [Duration]) -> String {
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "n={:<5} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms",
        latencies.len(),
        ms(percentile(latencies, 50.0)),
        ms(percentile(latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default())
    )
}

/// How the jobs are submitted.
#[derive(Clone, Copy)]
enum Pace {
    /// Each `submit` awaited, then the next at once.
    BackToBack,
    /// This many submissions per second at most.
    Rate(u32),
    /// The next submission once the previous job's handler was entered.
    OneAtATime,
}

async fn latency(label: &str, timing: Timing, jobs: usize, pace: Pace) -> Result<(), colony::Error> {
    println!(
        "-- {label}: settle_ms {}, claim_stagger_ms {}, {jobs} jobs, {}",
        timing.settle_ms,
        timing.claim_stagger_ms,
        match pace {
            Pace::BackToBack => "back to back".to_string(),
            Pace::Rate(r) => format!("at most {r}/s"),
            Pace::OneAtATime => "one at a time".to_string(),
        }
    );
    let entries: Entries = Arc::default();
    let nodes = start_three(&timing, &entries).await?;
    let names: HashMap<String, String> = nodes.iter().map(|n| (n.id().to_string(), n.name().to_string())).collect();
    let a = &nodes[0];
    let claims: Claims = Arc::default();
    let mut watchers = Vec::new();
    for node in &nodes {
        let mut events = node.events();
        let (me, claims) = (node.id().to_string(), claims.clone());
        watchers.push(tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if let Event::Instance { job, status: InstanceStatus::Claimed, node: Some(owner), .. } = event {
                    if owner == me {
                        claims.lock().unwrap().entry((job, owner)).or_insert_with(Instant::now);
                    }
                }
            }
        }));
    }

    let mut submitted: Vec<(String, Instant)> = Vec::with_capacity(jobs);
    let started = Instant::now();
    for i in 0..jobs {
        let mut spec = JobSpec::command(format!("probe-{i}"), Vec::<String>::new());
        spec.driver = "probe".into();
        let at = Instant::now();
        let id = a.submit(spec).await?;
        if let Pace::Rate(rate) = pace {
            tokio::time::sleep_until((started + Duration::from_secs(i as u64 + 1) / rate).into()).await;
        }
        if let Pace::OneAtATime = pace {
            let deadline = Instant::now() + WORK_DEADLINE;
            while !entries.lock().unwrap().contains_key(&id) {
                assert!(Instant::now() < deadline, "job {id} never started");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        submitted.push((id, at));
    }
    let submit_secs = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + WORK_DEADLINE;
    while entries.lock().unwrap().len() < jobs {
        assert!(Instant::now() < deadline, "only {} of {jobs} jobs started", entries.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_started = started.elapsed().as_secs_f64();

    let entries = entries.lock().unwrap().clone();
    let mut all = Vec::with_capacity(jobs);
    let mut by_node: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let (mut to_claim, mut claim_to_handler) = (Vec::new(), Vec::new());
    let claims = claims.lock().unwrap().clone();
    for (id, at) in &submitted {
        let (entered, node, _) = &entries[id];
        let latency = entered.saturating_duration_since(*at);
        all.push(latency);
        if let Some(claimed) = claims.get(&(id.clone(), node.clone())) {
            to_claim.push(claimed.saturating_duration_since(*at));
            claim_to_handler.push(entered.saturating_duration_since(*claimed));
        }
        let on = names.get(node).cloned().unwrap_or_else(|| node.clone());
        by_node.entry(if on == "a" { "a (the submitter)".into() } else { on }).or_default().push(latency);
    }
    // Let the last runs reach `a`'s table before counting duplicates.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut duplicates = 0;
    for (id, _) in &submitted {
        duplicates += a.job(id).await.map_or(0, |j| j.duplicate_runs);
    }
    let extra_entries: u32 = entries.values().map(|(_, _, n)| n - 1).sum();
    let mut io = colony::daemon::runtime::IoStats::default();
    for node in &nodes {
        let s = node.io_stats().await?;
        io.sends += s.sends;
        io.sends_dropped += s.sends_dropped;
        io.sends_unreachable += s.sends_unreachable;
    }
    println!(
        "submitting took     {submit_secs:.2} s ({:.0} submissions/s); all started after {all_started:.2} s",
        jobs as f64 / submit_secs
    );
    println!("all                 {}", summary(&mut all));
    println!("  submit -> claimed {} (the runner's own claim, from its event stream)", summary(&mut to_claim));
    println!("  claimed -> entry  {} (settle window, then start)", summary(&mut claim_to_handler));
    for (node, latencies) in &mut by_node {
        println!("ran on {node:<12} {}", summary(latencies));
    }
    println!(
        "duplicates          {duplicates} duplicate runs in a's table; {extra_entries} handler entries beyond one per job"
    );
    println!(
        "messages            {} sent, {} dropped (queue full), {} unreachable",
        io.sends, io.sends_dropped, io.sends_unreachable
    );
    shutdown(nodes).await;
    for watcher in watchers {
        watcher.abort();
    }
    Ok(())
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), colony::Error> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .init();
    let idle = Duration::from_secs(arg("--idle-secs", 30));
    let jobs = arg("--jobs", 1000) as usize;
    println!(
        "machine: {} CPUs available to this process, colony {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        env!("CARGO_PKG_VERSION")
    );

    idle_cost(idle).await?;

    println!();
    println!("== (b) submit-to-handler latency of the in-process driver, jobs submitted on a");
    latency("defaults", Timing::default(), jobs, Pace::BackToBack).await?;
    let fast = Timing { settle_ms: 1, claim_stagger_ms: 1, ..Timing::default() };
    latency("waits at 1 ms", fast, jobs, Pace::BackToBack).await?;
    latency("defaults, paced", Timing::default(), jobs / 2, Pace::Rate(100)).await?;
    let unloaded = (jobs / 5).max(1);
    latency("defaults, unloaded", Timing::default(), unloaded, Pace::OneAtATime).await?;
    let fast = Timing { settle_ms: 1, claim_stagger_ms: 1, ..Timing::default() };
    latency("waits at 1 ms, unloaded", fast, unloaded, Pace::OneAtATime).await?;
    Ok(())
}
