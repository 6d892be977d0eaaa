//! `colony-sim`: run partition simulations from the command line.

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells mimalloc to keep freed memory instead of returning it to the OS after 10 ms (its
/// `purge_delay`). A simulation frees and allocates gigabytes over and over; purged pages
/// came back through page faults and the kernel zeroing them (5% of a 400-node run in perf),
/// and 400 nodes x 1,000 jobs ran about 8% faster without purging, at the same peak RSS.
#[allow(unsafe_code)] // The workspace's one FFI call, in the simulator binary only.
fn keep_freed_memory() {
    // The bindings name `mi_option_use_numa_nodes` but not `mi_option_purge_delay`, which
    // comes right before it in mimalloc.h (v2 and v3 alike).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = libmimalloc_sys::mi_option_use_numa_nodes - 1;
    // SAFETY: called first thing in `main`, before any other thread exists (the option is
    // not thread safe to set); it only changes when freed pages are returned to the OS.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

use colony_sim::{Fault, RunResult, Sim, SimConfig};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "colony-sim",
    version,
    about = "Offline partition simulator for Colony: many node cores, virtual time, injected faults, invariant checks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run simulations over one or more seeds and check the invariants.
    Run(RunArgs),
    /// Push many jobs through one node core and sample its table's size (I6: bounded state).
    Churn(ChurnArgs),
}

#[derive(Parser, Clone)]
struct ChurnArgs {
    /// Jobs to submit and finish.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: usize,
    /// Finished jobs retained.
    #[arg(long, default_value_t = 10_000)]
    retain: usize,
    /// Job counts at which to sample (comma-separated); the end is always sampled.
    #[arg(long, default_value = "20000,100000,250000,500000")]
    sample_at: String,
    /// Print the samples as JSON lines.
    #[arg(long)]
    json: bool,
}

#[derive(Parser, Clone)]
struct RunArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Jobs submitted per run.
    #[arg(long, default_value_t = 200)]
    jobs: usize,
    /// Number of seeds to run, starting at --seed.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The first seed (a single run with --seeds 1 replays exactly).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Faults to inject, comma-separated: all, none, loss, delay, duplicate, reorder, halves,
    /// isolate, bridge, ring, oneway, crash, pause.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Virtual length of the fault phase, in ms.
    #[arg(long, default_value_t = 30_000)]
    fault_phase_ms: u64,
    /// Retention: finished jobs kept per node.
    #[arg(long)]
    retain_jobs: Option<usize>,
    /// Retention: finished jobs older than this (virtual ms) are compacted.
    #[arg(long)]
    retain_age_ms: Option<u64>,
    /// Worker threads. Several seeds: each thread runs whole seeds. One seed: the threads
    /// run that seed's node cores in parallel. Either way a seed's result is the same for any
    /// number of threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print one JSON object at the end instead of a table.
    #[arg(long)]
    json: bool,
    /// Print each run's scenario steps to stderr.
    #[arg(long)]
    trace: bool,
}

#[derive(serde::Serialize)]
struct Summary {
    seeds: u64,
    nodes: usize,
    jobs: usize,
    faults: Vec<&'static str>,
    acknowledged: usize,
    unacknowledged: usize,
    lost_jobs: usize,
    unconverged_seeds: usize,
    multi_owner_instances_at_rest: usize,
    duplicate_runs: usize,
    capacity_violations: usize,
    false_deaths: usize,
    convergence_ms_p50: u64,
    convergence_ms_p99: u64,
    convergence_ms_max: u64,
    messages: u64,
    messages_by_kind: std::collections::BTreeMap<&'static str, u64>,
    task_starts: u64,
    claims_written: u64,
    claims_replacing: u64,
    failing_seeds: Vec<u64>,
    wall_ms: u64,
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Churn(args) => return churn(args),
    };
    let faults = match Fault::parse_list(&args.faults) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: --faults: {e}");
            std::process::exit(2);
        }
    };
    if args.nodes == 0 {
        eprintln!("error: --nodes: must be at least 1");
        std::process::exit(2);
    }
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<RunResult>>> = Mutex::new(vec![None; args.seeds as usize]);
    let done = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        // One seed gets every thread inside its run; several get one each.
        let seed_workers = if args.seeds == 1 { 1 } else { args.threads.max(1) };
        for _ in 0..seed_workers {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k as u64 >= args.seeds {
                    break;
                }
                let mut config = SimConfig::new(args.nodes, args.jobs, args.seed + k as u64);
                config.faults = faults.clone();
                config.fault_phase_ms = args.fault_phase_ms;
                config.trace = args.trace;
                // Progress goes to stderr, so it never mixes with the JSON on stdout.
                config.progress = args.seeds == 1;
                config.threads = if args.seeds == 1 { args.threads.max(1) } else { 1 };
                if let Some(n) = args.retain_jobs {
                    config.retention.finished_jobs = n;
                }
                if let Some(ms) = args.retain_age_ms {
                    config.retention.finished_age_ms = ms;
                }
                let result = Sim::new(config).run();
                if !result.ok() {
                    eprintln!(
                        "seed {} FAILED: lost={} converged={} multi_owner={} capacity_violations={} false_deaths={}\n  replay: colony-sim run --nodes {} --jobs {} --seed {} --faults {} --fault-phase-ms {}{}{} --trace",
                        result.seed,
                        result.lost_jobs.len(),
                        result.converged,
                        result.multi_owner_instances_at_rest,
                        result.capacity_violations,
                        result.false_deaths,
                        args.nodes,
                        args.jobs,
                        result.seed,
                        args.faults,
                        args.fault_phase_ms,
                        args.retain_jobs.map(|n| format!(" --retain-jobs {n}")).unwrap_or_default(),
                        args.retain_age_ms.map(|ms| format!(" --retain-age-ms {ms}")).unwrap_or_default()
                    );
                }
                if let Ok(mut r) = results.lock() {
                    r[k] = Some(result);
                }
                let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                if !args.json && (args.seeds > 1) && (d.is_multiple_of(10) || d as u64 == args.seeds) {
                    eprint!("\r{d}/{} seeds, {:.1} s", args.seeds, started.elapsed().as_secs_f64());
                    let _ = std::io::stderr().flush();
                }
            });
        }
    });
    if !args.json && args.seeds > 1 {
        eprintln!();
    }
    let results: Vec<RunResult> = results.into_inner().unwrap_or_default().into_iter().flatten().collect();
    let mut conv: Vec<u64> = results.iter().filter_map(|r| r.convergence_ms).collect();
    conv.sort_unstable();
    let pct = |p: f64| -> u64 {
        if conv.is_empty() {
            return 0;
        }
        conv[((conv.len() as f64 - 1.0) * p).round() as usize]
    };
    let summary = Summary {
        seeds: args.seeds,
        nodes: args.nodes,
        jobs: args.jobs,
        faults: faults.iter().map(|f| f.name()).collect(),
        acknowledged: results.iter().map(|r| r.acknowledged).sum(),
        unacknowledged: results.iter().map(|r| r.unacknowledged).sum(),
        lost_jobs: results.iter().map(|r| r.lost_jobs.len()).sum(),
        unconverged_seeds: results.iter().filter(|r| !r.converged).count(),
        multi_owner_instances_at_rest: results.iter().map(|r| r.multi_owner_instances_at_rest).sum(),
        duplicate_runs: results.iter().map(|r| r.duplicate_runs).sum(),
        capacity_violations: results.iter().map(|r| r.capacity_violations).sum(),
        false_deaths: results.iter().map(|r| r.false_deaths).sum(),
        convergence_ms_p50: pct(0.5),
        convergence_ms_p99: pct(0.99),
        convergence_ms_max: conv.last().copied().unwrap_or(0),
        messages: results.iter().map(|r| r.messages).sum(),
        messages_by_kind: results.iter().flat_map(|r| r.messages_by_kind.iter()).fold(
            std::collections::BTreeMap::new(),
            |mut acc, (k, v)| {
                *acc.entry(*k).or_default() += v;
                acc
            },
        ),
        task_starts: results.iter().map(|r| r.task_starts).sum(),
        claims_written: results.iter().map(|r| r.claims_written).sum(),
        claims_replacing: results.iter().map(|r| r.claims_replacing).sum(),
        failing_seeds: results.iter().filter(|r| !r.ok()).map(|r| r.seed).collect(),
        wall_ms: started.elapsed().as_millis() as u64,
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary).unwrap_or_default());
    } else {
        print_table(&summary);
    }
    if !summary.failing_seeds.is_empty() {
        std::process::exit(1);
    }
}

fn print_table(s: &Summary) {
    let rows: Vec<(&str, String)> = vec![
        ("seeds", s.seeds.to_string()),
        ("nodes", s.nodes.to_string()),
        ("jobs per seed", s.jobs.to_string()),
        ("faults", s.faults.join(",")),
        ("acknowledged / refused", format!("{} / {}", s.acknowledged, s.unacknowledged)),
        ("lost jobs (I2)", s.lost_jobs.to_string()),
        ("unconverged seeds (I1)", s.unconverged_seeds.to_string()),
        ("multi-owner at rest (I3)", s.multi_owner_instances_at_rest.to_string()),
        ("capacity violations (I4)", s.capacity_violations.to_string()),
        ("false deaths (no faults)", s.false_deaths.to_string()),
        ("duplicate runs (counted)", s.duplicate_runs.to_string()),
        (
            "convergence p50/p99/max",
            format!("{} / {} / {} ms", s.convergence_ms_p50, s.convergence_ms_p99, s.convergence_ms_max),
        ),
        ("messages delivered", s.messages.to_string()),
        ("task starts", s.task_starts.to_string()),
        ("claims (replacing)", format!("{} ({})", s.claims_written, s.claims_replacing)),
        ("wall time", format!("{:.1} s", s.wall_ms as f64 / 1000.0)),
    ];
    for (k, v) in rows {
        println!("{k:<28} {v}");
    }
    if s.failing_seeds.is_empty() {
        println!("result                       OK");
    } else {
        println!("result                       FAILED seeds {:?}", s.failing_seeds);
    }
}

fn churn(args: ChurnArgs) {
    let mut samples = Vec::new();
    for part in args.sample_at.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<usize>() {
            Ok(n) => samples.push(n),
            Err(_) => {
                eprintln!("error: --sample-at: `{part}` is not a job count");
                std::process::exit(2);
            }
        }
    }
    let started = Instant::now();
    if !args.json {
        println!(
            "{:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>8}",
            "jobs", "job docs", "tombstones", "disk bytes", "snapshot", "rss KiB", "wall s"
        );
    }
    colony_sim::churn(args.jobs, args.retain, &samples, |p| {
        if args.json {
            println!("{}", serde_json::to_string(p).unwrap_or_default());
        } else {
            println!(
                "{:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>8.1}",
                p.jobs,
                p.job_documents,
                p.tombstones,
                p.disk_bytes,
                p.snapshot_bytes,
                p.rss_kib.map_or("-".to_string(), |r| r.to_string()),
                started.elapsed().as_secs_f64()
            );
        }
    });
}
