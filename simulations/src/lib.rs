//! `colony-sim`: the offline partition simulator.
//!
//! It runs N node cores ([`colony::engine::Engine`], exactly the code the daemon runs) over a
//! simulated network with virtual time. It injects message loss, delay, duplication and
//! reordering; partitions (halves, an isolated node, a bridge node, a majorities ring, one-way
//! cuts); crashes with restart from the node's durable bytes (unsynced writes lost); and
//! pauses. A workload submits jobs to random nodes throughout. After the fault phase, a
//! liveness phase heals everything and runs to quiescence, then the checkers run.
//!
//! A run is a pure function of its config and seed: `colony-sim run --seed S` replays it.
//! It does not use tokio, libp2p, clocks or unseeded randomness. It may use threads within
//! a run (`SimConfig::threads`), for node cores only and without changing a single result:
//! see [`Sim`].

use colony::engine::{Engine, EngineConfig, Message, Output, Retention, Timing};
use colony_crdt::{DocId, JobKind, JobSpec, Resources, RestartPolicy, SharedStates};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A kind of fault the simulator can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// Random message loss (up to 30%) for a while.
    Loss,
    /// Extra message delay (up to 300 ms) for a while.
    Delay,
    /// Messages delivered twice.
    Duplicate,
    /// Messages overtaking each other (wide delay jitter).
    Reorder,
    /// The cluster split into two halves.
    Halves,
    /// One node cut off from all others.
    Isolate,
    /// Two halves, and one node that sees both.
    Bridge,
    /// Each node sees only a majority: its neighbours on a ring.
    Ring,
    /// Messages from one node to another dropped, the other way not.
    OneWay,
    /// A node crashes, losing unsynced writes, and restarts from disk.
    Crash,
    /// A node stops processing for a while (SIGSTOP), then resumes.
    Pause,
    /// The link between two nodes goes down and up every few hundred ms.
    Flap,
}

impl Fault {
    /// Every fault: the default mix.
    pub const ALL: [Fault; 12] = [
        Fault::Loss,
        Fault::Delay,
        Fault::Duplicate,
        Fault::Reorder,
        Fault::Halves,
        Fault::Isolate,
        Fault::Bridge,
        Fault::Ring,
        Fault::OneWay,
        Fault::Crash,
        Fault::Pause,
        Fault::Flap,
    ];

    /// The fault's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Loss => "loss",
            Fault::Delay => "delay",
            Fault::Duplicate => "duplicate",
            Fault::Reorder => "reorder",
            Fault::Halves => "halves",
            Fault::Isolate => "isolate",
            Fault::Bridge => "bridge",
            Fault::Ring => "ring",
            Fault::OneWay => "oneway",
            Fault::Crash => "crash",
            Fault::Pause => "pause",
            Fault::Flap => "flap",
        }
    }

    /// Parses a comma-separated list (`all` and `none` allowed).
    pub fn parse_list(s: &str) -> Result<Vec<Fault>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => out.extend(Fault::ALL),
                "none" => {}
                name => match Fault::ALL.iter().find(|f| f.name() == name) {
                    Some(f) => out.push(*f),
                    None => {
                        let known: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                        return Err(format!("unknown fault `{name}`; known: all, none, {}", known.join(", ")));
                    }
                },
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// One simulation's parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Nodes.
    pub nodes: usize,
    /// Jobs submitted during the fault phase.
    pub jobs: usize,
    /// The seed.
    pub seed: u64,
    /// Faults injected.
    pub faults: Vec<Fault>,
    /// Virtual length of the fault phase.
    pub fault_phase_ms: u64,
    /// The liveness phase gives up after this long.
    pub max_liveness_ms: u64,
    /// Share of jobs that are long-running services.
    pub service_share: f64,
    /// Share of jobs stopped by a user shortly after submission.
    pub stop_share: f64,
    /// Each node's capacity.
    pub capacity: Resources,
    /// Engine timings.
    pub timing: Timing,
    /// Engine retention.
    pub retention: Retention,
    /// Print scenario steps to stderr.
    pub trace: bool,
    /// Print progress (virtual time, events, messages) to stderr every few seconds of wall
    /// time: for long runs. Display only; it does not affect the run.
    pub progress: bool,
    /// Threads that run node cores within this run (see [`Sim`]'s segments). Speed only: a
    /// run's result is the same for any number.
    pub threads: usize,
}

impl SimConfig {
    /// Defaults for `nodes` and `jobs` with every fault.
    pub fn new(nodes: usize, jobs: usize, seed: u64) -> SimConfig {
        SimConfig {
            nodes,
            jobs,
            seed,
            faults: Fault::ALL.to_vec(),
            fault_phase_ms: 30_000,
            max_liveness_ms: 120_000,
            service_share: 0.05,
            stop_share: 0.03,
            capacity: Resources { cpu_millis: 8_000, memory_mb: 16_384 },
            timing: Timing::default(),
            retention: Retention::default(),
            trace: false,
            progress: false,
            threads: 1,
        }
    }
}

/// What one run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunResult {
    /// The seed.
    pub seed: u64,
    /// Submissions acknowledged (durable on the accepting node).
    pub acknowledged: usize,
    /// Submissions refused (node down or paused).
    pub unacknowledged: usize,
    /// Acknowledged jobs with an instance that never completed (batch) or is not running at
    /// rest (service). Must be 0 (I2).
    pub lost_jobs: Vec<String>,
    /// Whether every node ended with the same digest (I1).
    pub converged: bool,
    /// Virtual ms from the heal to identical digests.
    pub convergence_ms: Option<u64>,
    /// Instances with more than one running copy, or a running copy that is not the winner, at
    /// rest (I3).
    pub multi_owner_instances_at_rest: usize,
    /// Runs beyond one per (instance, attempt): copies that ran concurrently.
    pub duplicate_runs: usize,
    /// Task starts that took a node past its capacity (I4).
    pub capacity_violations: usize,
    /// Death certificates written while the network had been healthy (no fault active) for at
    /// least the grace period, or at any time in a run without faults (no false positives).
    pub false_deaths: usize,
    /// Messages delivered.
    pub messages: u64,
    /// Messages delivered, by kind (`ping`, `changes`, `sync`, ...): where the traffic goes.
    /// Pushed changes are split by document: `changes` to job documents, `node_changes` to
    /// node documents (membership, certificates, modes).
    pub messages_by_kind: BTreeMap<&'static str, u64>,
    /// Virtual ms the run lasted.
    pub virtual_ms: u64,
    /// Task starts.
    pub task_starts: u64,
    /// Claims written, summed over the nodes up at the end (a restarted node counts from its
    /// restart). Above one per instance start: nodes that claimed and lost the tie-break.
    pub claims_written: u64,
    /// Of those, claims on attempts whose earlier claims had all stopped counting.
    pub claims_replacing: u64,
    /// Fault episodes injected, by kind.
    pub faults_injected: BTreeMap<String, usize>,
    /// Each fault episode: what, when, for how long, which nodes. A function of the seed and
    /// the configuration's fault mix and size only, not of what the nodes do.
    pub fault_episodes: Vec<FaultEpisode>,
    /// The main structures' sizes at rest, summed over the nodes up at the end.
    pub footprint_at_rest: colony::engine::Footprint,
}

/// One fault episode a run injected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultEpisode {
    /// The fault's name (as `--faults` takes it).
    pub fault: &'static str,
    /// Virtual ms it started at.
    pub at_ms: u64,
    /// How long it lasted.
    pub duration_ms: u64,
    /// The nodes it singled out (a victim, a bridge, a cut's ends), by index.
    pub nodes: Vec<usize>,
}

impl RunResult {
    /// Whether every invariant held.
    pub fn ok(&self) -> bool {
        self.lost_jobs.is_empty()
            && self.converged
            && self.multi_owner_instances_at_rest == 0
            && self.capacity_violations == 0
            && self.false_deaths == 0
    }
}

/// A simulator event. `Submit` and `Stop` carry the node they go to, and `FaultStart` the seed
/// of the episode's own draws (length, victims), all drawn with the schedule: what the nodes
/// do before does not move them, so two builds run against the same workload and faults.
#[derive(Debug)]
enum Ev {
    Deliver { to: usize, from: usize, message: Message },
    Wake { node: usize },
    TaskExit { node: usize, boot: u64, task: String, code: i32 },
    Submit { job: usize, node: usize },
    Stop { job: usize, node: usize },
    FaultStart { fault: Fault, seed: u64 },
    FaultEnd { episode: u64 },
    Restart { node: usize },
    Unpause { node: usize },
    Fsync { node: usize },
    Heal,
    Check,
    Link { a: usize, b: usize, down: bool },
}

#[derive(Default)]
struct Disk {
    /// The last snapshot's records, shared by content like the log's: nodes holding a
    /// document in one state write one record for it, and at 1,000 nodes each node's
    /// snapshot is most of a copy of every other's.
    snapshot: Vec<Record>,
    records: Vec<Record>,
    /// Writes not yet synced, already shared by content: held as the node core handed them
    /// over, a wave of snapshots across 1,000 nodes was gigabytes until their fsyncs.
    pending: Vec<Write>,
    fsync_scheduled: bool,
}

/// A write waiting for its fsync.
enum Write {
    Records(Vec<Record>),
    Snapshot(Vec<Record>),
}

impl Disk {
    fn write(&mut self, output: Output, pool: &mut RecordPool) {
        match output {
            Output::Persist(records) => {
                self.pending.push(Write::Records(records.into_iter().map(|r| pool.intern(r)).collect()))
            }
            Output::Snapshot(records) => {
                self.pending.push(Write::Snapshot(records.0.into_iter().map(|r| pool.intern(r)).collect()))
            }
            _ => {}
        }
    }

    fn fsync(&mut self) {
        for write in self.pending.drain(..) {
            match write {
                Write::Records(records) => self.records.extend(records),
                Write::Snapshot(records) => {
                    self.snapshot = records;
                    self.records.clear();
                }
            }
        }
    }
}

/// One distinct record: where its bytes are in the pool's file. Shared by every disk that
/// holds it; the pool forgets it once no disk does.
type Record = Arc<Stored>;

struct Stored {
    /// Offset in the pool's file (moved when the file is compacted).
    offset: AtomicU64,
    len: u32,
}

/// Persisted records shared by content across the simulated disks, their bytes in a real
/// temporary file. Most records are one change pushed to every node, persisted alike by each:
/// at 1,000 nodes the disks held a thousand copies of each, a quarter of the simulator's
/// memory, and shared by content in memory the distinct ones still grew past 2 GB after a
/// heal (documents in as many states as nodes, snapshotted). Bytes are read back only when a
/// crashed node restarts. Sharing changes nothing a node sees (records are immutable), only
/// where the process keeps them.
struct RecordPool {
    /// Unnamed (unlinked at creation), so nothing is left behind however the process ends.
    file: std::fs::File,
    /// Its length, `buffer` included.
    file_len: u64,
    /// Appended bytes not yet written to the file, which start at `file_len - buffer.len()`.
    buffer: Vec<u8>,
    /// By content: XXH3-128 of the bytes. A collision among the ten million or so records of
    /// a 1,000-node run has a probability around 1e-25.
    records: HashMap<u128, Record, rustc_hash::FxBuildHasher>,
    /// Bytes of the records in `records`.
    live_bytes: u64,
    purge_at: usize,
    /// The file is rewritten only past this size.
    compact_from: u64,
}

/// Appended bytes go to the file in writes of about this size.
const POOL_BUFFER: usize = 4 << 20;

impl RecordPool {
    fn new() -> RecordPool {
        let file = tempfile::tempfile()
            .unwrap_or_else(|e| panic!("cannot create the simulated disks' file in the temporary directory: {e}"));
        RecordPool {
            file,
            file_len: 0,
            buffer: Vec::new(),
            records: HashMap::default(),
            live_bytes: 0,
            purge_at: 1 << 16,
            compact_from: 64 << 20,
        }
    }

    fn intern(&mut self, bytes: Vec<u8>) -> Record {
        let key = xxhash_rust::xxh3::xxh3_128(&bytes);
        if let Some(found) = self.records.get(&key) {
            return Arc::clone(found);
        }
        let record = Arc::new(Stored { offset: AtomicU64::new(self.file_len), len: bytes.len() as u32 });
        self.append(&bytes);
        self.live_bytes += bytes.len() as u64;
        self.records.insert(key, Arc::clone(&record));
        if self.records.len() > self.purge_at {
            self.purge();
            self.purge_at = (self.records.len() * 2).max(1 << 16);
        }
        record
    }

    fn append(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
        self.file_len += bytes.len() as u64;
        if self.buffer.len() >= POOL_BUFFER {
            self.flush();
        }
    }

    fn flush(&mut self) {
        use std::io::Write as _;
        self.file.write_all(&self.buffer).unwrap_or_else(|e| panic!("cannot write the simulated disks' file: {e}"));
        self.buffer.clear();
    }

    /// A record's bytes.
    fn read(&self, record: &Stored) -> Vec<u8> {
        use std::os::unix::fs::FileExt as _;
        let offset = record.offset.load(Ordering::Relaxed);
        let buffered_from = self.file_len - self.buffer.len() as u64;
        let mut out = vec![0; record.len as usize];
        if offset >= buffered_from {
            let at = (offset - buffered_from) as usize;
            let len = out.len();
            out.copy_from_slice(&self.buffer[at..at + len]);
        } else {
            self.file
                .read_exact_at(&mut out, offset)
                .unwrap_or_else(|e| panic!("cannot read the simulated disks' file: {e}"));
        }
        out
    }

    /// Forgets records no disk holds any more (each node drops its log at a snapshot), and
    /// rewrites the file with only the rest once they are under half of it.
    fn purge(&mut self) {
        self.records.retain(|_, r| Arc::strong_count(r) > 1);
        self.live_bytes = self.records.values().map(|r| u64::from(r.len)).sum();
        if self.file_len < self.compact_from || self.file_len < 2 * self.live_bytes {
            return;
        }
        let mut next = RecordPool::new();
        for record in self.records.values() {
            let bytes = self.read(record);
            record.offset.store(next.file_len, Ordering::Relaxed);
            next.append(&bytes);
        }
        next.records = std::mem::take(&mut self.records);
        next.live_bytes = self.live_bytes;
        next.purge_at = self.purge_at;
        next.compact_from = self.compact_from;
        *self = next;
    }
}

struct RunningTask {
    job: String,
    index: u32,
    resources: Resources,
    stopping: bool,
}

struct SimNode {
    id: String,
    engine: Option<Engine>,
    boot: u64,
    disk: Disk,
    paused_until: Option<u64>,
    wake_at: Option<u64>,
    tasks: BTreeMap<String, RunningTask>,
}

#[derive(Default, Clone)]
struct NetState {
    loss: f64,
    extra_delay_ms: u64,
    duplicate: f64,
    jitter_ms: u64,
    /// Partition group per node; `None` = no partition. Group u32::MAX reaches every group.
    groups: Option<Vec<u32>>,
    /// Majorities ring: each node reaches nodes within this ring distance.
    ring_reach: Option<usize>,
    cuts: BTreeSet<(usize, usize)>,
}

struct Workload {
    spec: JobSpec,
    fail_attempts: u32,
    duration_ms: u64,
}

/// A single simulation run.
///
/// Events run in order of (virtual time, scheduling sequence). A node core's work on a
/// message, a timer or a task exit touches only that node, so the events due at one virtual
/// millisecond run as segments: a segment is the run of such events up to the next event that
/// is not a node core's (a submission, a fault, a restart, a check: a barrier, run on its
/// own). A segment runs in three phases:
/// 1. in order, decide for each event what the one-at-a-time loop would have done with it
///    (wait for a paused node, drop a message across a cut, skip a stale timer, or call a
///    node core); nothing a segment's events do changes these decisions, since messages and
///    timers they cause are due a millisecond later at the earliest;
/// 2. make the node-core calls, each node's in order, different nodes on different threads,
///    keeping each call's outputs and the node's next timeout and counters just after it;
/// 3. in order again, do with those outputs exactly what the one-at-a-time loop did (draw
///    loss and delay from the run's RNG, schedule deliveries, account tasks and disks).
///
/// Every RNG draw and every scheduling sequence number is therefore the same as running the
/// events one at a time, and a run's result is the same for any number of threads. The
/// node cores share only [`SharedStates`], a cache whose hits equal the work they save.
pub struct Sim {
    config: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    /// Events by slot; a slot is free again once its event has run (`free_slots`). The queue
    /// orders by (time, sequence), never by slot.
    events: Vec<Option<Ev>>,
    free_slots: Vec<usize>,
    nodes: Vec<SimNode>,
    net: NetState,
    active_faults: BTreeMap<u64, (Fault, Vec<usize>)>,
    episode: u64,
    workload: Vec<Workload>,
    acked: BTreeMap<String, usize>,
    stopped_jobs: BTreeSet<String>,
    job_ids: BTreeMap<usize, String>,
    completions: BTreeMap<(String, u32), u32>,
    starts: BTreeMap<(String, u32, u32), u32>,
    heal_at: Option<u64>,
    healthy_since: u64,
    deaths_by_node: BTreeMap<usize, u64>,
    result: RunResult,
    pool: RecordPool,
    /// Cold document states shared by this run's nodes (see `colony_crdt::SharedStates`):
    /// every node reaches the same states of the same documents, and loading, applying and
    /// encoding each once per node was most of a 1,000-node run. One per run, so a run stays
    /// a function of its seed.
    states: Arc<SharedStates>,
    /// Node ids by index (the same as `nodes[i].id`): borrowed by node cores running in
    /// parallel while `nodes` is borrowed mutably.
    ids: Vec<String>,
    /// Runs a segment's node-core calls on `config.threads` threads; `None` for one.
    workers: Option<rayon::ThreadPool>,
    /// Per node, the node-core calls of the current segment (kept to reuse the vectors).
    calls: Vec<Vec<(usize, Call)>>,
}

/// A node-core call of a segment (see [`Sim`]).
enum Call {
    Message { from: usize, message: Message },
    Timeout,
    TaskExited { task: String, code: i32 },
}

impl Call {
    /// Makes the call, and keeps what the one-at-a-time loop would have read right after it.
    fn run(self, engine: &mut Engine, now: u64, ids: &[String]) -> Done {
        match self {
            Call::Message { from, message } => engine.handle_message(now, &ids[from], message),
            Call::Timeout => engine.handle_timeout(now),
            Call::TaskExited { task, code } => engine.handle_task_exited(now, &task, code),
        }
        Done::take(engine)
    }
}

/// What a node-core call left: its outputs, then the node's next timeout and death
/// certificates written so far.
struct Done {
    outputs: Vec<Output>,
    timeout: u64,
    deaths_written: u64,
}

impl Done {
    fn take(engine: &mut Engine) -> Done {
        let mut outputs = Vec::new();
        while let Some(output) = engine.poll_output() {
            outputs.push(output);
        }
        Done { outputs, timeout: engine.poll_timeout(), deaths_written: engine.counters().deaths_written }
    }
}

/// What phase 3 of a segment does with one event (see [`Sim`]).
enum Plan {
    /// Nothing: a message across a cut or to a node that is down, a stale timer, an exit of
    /// a task that is gone.
    Skip,
    /// The node is paused: the event waits until it resumes, in its original order.
    Wait {
        until: u64,
        ev: Ev,
    },
    Deliver {
        to: usize,
        kind: &'static str,
    },
    /// `called`: the node is up, so its core handled the timeout.
    Wake {
        node: usize,
        called: bool,
    },
    TaskExit {
        node: usize,
        task: String,
        code: i32,
    },
    Fsync {
        node: usize,
    },
}

/// Below this many node-core calls a segment runs on the calling thread: handing a few calls
/// to the pool costs more than it saves. Speed only.
const PARALLEL_CALLS: usize = 8;

const DEFAULT_LATENCY_MS: u64 = 1;

impl Sim {
    /// Sets a run up.
    pub fn new(config: SimConfig) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let nodes: Vec<SimNode> = (0..config.nodes)
            .map(|i| SimNode {
                id: format!("node-{i:04}"),
                engine: None,
                boot: 0,
                disk: Disk::default(),
                paused_until: None,
                wake_at: None,
                tasks: BTreeMap::new(),
            })
            .collect();
        let workload = (0..config.jobs).map(|j| make_workload(&mut rng, &config, j)).collect();
        let result = RunResult { seed: config.seed, ..RunResult::default() };
        let ids: Vec<String> = nodes.iter().map(|n: &SimNode| n.id.clone()).collect();
        // A pool that cannot start (no threads left) only costs speed.
        let workers = (config.threads > 1)
            .then(|| rayon::ThreadPoolBuilder::new().num_threads(config.threads).build().ok())
            .flatten();
        Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            free_slots: Vec::new(),
            nodes,
            net: NetState::default(),
            active_faults: BTreeMap::new(),
            episode: 0,
            workload,
            acked: BTreeMap::new(),
            stopped_jobs: BTreeSet::new(),
            job_ids: BTreeMap::new(),
            completions: BTreeMap::new(),
            starts: BTreeMap::new(),
            heal_at: None,
            healthy_since: 0,
            deaths_by_node: BTreeMap::new(),
            result,
            pool: RecordPool::new(),
            states: Arc::default(),
            calls: (0..config.nodes).map(|_| Vec::new()).collect(),
            ids,
            workers,
            config,
        }
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.events[slot] = Some(ev);
                slot
            }
            None => {
                self.events.push(Some(ev));
                self.events.len() - 1
            }
        };
        self.queue.push(Reverse((at, self.seq, slot)));
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.config.trace {
            eprintln!("[{:>7} ms] {}", self.now, what());
        }
    }

    fn node_config(&self, i: usize) -> EngineConfig {
        let mut c = EngineConfig::new(format!("n{i}"), self.config.capacity);
        c.timing = self.config.timing.clone();
        c.retention = self.config.retention.clone();
        c
    }

    fn boot_node(&mut self, i: usize) {
        let seed = self.rng.gen();
        let config = self.node_config(i);
        let node = &mut self.nodes[i];
        node.boot += 1;
        // The snapshot's records replay like the log's, ahead of them.
        let pool = &self.pool;
        let records: Vec<Vec<u8>> = node.disk.snapshot.iter().chain(&node.disk.records).map(|r| pool.read(r)).collect();
        let restored = if node.boot == 1 { None } else { Some((None, &records[..])) };
        let states = Some(self.states.clone());
        let engine = Engine::new_sharing(node.id.clone(), config, seed, self.now, restored, states)
            .unwrap_or_else(|e| panic!("node {i} failed to restore its own durable state: {e}"));
        node.engine = Some(engine);
        node.wake_at = None;
        let ids: Vec<String> = self.nodes.iter().map(|n| n.id.clone()).collect();
        for (j, id) in ids.iter().enumerate() {
            if j != i {
                if let Some(e) = self.nodes[i].engine.as_mut() {
                    e.handle_peer_up(self.now, id.clone());
                }
            }
        }
        self.drain_outputs(i);
    }

    /// Runs to the end and returns what the checkers found.
    pub fn run(mut self) -> RunResult {
        for i in 0..self.nodes.len() {
            self.boot_node(i);
        }
        // Workload and faults are drawn here, from the seed alone: what happens to the nodes
        // (and so the draws for message loss and delay) does not move them.
        // Workload: submissions spread over the fault phase, each to a random node.
        let phase = self.config.fault_phase_ms;
        let n = self.nodes.len();
        for job in 0..self.workload.len() {
            let at = self.rng.gen_range(100..phase.max(200));
            let node = self.rng.gen_range(0..n);
            self.schedule(at, Ev::Submit { job, node });
            if self.rng.gen_bool(self.config.stop_share) {
                let delay = self.rng.gen_range(200..3_000);
                let node = self.rng.gen_range(0..n);
                self.schedule(at + delay, Ev::Stop { job, node });
            }
        }
        // Faults: episodes one after another with quiet gaps, each kind drawn from the mix.
        if !self.config.faults.is_empty() {
            let mut t = 1_000;
            while t + 1_000 < phase {
                let fault = self.config.faults[self.rng.gen_range(0..self.config.faults.len())];
                let seed = self.rng.gen();
                self.schedule(t, Ev::FaultStart { fault, seed });
                t += self.rng.gen_range(3_000..8_000);
            }
        }
        self.schedule(phase, Ev::Heal);
        self.run_events();
        self.finish()
    }

    /// The main structures' sizes, summed over the nodes up now.
    fn footprint(&self) -> colony::engine::Footprint {
        let mut total = colony::engine::Footprint::default();
        for engine in self.engines() {
            total += engine.footprint();
        }
        total
    }

    /// Totals over live nodes of what dominates memory: for finding what grows in long runs.
    fn memory_report(&self) -> String {
        let (mut disk, mut records) = (0usize, 0usize);
        for n in &self.nodes {
            disk += n.disk.snapshot.iter().map(|r| r.len as usize).sum::<usize>()
                + n.disk.records.iter().map(|r| r.len as usize).sum::<usize>();
            records += n.disk.records.len();
        }
        let t = self.footprint();
        let unique = self.pool.live_bytes as usize;
        let job_states = self.states.job_states();
        format!(
            "disk {} MB in {} records ({} MB in {} distinct); job docs {} ({} live), cold {} MB, {} states kept loaded, {} job states ({} MB, {} hashes); tombstones {}; sync sessions {}; cached jobs {}; pending {}; timers {}; queued events {}",
            disk >> 20,
            records,
            unique >> 20,
            self.pool.records.len(),
            t.job_documents,
            t.live_job_documents,
            t.cold_bytes >> 20,
            self.states.kept_live(),
            job_states.0,
            job_states.1 >> 20,
            job_states.2,
            t.tombstones,
            t.sync_sessions,
            t.cached_jobs,
            t.pending_since,
            t.timers,
            self.queue.len()
        )
    }

    fn run_events(&mut self) {
        let started = std::time::Instant::now();
        let mut last_report = started;
        let mut last_memory_report: Option<std::time::Instant> = None;
        let mut events: u64 = 0;
        let mut segment: Vec<Ev> = Vec::new();
        while let Some(&Reverse((at, _, _))) = self.queue.peek() {
            if let Some(heal) = self.heal_at {
                if at > heal + self.config.max_liveness_ms {
                    break;
                }
            }
            self.now = at;
            // The events due now, up to the first barrier.
            let mut barrier = None;
            while let Some(&Reverse((due, _, slot))) = self.queue.peek() {
                if due != at {
                    break;
                }
                self.queue.pop();
                events += 1;
                self.free_slots.push(slot);
                let Some(ev) = self.events[slot].take() else { continue };
                if matches!(ev, Ev::Deliver { .. } | Ev::Wake { .. } | Ev::TaskExit { .. } | Ev::Fsync { .. }) {
                    segment.push(ev);
                } else {
                    barrier = Some(ev);
                    break;
                }
            }
            self.run_segment(&mut segment);
            if let Some(ev) = barrier {
                if self.step(ev) {
                    break;
                }
            }
            if self.config.progress && last_report.elapsed().as_secs() >= 5 {
                last_report = std::time::Instant::now();
                let phase = if self.heal_at.is_some() { "liveness" } else { "faults" };
                eprintln!(
                    "seed {}: {phase} phase, virtual {:.1} s, {} events, {} messages {:?}, {} task starts, {} claims ({} replacing), {:.0} s wall",
                    self.config.seed,
                    self.now as f64 / 1000.0,
                    events,
                    self.result.messages,
                    self.result.messages_by_kind,
                    self.result.task_starts,
                    self.engines().map(|e| e.counters().claims).sum::<u64>(),
                    self.engines().map(|e| e.counters().claims_replacing).sum::<u64>(),
                    started.elapsed().as_secs_f64()
                );
                // Walks every node's tables: once a minute, not with every progress line (at
                // 1,000 nodes it was 3% of the run).
                if last_memory_report.is_none_or(|at: std::time::Instant| at.elapsed().as_secs() >= 60) {
                    last_memory_report = Some(std::time::Instant::now());
                    eprintln!("seed {}: memory: {}", self.config.seed, self.memory_report());
                }
            }
        }
    }

    /// Runs a segment: events due now that only a node core handles (see [`Sim`]).
    fn run_segment(&mut self, segment: &mut Vec<Ev>) {
        if segment.is_empty() {
            return;
        }
        // Phase 1: what the one-at-a-time loop would do with each event. Within a segment no
        // pause, crash, restart or cut changes (those are barriers), and a wake timer due now
        // is only ever cleared, by the node's own wake; a task only ever leaves by its exit.
        let mut plans: Vec<Plan> = Vec::with_capacity(segment.len());
        let mut woken: Vec<usize> = Vec::new();
        let mut exited: Vec<(usize, String)> = Vec::new();
        let mut calls = std::mem::take(&mut self.calls);
        let mut n_calls = 0;
        for (i, ev) in segment.drain(..).enumerate() {
            let node = match &ev {
                Ev::Deliver { to, .. } => Some(*to),
                Ev::Wake { node } | Ev::TaskExit { node, .. } => Some(*node),
                _ => None,
            };
            if let Some(until) = node.and_then(|n| self.nodes[n].paused_until) {
                plans.push(Plan::Wait { until, ev });
                continue;
            }
            let plan = match ev {
                Ev::Deliver { to, from, message } => {
                    if !self.reachable(from, to) || from == to || self.nodes[to].engine.is_none() {
                        Plan::Skip
                    } else {
                        let kind = match &message {
                            Message::Changes { doc: DocId::Node(_), .. } => "node_changes",
                            m => m.kind(),
                        };
                        calls[to].push((i, Call::Message { from, message }));
                        Plan::Deliver { to, kind }
                    }
                }
                Ev::Wake { node } => {
                    if self.nodes[node].wake_at != Some(self.now) || woken.contains(&node) {
                        Plan::Skip
                    } else {
                        woken.push(node);
                        let called = self.nodes[node].engine.is_some();
                        if called {
                            calls[node].push((i, Call::Timeout));
                        }
                        Plan::Wake { node, called }
                    }
                }
                Ev::TaskExit { node, boot, task, code } => {
                    let n = &self.nodes[node];
                    let gone = exited.iter().any(|(x, t)| *x == node && *t == task);
                    if n.boot != boot || n.engine.is_none() || gone || !n.tasks.contains_key(&task) {
                        Plan::Skip
                    } else {
                        exited.push((node, task.clone()));
                        calls[node].push((i, Call::TaskExited { task: task.clone(), code }));
                        Plan::TaskExit { node, task, code }
                    }
                }
                Ev::Fsync { node } => Plan::Fsync { node },
                // INVARIANT: `run_events` puts only the four kinds above in a segment.
                other => unreachable!("a barrier in a segment: {other:?}"),
            };
            if matches!(plan, Plan::Deliver { .. } | Plan::Wake { called: true, .. } | Plan::TaskExit { .. }) {
                n_calls += 1;
            }
            plans.push(plan);
        }

        // Phase 2: the node-core calls, each node's in order.
        let now = self.now;
        let ids = &self.ids;
        let work = |node: &mut SimNode, calls: &mut Vec<(usize, Call)>| -> Vec<(usize, Done)> {
            // INVARIANT: phase 1 made calls only to nodes that are up.
            let engine = node.engine.as_mut().expect("calls go to nodes that are up");
            calls.drain(..).map(|(i, call)| (i, call.run(engine, now, ids))).collect()
        };
        let done: Vec<(usize, Done)> = match &self.workers {
            Some(pool) if n_calls >= PARALLEL_CALLS => {
                use rayon::prelude::*;
                let nodes = &mut self.nodes;
                pool.install(|| {
                    nodes
                        .par_iter_mut()
                        .zip(calls.par_iter_mut())
                        .filter(|(_, c)| !c.is_empty())
                        .flat_map_iter(|(node, c)| work(node, c))
                        .collect()
                })
            }
            _ => self
                .nodes
                .iter_mut()
                .zip(calls.iter_mut())
                .filter(|(_, c)| !c.is_empty())
                .flat_map(|(node, c)| work(node, c))
                .collect(),
        };
        self.calls = calls;
        let mut results: Vec<Option<Done>> = (0..plans.len()).map(|_| None).collect();
        for (i, d) in done {
            results[i] = Some(d);
        }

        // Phase 3: in order, what the one-at-a-time loop did after each call.
        for (plan, done) in plans.into_iter().zip(results) {
            match plan {
                Plan::Skip => {}
                Plan::Wait { until, ev } => self.schedule(until, ev),
                Plan::Deliver { to, kind } => {
                    self.result.messages += 1;
                    *self.result.messages_by_kind.entry(kind).or_default() += 1;
                    self.apply_outputs(to, done);
                }
                Plan::Wake { node, called } => {
                    self.nodes[node].wake_at = None;
                    if called {
                        self.apply_outputs(node, done);
                    }
                }
                Plan::TaskExit { node, task, code } => {
                    // INVARIANT: phase 1 saw the task, and only its own exit removes it.
                    let t = self.nodes[node].tasks.remove(&task).expect("the exiting task is running");
                    if code == 0 && !t.stopping {
                        *self.completions.entry((t.job.clone(), t.index)).or_default() += 1;
                    }
                    self.apply_outputs(node, done);
                }
                Plan::Fsync { node } => {
                    self.nodes[node].disk.fsync();
                    self.nodes[node].disk.fsync_scheduled = false;
                }
            }
        }
    }

    /// Runs a barrier: an event that is not a node core's message, timer or task exit.
    fn step(&mut self, ev: Ev) -> bool {
        match ev {
            Ev::Deliver { .. } | Ev::Wake { .. } | Ev::TaskExit { .. } | Ev::Fsync { .. } => {
                // INVARIANT: `run_events` runs these in segments.
                unreachable!("a segment's event run as a barrier: {ev:?}")
            }
            Ev::Submit { job, node } => self.submit(job, node),
            Ev::Stop { job, node } => self.stop(job, node),
            Ev::FaultStart { fault, seed } => self.fault_start(fault, seed),
            Ev::FaultEnd { episode } => self.fault_end(episode),
            Ev::Restart { node } => {
                if self.nodes[node].engine.is_none() {
                    self.trace(|| format!("restart n{node}"));
                    self.boot_node(node);
                    self.healthy_since = self.healthy_since.max(self.now);
                }
            }
            Ev::Unpause { node } => {
                if self.nodes[node].paused_until.take().is_some() {
                    self.trace(|| format!("resume n{node}"));
                    self.healthy_since = self.healthy_since.max(self.now);
                    self.reschedule_wake(node);
                }
            }
            Ev::Heal => self.heal(),
            Ev::Link { a, b, down } => {
                if self.heal_at.is_none() {
                    if down {
                        self.net.cuts.insert((a, b));
                        self.net.cuts.insert((b, a));
                    } else {
                        self.net.cuts.remove(&(a, b));
                        self.net.cuts.remove(&(b, a));
                    }
                }
            }
            Ev::Check => return self.check(),
        }
        false
    }

    fn reschedule_wake(&mut self, node: usize) {
        let Some(engine) = self.nodes[node].engine.as_ref() else { return };
        self.reschedule_wake_to(node, engine.poll_timeout());
    }

    fn reschedule_wake_to(&mut self, node: usize, timeout: u64) {
        let at = timeout.max(self.now + 1);
        if self.nodes[node].wake_at.is_none_or(|w| at < w || w < self.now) {
            self.nodes[node].wake_at = Some(at);
            self.schedule(at, Ev::Wake { node });
        }
    }

    fn submit(&mut self, job: usize, node: usize) {
        let up = self.nodes[node].engine.is_some() && self.nodes[node].paused_until.is_none();
        if !up {
            self.result.unacknowledged += 1;
            return;
        }
        let spec = self.workload[job].spec.clone();
        let now = self.now;
        let Some(engine) = self.nodes[node].engine.as_mut() else { return };
        match engine.submit(now, spec) {
            Ok(id) => {
                self.drain_outputs(node);
                // The acknowledgement waits for fsync, as in the daemon.
                self.nodes[node].disk.fsync();
                self.trace(|| format!("submit job {job} as {id} on n{node}"));
                self.acked.insert(id.clone(), job);
                self.job_ids.insert(job, id);
                self.result.acknowledged += 1;
            }
            Err(_) => self.result.unacknowledged += 1,
        }
    }

    fn stop(&mut self, job: usize, node: usize) {
        let Some(id) = self.job_ids.get(&job).cloned() else { return };
        if self.nodes[node].paused_until.is_some() {
            return;
        }
        let now = self.now;
        let Some(engine) = self.nodes[node].engine.as_mut() else { return };
        if engine.stop_job(now, &id).is_ok() {
            self.drain_outputs(node);
            self.nodes[node].disk.fsync();
            self.stopped_jobs.insert(id);
        }
    }

    fn drain_outputs(&mut self, node: usize) {
        let Some(engine) = self.nodes[node].engine.as_mut() else { return };
        let done = Done::take(engine);
        self.apply_outputs(node, Some(done));
    }

    /// Does what a node core's outputs ask, then notes its death certificates and its next
    /// timeout as they were just after the call.
    fn apply_outputs(&mut self, node: usize, done: Option<Done>) {
        // INVARIANT: phase 2 ran every call that phase 1 planned.
        let done = done.expect("every planned call was made");
        for output in done.outputs {
            match output {
                Output::Persist(_) | Output::Snapshot(_) => {
                    let disk = &mut self.nodes[node].disk;
                    disk.write(output, &mut self.pool);
                    if !disk.fsync_scheduled {
                        disk.fsync_scheduled = true;
                        self.schedule(self.now + 20, Ev::Fsync { node });
                    }
                }
                Output::Send { to, message } => self.send(node, &to, message),
                Output::StartTask(start) => {
                    let used = self.nodes[node].tasks.values().fold(Resources::default(), |a, t| a.plus(t.resources));
                    if !self.config.capacity.minus(used).fits(start.spec.resources) {
                        self.result.capacity_violations += 1;
                    }
                    *self.starts.entry((start.job.clone(), start.index, start.attempt)).or_default() += 1;
                    self.result.task_starts += 1;
                    let work = self
                        .acked
                        .get(&start.job)
                        .map(|j| (&self.workload[*j].fail_attempts, self.workload[*j].duration_ms));
                    let (fail_attempts, duration) = match work {
                        Some((f, d)) => (*f, d),
                        None => (0, 500),
                    };
                    let boot = self.nodes[node].boot;
                    self.nodes[node].tasks.insert(
                        start.task.clone(),
                        RunningTask {
                            job: start.job.clone(),
                            index: start.index,
                            resources: start.spec.resources,
                            stopping: false,
                        },
                    );
                    if start.spec.kind == JobKind::Batch {
                        let code = if start.attempt < fail_attempts { 1 } else { 0 };
                        self.schedule(self.now + duration, Ev::TaskExit { node, boot, task: start.task, code });
                    }
                }
                Output::StopTask { task } => {
                    let boot = self.nodes[node].boot;
                    if let Some(t) = self.nodes[node].tasks.get_mut(&task) {
                        t.stopping = true;
                        self.schedule(self.now + 5, Ev::TaskExit { node, boot, task, code: 143 });
                    }
                }
                Output::Event(_) => {}
            }
        }
        self.check_false_deaths(node, done.deaths_written);
        self.reschedule_wake_to(node, done.timeout);
    }

    /// A node that writes a death certificate while every node is up, unpaused and reachable,
    /// and has been for the grace period (detection time plus slack), accused a live node.
    fn check_false_deaths(&mut self, node: usize, written: u64) {
        const GRACE_MS: u64 = 5_000;
        let seen = self.deaths_by_node.entry(node).or_insert(written);
        if written > *seen {
            let healthy = self.active_faults.is_empty()
                && self.nodes.iter().all(|n| n.engine.is_some() && n.paused_until.is_none())
                && self.now >= self.healthy_since + GRACE_MS;
            if healthy || self.config.faults.is_empty() {
                self.result.false_deaths += (written - *seen) as usize;
                self.trace(|| format!("FALSE DEATH written by n{node}"));
            }
        }
        self.deaths_by_node.insert(node, written);
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        id.strip_prefix("node-").and_then(|s| s.parse().ok()).filter(|i: &usize| *i < self.nodes.len())
    }

    fn send(&mut self, from: usize, to: &str, message: Message) {
        let Some(to) = self.index_of(to) else { return };
        if !self.reachable(from, to) || (self.net.loss > 0.0 && self.rng.gen_bool(self.net.loss)) {
            return;
        }
        let jitter = if self.net.jitter_ms > 0 { self.rng.gen_range(0..=self.net.jitter_ms) } else { 0 };
        let delay = DEFAULT_LATENCY_MS + self.net.extra_delay_ms + jitter;
        if self.net.duplicate > 0.0 && self.rng.gen_bool(self.net.duplicate) {
            let extra = self.rng.gen_range(0..50);
            self.schedule(self.now + delay + extra, Ev::Deliver { to, from, message: message.clone() });
        }
        self.schedule(self.now + delay, Ev::Deliver { to, from, message });
    }

    fn reachable(&self, from: usize, to: usize) -> bool {
        if self.net.cuts.contains(&(from, to)) {
            return false;
        }
        if let Some(groups) = &self.net.groups {
            let (a, b) = (groups[from], groups[to]);
            if a != b && a != u32::MAX && b != u32::MAX {
                return false;
            }
        }
        if let Some(reach) = self.net.ring_reach {
            let n = self.nodes.len();
            let d = from.abs_diff(to);
            if d.min(n - d) > reach {
                return false;
            }
        }
        true
    }

    fn random_live_node(&self, rng: &mut ChaCha8Rng) -> Option<usize> {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].engine.is_some() && self.nodes[*i].paused_until.is_none())
            .collect();
        if live.is_empty() {
            return None;
        }
        Some(live[rng.gen_range(0..live.len())])
    }

    fn fault_start(&mut self, fault: Fault, seed: u64) {
        if self.heal_at.is_some() {
            return;
        }
        self.episode += 1;
        let episode = self.episode;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = self.nodes.len();
        let duration = rng.gen_range(1_000..4_000);
        *self.result.faults_injected.entry(fault.name().to_string()).or_default() += 1;
        let mut touched = Vec::new();
        let mut singled = Vec::new();
        match fault {
            Fault::Loss => self.net.loss = rng.gen_range(0.05..0.30),
            Fault::Delay => self.net.extra_delay_ms = rng.gen_range(20..300),
            Fault::Duplicate => self.net.duplicate = rng.gen_range(0.05..0.3),
            Fault::Reorder => self.net.jitter_ms = rng.gen_range(20..200),
            Fault::Halves => {
                let cut = n / 2;
                let mut order: Vec<usize> = (0..n).collect();
                shuffle(&mut rng, &mut order);
                let mut groups = vec![0; n];
                for (k, i) in order.iter().enumerate() {
                    groups[*i] = u32::from(k >= cut.max(1));
                }
                self.net.groups = Some(groups);
            }
            Fault::Isolate => {
                let victim = rng.gen_range(0..n);
                singled.push(victim);
                let mut groups = vec![0; n];
                groups[victim] = 1;
                self.net.groups = Some(groups);
            }
            Fault::Bridge => {
                let mut groups: Vec<u32> = (0..n).map(|i| (i % 2) as u32).collect();
                let bridge = rng.gen_range(0..n);
                singled.push(bridge);
                groups[bridge] = u32::MAX;
                self.net.groups = Some(groups);
            }
            Fault::Ring => {
                let visible = n / 2 + 1;
                self.net.ring_reach = Some((visible / 2).max(1));
            }
            Fault::OneWay => {
                if n >= 2 {
                    let a = rng.gen_range(0..n);
                    let b = (a + rng.gen_range(1..n)) % n;
                    singled.extend([a, b]);
                    self.net.cuts.insert((a, b));
                }
            }
            Fault::Flap => {
                if n >= 2 {
                    let a = rng.gen_range(0..n);
                    let b = (a + rng.gen_range(1..n)) % n;
                    singled.extend([a, b]);
                    let mut t = self.now;
                    let mut down = true;
                    while t < self.now + duration {
                        self.schedule(t, Ev::Link { a, b, down });
                        t += rng.gen_range(100..600);
                        down = !down;
                    }
                    self.schedule(self.now + duration, Ev::Link { a, b, down: false });
                }
            }
            Fault::Crash => {
                if let Some(victim) = self.random_live_node(&mut rng) {
                    self.trace(|| format!("crash n{victim}"));
                    let node = &mut self.nodes[victim];
                    node.engine = None;
                    node.disk.pending.clear(); // unsynced writes are lost
                    node.tasks.clear(); // its processes die with it
                    node.wake_at = None;
                    touched.push(victim);
                    self.schedule(self.now + duration, Ev::Restart { node: victim });
                }
            }
            Fault::Pause => {
                if let Some(victim) = self.random_live_node(&mut rng) {
                    self.trace(|| format!("pause n{victim}"));
                    self.nodes[victim].paused_until = Some(self.now + duration);
                    touched.push(victim);
                    self.schedule(self.now + duration, Ev::Unpause { node: victim });
                }
            }
        }
        self.trace(|| format!("fault {} for {duration} ms", fault.name()));
        if self.config.progress {
            // A run's speed changes with its faults: say when each comes and goes.
            eprintln!(
                "seed {}: fault {} from virtual {:.1} s for {:.1} s",
                self.config.seed,
                fault.name(),
                self.now as f64 / 1000.0,
                duration as f64 / 1000.0
            );
        }
        singled.extend(&touched);
        self.result.fault_episodes.push(FaultEpisode {
            fault: fault.name(),
            at_ms: self.now,
            duration_ms: duration,
            nodes: singled,
        });
        self.active_faults.insert(episode, (fault, touched));
        self.schedule(self.now + duration, Ev::FaultEnd { episode });
    }

    fn fault_end(&mut self, episode: u64) {
        let Some((fault, _)) = self.active_faults.remove(&episode) else { return };
        match fault {
            Fault::Loss => self.net.loss = 0.0,
            Fault::Delay => self.net.extra_delay_ms = 0,
            Fault::Duplicate => self.net.duplicate = 0.0,
            Fault::Reorder => self.net.jitter_ms = 0,
            Fault::Halves | Fault::Isolate | Fault::Bridge => self.net.groups = None,
            Fault::Ring => self.net.ring_reach = None,
            Fault::OneWay => self.net.cuts.clear(),
            Fault::Crash | Fault::Pause | Fault::Flap => {} // restart/unpause/link events end these
        }
        if self.active_faults.is_empty() {
            self.healthy_since = self.now;
        }
        self.trace(|| format!("fault {} ends", fault.name()));
    }

    fn heal(&mut self) {
        self.trace(|| "heal: liveness phase".into());
        self.net = NetState::default();
        self.active_faults.clear();
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused_until.take().is_some() {
                self.reschedule_wake(i);
            }
            if self.nodes[i].engine.is_none() {
                self.boot_node(i);
            }
        }
        self.heal_at = Some(self.now);
        self.healthy_since = self.now;
        self.schedule(self.now + 100, Ev::Check);
    }

    fn digests_equal(&self) -> bool {
        let mut digests = self.engines().map(|e| e.digest());
        let Some(first) = digests.next() else { return true };
        digests.all(|d| d == first)
    }

    fn running_copies(&self) -> BTreeMap<(String, u32), Vec<usize>> {
        let mut out: BTreeMap<(String, u32), Vec<usize>> = BTreeMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for t in node.tasks.values() {
                if !t.stopping {
                    out.entry((t.job.clone(), t.index)).or_default().push(i);
                }
            }
        }
        out
    }

    fn lost_jobs(&self) -> Vec<String> {
        let running = self.running_copies();
        let mut lost = Vec::new();
        for (id, j) in &self.acked {
            if self.stopped_jobs.contains(id) {
                continue;
            }
            let spec = &self.workload[*j].spec;
            let complete = (0..spec.count).all(|i| match spec.kind {
                JobKind::Batch => self.completions.get(&(id.clone(), i)).is_some_and(|c| *c > 0),
                JobKind::Service => running.contains_key(&(id.clone(), i)),
            });
            if !complete {
                lost.push(id.clone());
            }
        }
        lost
    }

    fn check(&mut self) -> bool {
        let heal = self.heal_at.unwrap_or(0);
        let converged = self.digests_equal();
        if converged && self.result.convergence_ms.is_none() {
            self.result.convergence_ms = Some(self.now - heal);
        }
        if !converged {
            self.result.convergence_ms = None;
        }
        let rest = converged && self.lost_jobs().is_empty() && self.multi_owner() == 0 && self.all_stops_done();
        if rest {
            return true;
        }
        self.schedule(self.now + 100, Ev::Check);
        false
    }

    fn all_stops_done(&self) -> bool {
        self.nodes.iter().all(|n| n.tasks.values().all(|t| !self.stopped_jobs.contains(&t.job) || t.stopping))
    }

    /// The node cores up now.
    fn engines(&self) -> impl Iterator<Item = &Engine> {
        self.nodes.iter().filter_map(|n| n.engine.as_ref())
    }

    fn multi_owner(&self) -> usize {
        let running = self.running_copies();
        let mut bad = 0;
        for ((job, index), nodes) in &running {
            if nodes.len() > 1 {
                bad += 1;
                continue;
            }
            // The single copy must be the table's winner, on every node's view.
            let Some(view) = self.nodes.iter().find_map(|n| n.engine.as_ref()).and_then(|e| e.job_json(job)) else {
                continue;
            };
            let owner = view.instances.get(*index as usize).and_then(|i| i.node_id.clone());
            if owner.as_deref() != Some(self.nodes[nodes[0]].id.as_str()) && !self.stopped_jobs.contains(job) {
                bad += 1;
            }
        }
        bad
    }

    fn finish(mut self) -> RunResult {
        self.result.converged = self.digests_equal();
        if !self.result.converged && self.config.trace {
            // Which documents differ, and how each variant is held: what an unconverged seed needs.
            let live: Vec<usize> = (0..self.nodes.len()).filter(|i| self.nodes[*i].engine.is_some()).collect();
            let all: Vec<usize> = (0..colony_crdt::BUCKETS).collect();
            let mut by_doc: BTreeMap<colony_crdt::DocId, BTreeMap<u64, Vec<usize>>> = BTreeMap::new();
            for &i in &live {
                let t = self.nodes[i].engine.as_ref().expect("live").table();
                for (doc, hash) in t.summary(&all) {
                    by_doc.entry(doc).or_default().entry(hash).or_default().push(i);
                }
            }
            let differing: Vec<_> = by_doc
                .iter()
                .filter(|(_, h)| h.len() > 1 || h.values().map(Vec::len).sum::<usize>() != live.len())
                .collect();
            eprintln!("DIAG {} documents differ", differing.len());
            for (doc, hashes) in differing.iter().take(4) {
                eprintln!("DIAG {doc:?}: {} variants", hashes.len());
                for (hash, nodes) in hashes.iter() {
                    eprintln!("DIAG   {hash:016x} on {} nodes, e.g. n{}", nodes.len(), nodes[0]);
                    let t = self.nodes[nodes[0]].engine.as_ref().expect("live").table();
                    eprintln!("DIAG     {}", t.debug_entry(doc));
                    if let colony_crdt::DocId::Job(id) = doc {
                        let e = self.nodes[nodes[0]].engine.as_ref().expect("live");
                        eprintln!("DIAG     view {}", serde_json::to_string(&e.job_json(id)).unwrap_or_default());
                        eprintln!(
                            "DIAG     tasks {:?}",
                            self.nodes[nodes[0]]
                                .tasks
                                .values()
                                .filter(|t| t.job == *id)
                                .map(|t| (t.index, t.stopping))
                                .collect::<Vec<_>>()
                        );
                        let compacted = live
                            .iter()
                            .filter(|&&i| self.nodes[i].engine.as_ref().expect("live").table().is_compacted(id))
                            .count();
                        eprintln!("DIAG     compacted on {compacted} of {} nodes", live.len());
                    }
                }
            }
        }
        self.result.lost_jobs = self.lost_jobs();
        if self.config.trace {
            for id in &self.result.lost_jobs {
                for (i, n) in self.nodes.iter().enumerate() {
                    if let Some(e) = n.engine.as_ref() {
                        eprintln!(
                            "LOST {id} view of n{i}: {}",
                            serde_json::to_string(&e.job_json(id)).unwrap_or_default()
                        );
                        eprintln!("   n{i} tasks: {:?}", n.tasks.keys().collect::<Vec<_>>());
                    }
                }
            }
        }
        self.result.multi_owner_instances_at_rest = self.multi_owner();
        self.result.duplicate_runs = self.starts.values().map(|n| (*n as usize).saturating_sub(1)).sum();
        self.result.virtual_ms = self.now;
        self.result.claims_written = self.engines().map(|e| e.counters().claims).sum();
        self.result.claims_replacing = self.engines().map(|e| e.counters().claims_replacing).sum();
        self.result.footprint_at_rest = self.footprint();
        self.result
    }
}

fn shuffle(rng: &mut ChaCha8Rng, v: &mut [usize]) {
    for i in (1..v.len()).rev() {
        let j = rng.gen_range(0..=i);
        v.swap(i, j);
    }
}

fn make_workload(rng: &mut ChaCha8Rng, config: &SimConfig, j: usize) -> Workload {
    let service = rng.gen_bool(config.service_share);
    let count = rng.gen_range(1..=3);
    let duration_ms = rng.gen_range(50..3_000);
    let fail_attempts = if rng.gen_bool(0.1) { rng.gen_range(1..=2) } else { 0 };
    let mut spec = JobSpec::command("work", [duration_ms.to_string()]);
    spec.name = format!("job-{j}");
    spec.kind = if service { JobKind::Service } else { JobKind::Batch };
    spec.count = count;
    spec.resources = Resources { cpu_millis: rng.gen_range(1..=10) * 100, memory_mb: rng.gen_range(1..=8) * 64 };
    spec.priority = rng.gen_range(0..=10);
    spec.restart =
        RestartPolicy { attempts: 4, delay_ms: 100, backoff: 2.0, max_delay_ms: 2_000, ..RestartPolicy::default() };
    Workload { spec, fail_attempts, duration_ms }
}

/// Figures from a churn run: one node, jobs submitted and finished back to back.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnPoint {
    /// Jobs submitted and finished so far.
    pub jobs: usize,
    /// Job documents held (live + retained finished).
    pub job_documents: usize,
    /// Tombstones held.
    pub tombstones: usize,
    /// Bytes on disk: the last snapshot plus the log appended since (8 bytes framing each).
    pub disk_bytes: usize,
    /// Size of a fresh snapshot of the table now.
    pub snapshot_bytes: usize,
    /// Resident memory of this process (VmRSS), in KiB, where /proc is available.
    pub rss_kib: Option<u64>,
}

/// Runs `jobs` single-instance batch jobs through one node core, each finishing at once, and
/// samples the table's size at the given job counts (I6: state stays bounded under churn).
pub fn churn(
    jobs: usize,
    retain: usize,
    sample_at: &[usize],
    mut progress: impl FnMut(&ChurnPoint),
) -> Vec<ChurnPoint> {
    let mut config = EngineConfig::new("churn", Resources { cpu_millis: 1_000_000, memory_mb: 1_000_000 });
    config.retention.finished_jobs = retain;
    config.retention.tombstones = retain;
    config.retention.finished_age_ms = u64::MAX / 4;
    let mut engine = match Engine::new("churn-node".into(), config, 1, 0, None) {
        Ok(e) => e,
        Err(e) => panic!("a fresh engine cannot fail to start: {e}"),
    };
    let mut disk = DiskBytes::default();
    let mut out = Vec::new();
    let mut now = 0u64;
    let spec = JobSpec::command("true", Vec::<String>::new());
    for i in 1..=jobs {
        now += 20;
        if engine.submit(now, spec.clone()).is_err() {
            panic!("a valid spec was refused");
        }
        let mut pending_exit = Vec::new();
        for t in [now, now + 16] {
            engine.handle_timeout(t);
            while let Some(o) = engine.poll_output() {
                if let Output::StartTask(start) = o {
                    pending_exit.push(start.task);
                } else {
                    disk.record(o);
                }
            }
        }
        for task in pending_exit {
            engine.handle_task_exited(now + 17, &task, 0);
        }
        while let Some(o) = engine.poll_output() {
            disk.record(o);
        }
        if sample_at.contains(&i) || i == jobs {
            // One more compaction pass so the sample sees the steady state.
            engine.handle_timeout(now + 2_000);
            while let Some(o) = engine.poll_output() {
                disk.record(o);
            }
            now += 2_000;
            let point = ChurnPoint {
                jobs: i,
                job_documents: engine.table().job_count(),
                tombstones: engine.table().tombstone_count(),
                disk_bytes: disk.snapshot + disk.log,
                snapshot_bytes: engine.snapshot_len(),
                rss_kib: rss_kib(),
            };
            progress(&point);
            out.push(point);
        }
    }
    out
}

/// Bytes the daemon's storage would hold: the last snapshot plus the log after it, with the
/// store's framing (8 bytes a record, 16 for the snapshot header).
#[derive(Default)]
struct DiskBytes {
    snapshot: usize,
    log: usize,
}

impl DiskBytes {
    fn record(&mut self, output: Output) {
        match output {
            Output::Persist(records) => self.log += records.iter().map(|r| r.len() + 8).sum::<usize>(),
            Output::Snapshot(records) => {
                // The daemon writes the blob form: a count, then the records.
                self.snapshot = records.blob_len() + 16;
                self.log = 0;
            }
            _ => {}
        }
    }
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{Record, RecordPool};
    use std::sync::Arc;

    /// Records equal in content are one record; every record reads back as written, from
    /// the write buffer, from the file, and after the file was rewritten without the records
    /// no disk holds any more.
    #[test]
    fn the_record_pool_shares_by_content_and_reads_back_what_it_was_given() {
        let mut pool = RecordPool::new();
        pool.compact_from = 1 << 20;
        let bytes = |i: usize| format!("record {i} ").repeat(1 + i % 100).into_bytes();
        let a = pool.intern(bytes(1));
        assert!(Arc::ptr_eq(&a, &pool.intern(bytes(1))), "equal content, one record");
        assert_eq!(pool.read(&a), bytes(1), "read back from the buffer");
        // Enough to pass the file through several buffers and the purge threshold; keep
        // every third record, as a disk would.
        let kept: Vec<(usize, Record)> =
            (0..20_000).map(|i| (i, pool.intern(bytes(i)))).filter(|(i, _)| i % 3 == 0).collect();
        assert!(pool.file_len > 6 << 20, "the file grew through several buffers");
        pool.purge();
        assert!(pool.file_len < 2 * pool.live_bytes, "compacted to the records kept");
        assert_eq!(pool.records.len(), kept.len() + 1, "only records some disk holds remain");
        for (i, record) in &kept {
            assert_eq!(pool.read(record), bytes(*i), "record {i} after compaction");
        }
        assert_eq!(pool.read(&a), bytes(1));
        let again = pool.intern(bytes(3));
        assert!(Arc::ptr_eq(&again, &kept[1].1), "still shared by content after compaction");
    }
}
