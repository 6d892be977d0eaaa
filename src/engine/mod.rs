//! The node core: a deterministic, sans-IO state machine.
//!
//! Inputs are `handle_*(now_ms, ...)` calls and API commands. Outputs are data, drained with
//! [`Engine::poll_output`] in this order within each step: `Persist`/`Snapshot` first, then
//! `Send`, then `StartTask`/`StopTask`, then `Event`. A driver must make the persist durable
//! before acting on what follows it (that is what makes a submission's acknowledgement safe).
//!
//! It never reads a clock, draws unseeded randomness, opens a socket or spawns a task: the
//! simulator and the daemon drive exactly this code.

mod config;
mod message;
mod swim;
mod views;

pub use config::{EngineConfig, Limits, Retention, Timing};
pub use message::{DecodeError, Message};
pub use views::{InstanceJson, JobJson, NodeJson, RunJson};

use colony_crdt::records::shared_node_id;
use colony_crdt::rules::{self, evaluate_instance, InstanceView, JobStatus, NodeState};
use colony_crdt::{
    Claim, DocId, InstanceStatus, JobHeader, JobId, JobSpec, NodeId, NodeInfo, NodeMode, Resources, RestartPlacement,
    Run, RunStatus, SharedStates, SnapshotRecords, SpecError, StopRequest, SyncState, Table, TableError, BUCKETS,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use swim::Swim;

/// Sync rounds in a row without the document moving before a session is abandoned. A normal
/// exchange settles in two or three; eight leaves room for a slow multi-change catch-up.
const MAX_IDLE_SYNC_ROUNDS: u32 = 8;

/// Anti-entropy intervals a sync session may go unused before it is dropped. A session waits
/// for the peer's answer; one whose answer was lost (message loss, a partition, a peer that
/// died) would otherwise stay until the session cap: under a 1,000-node ring partition the
/// nodes' sessions together grew past two million. The next anti-entropy round with that peer starts a fresh
/// one (it always does), so dropping a stale session costs nothing.
const SESSION_IDLE_INTERVALS: u64 = 3;

/// Anti-entropy rounds run early, a tenth of the interval apart, after peers come up. A new
/// peer is the likeliest to differ (a joining node, a healed partition), but a round with
/// every new peer would make a 1,000-node boot an N^2 storm: three rounds with random new
/// peers pull the other side's state, and gossip carries the rest.
const EAGER_ROUNDS: u32 = 3;

/// Rank positions past `max_claim_rank` spread over this many times the cap (see
/// `Engine::past_cap_position`): at 1,000 nodes about 15 nodes share a position past the
/// cap, and the longest back-off is under `5 × cap` staggers (3.2 s at the default 40 ms).
/// Spread over every position, the back-offs reached 40 s, and the timers of nodes waiting
/// them out were 7.5 million entries in a 1,000-node simulation.
const PAST_CAP_SLOTS: usize = 4;

/// A peer that may win placements: alive, active, with its facts known. Kept up to date as
/// node documents change, so ranking a job costs O(candidates), not a table scan with hashing.
#[derive(Debug, Clone)]
struct Candidate {
    capacity: Resources,
    labels: BTreeMap<String, String>,
    /// `stable_hash` of each driver name: ranking compares thousands of candidates per
    /// decision, and string comparisons were most of its cost. A collision could only let a
    /// node without the driver count as better-ranked (a longer back-off), never claim.
    drivers: Vec<u64>,
    /// This node's view of the candidate's allocation (mirrors `Engine::allocated`).
    allocated: Resources,
}

/// What durable storage held at start: the snapshot, and the records appended after it.
pub type Restored<'a> = (Option<&'a [u8]>, &'a [Vec<u8>]);

/// One job's claims and running runs by this node from an earlier boot.
type EarlierWork = (JobId, Vec<(u32, Claim)>, Vec<(u32, u32, Run)>);

/// Identifies one run of one instance on this node: `<job>/<index>/<attempt>`.
pub type TaskId = String;

/// What the driver must do. See the module docs for the order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Append these records to durable storage.
    Persist(Vec<Vec<u8>>),
    /// Replace durable storage with this snapshot (the records before it are folded in).
    /// [`SnapshotRecords::to_bytes`] is the blob [`Engine::new`] restores from; a store may
    /// also keep the records and hand them back as the first of the log's.
    Snapshot(SnapshotRecords),
    /// Send `message` to `to`; delivery is best effort.
    Send {
        /// The peer.
        to: NodeId,
        /// The message.
        message: Message,
    },
    /// Start running an instance (boxed: the largest output by far, and queues hold many sends).
    StartTask(Box<TaskStart>),
    /// Stop a task started earlier; its exit is still reported with `handle_task_exited`.
    StopTask {
        /// The task.
        task: TaskId,
    },
    /// Something users may want to react to.
    Event(Event),
}

/// A task to start.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStart {
    /// Echoed by `handle_task_exited`.
    pub task: TaskId,
    /// The job.
    pub job: JobId,
    /// Instance index.
    pub index: u32,
    /// Attempt.
    pub attempt: u32,
    /// The job's spec.
    pub spec: JobSpec,
}

/// A state change, for event streams.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A job changed status.
    Job {
        /// The job.
        id: JobId,
        /// Its new status.
        status: JobStatus,
    },
    /// An instance changed status or owner.
    Instance {
        /// The job.
        job: JobId,
        /// Instance index.
        index: u32,
        /// New status.
        status: InstanceStatus,
        /// Owner's node id.
        node: Option<NodeId>,
    },
    /// A node changed state.
    Node {
        /// The node.
        id: NodeId,
        /// Its new state.
        state: NodeState,
    },
}

/// Errors from API commands. None of them changes state.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The spec was refused; nothing was written.
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    /// No such job here (never submitted, or compacted).
    #[error("unknown job `{0}`")]
    UnknownJob(String),
    /// The node has left the cluster and takes no commands.
    #[error("this node has left the cluster")]
    Left,
    /// Persisted state could not be restored.
    #[error(transparent)]
    Table(#[from] TableError),
}

#[derive(Debug, Clone)]
struct MyClaim {
    attempt: u32,
    at_ms: u64,
    resources: Resources,
    started: bool,
}

#[derive(Debug, Clone)]
struct LocalTask {
    job: JobId,
    index: u32,
    attempt: u32,
    started_ms: u64,
    stopping: Option<&'static str>,
}

/// Since when this node has seen one attempt of one instance pending (see `try_claim`).
#[derive(Debug, Clone, Copy)]
struct PendingSince {
    index: u32,
    attempt: u32,
    since_ms: u64,
    /// Claims on the attempt when it was first seen pending with this many.
    claimants: u32,
}

/// The claims on one instance's current attempt, valid or not.
#[derive(Debug, Clone, Copy, Default)]
struct Claimants {
    count: u32,
    /// Until when a claimant's refutation of a certificate is awaited (0: none is).
    refutation_due_ms: u64,
}

/// Node ids in it are shared (`shared_node_id`): each job names a few nodes, on every node,
/// and a `String` per mention was about 500 bytes per job per node.
#[derive(Debug, Clone, Default, PartialEq)]
struct JobCache {
    status: Option<JobStatus>,
    instances: Vec<(InstanceStatus, Option<Arc<str>>)>,
    allocation: Vec<(Arc<str>, Resources)>,
    priority: i32,
    finished_at_ms: Option<u64>,
    /// Nodes with a claim or a run in the job, sorted and distinct: their state decides its
    /// winners and status. A vector, not a set: it holds one to three nodes, and a set's node
    /// cost about 300 bytes per job on every node.
    participants: Vec<Arc<str>>,
}

/// Sizes of a node's main structures (see [`Engine::footprint`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    /// Job documents held (live or cold).
    pub job_documents: usize,
    /// Job documents held live (not cold).
    pub live_job_documents: usize,
    /// Bytes of cold documents.
    pub cold_bytes: usize,
    /// Compacted jobs remembered.
    pub tombstones: usize,
    /// Open sync sessions.
    pub sync_sessions: usize,
    /// Jobs in the evaluation cache.
    pub cached_jobs: usize,
    /// Pending instances this node is backing off on: only the current attempt of an instance
    /// pending in this node's view. At rest, only in deferred jobs holding changes not yet
    /// looked at (the sweep's next round).
    pub pending_since: usize,
    /// Deferred jobs holding changes not yet applied.
    pub deferred_with_changes: usize,
    /// Armed timers.
    pub timers: usize,
}

impl std::ops::AddAssign for Footprint {
    /// Field by field: totals over many nodes.
    fn add_assign(&mut self, o: Footprint) {
        self.job_documents += o.job_documents;
        self.live_job_documents += o.live_job_documents;
        self.cold_bytes += o.cold_bytes;
        self.tombstones += o.tombstones;
        self.sync_sessions += o.sync_sessions;
        self.cached_jobs += o.cached_jobs;
        self.pending_since += o.pending_since;
        self.deferred_with_changes += o.deferred_with_changes;
        self.timers += o.timers;
    }
}

/// Counters for metrics and the simulator's checkers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Claims written.
    pub claims: u64,
    /// Claims on an attempt whose earlier claims all stopped counting (their nodes certified
    /// dead or gone): the re-placements.
    pub claims_replacing: u64,
    /// Claims withdrawn after losing.
    pub claims_lost: u64,
    /// Tasks started.
    pub tasks_started: u64,
    /// Tasks stopped because another node won (duplicates).
    pub tasks_superseded: u64,
    /// Death certificates written.
    pub deaths_written: u64,
    /// Refutations (own incarnation raised).
    pub refutations: u64,
    /// Jobs compacted.
    pub jobs_compacted: u64,
    /// Claim back-off timers of deferred jobs left to the sweep (changes had arrived).
    pub wakes_left_to_sweep: u64,
    /// Messages that failed to decode or apply.
    pub bad_messages: u64,
    /// Differing documents an anti-entropy round left to later rounds
    /// (`Limits::sync_docs_per_round`).
    pub sync_docs_deferred: u64,
    /// Job changes sent to repair a peer's copy (answers to `Have`).
    pub repair_changes_sent: u64,
    /// Death certificates passed on to the accused, which this node still saw alive.
    pub certificates_forwarded: u64,
}

/// The node core.
pub struct Engine {
    id: NodeId,
    config: EngineConfig,
    rng: ChaCha8Rng,
    boot: u64,
    table: Table,
    incarnation: u64,
    mode: NodeMode,
    peers: BTreeSet<NodeId>,
    claims: BTreeMap<(JobId, u32), MyClaim>,
    tasks: BTreeMap<TaskId, LocalTask>,
    /// Per job: (instance, attempt) → (when first seen pending, claims on it then). Only the
    /// current attempt of a pending instance has an entry.
    pending_since: BTreeMap<JobId, Vec<PendingSince>>,
    timers: BTreeSet<(u64, JobId)>,
    dirty: BTreeSet<JobId>,
    waiting_for_capacity: BTreeSet<JobId>,
    cache: BTreeMap<JobId, JobCache>,
    /// The jobs each node has a claim or a run in (the inverse of `JobCache::participants`):
    /// a node's change of state re-evaluates exactly these, without scanning every job.
    participating: BTreeMap<NodeId, BTreeSet<JobId>>,
    allocated: BTreeMap<NodeId, Resources>,
    node_states: BTreeMap<NodeId, NodeState>,
    /// Nodes this node saw alive until a death certificate arrived all at once (not after a
    /// suspicion): certificates written across a cut that has healed. Each was passed on to
    /// the accused, and until the deadline here its instances wait for its refutation before
    /// anyone here claims them (see `on_state_change`).
    awaiting_refutation: BTreeMap<NodeId, u64>,
    /// Peers that may win placements (not this node).
    candidates: BTreeMap<NodeId, Candidate>,
    /// The care-taker ring: (hash, node) for every node with known facts whose claims count.
    ring: BTreeSet<(u64, NodeId)>,
    fresh_peers: BTreeSet<NodeId>,
    eager_rounds: u32,
    /// Documents this node may still ask peers to repair (`Have`) in the current anti-entropy
    /// interval: `sync_docs_per_round`, shared by the regular round and the eager ones.
    /// Counted per round, a heal (every node meeting hundreds of new peers, three eager rounds
    /// each) put four rounds' worth of repairs in flight at once on every node: at 1,000
    /// simulated nodes, 1.28 million queued messages and the run's peak memory.
    repair_budget: usize,
    next_eager_ms: Option<u64>,
    swim: Swim,
    /// Sync sessions, with the anti-entropy interval (`intervals`) each was last used in.
    sessions: BTreeMap<(NodeId, DocId), (SyncState, u64)>,
    sync_idle_rounds: BTreeMap<(NodeId, DocId), u32>,
    /// Anti-entropy intervals since boot.
    intervals: u64,
    next_anti_entropy_ms: u64,
    next_compaction_ms: u64,
    next_sweep_ms: u64,
    persisted_since_snapshot: usize,
    /// Documents in the last snapshot: the next waits for twice their estimated size of log.
    last_snapshot_documents: usize,
    /// Snapshots taken since boot.
    snapshots: u64,
    sends: Vec<(NodeId, Message)>,
    task_outputs: Vec<Output>,
    events: Vec<Event>,
    outputs: VecDeque<Output>,
    counters: Counters,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("id", &self.id).field("name", &self.config.name).finish_non_exhaustive()
    }
}

/// A snapshot document's estimated size (a tombstone counts as one): a job document saved
/// after its usual seven changes is about 1.5 KiB, a tombstone a few dozen bytes (see
/// `Engine::flush`).
const SNAPSHOT_BYTES_PER_DOCUMENT: usize = 1024;

/// `amount` of `items`, a uniform random choice, sorted. (`partial_shuffle` leaves the
/// chosen ones in the slice it returns first, which is the *tail* of the vector: truncating
/// the vector instead kept mostly the first documents in id order, round after round.)
fn sample_sorted<T: Ord>(rng: &mut ChaCha8Rng, mut items: Vec<T>, amount: usize) -> Vec<T> {
    let len = items.len();
    if amount >= len {
        return items;
    }
    items.partial_shuffle(rng, amount);
    let mut chosen = items.split_off(len - amount);
    chosen.sort();
    chosen
}

fn task_id(job: &str, index: u32, attempt: u32) -> TaskId {
    format!("{job}/{index}/{attempt}")
}

impl Engine {
    /// Starts a node core. `seed` drives all its randomness (log it: it replays the node).
    /// `restored` is what durable storage held: a snapshot and the records appended after it.
    pub fn new(
        id: NodeId,
        config: EngineConfig,
        seed: u64,
        now_ms: u64,
        restored: Option<Restored<'_>>,
    ) -> Result<Engine, EngineError> {
        Engine::new_sharing(id, config, seed, now_ms, restored, None)
    }

    /// [`Engine::new`] for one of many node cores in a process, sharing cold document states
    /// with the others given the same `states` (see [`SharedStates`]): the simulator's nodes
    /// share one per run. It changes no decision, only the work done.
    pub fn new_sharing(
        id: NodeId,
        config: EngineConfig,
        seed: u64,
        now_ms: u64,
        restored: Option<Restored<'_>>,
        states: Option<std::sync::Arc<SharedStates>>,
    ) -> Result<Engine, EngineError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let boot: u64 = rng.gen();
        let actor: [u8; 16] = rng.gen();
        // Each node sweeps at its own phase: nodes that boot together would otherwise all
        // bring the same deferred jobs up to date at the same instant, and where an instance
        // was past every node's back-off, all of them claimed it at once (N claims, each
        // pushed to N peers: a 1,000-node simulation stalled on it).
        let sweep_phase = rng.gen_range(0..config.timing.deferred_sweep_ms.max(1));
        let mut table = Table::new(id.clone(), actor);
        if let Some(states) = states {
            table.share_states(states);
        }
        if let Some((snapshot, records)) = restored {
            table.restore(snapshot, records)?;
        }
        let incarnation = table.node(&id).map_or(0, |r| r.incarnation);
        let mode = table.node(&id).map_or(NodeMode::Active, |r| r.mode);
        let swim = Swim::new(&config.timing, now_ms);
        let mut engine = Engine {
            id,
            boot,
            table,
            incarnation,
            mode,
            peers: BTreeSet::new(),
            claims: BTreeMap::new(),
            tasks: BTreeMap::new(),
            pending_since: BTreeMap::new(),
            timers: BTreeSet::new(),
            dirty: BTreeSet::new(),
            waiting_for_capacity: BTreeSet::new(),
            cache: BTreeMap::new(),
            participating: BTreeMap::new(),
            allocated: BTreeMap::new(),
            node_states: BTreeMap::new(),
            awaiting_refutation: BTreeMap::new(),
            candidates: BTreeMap::new(),
            ring: BTreeSet::new(),
            fresh_peers: BTreeSet::new(),
            eager_rounds: 0,
            repair_budget: config.limits.sync_docs_per_round.max(1),
            next_eager_ms: None,
            swim,
            sessions: BTreeMap::new(),
            sync_idle_rounds: BTreeMap::new(),
            intervals: 0,
            next_anti_entropy_ms: now_ms,
            next_compaction_ms: now_ms + config.timing.compaction_ms,
            next_sweep_ms: now_ms + sweep_phase + 1,
            persisted_since_snapshot: 0,
            last_snapshot_documents: 0,
            snapshots: 0,
            sends: Vec::new(),
            task_outputs: Vec::new(),
            events: Vec::new(),
            outputs: VecDeque::new(),
            counters: Counters::default(),
            config,
            rng,
        };
        engine.boot_up(now_ms);
        Ok(engine)
    }

    fn boot_up(&mut self, now_ms: u64) {
        if self.mode == NodeMode::Left {
            // A node that left and is started again rejoins.
            self.mode = NodeMode::Active;
        }
        let info = NodeInfo {
            name: self.config.name.clone(),
            addrs: self.config.addrs.clone(),
            capacity: self.config.capacity,
            labels: self.config.labels.clone(),
            drivers: self.config.drivers.clone(),
        };
        self.table.write_node_info(&info);
        self.table.write_mode(self.mode);
        // A restart refutes whatever was said about the previous boot.
        self.refute_if_needed(true);
        // Work of an earlier boot is gone (the processes died with it, or were killed by the
        // driver): record it as lost and give the claims up, so the instances run again.
        let mine: Vec<EarlierWork> = self
            .table
            .jobs()
            .map(|(id, rec)| {
                let claims = rec
                    .claims
                    .iter()
                    .filter(|((_, n), c)| *n == self.id && c.boot != self.boot)
                    .map(|((i, _), c)| (*i, *c))
                    .collect();
                let runs = rec
                    .runs
                    .iter()
                    .filter(|((_, _, n), r)| *n == self.id && r.status == RunStatus::Running)
                    .map(|((i, a, _), r)| (*i, *a, r.clone()))
                    .collect();
                (id.clone(), claims, runs)
            })
            .collect();
        for (job, claims, runs) in mine {
            for (index, attempt, mut run) in runs {
                run.status = RunStatus::Lost;
                run.finished_ms = Some(now_ms);
                run.reason = Some("node restarted".into());
                self.table.write_run(&job, index, attempt, &run);
            }
            for (index, _) in claims {
                self.table.delete_claim(&job, index);
            }
        }
        let jobs: Vec<JobId> = self.table.jobs().map(|(id, _)| id.clone()).collect();
        self.dirty.extend(jobs);
        self.finish_step(now_ms);
    }

    // ---------------------------------------------------------------- accessors

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// This node's config.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The table, read-only.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The table's digest: equal on two nodes holding the same state.
    pub fn digest(&self) -> u64 {
        self.table.digest()
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// This boot's id.
    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Resources held by this node's claims and tasks now.
    pub fn local_allocation(&self) -> Resources {
        self.claims.values().fold(Resources::default(), |acc, c| acc.plus(c.resources))
    }

    /// Tasks this node runs now.
    pub fn running_tasks(&self) -> impl Iterator<Item = (&TaskId, (&str, u32, u32))> {
        self.tasks.iter().map(|(id, t)| (id, (t.job.as_str(), t.index, t.attempt)))
    }

    /// Sizes of the node's main structures, for the simulator's progress and memory reports.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            job_documents: self.table.job_count(),
            live_job_documents: self.table.live_job_documents(),
            cold_bytes: self.table.cold_bytes(),
            tombstones: self.table.tombstone_count(),
            sync_sessions: self.sessions.len(),
            cached_jobs: self.cache.len(),
            pending_since: self.pending_since.values().map(Vec::len).sum(),
            deferred_with_changes: self.table.deferred_with_changes().count(),
            timers: self.timers.len(),
        }
    }

    /// The size a snapshot of the table would have now (for measurements; slow).
    pub fn snapshot_len(&self) -> usize {
        self.table.measure_snapshot_len()
    }

    /// Jobs held, by status (from the evaluation cache: cheap enough for every metrics scrape).
    pub fn job_status_counts(&self) -> BTreeMap<JobStatus, usize> {
        let mut out = BTreeMap::new();
        for cache in self.cache.values() {
            if let Some(status) = cache.status {
                *out.entry(status).or_default() += 1;
            }
        }
        out
    }

    /// The next output, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        let output = self.outputs.pop_front();
        let keep = self.queue_keep();
        if output.is_none() && self.outputs.capacity() > keep {
            // A sync round or a burst of changes can queue thousands of sends; keeping that
            // peak for the node's life cost 0.5 MB per node at 150 nodes. One push to every
            // peer is the steady state, kept to avoid regrowing it on every step.
            self.outputs.shrink_to(keep);
        }
        output
    }

    /// Capacity a drained output or send queue keeps: room for a push to every peer.
    fn queue_keep(&self) -> usize {
        2 * self.peers.len() + 16
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> u64 {
        let mut t = self
            .next_anti_entropy_ms
            .min(self.next_compaction_ms)
            .min(self.next_sweep_ms)
            .min(self.swim.next_deadline_ms());
        if let Some(at) = self.next_eager_ms {
            t = t.min(at);
        }
        if let Some((at, _)) = self.timers.first() {
            t = t.min(*at);
        }
        t
    }

    // ---------------------------------------------------------------- inputs

    /// A peer became reachable.
    pub fn handle_peer_up(&mut self, now_ms: u64, peer: NodeId) {
        if peer == self.id {
            return;
        }
        self.add_peer(now_ms, &peer);
        self.finish_step(now_ms);
    }

    /// A peer we had not counted: introduce ourselves and bring anti-entropy forward.
    fn add_peer(&mut self, now_ms: u64, peer: &str) {
        if !self.peers.insert(peer.to_string()) {
            return;
        }
        // Every node needs every node document, and one direct message per new peer is the
        // cheapest way (gossip would move each several times).
        let changes = self.table.own_node_changes();
        if !changes.is_empty() {
            self.sends.push((
                peer.to_string(),
                Message::Changes { doc: DocId::Node(self.id.clone()), changes: changes.into() },
            ));
        }
        // A new peer is the likeliest to differ (see EAGER_ROUNDS). These rounds come on top
        // of the regular ones, so a stream of new peers cannot starve the established ones.
        self.fresh_peers.insert(peer.to_string());
        if self.next_eager_ms.is_none() {
            self.next_eager_ms = Some(now_ms);
        }
        self.eager_rounds = EAGER_ROUNDS;
    }

    /// A peer became unreachable (a hint only: failure detection decides deaths).
    pub fn handle_peer_down(&mut self, now_ms: u64, peer: &str) {
        self.peers.remove(peer);
        self.fresh_peers.remove(peer);
        self.sessions.retain(|(p, _), _| p != peer);
        self.sync_idle_rounds.retain(|(p, _), _| p != peer);
        self.finish_step(now_ms);
    }

    /// A message from a peer, as bytes. Malformed bytes are counted and refused.
    pub fn handle_bytes(&mut self, now_ms: u64, from: &str, bytes: &[u8]) -> Result<(), DecodeError> {
        match Message::decode(bytes) {
            Ok(message) => {
                self.handle_message(now_ms, from, message);
                Ok(())
            }
            Err(e) => {
                self.counters.bad_messages += 1;
                Err(e)
            }
        }
    }

    /// A message from a peer.
    pub fn handle_message(&mut self, now_ms: u64, from: &str, message: Message) {
        if from == self.id {
            return;
        }
        if !self.peers.contains(from) {
            // Heard from before any peer-up (a connection the driver has not reported yet,
            // or a message still in flight): a peer all the same.
            self.add_peer(now_ms, from);
        }
        match message {
            Message::Ping { seq } => self.sends.push((from.to_string(), Message::Ack { seq })),
            Message::Ack { seq } => self.on_ack(now_ms, from, seq),
            Message::PingReq { seq, target } => {
                let relay_seq = self.swim.start_relay(now_ms, from, seq);
                self.sends.push((target, Message::Ping { seq: relay_seq }));
            }
            Message::Changes { doc, changes } => match self.table.apply_shared_changes(&doc, &changes) {
                Ok(_) => {}
                Err(_) => self.counters.bad_messages += 1,
            },
            Message::Digest { buckets } => self.on_digest(from, &buckets),
            Message::Summary { buckets, entries } => self.on_summary(from, &buckets, entries),
            Message::Sync { doc, data } => self.on_sync(from, doc, &data),
            Message::Have { doc, hashes, reply } => self.on_have(from, doc, hashes, reply),
            Message::Forget { jobs } => {
                // The peer compacted these jobs, which it does only once they finished, and a
                // finished job never runs again: a copy still running here stops
                // (`forget_local`). Keeping it because of that local work left a node that had
                // missed the stop of a service job (its dependencies lost in a ring partition,
                // then compacted everywhere else) running it for good, and the cluster never
                // converged: nobody was left who could send the missing changes.
                for job in jobs {
                    if self.table.job(&job).is_some() {
                        self.table.compact_job(&job, now_ms);
                        self.forget_local(&job);
                    }
                }
            }
        }
        self.finish_step(now_ms);
    }

    /// Timers: probes, anti-entropy, compaction, claim back-offs and settle windows.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.run_failure_detector(now_ms);
        if self.next_eager_ms.is_some_and(|at| now_ms >= at) {
            // An eager round with the interval's repairs spent would only list documents.
            let peer = if self.eager_rounds > 0 && !self.fresh_peers.is_empty() && self.repair_budget > 0 {
                self.eager_rounds -= 1;
                let i = self.rng.gen_range(0..self.fresh_peers.len());
                self.fresh_peers.iter().nth(i).cloned()
            } else {
                None
            };
            match peer {
                Some(peer) => {
                    self.fresh_peers.remove(&peer);
                    self.sends.push((peer, Message::Digest { buckets: self.table.bucket_hashes().to_vec() }));
                    let gap = (self.config.timing.anti_entropy_ms / 10).max(1);
                    self.next_eager_ms = (self.eager_rounds > 0).then_some(now_ms + gap);
                }
                None => self.next_eager_ms = None,
            }
            if self.next_eager_ms.is_none() {
                self.eager_rounds = 0;
                self.fresh_peers.clear();
            }
        }
        if now_ms >= self.next_anti_entropy_ms {
            self.next_anti_entropy_ms = now_ms + self.config.timing.anti_entropy_ms;
            self.intervals += 1;
            self.repair_budget = self.config.limits.sync_docs_per_round.max(1);
            let oldest = self.intervals.saturating_sub(SESSION_IDLE_INTERVALS);
            self.sessions.retain(|_, (_, used)| *used >= oldest);
            let sessions = &self.sessions;
            self.sync_idle_rounds.retain(|key, _| sessions.contains_key(key));
            if let Some(peer) = self.random_peer() {
                self.sends.push((peer, Message::Digest { buckets: self.table.bucket_hashes().to_vec() }));
            }
        }
        if now_ms >= self.next_sweep_ms {
            self.next_sweep_ms = now_ms + self.config.timing.deferred_sweep_ms;
            let deferred: Vec<JobId> = self.table.deferred_with_changes().cloned().collect();
            self.dirty.extend(deferred);
        }
        if now_ms >= self.next_compaction_ms {
            self.next_compaction_ms = now_ms + self.config.timing.compaction_ms;
            self.compact(now_ms);
        }
        while let Some((at, _)) = self.timers.first() {
            if *at > now_ms {
                break;
            }
            if let Some((_, job)) = self.timers.pop_first() {
                // A claim back-off timer of a deferred job that received changes since it was
                // deferred: most likely a better-ranked node claimed it. Bringing the document
                // up to date to find that out was most of a 1,000-node simulation's time (every
                // node wakes once per job). The sweep evaluates it within
                // `deferred_sweep_ms`, which bounds the delay when the change was another.
                // With more instances, a change may concern another one: the wake is left to
                // the sweep only when at least one change arrived per instance that was
                // pending (each a claim, most likely). Multi-instance jobs (two thirds of the
                // simulator's workload) woke every node up to once per instance, and those
                // evaluations were most of a 1,000-node run.
                let pending = self.cache.get(&job).map_or(usize::MAX, |c| {
                    c.instances.iter().filter(|(s, _)| *s == InstanceStatus::Pending).count().max(1)
                });
                let claimed_since = self.table.held_changes(&job) >= pending;
                if claimed_since && !self.has_claim(&job) && !self.has_local_work(&job) {
                    self.counters.wakes_left_to_sweep += 1;
                    continue;
                }
                self.dirty.insert(job);
            }
        }
        self.finish_step(now_ms);
    }

    /// A task started by `StartTask` ended with `exit_code` (128+n for signal n).
    pub fn handle_task_exited(&mut self, now_ms: u64, task: &str, exit_code: i32) {
        let Some(local) = self.tasks.remove(task) else { return };
        let status = match (local.stopping, exit_code) {
            (Some(_), _) => RunStatus::Stopped,
            (None, 0) => RunStatus::Succeeded,
            (None, _) => RunStatus::Failed,
        };
        let run = Run {
            status,
            boot: self.boot,
            started_ms: local.started_ms,
            finished_ms: Some(now_ms),
            exit_code: Some(exit_code),
            reason: local.stopping.map(str::to_string),
        };
        if self.table.job(&local.job).is_some() {
            self.table.write_run(&local.job, local.index, local.attempt, &run);
        }
        if status == RunStatus::Stopped {
            // A stopped copy gives its claim up, so the rule never picks it again.
            if self.table.job(&local.job).is_some() {
                self.table.delete_claim(&local.job, local.index);
            }
        }
        self.claims.remove(&(local.job.clone(), local.index));
        self.release_capacity();
        self.dirty.insert(local.job);
        self.finish_step(now_ms);
    }

    /// A task could not be started (bad command, driver refused). Counts as a failed run.
    pub fn handle_task_start_failed(&mut self, now_ms: u64, task: &str, reason: &str) {
        let Some(local) = self.tasks.remove(task) else { return };
        let run = Run {
            status: if local.stopping.is_some() { RunStatus::Stopped } else { RunStatus::Failed },
            boot: self.boot,
            started_ms: local.started_ms,
            finished_ms: Some(now_ms),
            exit_code: Some(127),
            reason: Some(format!("start failed: {reason}")),
        };
        if self.table.job(&local.job).is_some() {
            self.table.write_run(&local.job, local.index, local.attempt, &run);
        }
        self.claims.remove(&(local.job.clone(), local.index));
        self.release_capacity();
        self.dirty.insert(local.job);
        self.finish_step(now_ms);
    }

    // ---------------------------------------------------------------- API commands

    /// Accepts a job. The job is durable once the `Persist` output this call produces is
    /// written; acknowledge the submitter only after that.
    pub fn submit(&mut self, now_ms: u64, spec: JobSpec) -> Result<JobId, EngineError> {
        if self.mode == NodeMode::Left {
            return Err(EngineError::Left);
        }
        spec.validate()?;
        let id = loop {
            let candidate = format!("{:016x}", self.rng.gen::<u64>());
            if self.table.job(&candidate).is_none() && !self.table.is_compacted(&candidate) {
                break candidate;
            }
        };
        let header = JobHeader { spec, submitted_by: self.id.clone(), submitted_at_ms: now_ms };
        self.table.create_job(&id, &header);
        self.dirty.insert(id.clone());
        self.finish_step(now_ms);
        Ok(id)
    }

    /// Requests that a job stop everywhere.
    pub fn stop_job(&mut self, now_ms: u64, id: &str) -> Result<(), EngineError> {
        if self.table.job(id).is_none() {
            return Err(EngineError::UnknownJob(id.to_string()));
        }
        self.table.write_stop(id, &StopRequest { at_ms: now_ms });
        self.dirty.insert(id.to_string());
        self.finish_step(now_ms);
        Ok(())
    }

    /// Stops taking new work and hands running work to others.
    pub fn drain(&mut self, now_ms: u64) {
        self.mode = NodeMode::Draining;
        self.table.write_mode(NodeMode::Draining);
        let tasks: Vec<TaskId> = self.tasks.keys().cloned().collect();
        for task in tasks {
            self.stop_task(&task, "drained");
        }
        let claims: Vec<(JobId, u32)> =
            self.claims.iter().filter(|(_, c)| !c.started).map(|(k, _)| k.clone()).collect();
        for (job, index) in claims {
            self.table.delete_claim(&job, index);
            self.claims.remove(&(job, index));
        }
        self.finish_step(now_ms);
    }

    /// Takes work again after a drain.
    pub fn undrain(&mut self, now_ms: u64) {
        self.mode = NodeMode::Active;
        self.table.write_mode(NodeMode::Active);
        let jobs: Vec<JobId> = self.table.jobs().map(|(id, _)| id.clone()).collect();
        self.dirty.extend(jobs);
        self.finish_step(now_ms);
    }

    /// Announces a graceful departure: others reschedule at once, without waiting for a
    /// timeout. The driver should let the resulting sends go out before shutting down.
    pub fn leave(&mut self, now_ms: u64) {
        self.drain(now_ms);
        self.mode = NodeMode::Left;
        self.table.write_mode(NodeMode::Left);
        self.finish_step(now_ms);
    }

    // ---------------------------------------------------------------- the step

    fn finish_step(&mut self, now_ms: u64) {
        // Evaluating jobs writes claims and runs, which changes documents, which may make
        // more jobs worth evaluating (a node state change touches every job): loop to rest.
        for _ in 0..4 {
            self.absorb_changes(now_ms);
            if self.dirty.is_empty() {
                break;
            }
            let mut jobs: Vec<JobId> = std::mem::take(&mut self.dirty).into_iter().collect();
            // Higher priority first, so scarce capacity goes to it.
            jobs.sort_by_key(|j| (-self.cache.get(j).map_or(0, |c| c.priority), j.clone()));
            for job in jobs {
                self.evaluate_job(now_ms, &job);
            }
        }
        self.flush(now_ms);
    }

    fn absorb_changes(&mut self, now_ms: u64) {
        let changed = self.table.take_changed();
        let mut nodes = Vec::new();
        for doc in changed {
            match doc {
                DocId::Job(id) => {
                    self.dirty.insert(id);
                }
                DocId::Node(id) => nodes.push(id),
            }
        }
        if !nodes.is_empty() {
            self.on_nodes_changed(now_ms, &nodes);
        }
    }

    /// Node documents (or the certificates about those nodes) changed. Cost is per changed
    /// node, not per cluster member: on a 1,000-node boot every node document arrives once.
    fn on_nodes_changed(&mut self, now_ms: u64, nodes: &[NodeId]) {
        let mut state_changed: BTreeSet<&NodeId> = BTreeSet::new();
        let mut about_me = false;
        for id in nodes {
            about_me |= *id == self.id;
            let new = self.table.node_states().get(id).copied();
            let old = self.node_states.get(id).copied();
            if old != new {
                state_changed.insert(id);
                self.on_state_change(now_ms, id, old, new);
                match new {
                    Some(state) => {
                        self.events.push(Event::Node { id: id.clone(), state });
                        self.node_states.insert(id.clone(), state);
                    }
                    None => {
                        self.node_states.remove(id);
                    }
                }
            }
            self.refresh_node_caches(id);
        }
        if !state_changed.is_empty() {
            // A node's death or return changes who wins the instances it claimed or ran, and
            // the status of those jobs, finished or not (a return can make a failed or
            // stopped job running again). Jobs it has no part in cannot change: where they
            // are pending, this node's claim back-off timer ranks afresh when it fires.
            // (Re-evaluating every open job on every state change was O(jobs) per message:
            // a partition of a 1,000-node simulation stalled on it.)
            for node in state_changed {
                if let Some(jobs) = self.participating.get(node) {
                    self.dirty.extend(jobs.iter().cloned());
                }
            }
        }
        if about_me {
            self.refute_if_needed(false);
        }
        self.drop_stale_certificates();
    }

    /// A certificate that arrives about a node this node saw alive, not suspected first, was
    /// written where the node could not be reached: across a cut, now healed, or it would
    /// have come after a suspicion, pushed as the care-taker wrote it. The accused is likely
    /// alive and will refute once it hears, but anti-entropy may bring it the certificate
    /// seconds after it reached this node. Meanwhile every node that learnt of it found the
    /// accused's instances without a valid claim and claimed them afresh: at 200 simulated
    /// nodes, 500 such claims in the half-second after a heal, and as many duplicate starts.
    /// So the certificate goes straight to the accused (the certifiers' node documents),
    /// and the accused's instances wait here for its refutation, two round trips, before
    /// they count as lost. A node really dead costs one wasted message per node that saw it
    /// alive, and those rarely exist: a death is normally suspected first.
    fn on_state_change(&mut self, now_ms: u64, id: &NodeId, old: Option<NodeState>, new: Option<NodeState>) {
        if new.is_none_or(|s| s.counts()) {
            self.awaiting_refutation.remove(id);
            return;
        }
        let sudden = old.unwrap_or(NodeState::Alive) == NodeState::Alive && new == Some(NodeState::Dead);
        if !sudden || *id == self.id || !self.peers.contains(id) {
            return;
        }
        self.awaiting_refutation.retain(|_, deadline| *deadline > now_ms);
        self.awaiting_refutation.insert(id.clone(), now_ms + 2 * self.effective_stagger_ms());
        let incarnation = self.table.node(id).map_or(0, |r| r.incarnation);
        for observer in self.table.certifiers(id, incarnation) {
            let doc = DocId::Node(observer);
            let changes = self.table.changes_missing(&doc, &[]);
            if !changes.is_empty() {
                self.counters.certificates_forwarded += 1;
                self.sends.push((id.clone(), Message::Changes { doc, changes: changes.into() }));
            }
        }
    }

    /// Keeps the candidate list and the care-taker ring in step with one node's record.
    fn refresh_node_caches(&mut self, id: &NodeId) {
        let state = self.node_states.get(id).copied();
        let record = self.table.node(id);
        let info = record.and_then(|r| r.info.as_ref());
        let ring_key = (colony_crdt::hash::stable_hash(id.as_bytes()), id.clone());
        if info.is_some() && (*id == self.id || state.is_some_and(|s| s.counts())) {
            self.ring.insert(ring_key);
        } else {
            self.ring.remove(&ring_key);
        }
        let eligible = *id != self.id
            && record.is_some_and(|r| r.mode == NodeMode::Active)
            && state.unwrap_or(NodeState::Alive) == NodeState::Alive;
        match info {
            Some(info) if eligible => {
                let candidate = Candidate {
                    capacity: info.capacity,
                    labels: info.labels.clone(),
                    drivers: info.drivers.iter().map(|d| colony_crdt::hash::stable_hash(d.as_bytes())).collect(),
                    allocated: self.allocated.get(id).copied().unwrap_or_default(),
                };
                self.candidates.insert(id.clone(), candidate);
            }
            _ => {
                self.candidates.remove(id);
            }
        }
    }

    fn refute_if_needed(&mut self, force: bool) {
        let worst = match (self.table.worst_certificate(&self.id, true), self.table.worst_certificate(&self.id, false))
        {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let needed = worst.is_some_and(|w| w >= self.incarnation);
        if needed || force {
            let next = worst.map_or(self.incarnation, |w| w.max(self.incarnation)) + u64::from(needed);
            if needed {
                self.counters.refutations += 1;
            }
            self.incarnation = next;
            self.table.write_incarnation(next);
        }
    }

    /// Our suspicions and death certificates about nodes that have since refuted them (raised
    /// their incarnation) or left are cleared, so node documents stay small.
    fn drop_stale_certificates(&mut self) {
        let Some(me) = self.table.node(&self.id) else { return };
        let stale = |certs: &BTreeMap<NodeId, u64>| -> Vec<NodeId> {
            certs
                .iter()
                .filter(|(target, inc)| {
                    self.table.node(target).is_some_and(|r| r.incarnation > **inc || r.mode == NodeMode::Left)
                })
                .map(|(t, _)| t.clone())
                .collect()
        };
        let suspects = stale(&me.suspects);
        let deaths = stale(&me.deaths);
        for target in suspects {
            self.table.write_suspect(&target, None);
            self.swim.forget(&target);
        }
        for target in deaths {
            self.table.write_death(&target, None);
            self.swim.forget(&target);
        }
    }

    /// The Lifeguard local health multiplier (0 = healthy).
    pub fn local_health(&self) -> u32 {
        self.swim.local_health()
    }

    fn flush(&mut self, now_ms: u64) {
        let records = self.table.take_persist_records();
        if !records.is_empty() {
            self.persisted_since_snapshot += records.iter().map(Vec::len).sum::<usize>();
            self.outputs.push_back(Output::Persist(records));
        }
        // The snapshot's size is estimated from its document count, not measured: the bytes of a
        // cold document depend on how it was encoded (a save, or a save followed by change
        // chunks), and in the simulator on which node froze a shared state first. Measured
        // bytes made when a node snapshots, and so its later decisions, depend on other
        // nodes' timing: with snapshots past 2 MB (hundreds of nodes and jobs), a seed's
        // result could depend on the simulator's thread count. One such dependence remains:
        // `persisted_since_snapshot` counts record bytes, and a change taken from a shared
        // state is one raw record where a live document's next write would have joined it
        // in one incremental save (a record header apart).
        let estimate = self.last_snapshot_documents.saturating_mul(SNAPSHOT_BYTES_PER_DOCUMENT);
        let threshold = self.config.limits.snapshot_after_bytes.max(estimate * 2);
        // Up to half as much again, a function of the node and how many snapshots it took:
        // nodes receive the same changes, so without it every node crossed the threshold at
        // the same change and snapshotted at once (at 1,000 simulated nodes, gigabytes of
        // snapshots in flight together; on a real cluster, every disk busy in the same second).
        let spread = colony_crdt::hash::stable_hash_parts(&[self.id.as_bytes(), &self.snapshots.to_le_bytes()]);
        let threshold = threshold + (spread % (threshold as u64 / 2 + 1)) as usize;
        if self.persisted_since_snapshot > threshold {
            let snapshot = self.table.snapshot_records();
            self.snapshots += 1;
            self.last_snapshot_documents = self.table.snapshot_documents();
            self.persisted_since_snapshot = 0;
            self.outputs.push_back(Output::Snapshot(snapshot));
        }
        // Push local changes to every reachable peer at once.
        let outbox = self.table.take_outbox();
        if !outbox.is_empty() {
            let mut grouped: BTreeMap<DocId, Vec<Vec<u8>>> = BTreeMap::new();
            for (doc, change) in outbox {
                grouped.entry(doc).or_default().push(change);
            }
            for (doc, changes) in grouped {
                let changes: Arc<[Vec<u8>]> = changes.into();
                for peer in &self.peers {
                    self.sends.push((peer.clone(), Message::Changes { doc: doc.clone(), changes: changes.clone() }));
                }
            }
        }
        for (to, message) in self.sends.drain(..) {
            self.outputs.push_back(Output::Send { to, message });
        }
        let keep = self.queue_keep();
        self.sends.shrink_to(keep);
        self.outputs.extend(self.task_outputs.drain(..));
        for event in self.events.drain(..) {
            self.outputs.push_back(Output::Event(event));
        }
        let _ = now_ms;
    }

    // ---------------------------------------------------------------- placement

    fn evaluate_job(&mut self, now_ms: u64, job: &str) {
        self.table.materialize_job(job);
        let Some(record) = self.table.job(job) else {
            self.forget_local(job);
            return;
        };
        let Some(header) = record.header.clone() else { return };
        let spec = &header.spec;
        let states = &self.node_states;
        let state = |n: &str| states.get(n).copied().unwrap_or(NodeState::Alive);
        let views: Vec<InstanceView> =
            (0..spec.count).map(|i| evaluate_instance(job, record, spec, i, &state)).collect();
        let stopped = !record.stops.is_empty();
        let status = rules::job_status(stopped, &views);
        let finished_at_ms = status.is_terminal().then(|| rules::finished_at_ms(record));
        let mut participants: Vec<Arc<str>> = record
            .claims
            .keys()
            .map(|(_, n)| n)
            .chain(record.runs.keys().map(|(_, _, n)| n))
            .map(|n| shared_node_id(n))
            .collect();
        participants.sort_unstable();
        participants.dedup();
        // Claims written on each instance's current attempt, valid or not, and until when a
        // claimant's refutation is awaited (see `try_claim`, `on_state_change`).
        let awaiting = &self.awaiting_refutation;
        let claimants: Vec<Claimants> = views
            .iter()
            .map(|v| {
                let claims = colony_crdt::records::range_from(&record.claims, &(v.index, String::new()))
                    .take_while(|((i, _), _)| *i == v.index)
                    .filter(|(_, c)| c.attempt == v.attempt);
                claims.fold(Claimants::default(), |acc, ((_, node), _)| Claimants {
                    count: acc.count + 1,
                    refutation_due_ms: acc.refutation_due_ms.max(awaiting.get(node).copied().unwrap_or(0)),
                })
            })
            .collect();
        self.update_cache(job, spec, status, &views, finished_at_ms, participants);
        for (view, claimants) in views.iter().zip(claimants) {
            self.act_on_instance(now_ms, job, &header, view, stopped, claimants);
        }
        // A job this node has no part in is deferred: its changes are held, not applied, until
        // one of the moments this node could act on it (a back-off timer, a change of state of
        // a node that claimed or ran it, the once-a-compaction-interval sweep, a sync round).
        // On each change this evaluation would only have confirmed that there is nothing to
        // do; at 1,000 nodes applying and re-evaluating every job's every change on every node
        // was most of the simulator's time.
        //
        // The node a job was submitted to never defers it: whoever submitted it watches it
        // there (`job run --wait`, an embedder's event stream), and a deferred job's states
        // between two sweeps would reach its events as one jump (pending straight to
        // succeeded). One node per job: no cost at scale.
        if !self.has_local_work(job) && !self.has_claim(job) && header.submitted_by != self.id {
            self.table.defer_job(job);
        }
    }

    fn retain_pending_since(&mut self, job: &str, keep: impl Fn(&PendingSince) -> bool) {
        if let Some(entries) = self.pending_since.get_mut(job) {
            entries.retain(keep);
            if entries.is_empty() {
                self.pending_since.remove(job);
            }
        }
    }

    fn has_claim(&self, job: &str) -> bool {
        self.claims.range((job.to_string(), 0)..=(job.to_string(), u32::MAX)).next().is_some()
    }

    fn update_cache(
        &mut self,
        job: &str,
        spec: &JobSpec,
        status: JobStatus,
        views: &[InstanceView],
        finished_at_ms: Option<u64>,
        participants: Vec<Arc<str>>,
    ) {
        let instances: Vec<(InstanceStatus, Option<Arc<str>>)> =
            views.iter().map(|v| (v.status, v.owner.as_deref().map(shared_node_id))).collect();
        let allocation: Vec<(Arc<str>, Resources)> = views
            .iter()
            .filter(|v| matches!(v.status, InstanceStatus::Claimed | InstanceStatus::Running))
            .filter_map(|v| v.owner.as_deref().map(|o| (shared_node_id(o), spec.resources)))
            .collect();
        let old = self.cache.remove(job).unwrap_or_default();
        if old.status != Some(status) {
            self.events.push(Event::Job { id: job.to_string(), status });
        }
        for (i, inst) in instances.iter().enumerate() {
            if old.instances.get(i) != Some(inst) {
                self.events.push(Event::Instance {
                    job: job.to_string(),
                    index: i as u32,
                    status: inst.0,
                    node: inst.1.as_deref().map(str::to_string),
                });
            }
        }
        for (node, r) in &old.allocation {
            self.release_allocation(node, *r);
        }
        self.index_participants(job, &old.participants, &participants);
        for (node, r) in &allocation {
            if !self.allocated.contains_key(&**node) {
                self.allocated.insert(node.to_string(), Resources::default());
            }
            let Some(a) = self.allocated.get_mut(&**node) else { continue };
            *a = a.plus(*r);
            if let Some(c) = self.candidates.get_mut(&**node) {
                c.allocated = *a;
            }
        }
        self.cache.insert(
            job.to_string(),
            JobCache {
                status: Some(status),
                instances,
                allocation,
                priority: spec.priority,
                finished_at_ms,
                participants,
            },
        );
    }

    fn act_on_instance(
        &mut self,
        now_ms: u64,
        job: &str,
        header: &JobHeader,
        view: &InstanceView,
        stopped: bool,
        claimants: Claimants,
    ) {
        let (spec, submitted_at_ms) = (&header.spec, header.submitted_at_ms);
        let key = (job.to_string(), view.index);
        let my_task: Option<TaskId> = self
            .tasks
            .iter()
            .find(|(_, t)| t.job == job && t.index == view.index && t.stopping.is_none())
            .map(|(id, _)| id.clone());
        let i_own = view.owner.as_deref() == Some(self.id.as_str());

        // Only the current attempt of a pending instance needs to know since when it is
        // pending. Kept for every instance and attempt ever seen, it was one entry per instance
        // on every node, for as long as the job was held.
        let current = (view.status == InstanceStatus::Pending && !stopped).then_some(view.attempt);
        self.retain_pending_since(job, |p| p.index != view.index || Some(p.attempt) == current);
        if stopped || view.status.is_terminal() {
            if let Some(task) = my_task {
                let reason = if stopped { "stopped" } else { "superseded" };
                self.stop_task(&task, reason);
            } else if self.claims.contains_key(&key) {
                self.claims.remove(&key);
                self.release_capacity();
            }
            return;
        }

        match view.status {
            InstanceStatus::Claimed | InstanceStatus::Running if i_own => {
                let Some(claim) = self.claims.get(&key).cloned() else {
                    // We own it by the table but hold no local claim: a claim from before a
                    // restart that was not yet withdrawn. Give it up.
                    if my_task.is_none() {
                        self.table.delete_claim(job, view.index);
                    }
                    return;
                };
                if claim.attempt != view.attempt {
                    return;
                }
                if !claim.started {
                    let start_at = claim.at_ms + self.effective_settle_ms();
                    if now_ms >= start_at {
                        self.start_task(now_ms, job, spec, view.index, view.attempt);
                    } else {
                        self.timers.insert((start_at, job.to_string()));
                    }
                }
            }
            InstanceStatus::Claimed | InstanceStatus::Running => {
                // Someone else wins. If we claimed or run it, we lost: stop and withdraw.
                if let Some(task) = my_task {
                    self.counters.tasks_superseded += 1;
                    self.stop_task(&task, "superseded");
                } else if let Some(claim) = self.claims.remove(&key) {
                    if !claim.started {
                        self.counters.claims_lost += 1;
                        self.table.delete_claim(job, view.index);
                    }
                    self.release_capacity();
                }
            }
            InstanceStatus::Pending => {
                if let Some(task) = my_task {
                    // Our copy runs an older attempt that is no longer current.
                    self.stop_task(&task, "superseded");
                    return;
                }
                if let Some(claim) = self.claims.get(&key) {
                    if claim.attempt == view.attempt && !claim.started {
                        return; // our claim is written; it shows once the change lands
                    }
                    self.claims.remove(&key);
                    self.release_capacity();
                }
                self.try_claim(now_ms, job, spec, view, submitted_at_ms, claimants);
            }
            _ => {}
        }
    }

    /// The settle window: at least the configured one, and long enough to cover a round trip
    /// as measured by probes (smoothed RTT + 4 deviations, as TCP's retransmit timer). On a
    /// slow network a fixed window would start duplicates that a wider one avoids.
    pub fn effective_settle_ms(&self) -> u64 {
        self.config.timing.settle_ms.max(self.swim.rtt_bound_ms())
    }

    fn effective_stagger_ms(&self) -> u64 {
        self.config.timing.claim_stagger_ms.max(self.swim.rtt_bound_ms())
    }

    fn try_claim(
        &mut self,
        now_ms: u64,
        job: &str,
        spec: &JobSpec,
        view: &InstanceView,
        submitted_at_ms: u64,
        claimants: Claimants,
    ) {
        let Claimants { count: claimants, refutation_due_ms } = claimants;
        if self.mode != NodeMode::Active {
            return;
        }
        if now_ms < view.not_before_ms {
            self.timers.insert((view.not_before_ms, job.to_string()));
            return;
        }
        if !spec.constraints.iter().all(|c| c.matches(&self.config.labels))
            || !self.config.drivers.contains(&spec.driver)
        {
            return;
        }
        let free = self.config.capacity.minus(self.local_allocation());
        if !free.fits(spec.resources) {
            // I4: never past our own capacity. Look again when something finishes here.
            self.waiting_for_capacity.insert(job.to_string());
            return;
        }
        let position = self.rank_position(job, spec, view);
        // When we first saw the instance pending with this many claims on its attempt: a claim
        // that stops counting (its node certified dead, or withdrawn) makes it pending anew.
        let entries = match self.pending_since.get_mut(job) {
            Some(entries) => entries,
            None => self.pending_since.entry(job.to_string()).or_default(),
        };
        let at = match entries.iter().position(|p| p.index == view.index && p.attempt == view.attempt) {
            Some(at) => at,
            None => {
                entries.push(PendingSince { index: view.index, attempt: view.attempt, since_ms: now_ms, claimants });
                entries.len() - 1
            }
        };
        let seen = &mut entries[at];
        if seen.claimants != claimants {
            (seen.since_ms, seen.claimants) = (now_ms, claimants);
        }
        let first_seen = seen.since_ms;
        // The back-off counts from a moment every node agrees on where there is one (the
        // submission, or the end of a restart delay), so a node that hears of the job late
        // does not claim at the same moment as a worse-ranked node that heard early. A clock
        // ahead of ours cannot push the moment past when we first saw it.
        //
        // Not for an instance pending again after its claim stopped counting: counted from
        // the submission, every node's back-off had long run out, and every node claimed the
        // moment it learnt of the death (57 of 200 simulated nodes claimed one instance in
        // one virtual millisecond, and the claims' fan-out stalled the run for minutes).
        // Nodes learn of a death at about the same time: counting from then, the ranks space
        // their claims again.
        let shared = if view.not_before_ms > 0 { view.not_before_ms } else { submitted_at_ms };
        let fresh = view.attempt == 0 || view.not_before_ms > 0;
        let since = if fresh && claimants == 0 { shared.min(first_seen) } else { first_seen };
        let stagger = self.effective_stagger_ms();
        // A node that is not first in line also waits one stagger after it first heard of the
        // job, so a better node's claim that is still in flight (a busy or late peer) can
        // arrive first.
        let own_wait = if position > 0 { first_seen + stagger } else { first_seen };
        let due = (since + u64::from(position) * stagger).max(own_wait).max(refutation_due_ms);
        if now_ms < due {
            self.timers.insert((due, job.to_string()));
            return;
        }
        let claim = Claim { attempt: view.attempt, boot: self.boot, at_ms: now_ms };
        self.table.write_claim(job, view.index, &claim);
        self.counters.claims += 1;
        self.counters.claims_replacing += u64::from(claimants > 0);
        self.retain_pending_since(job, |p| p.index != view.index);
        self.claims.insert(
            (job.to_string(), view.index),
            MyClaim { attempt: view.attempt, at_ms: now_ms, resources: spec.resources, started: false },
        );
        self.timers.insert((now_ms + self.effective_settle_ms(), job.to_string()));
    }

    /// How many stagger steps this node waits: how many eligible nodes rank before it.
    /// Eligible: alive, active, matching the constraints, with room for the request by our
    /// view of their allocation.
    ///
    /// Counted exactly up to `max_claim_rank`, which bounds the ranking's cost (every node
    /// ranks every new instance). Past it, the position is estimated from this node's own
    /// rendezvous hash, as if every node weighed the same, over at most
    /// `PAST_CAP_SLOTS × cap` more positions ([`Engine::past_cap_position`]). So the
    /// nodes past the cap still claim one after another, best first, within a bounded wait
    /// (every waiting node holds a timer until then). They used to all wait `cap` steps and
    /// claim in the same instant whenever the best nodes could not claim (a partition hid
    /// them, or they were full by their own count): at 200 simulated nodes that was a third
    /// of all claims, each pushed to every node.
    fn rank_position(&self, job: &str, spec: &JobSpec, view: &InstanceView) -> u32 {
        let instance = rules::instance_key(job, view.index, view.attempt);
        let penalized = |node: &str| spec.restart.placement == RestartPlacement::Other && view.failed_on.contains(node);
        let score_of = |node: &str, capacity: Resources, allocated: Resources| {
            let mut s = rules::placement_score_of(instance, node, capacity, allocated);
            if penalized(node) {
                s /= 1e6; // after every node that has not failed it
            }
            s
        };
        let mine = score_of(&self.id, self.config.capacity, self.local_allocation());
        let cap = self.config.timing.max_claim_rank.max(1);
        let mut better = 0;
        let driver = colony_crdt::hash::stable_hash(spec.driver.as_bytes());
        for (id, c) in &self.candidates {
            let allocated = c.allocated;
            if !c.drivers.contains(&driver) || !spec.constraints.iter().all(|k| k.matches(&c.labels)) {
                continue;
            }
            if !c.capacity.minus(allocated).fits(spec.resources) {
                continue;
            }
            let s = score_of(id, c.capacity, allocated);
            if s > mine || (s == mine && id < &self.id) {
                better += 1;
                if better >= cap {
                    return self.past_cap_position(instance, cap, penalized(&self.id));
                }
            }
        }
        better
    }

    /// [`Engine::rank_position`] past the cap. As if every node weighed the same, the share of
    /// nodes ranked before this one is about `1 - u` (`u` its rendezvous hash in (0, 1]), and
    /// nodes past the cap have a share above about `cap / n`: that range maps onto the window
    /// of `min(n - cap, PAST_CAP_SLOTS × cap)` positions after the cap, so small clusters use
    /// its first positions too. A node that failed the instance where the job wants another
    /// node (`penalized`) takes the last position, as it ranks after every other node.
    fn past_cap_position(&self, instance: u64, cap: u32, penalized: bool) -> u32 {
        let n = self.candidates.len();
        let slots = n.saturating_sub(cap as usize).min(PAST_CAP_SLOTS.saturating_mul(cap as usize));
        if slots == 0 {
            return cap;
        }
        if penalized {
            return cap.saturating_add(slots as u32 - 1);
        }
        let u = colony_crdt::hash::unit_interval(rules::rank_key_of(instance, &self.id));
        let floor = f64::from(cap) / n as f64;
        let share = ((1.0 - u - floor) / (1.0 - floor)).clamp(0.0, 1.0);
        cap.saturating_add(((share * slots as f64) as u32).min(slots as u32 - 1))
    }

    fn start_task(&mut self, now_ms: u64, job: &str, spec: &JobSpec, index: u32, attempt: u32) {
        let task = task_id(job, index, attempt);
        if let Some(claim) = self.claims.get_mut(&(job.to_string(), index)) {
            claim.started = true;
        }
        let run = Run {
            status: RunStatus::Running,
            boot: self.boot,
            started_ms: now_ms,
            finished_ms: None,
            exit_code: None,
            reason: None,
        };
        self.table.write_run(job, index, attempt, &run);
        self.tasks.insert(
            task.clone(),
            LocalTask { job: job.to_string(), index, attempt, started_ms: now_ms, stopping: None },
        );
        self.counters.tasks_started += 1;
        self.task_outputs.push(Output::StartTask(Box::new(TaskStart {
            task,
            job: job.to_string(),
            index,
            attempt,
            spec: spec.clone(),
        })));
    }

    fn stop_task(&mut self, task: &str, reason: &'static str) {
        if let Some(local) = self.tasks.get_mut(task) {
            if local.stopping.is_none() {
                local.stopping = Some(reason);
                self.task_outputs.push(Output::StopTask { task: task.to_string() });
            }
        }
    }

    fn release_capacity(&mut self) {
        let waiting = std::mem::take(&mut self.waiting_for_capacity);
        self.dirty.extend(waiting);
    }

    fn has_local_work(&self, job: &str) -> bool {
        self.tasks.values().any(|t| t.job == job)
    }

    fn release_allocation(&mut self, node: &str, r: Resources) {
        if let Some(a) = self.allocated.get_mut(node) {
            *a = a.minus(r);
            if let Some(c) = self.candidates.get_mut(node) {
                c.allocated = *a;
            }
        }
    }

    /// Moves `job` in the `participating` index from the nodes `old` to the nodes `new`.
    fn index_participants(&mut self, job: &str, old: &[Arc<str>], new: &[Arc<str>]) {
        for node in old.iter().filter(|n| new.binary_search(n).is_err()) {
            if let Some(jobs) = self.participating.get_mut(&**node) {
                jobs.remove(job);
                if jobs.is_empty() {
                    self.participating.remove(&**node);
                }
            }
        }
        for node in new.iter().filter(|n| old.binary_search(n).is_err()) {
            self.participating.entry(node.to_string()).or_default().insert(job.to_string());
        }
    }

    fn forget_local(&mut self, job: &str) {
        let claims: Vec<(JobId, u32)> =
            self.claims.range((job.to_string(), 0)..=(job.to_string(), u32::MAX)).map(|(k, _)| k.clone()).collect();
        for key in claims {
            self.claims.remove(&key);
        }
        self.pending_since.remove(job);
        self.waiting_for_capacity.remove(job);
        if let Some(old) = self.cache.remove(job) {
            for (node, r) in &old.allocation {
                self.release_allocation(node, *r);
            }
            self.index_participants(job, &old.participants, &[]);
        }
        let tasks: Vec<TaskId> = self.tasks.iter().filter(|(_, t)| t.job == job).map(|(id, _)| id.clone()).collect();
        for task in tasks {
            self.stop_task(&task, "compacted");
        }
    }

    fn compact(&mut self, now_ms: u64) {
        let finished: Vec<(u64, String)> = self
            .cache
            .iter()
            .filter_map(|(id, c)| c.finished_at_ms.map(|at| (at, id.clone())))
            .filter(|(_, id)| !self.has_local_work(id))
            .collect();
        let retention = self.config.retention.clone();
        self.table.freeze_idle_nodes();
        // Finished jobs change rarely: keep their documents cold (I6, memory).
        for (_, job) in &finished {
            self.table.freeze_job(job);
        }
        let doomed = rules::jobs_to_compact(&finished, now_ms, retention.finished_jobs, retention.finished_age_ms);
        for job in doomed {
            self.table.compact_job(&job, now_ms);
            self.forget_local(&job);
            self.counters.jobs_compacted += 1;
        }
        self.table.expire_tombstones(now_ms, retention.tombstones, retention.tombstone_age_ms);
    }

    // ---------------------------------------------------------------- anti-entropy

    fn random_peer(&mut self) -> Option<NodeId> {
        if self.peers.is_empty() {
            return None;
        }
        let i = self.rng.gen_range(0..self.peers.len());
        self.peers.iter().nth(i).cloned()
    }

    fn on_digest(&mut self, from: &str, buckets: &[u64]) {
        let mine = self.table.bucket_hashes();
        if buckets.len() != BUCKETS {
            self.counters.bad_messages += 1;
            return;
        }
        let differing: Vec<usize> = (0..BUCKETS).filter(|b| mine[*b] != buckets[*b]).collect();
        if differing.is_empty() {
            return;
        }
        let mut entries = self.table.summary(&differing);
        entries.truncate(self.config.limits.summary_entries);
        let buckets = differing.iter().map(|b| *b as u16).collect();
        self.sends.push((from.to_string(), Message::Summary { buckets, entries }));
    }

    fn on_summary(&mut self, from: &str, buckets: &[u16], entries: Vec<(DocId, u64)>) {
        let buckets: Vec<usize> = buckets.iter().map(|b| usize::from(*b)).filter(|b| *b < BUCKETS).collect();
        let theirs: BTreeMap<DocId, u64> = entries.into_iter().collect();
        let mine: BTreeMap<DocId, u64> = self.table.summary(&buckets).into_iter().collect();
        let mut forget = Vec::new();
        let mut to_sync: Vec<DocId> = Vec::new();
        for (doc, hash) in &theirs {
            if let DocId::Job(job) = doc {
                if self.table.is_compacted(job) {
                    forget.push(job.clone());
                    continue;
                }
            }
            if mine.get(doc) != Some(hash) {
                to_sync.push(doc.clone());
            }
        }
        for doc in mine.keys() {
            if !theirs.contains_key(doc) {
                to_sync.push(doc.clone());
            }
        }
        if !forget.is_empty() {
            self.sends.push((from.to_string(), Message::Forget { jobs: forget }));
        }
        // Node documents first, and never deferred: they say who is alive, and so who owns
        // what. A certificate from across a healed cut that reaches the accused only after
        // hundreds of job documents leaves every node that heard of it first re-placing the
        // accused's work; the accused's refutation is what stops that. There is one node
        // document per member, a few changes each: the budget is for job documents.
        let (nodes, mut jobs): (Vec<DocId>, Vec<DocId>) =
            to_sync.into_iter().partition(|doc| matches!(doc, DocId::Node(_)));
        let cap = self.repair_budget.saturating_sub(nodes.len());
        if jobs.len() > cap {
            self.counters.sync_docs_deferred += (jobs.len() - cap) as u64;
            jobs = sample_sorted(&mut self.rng, jobs, cap);
        }
        self.repair_budget = self.repair_budget.saturating_sub(nodes.len() + jobs.len());
        for doc in nodes.into_iter().chain(jobs) {
            let hashes = self.table.doc_hashes(&doc);
            self.sends.push((from.to_string(), Message::Have { doc, hashes, reply: true }));
        }
    }

    fn continue_sync(&mut self, peer: &str, doc: DocId) {
        if self.sessions.len() >= self.config.limits.sync_sessions {
            self.sessions.clear();
            self.sync_idle_rounds.clear();
        }
        let key = (peer.to_string(), doc.clone());
        let mut session = self.sessions.remove(&key).map(|(s, _)| s).unwrap_or_default();
        // In sync (None): the session is dropped to keep memory bounded.
        if let Some(data) = self.table.generate_sync(&doc, &mut session) {
            self.sends.push((peer.to_string(), Message::Sync { doc, data }));
            self.sessions.insert(key, (session, self.intervals));
        } else {
            self.sync_idle_rounds.remove(&key);
        }
    }

    /// A peer's `Have`: send it what it lacks, and ask for what this node lacks.
    fn on_have(&mut self, from: &str, doc: DocId, mut theirs: Vec<[u8; 32]>, reply: bool) {
        if let DocId::Job(job) = &doc {
            if self.table.is_compacted(job) {
                self.sends.push((from.to_string(), Message::Forget { jobs: vec![job.clone()] }));
                return;
            }
        }
        theirs.sort_unstable();
        theirs.dedup();
        let missing = self.table.changes_missing(&doc, &theirs);
        if reply {
            let mine = self.table.doc_hashes(&doc);
            if theirs.iter().any(|h| mine.binary_search(h).is_err()) {
                self.sends.push((from.to_string(), Message::Have { doc: doc.clone(), hashes: mine, reply: false }));
            }
        }
        if !missing.is_empty() {
            self.counters.repair_changes_sent += missing.len() as u64;
            self.sends.push((from.to_string(), Message::Changes { doc, changes: missing.into() }));
        }
    }

    fn on_sync(&mut self, from: &str, doc: DocId, data: &[u8]) {
        if let DocId::Job(job) = &doc {
            if self.table.is_compacted(job) {
                self.sends.push((from.to_string(), Message::Forget { jobs: vec![job.clone()] }));
                return;
            }
        }
        let key = (from.to_string(), doc.clone());
        let mut session = self.sessions.remove(&key).map(|(s, _)| s).unwrap_or_default();
        let moved = match self.table.receive_sync(&doc, &mut session, data) {
            Ok(moved) => moved,
            Err(_) => {
                self.counters.bad_messages += 1;
                return;
            }
        };
        // A session that keeps exchanging messages without the document moving is stuck: a
        // change both sides wait for may exist nowhere any more (its author crashed before
        // persisting it). Stop answering after a few idle rounds; the next anti-entropy round
        // starts afresh, so this costs at most one round per interval instead of a storm.
        let idle = self.sync_idle_rounds.entry(key.clone()).or_default();
        *idle = if moved { 0 } else { *idle + 1 };
        if *idle > MAX_IDLE_SYNC_ROUNDS {
            self.sync_idle_rounds.remove(&key);
            return;
        }
        self.sessions.insert(key, (session, self.intervals));
        self.continue_sync(from, doc);
    }

    // ---------------------------------------------------------------- failure detection

    fn on_ack(&mut self, now_ms: u64, from: &str, seq: u64) {
        match self.swim.on_ack(now_ms, seq, from) {
            swim::AckOutcome::Relay { origin, seq } => self.sends.push((origin, Message::Ack { seq })),
            swim::AckOutcome::Alive { target } => self.clear_suspicion(&target),
            swim::AckOutcome::Unknown => {}
        }
    }

    fn clear_suspicion(&mut self, target: &str) {
        let Some(record) = self.table.node(&self.id) else { return };
        let suspected = record.suspects.contains_key(target);
        let certified = record.deaths.contains_key(target);
        if suspected {
            self.table.write_suspect(target, None);
        }
        if certified {
            self.table.write_death(target, None);
        }
    }

    fn watched_nodes(&self) -> Vec<NodeId> {
        let me = (colony_crdt::hash::stable_hash(self.id.as_bytes()), self.id.clone());
        if !self.ring.contains(&me) {
            return Vec::new();
        }
        let k = self.config.timing.care_takers.min(self.ring.len().saturating_sub(1));
        // We watch the k nodes before us on the ring; each node is watched by the k after it.
        self.ring
            .range(..&me)
            .rev()
            .chain(self.ring.range(&me..).rev())
            .filter(|(_, id)| *id != self.id)
            .take(k)
            .map(|(_, id)| id.clone())
            .collect()
    }

    fn run_failure_detector(&mut self, now_ms: u64) {
        if self.mode == NodeMode::Left {
            return;
        }
        if self.swim.probe_due(now_ms) {
            let watched = self.watched_nodes();
            for target in watched {
                if let Some(seq) = self.swim.start_probe(now_ms, &target) {
                    self.sends.push((target, Message::Ping { seq }));
                }
            }
        }
        let expired = self.swim.expire(now_ms);
        for event in expired {
            match event {
                swim::Expired::NeedIndirect { target, seq } => {
                    let helpers: Vec<NodeId> = {
                        let candidates: Vec<NodeId> = self
                            .peers
                            .iter()
                            .filter(|p| **p != target && self.node_states.get(*p).is_none_or(|s| s.counts()))
                            .cloned()
                            .collect();
                        let mut chosen = Vec::new();
                        let mut pool = candidates;
                        while chosen.len() < self.config.timing.indirect_probes && !pool.is_empty() {
                            let i = self.rng.gen_range(0..pool.len());
                            chosen.push(pool.swap_remove(i));
                        }
                        chosen
                    };
                    for helper in helpers {
                        self.sends.push((helper, Message::PingReq { seq, target: target.clone() }));
                    }
                }
                swim::Expired::Suspect { target } => {
                    let inc = self.table.node(&target).map_or(0, |r| r.incarnation);
                    let already = self.table.node(&self.id).is_some_and(|r| r.suspects.get(&target) == Some(&inc));
                    if !already {
                        self.table.write_suspect(&target, Some(inc));
                    }
                }
            }
        }
        for target in self.swim.suspicions_due(now_ms) {
            let inc = self.table.node(&target).map_or(0, |r| r.incarnation);
            let already = self.table.node(&self.id).is_some_and(|r| r.deaths.get(&target) == Some(&inc));
            if !already {
                self.table.write_death(&target, Some(inc));
                self.counters.deaths_written += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests;
