//! The cluster table: one Automerge document per node and one per job, behind a typed API.
//!
//! # Single writer per key
//! - A node writes only its own node document.
//! - In a job document, the accepting node writes `spec` once; node N writes only
//!   `claim/<i>/N`, `run/<i>/<a>/N` and `stop/N`.
//!
//! So concurrent writers never touch one key, and Automerge's own conflict pick decides
//! nothing. The typed writers below take no node argument: they always write as the local
//! node, which makes the rule impossible to break from outside this module.
//!
//! # Bounded history (I6)
//! A job's history lives and dies with the job: compaction drops the whole document, and a
//! bounded tombstone list keeps peers from handing it back. See ARCHITECTURE.md.

use crate::doc::{heads_hash, push_waiting, Doc, DocError, SyncState, Waiting};
use crate::frozen::{self, Chunks, Frozen, Shared, SharedStates};
use crate::hash::{mix64, stable_hash};
use crate::records::{
    keys, Claim, DocId, JobHeader, JobId, JobRecord, NodeId, NodeInfo, NodeMode, NodeRecord, Run, StopRequest,
};
use crate::rules::{node_state, NodeState};
use automerge::{ActorId, ChangeHash};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Anti-entropy buckets. A digest is this many hashes, so two peers find which slice of the
/// table differs without exchanging the whole summary.
pub const BUCKETS: usize = 64;

/// Errors from the table. None of them changes the table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// Remote or stored bytes that Automerge could not read.
    #[error(transparent)]
    Doc(#[from] DocError),
    /// A persisted record or snapshot that could not be decoded.
    #[error("corrupt persisted table: {0}")]
    Corrupt(String),
}

/// One document. A document nobody here is writing is kept *cold*: a [`Frozen`] state (bytes
/// of a few hundred, hashes, record) shared with every table of the process at the same
/// heads, instead of a live Automerge document (tens of KiB in memory); it is loaded again on
/// the rare occasions it is written or synced, or on a change the memo has not seen.
struct Entry<R> {
    /// Boxed, like [`Entry::log`]: few documents are live at once, and a table holds every
    /// entry in `BTreeMap` nodes of eleven, so an inline field costs every cold entry too
    /// (at 1,000 simulated nodes, 208 bytes an entry made tree nodes the largest allocations).
    doc: Option<Box<Doc>>,
    cold: Option<Arc<Frozen<R>>>,
    record: Arc<R>,
    hash: u64,
    /// Set while the document is deferred (see [`Table::defer_job`]).
    deferred: Option<Box<Deferred>>,
    /// For a live document loaded from cold bytes and since changed only by applying held
    /// changes: those bytes followed by the changes (Automerge loads a document chunk
    /// followed by change chunks). Freezing it again keeps these instead of encoding the
    /// whole document anew, which was the largest single cost of deferral at 1,000 nodes.
    log: Option<Box<Log>>,
    /// While the document is cold or absent: the changes it holds that wait for their
    /// dependencies, in arrival order (a live document holds them itself; see
    /// [`Doc::take_waiting`]). They are not part of any state, so they are kept here beside it
    /// and go into the document whenever it is loaded. Never set while deferred (the deferral keeps them).
    ///
    /// Under message loss most nodes miss some change of some job, and each later change of
    /// that job then waits; kept live until anti-entropy brought the missing one, such
    /// documents were 193,000 live Automerge documents (18 KiB each) at 1,000 simulated
    /// nodes, and what ran the simulator out of memory.
    waiting: Vec<Waiting>,
    /// Set when the document should go cold but had changes not yet on disk: it goes cold
    /// once they are (`take_persist_records`), unless it is written to before.
    cold_when_saved: bool,
}

/// Cold bytes plus appended change chunks; see [`Entry::log`].
struct Log {
    /// The frozen state's bytes (its base shared) with the chunks applied since.
    bytes: Chunks,
    appended: u32,
}

impl Log {
    /// The log of a frozen state, to append to.
    fn of<R>(state: &Frozen<R>) -> Log {
        Log { bytes: state.bytes.clone(), appended: state.appends }
    }

    /// The log of a document new here.
    fn empty() -> Log {
        Log { bytes: Chunks::default(), appended: 0 }
    }
}

/// After this many appends a freeze encodes the document afresh, so loading a cold
/// document never replays a long tail of changes. Loading replays each appended change
/// (about as costly as applying it), so the log pays only for documents frozen about as
/// often as loaded: at 16, node documents under a 1,000-node partition (many certificate
/// changes, each loading the document) stalled the simulator longer than at 2.
const MAX_LOG_APPENDS: u32 = 2;

/// Remote changes to a deferred document: held as bytes, counted in the digest, persisted,
/// and applied in one batch when the document is next needed.
struct Deferred {
    /// Every change of the document's history when it was deferred, or when the deferral was
    /// last re-based (see [`Deferred::rebase`]), sorted (shared with its frozen state when it
    /// was cold). With `pending`, the changes held.
    known: Arc<[ChangeHash]>,
    /// The heads the document will have once `pending` is applied.
    heads: Vec<ChangeHash>,
    /// The changes held since (hash, dependencies and bytes, each shared by every table
    /// holding it; see [`frozen::waiting`]), in causal order. With `known`, the changes held.
    pending: Vec<Waiting>,
    /// `pending[..persisted]` are already in a persist record.
    persisted: usize,
    /// Changes held since the document was deferred, `pending` and those a re-base took in:
    /// what the document's reader sees as held, however they are kept.
    held: usize,
    /// Changes that wait for dependencies the deferral does not hold, in arrival order, as
    /// a live document keeps them ([`frozen::plan_held`] decides what waits, by the live
    /// document's rule). Never persisted, like a live document's; they go into the document
    /// when it is brought up to date. Under a partition most changes of a job reach a node
    /// before some change they depend on, and bringing the job up to date for each (load,
    /// apply, encode, in a state no other node reached) was most of a 1,000-node ring episode.
    waiting: Vec<Waiting>,
}

impl Deferred {
    /// When another table of this process froze the state the held changes lead to (see
    /// `frozen`), and all of them are on disk: holds that state instead, returned to become
    /// the document's cold state, and no change bytes. The entry's record stays as it was
    /// (a deferred document reads stale until materialized), and `held` still counts the
    /// changes, so what the node sees and decides does not depend on whether another node
    /// got there first.
    ///
    /// Every node receives a job's changes, and all but a few defer it: at 1,000 simulated
    /// nodes the deferrals held 1.5 million documents' worth of change lists, about 600
    /// bytes a node and a job, a fifth of the simulator's heap, for states one copy of
    /// which existed already.
    fn rebase(&mut self, states: Option<&SharedStates>) -> Option<Arc<Frozen<JobRecord>>> {
        if self.pending.is_empty() || self.persisted < self.pending.len() {
            return None;
        }
        let mut heads = self.heads.clone();
        heads.sort();
        let state = frozen::lookup::<JobRecord>(states, &heads)?;
        self.known = state.hashes.clone();
        self.pending = Vec::new();
        self.persisted = 0;
        Some(state)
    }
}

/// The bytes of `held`, one after another (raw change chunks load like an incremental save).
fn concat(held: &[Waiting]) -> Vec<u8> {
    let mut out = Vec::with_capacity(held.iter().map(|h| h.bytes().len()).sum());
    for h in held {
        out.extend_from_slice(h.bytes());
    }
    out
}

impl<R: Default + Shared> Entry<R> {
    fn new(actor: &ActorId) -> Entry<R> {
        Entry { doc: Some(Box::new(Doc::new(actor))), ..Entry::absent() }
    }

    /// An entry holding nothing yet (for a state taken from the memo).
    fn absent() -> Entry<R> {
        Entry {
            doc: None,
            cold: None,
            record: Arc::default(),
            hash: 0,
            deferred: None,
            log: None,
            waiting: Vec::new(),
            cold_when_saved: false,
        }
    }

    fn doc_mut(&mut self, actor: &ActorId) -> Result<&mut Doc, DocError> {
        // The caller may change the document in any way: the log no longer describes it.
        self.log = None;
        self.cold_when_saved = false;
        if self.doc.is_none() {
            let mut doc = match &self.cold {
                Some(f) => f.load(actor)?,
                None => Doc::load(&[], actor)?,
            };
            doc.restore_waiting(std::mem::take(&mut self.waiting));
            self.cold = None;
            self.doc = Some(Box::new(doc));
        }
        // INVARIANT: just ensured above.
        Ok(self.doc.as_mut().expect("document loaded"))
    }

    /// Makes the document cold. Changes waiting for their dependencies are kept beside it
    /// (see [`Entry::waiting`]); one with changes waiting inside Automerge itself (from a sync
    /// message) stays live, since those cannot be taken out.
    fn freeze(&mut self, shared: Option<&SharedStates>) {
        let Some(live) = self.doc.as_mut() else { return };
        if live.has_queued_in_automerge() {
            return;
        }
        let waiting = live.take_waiting();
        if !waiting.is_empty() && live.is_empty() {
            // Nothing applied yet: the document is absent, only its waiting changes are held.
            self.doc = None;
            self.log = None;
            self.waiting = waiting;
            return;
        }
        self.waiting = waiting;
        if let Some(mut doc) = self.doc.take() {
            let mut heads = doc.heads();
            heads.sort();
            let log = self.log.take();
            if let Some(state) = frozen::lookup::<R>(shared, &heads) {
                self.cold = Some(state);
                return;
            }
            // Every change hash, so later pushes are told apart (new, held, or a gap) without
            // loading: reading them costs about one apply, paid once per state per process.
            let mut hashes = doc.change_hashes();
            hashes.sort();
            let (bytes, appends) = match log {
                Some(log) => (log.bytes, log.appended),
                None => (Chunks::saved(doc.save()), 0),
            };
            let state = frozen::share(shared, Frozen::from_chunks(bytes, heads, hashes, appends, self.record.clone()));
            // The next table to need this state live copies this document.
            state.keep_live(*doc);
            self.cold = Some(state);
        }
    }

    /// A document loaded from `prior` and not moved since goes back to it (an Automerge
    /// document can have taken changes without moving only into its own queue, and then it
    /// stays live).
    fn refreeze(&mut self, prior: Arc<Frozen<R>>) {
        let Some(doc) = self.doc.as_mut() else { return };
        if doc.has_queued_in_automerge() || !doc.is_saved() {
            return;
        }
        let mut heads = doc.heads();
        heads.sort();
        if *heads != *prior.heads {
            return;
        }
        self.waiting = doc.take_waiting();
        self.doc = None;
        self.log = None;
        self.cold = Some(prior);
    }

    /// Every change held, sorted (see [`Table::doc_hashes`]).
    fn held_hashes(&mut self) -> Vec<ChangeHash> {
        match (&self.deferred, &mut self.doc, &self.cold) {
            (Some(d), _, _) => {
                let mut all: Vec<ChangeHash> =
                    d.known.iter().copied().chain(d.pending.iter().map(Waiting::hash)).collect();
                all.sort();
                all.dedup();
                all
            }
            (None, Some(doc), _) => doc.change_hashes(),
            (None, None, Some(f)) => f.hashes.to_vec(),
            (None, None, None) => Vec::new(),
        }
    }

    /// The held changes in `missing`, in causal order; `common` are the held changes the peer
    /// holds too (see [`Table::changes_missing`]).
    fn changes_missing(
        &mut self,
        actor: &ActorId,
        missing: &BTreeSet<ChangeHash>,
        common: Vec<ChangeHash>,
    ) -> Vec<Vec<u8>> {
        // Held by the deferral: after the document's own changes (they depend on them).
        let mut held: Vec<Vec<u8>> = Vec::new();
        let mut base_missing = missing.len();
        if let Some(d) = &self.deferred {
            for w in &d.pending {
                if missing.contains(&w.hash()) {
                    held.push(w.bytes().to_vec());
                    base_missing -= 1;
                }
            }
        }
        // The peer's changes the document holds: its history is closed under dependencies,
        // so the document's changes not behind them are exactly those it lacks.
        let have: Vec<ChangeHash> = match &self.deferred {
            Some(d) => common.into_iter().filter(|h| d.known.binary_search(h).is_ok()).collect(),
            None => common,
        };
        let mut out = match (&mut self.doc, &self.cold) {
            _ if base_missing == 0 => Vec::new(),
            (Some(doc), _) => doc.changes_after(&have),
            (None, Some(f)) => f.read(actor, |doc| doc.changes_after(&have)).unwrap_or_default(),
            (None, None) => Vec::new(),
        };
        out.extend(held);
        out
    }

    /// The next sync message in `state`, from a copy of a cold document: generating changes
    /// nothing, so the document stays cold.
    fn generate_sync(&mut self, actor: &ActorId, state: &mut SyncState) -> Option<Vec<u8>> {
        match (&mut self.doc, &self.cold) {
            (Some(doc), _) => doc.generate_sync(state),
            (None, Some(f)) => f.load(actor).ok()?.generate_sync(state),
            (None, None) => Doc::new(actor).generate_sync(state),
        }
    }

    /// For a cold document: its bytes and appends, the base of a log (see [`Entry::log`]).
    fn log_base(&self) -> Option<Log> {
        if self.doc.is_some() {
            return None;
        }
        self.cold.as_deref().map(Log::of)
    }

    /// After changes were applied to the document just loaded from `base`: the log (`base`
    /// followed by the chunks of exactly the changes applied, which the document tracks
    /// since it was loaded; changes left waiting are not among them), unless changes wait
    /// inside Automerge itself (a log must load to exactly this document) or the log is long
    /// enough that the next freeze should encode afresh.
    fn append_log(&mut self, base: Log) {
        self.carry_log(base, 0, true);
    }

    /// Takes the log of a live document that still has one (one just brought up to date from
    /// its deferral), with how many unsaved chunk bytes the document holds: after an apply,
    /// [`Entry::carry_log`] appends the chunks beyond that mark. `None` when there is no log
    /// or the document does not track its unsaved chunks.
    fn take_live_log(&mut self) -> Option<(Log, usize)> {
        let mark = self.doc.as_ref()?.unsaved_chunks()?.len();
        Some((*self.log.take()?, mark))
    }

    /// After an apply to a live document whose log was taken with [`Entry::take_live_log`]:
    /// the log with exactly the chunks applied appended, so the next freeze copies bytes
    /// instead of encoding the document. A job a node has no part in is brought up to date
    /// when a change arrives that its deferral cannot place (under a partition, most of
    /// them), and encoding it again as it went cold was a fifth of a 1,000-node ring episode.
    fn carry_log(&mut self, mut log: Log, mark: usize, moved: bool) {
        let Some(doc) = self.doc.as_mut() else { return };
        if !moved {
            // Nothing applied: the log describes the document still.
            self.log = Some(Box::new(log));
            return;
        }
        if log.appended >= MAX_LOG_APPENDS || doc.has_queued_in_automerge() {
            return;
        }
        let Some(applied) = doc.unsaved_chunks().and_then(|c| c.get(mark..)) else { return };
        log.bytes.append(applied);
        log.appended += 1;
        self.log = Some(Box::new(log));
    }

    /// After an unguarded apply failed on the document loaded from `base`: the document as
    /// loaded, with the changes that were waiting in it (a failed apply leaves them as they
    /// were).
    fn reload(&mut self, base: &[u8], actor: &ActorId) {
        let waiting = self.doc.as_mut().map(|doc| doc.take_waiting()).unwrap_or_default();
        self.doc = Doc::load(base, actor).ok().map(|mut doc| {
            doc.restore_waiting(waiting);
            Box::new(doc)
        });
    }

    fn save(&mut self) -> Vec<u8> {
        match (&mut self.doc, &self.cold) {
            (Some(doc), _) => doc.save(),
            (None, Some(f)) => f.bytes.joined().to_vec(),
            (None, None) => Vec::new(),
        }
    }
}

/// What the table persists: appended records, replayed in order on load.
#[derive(Debug, Serialize, Deserialize)]
enum PersistRecord {
    /// Automerge bytes (a save or an incremental save) for one document.
    Doc { doc: DocId, bytes: Vec<u8> },
    /// A job compacted away, with when.
    Compacted { job: JobId, at_ms: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    records: Vec<PersistRecord>,
}

/// A snapshot of the table as its encoded persist records (see [`Table::snapshot_records`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotRecords(pub Vec<Vec<u8>>);

impl SnapshotRecords {
    /// The single-blob form that [`Table::restore`] takes as its snapshot: the record count,
    /// then the records. Byte for byte the encoding of the list of records, so blobs written
    /// before snapshots were kept as records load the same.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = encode(&self.0.len());
        out.reserve(self.byte_len());
        for record in &self.0 {
            out.extend_from_slice(record);
        }
        out
    }

    /// Total bytes of the records.
    pub fn byte_len(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }

    /// The length of [`SnapshotRecords::to_bytes`], without building it.
    pub fn blob_len(&self) -> usize {
        encode(&self.0.len()).len() + self.byte_len()
    }
}

/// The replicated table as one node holds it.
pub struct Table {
    local: NodeId,
    actor: ActorId,
    nodes: BTreeMap<NodeId, Entry<NodeRecord>>,
    jobs: BTreeMap<JobId, Entry<JobRecord>>,
    states: BTreeMap<NodeId, NodeState>,
    /// Reverse index of certificates: target -> observer -> incarnation, for deaths and
    /// suspicions. Keeps membership incremental: a node document's change recomputes only the
    /// nodes it names, not the whole cluster (O(N) per change made boot O(N^2) per node).
    deaths_about: BTreeMap<NodeId, BTreeMap<NodeId, u64>>,
    suspects_about: BTreeMap<NodeId, BTreeMap<NodeId, u64>>,
    tombstones: BTreeMap<JobId, u64>,
    tombstone_order: VecDeque<(u64, JobId)>,
    buckets: [u64; BUCKETS],
    unsaved: BTreeSet<DocId>,
    compacted_unsaved: Vec<(JobId, u64)>,
    changed: BTreeSet<DocId>,
    outbox: Vec<(DocId, Vec<u8>)>,
    /// Every change of the local node's document, kept between its changes: a node
    /// introduces itself to each new peer with it (a thousand times at a 1,000-node boot).
    own_changes: Option<Vec<Vec<u8>>>,
    /// Deferred jobs holding changes not yet applied.
    deferred_pending: BTreeSet<JobId>,
    /// Persist records of changes taken without a live document (raw change bytes, which load
    /// like an incremental save), in arrival order; written before any other record.
    raw_unsaved: Vec<Vec<u8>>,
    /// Document states shared with other tables of the process, if any (see `frozen`).
    shared: Option<Arc<SharedStates>>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("local", &self.local)
            .field("nodes", &self.nodes.len())
            .field("jobs", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

fn bucket_of(doc: &DocId) -> usize {
    (stable_hash(doc.key().as_bytes()) % BUCKETS as u64) as usize
}

/// A document's contribution to its bucket. A document with no history yet (only changes
/// waiting for their dependencies) contributes 0, as if absent: it is not persisted either, so
/// it must hash the same before and after a restart.
fn entry_hash(doc: &DocId, heads_hash: Option<u64>) -> u64 {
    heads_hash.map_or(0, |h| mix64(stable_hash(doc.key().as_bytes()) ^ h))
}

impl Table {
    /// An empty table for `local`. `actor` must be unique to this boot of this node: a node
    /// restarted from disk may have sent changes it never persisted, and reusing the actor
    /// would make its next change collide with them.
    pub fn new(local: NodeId, actor: [u8; 16]) -> Table {
        Table {
            local,
            actor: ActorId::from(&actor[..]),
            nodes: BTreeMap::new(),
            jobs: BTreeMap::new(),
            states: BTreeMap::new(),
            deaths_about: BTreeMap::new(),
            suspects_about: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            tombstone_order: VecDeque::new(),
            buckets: [0; BUCKETS],
            unsaved: BTreeSet::new(),
            compacted_unsaved: Vec::new(),
            changed: BTreeSet::new(),
            outbox: Vec::new(),
            own_changes: None,
            deferred_pending: BTreeSet::new(),
            raw_unsaved: Vec::new(),
            shared: None,
        }
    }

    /// Shares cold document states with the other tables given `states` (the simulator gives
    /// one to every node of a run). Sharing changes no decision, only the work done.
    pub fn share_states(&mut self, states: Arc<SharedStates>) {
        self.shared = Some(states);
    }

    /// The local node's id.
    pub fn local(&self) -> &NodeId {
        &self.local
    }

    // ---- reading ----

    /// A job's record.
    pub fn job(&self, id: &str) -> Option<&JobRecord> {
        self.jobs.get(id).filter(|e| e.hash != 0).map(|e| &*e.record)
    }

    /// All jobs, by id.
    pub fn jobs(&self) -> impl Iterator<Item = (&JobId, &JobRecord)> {
        self.jobs.iter().filter(|(_, e)| e.hash != 0).map(|(id, e)| (id, &*e.record))
    }

    /// Number of job documents held.
    pub fn job_count(&self) -> usize {
        self.jobs.values().filter(|e| e.hash != 0).count()
    }

    /// A node's record.
    pub fn node(&self, id: &str) -> Option<&NodeRecord> {
        self.nodes.get(id).filter(|e| e.hash != 0).map(|e| &*e.record)
    }

    /// All nodes, by id.
    pub fn nodes(&self) -> impl Iterator<Item = (&NodeId, &NodeRecord)> {
        self.nodes.iter().filter(|(_, e)| e.hash != 0).map(|(id, e)| (id, &*e.record))
    }

    /// A node's state. A node the table has never heard of counts as alive: its claims stand
    /// until some observer certifies it dead.
    pub fn node_state(&self, id: &str) -> NodeState {
        self.states.get(id).copied().unwrap_or(NodeState::Alive)
    }

    /// Every known node's state.
    pub fn node_states(&self) -> &BTreeMap<NodeId, NodeState> {
        &self.states
    }

    /// The highest incarnation at which any other node suspects (`dead == false`) or
    /// certifies dead (`dead == true`) the node `target`.
    pub fn worst_certificate(&self, target: &str, dead: bool) -> Option<u64> {
        let index = if dead { &self.deaths_about } else { &self.suspects_about };
        index.get(target).and_then(|by| by.values().copied().max())
    }

    /// The observers that certify `target` dead at incarnation `at_least` or higher: the
    /// node documents a certificate against its current incarnation lives in.
    pub fn certifiers(&self, target: &str, at_least: u64) -> Vec<NodeId> {
        self.deaths_about
            .get(target)
            .map(|by| by.iter().filter(|(_, inc)| **inc >= at_least).map(|(o, _)| o.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether a job was compacted here (and so is refused if a peer offers it again).
    pub fn is_compacted(&self, job: &str) -> bool {
        self.tombstones.contains_key(job)
    }

    /// Number of tombstones held.
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    // ---- local writes (always as the local node) ----

    /// Writes one key as the local node. Writing to a compacted job is ignored (it must not
    /// come back), and deleting from a document we do not hold creates nothing.
    fn write(&mut self, doc_id: DocId, key: &str, value: Option<&str>) {
        if let DocId::Job(id) = &doc_id {
            self.materialize(id, true);
        }
        let actor = self.actor.clone();
        let change = match &doc_id {
            DocId::Node(id) => {
                if value.is_none() && !self.nodes.contains_key(id) {
                    return;
                }
                let entry = self.nodes.entry(id.clone()).or_insert_with(|| Entry::new(&actor));
                let Ok(doc) = entry.doc_mut(&actor) else { return };
                match value {
                    Some(v) => doc.put(key, v),
                    None => doc.delete(key),
                }
            }
            DocId::Job(id) => {
                if self.tombstones.contains_key(id) || (value.is_none() && !self.jobs.contains_key(id)) {
                    return;
                }
                let entry = self.jobs.entry(id.clone()).or_insert_with(|| Entry::new(&actor));
                let Ok(doc) = entry.doc_mut(&actor) else { return };
                match value {
                    Some(v) => doc.put(key, v),
                    None => doc.delete(key),
                }
            }
        };
        if let Some(bytes) = change {
            self.outbox.push((doc_id.clone(), bytes));
            self.after_change(&doc_id);
        }
    }

    fn write_json<T: Serialize>(&mut self, doc_id: DocId, key: &str, value: &T) {
        // INVARIANT: our record types serialize infallibly (no maps with non-string keys).
        let json = serde_json::to_string(value).expect("record types serialize");
        self.write(doc_id, key, Some(&json));
    }

    fn local_doc(&self) -> DocId {
        DocId::Node(self.local.clone())
    }

    /// Creates a job document with its header. The id must be new.
    pub fn create_job(&mut self, id: &str, header: &JobHeader) {
        self.write_json(DocId::Job(id.to_string()), keys::SPEC, header);
    }

    /// Writes the local node's claim on `index` of `job`.
    pub fn write_claim(&mut self, job: &str, index: u32, claim: &Claim) {
        let key = keys::claim(index, &self.local);
        self.write_json(DocId::Job(job.to_string()), &key, claim);
    }

    /// Withdraws the local node's claim on `index` of `job`.
    pub fn delete_claim(&mut self, job: &str, index: u32) {
        let key = keys::claim(index, &self.local);
        self.write(DocId::Job(job.to_string()), &key, None);
    }

    /// Writes the local node's run of `index`/`attempt` of `job`.
    pub fn write_run(&mut self, job: &str, index: u32, attempt: u32, run: &Run) {
        let key = keys::run(index, attempt, &self.local);
        self.write_json(DocId::Job(job.to_string()), &key, run);
    }

    /// Records the local node's request to stop `job`.
    pub fn write_stop(&mut self, job: &str, stop: &StopRequest) {
        let key = keys::stop(&self.local);
        self.write_json(DocId::Job(job.to_string()), &key, stop);
    }

    /// Writes the local node's static facts.
    pub fn write_node_info(&mut self, info: &NodeInfo) {
        self.write_json(self.local_doc(), keys::INFO, info);
    }

    /// Writes the local node's incarnation.
    pub fn write_incarnation(&mut self, incarnation: u64) {
        self.write(self.local_doc(), keys::INCARNATION, Some(&incarnation.to_string()));
    }

    /// Writes the local node's mode.
    pub fn write_mode(&mut self, mode: NodeMode) {
        self.write_json(self.local_doc(), keys::MODE, &mode);
    }

    /// Records (Some) or clears (None) the local node's suspicion of `peer`.
    pub fn write_suspect(&mut self, peer: &str, incarnation: Option<u64>) {
        let value = incarnation.map(|i| i.to_string());
        self.write(self.local_doc(), &keys::suspect(peer), value.as_deref());
    }

    /// Records (Some) or clears (None) the local node's death certificate for `peer`.
    pub fn write_death(&mut self, peer: &str, incarnation: Option<u64>) {
        let value = incarnation.map(|i| i.to_string());
        self.write(self.local_doc(), &keys::dead(peer), value.as_deref());
    }

    // ---- bookkeeping after any change ----

    fn after_change(&mut self, doc_id: &DocId) {
        let bucket = bucket_of(doc_id);
        let (old, new) = match doc_id {
            DocId::Node(id) => {
                let Some(entry) = self.nodes.get_mut(id) else { return };
                let Some(doc) = entry.doc.as_mut() else { return };
                let entries = doc.entries();
                let record = Arc::new(NodeRecord::parse(entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
                let previous = std::mem::replace(&mut entry.record, record);
                if *id == self.local {
                    self.own_changes = None;
                }
                let old = entry.hash;
                entry.hash = entry_hash(doc_id, (!doc.is_empty()).then(|| doc.heads_hash()));
                let (old_hash, new_hash) = (old, entry.hash);
                self.update_membership(id, &previous, old_hash != 0, new_hash != 0);
                (old_hash, new_hash)
            }
            DocId::Job(id) => {
                let Some(entry) = self.jobs.get_mut(id) else { return };
                let Some(doc) = entry.doc.as_mut() else { return };
                let entries = doc.entries();
                entry.record = Arc::new(JobRecord::parse(entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
                let old = entry.hash;
                entry.hash = entry_hash(doc_id, (!doc.is_empty()).then(|| doc.heads_hash()));
                (old, entry.hash)
            }
        };
        self.buckets[bucket] ^= old ^ new;
        self.unsaved.insert(doc_id.clone());
        self.changed.insert(doc_id.clone());
    }

    /// Updates the certificate index and the states of every node `observer`'s record names,
    /// after that record changed from `previous`. A node whose certificates or state changed
    /// is reported by [`Table::take_changed`] as a changed node document.
    fn update_membership(&mut self, observer: &NodeId, previous: &NodeRecord, was_held: bool, is_held: bool) {
        let empty = NodeRecord::default();
        let previous = if was_held { previous } else { &empty };
        let current = match self.nodes.get(observer) {
            Some(e) if is_held => e.record.clone(),
            _ => Arc::default(),
        };
        let mut touched: BTreeSet<NodeId> = BTreeSet::new();
        touched.insert(observer.clone());
        for (index, old, new) in [
            (&mut self.deaths_about, &previous.deaths, &current.deaths),
            (&mut self.suspects_about, &previous.suspects, &current.suspects),
        ] {
            for target in old.keys().chain(new.keys()) {
                if old.get(target) == new.get(target) || target == observer {
                    continue;
                }
                touched.insert(target.clone());
                match new.get(target) {
                    Some(inc) => {
                        index.entry(target.clone()).or_default().insert(observer.clone(), *inc);
                    }
                    None => {
                        if let Some(by) = index.get_mut(target) {
                            by.remove(observer);
                            if by.is_empty() {
                                index.remove(target);
                            }
                        }
                    }
                }
            }
        }
        for target in touched {
            let record = self.nodes.get(&target).filter(|e| e.hash != 0).map(|e| &*e.record);
            let worst = |index: &BTreeMap<NodeId, BTreeMap<NodeId, u64>>| {
                index.get(&target).and_then(|by| by.values().copied().max())
            };
            let state = node_state(record, worst(&self.deaths_about), worst(&self.suspects_about));
            match state {
                Some(s) => {
                    self.states.insert(target.clone(), s);
                }
                None => {
                    self.states.remove(&target);
                }
            }
            self.changed.insert(DocId::Node(target));
        }
    }

    /// Every change of the local node's own document, to introduce this node to a new peer
    /// in one message.
    pub fn own_node_changes(&mut self) -> Vec<Vec<u8>> {
        if let Some(changes) = &self.own_changes {
            return changes.clone();
        }
        let actor = self.actor.clone();
        let changes = match self.nodes.get_mut(&self.local).map(|e| e.doc_mut(&actor)) {
            Some(Ok(doc)) => doc.all_changes(),
            _ => Vec::new(),
        };
        self.own_changes = Some(changes.clone());
        changes
    }

    /// Keeps other nodes' documents cold until they next change. They change rarely, and a
    /// live Automerge document costs about 18 KiB of memory: 1,000 nodes' documents on each of
    /// 1,000 simulated nodes would be 18 GB live, 0.5 GB cold.
    pub fn freeze_idle_nodes(&mut self) {
        for (id, entry) in &mut self.nodes {
            if *id != self.local && entry.doc.is_some() && !self.unsaved.contains(&DocId::Node(id.clone())) {
                entry.freeze(self.shared.as_deref());
            }
        }
    }

    /// Documents changed (locally or by a peer) since the last call.
    pub fn take_changed(&mut self) -> BTreeSet<DocId> {
        std::mem::take(&mut self.changed)
    }

    /// Local changes since the last call, to push to peers: (document, change bytes).
    pub fn take_outbox(&mut self) -> Vec<(DocId, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    // ---- remote input ----

    /// Runs `op` on the document for remote input, creating it if needed. A document created
    /// for input that turns out bad, or that brought nothing, is removed again. One created
    /// for changes that wait for their dependencies stays (the changes wait inside it) but
    /// counts as absent: hash 0, not in summaries, not in membership. A compacted job gives
    /// `Ok(None)`.
    fn with_remote_doc<T>(
        &mut self,
        doc_id: &DocId,
        op: impl FnOnce(&mut Doc) -> Result<T, DocError>,
    ) -> Result<Option<T>, TableError> {
        if let DocId::Job(id) = doc_id {
            self.materialize(id, true);
        }
        let actor = self.actor.clone();
        let result = match doc_id {
            DocId::Node(id) => {
                let created = !self.nodes.contains_key(id);
                let entry = self.nodes.entry(id.clone()).or_insert_with(|| Entry::new(&actor));
                let result = entry.doc_mut(&actor).and_then(op);
                let empty = entry.doc.as_mut().is_some_and(|d| d.is_empty());
                let waiting = entry.doc.as_mut().is_some_and(|d| d.has_waiting_changes());
                if created && empty && (result.is_err() || !waiting) {
                    self.nodes.remove(id);
                }
                result
            }
            DocId::Job(id) => {
                if self.tombstones.contains_key(id) {
                    return Ok(None);
                }
                let created = !self.jobs.contains_key(id);
                let entry = self.jobs.entry(id.clone()).or_insert_with(|| Entry::new(&actor));
                let result = entry.doc_mut(&actor).and_then(op);
                let empty = entry.doc.as_mut().is_some_and(|d| d.is_empty());
                let waiting = entry.doc.as_mut().is_some_and(|d| d.has_waiting_changes());
                if created && empty && (result.is_err() || !waiting) {
                    self.jobs.remove(id);
                }
                result
            }
        };
        Ok(Some(result?))
    }

    /// Applies changes pushed by a peer. Returns whether the document moved. A compacted job's
    /// changes are ignored (returns false). On error nothing changed.
    pub fn apply_changes(&mut self, doc_id: &DocId, changes: &[Vec<u8>]) -> Result<bool, TableError> {
        self.apply_shared_changes(doc_id, &Arc::from(changes))
    }

    /// [`Table::apply_changes`] for changes in a shared batch (as a push message carries
    /// them): a deferred document holds them without copying their bytes.
    pub fn apply_shared_changes(&mut self, doc_id: &DocId, batch: &Arc<[Vec<u8>]>) -> Result<bool, TableError> {
        let changes: &[Vec<u8>] = batch;
        let mut parsed = match &self.shared {
            Some(states) => states.parse(changes)?,
            None => Doc::parse_changes(changes)?,
        };
        if let DocId::Job(id) = doc_id {
            if let Some(moved) = self.defer_changes(id, &mut parsed, batch) {
                return Ok(moved);
            }
        }
        if let Some(moved) = self.apply_without_loading(doc_id, &mut parsed, batch) {
            return Ok(moved);
        }
        // A job document that is new here or cold: its bytes followed by these changes
        // describe the result, so freezing it afterwards need not encode it (see `Entry::log`).
        let prior = match doc_id {
            DocId::Job(id) => match self.jobs.get(id) {
                None => Some(Log::empty()),
                Some(e) if e.deferred.as_ref().is_none_or(|d| d.held == 0) => e.log_base(),
                Some(_) => None,
            },
            DocId::Node(id) => self.nodes.get(id).map_or(Some(Log::empty()), Entry::log_base),
        };
        // A live document whose log still describes it: the log follows the apply.
        let carried = match (&prior, doc_id) {
            (Some(_), _) => None,
            (None, DocId::Job(id)) => self.jobs.get_mut(id).and_then(Entry::take_live_log),
            (None, DocId::Node(id)) => self.nodes.get_mut(id).and_then(Entry::take_live_log),
        };
        // A document loaded from bytes `prior` holds (or new) needs no protective copy: on
        // failure it is rebuilt from them.
        let result = match prior {
            Some(_) => self.with_remote_doc(doc_id, |doc| doc.apply_changes_or_drop(parsed)),
            None => self.with_remote_doc(doc_id, |doc| doc.apply_changes(parsed)),
        };
        if let Some((log, mark)) = carried {
            // On an error the guarded apply left the document as it was.
            let moved = matches!(result, Ok(Some(true)));
            match doc_id {
                DocId::Job(id) => self.jobs.get_mut(id).map(|e| e.carry_log(log, mark, moved)),
                DocId::Node(id) => self.nodes.get_mut(id).map(|e| e.carry_log(log, mark, moved)),
            };
        }
        let moved = match result {
            Ok(moved) => moved.unwrap_or(false),
            Err(e) => {
                if let Some(base) = &prior {
                    self.rebuild_after_failed_apply(doc_id, base);
                }
                return Err(e);
            }
        };
        if moved {
            if let Some(base) = prior {
                match doc_id {
                    DocId::Job(id) => self.jobs.get_mut(id).map(|e| e.append_log(base)),
                    DocId::Node(id) => self.nodes.get_mut(id).map(|e| e.append_log(base)),
                };
            }
            self.after_change(doc_id);
        }
        Ok(moved)
    }

    /// Applies changes to a cold or absent document without loading it, where that can be
    /// done: `Some(false)` when they hold nothing new, `Some(true)` when the state they lead
    /// to was taken from the memo (see `frozen`); then they are persisted raw and the
    /// bookkeeping of [`Table::after_change`] is done. Changes whose dependencies are missing
    /// wait beside the document ([`Entry::waiting`]), as they would inside it. `None`: the
    /// caller does the work (a state not seen yet).
    fn apply_without_loading(
        &mut self,
        doc_id: &DocId,
        parsed: &mut [automerge::Change],
        batch: &Arc<[Vec<u8>]>,
    ) -> Option<bool> {
        let changes: &[Vec<u8>] = batch;
        enum Outcome<R> {
            Nothing,
            /// `unlocked`: the raw bytes of waiting changes applied with `new`, before them.
            Adopted {
                previous: Arc<R>,
                old: u64,
                heads: Vec<ChangeHash>,
                new: Vec<usize>,
                unlocked: Vec<u8>,
            },
        }
        fn adopt<R: Shared + Default>(
            states: Option<&SharedStates>,
            map: &mut BTreeMap<String, Entry<R>>,
            id: &str,
            parsed: &mut [automerge::Change],
            batch: &Arc<[Vec<u8>]>,
        ) -> Option<Outcome<R>> {
            let plan = match map.get(id) {
                None => frozen::plan::<R, Waiting>(None, &[], parsed),
                Some(e) if e.doc.is_none() && e.deferred.is_none() => {
                    frozen::plan(e.cold.as_deref(), &e.waiting, parsed)
                }
                Some(_) => return None,
            };
            let wait = |parsed: &mut [automerge::Change]| frozen::waiting(states, parsed, batch, &plan.wait);
            if plan.new.is_empty() {
                if !plan.wait.is_empty() {
                    let entry = map.entry(id.to_string()).or_insert_with(Entry::absent);
                    push_waiting(&mut entry.waiting, wait(parsed));
                }
                return Some(Outcome::Nothing);
            }
            let shared = frozen::lookup::<R>(states, &plan.heads)?;
            let entry = map.entry(id.to_string()).or_insert_with(Entry::absent);
            entry.log = None;
            let mut unlocked = Vec::new();
            for w in &entry.waiting {
                if plan.unlocked.contains(&w.hash()) {
                    unlocked.extend_from_slice(w.bytes());
                }
            }
            entry.waiting.retain(|w| !plan.unlocked.contains(&w.hash()));
            push_waiting(&mut entry.waiting, wait(parsed));
            let previous = std::mem::replace(&mut entry.record, shared.record.clone());
            entry.cold = Some(shared);
            Some(Outcome::Adopted { previous, old: entry.hash, heads: plan.heads, new: plan.new, unlocked })
        }
        let (old_hash, new_hash, applied, mut bytes) = match doc_id {
            DocId::Job(id) if self.tombstones.contains_key(id) => return Some(false),
            DocId::Job(id) => match adopt(self.shared.as_deref(), &mut self.jobs, id, parsed, batch)? {
                Outcome::Nothing => return Some(false),
                Outcome::Adopted { old, heads, new, unlocked, .. } => {
                    let hash = entry_hash(doc_id, Some(heads_hash(&heads)));
                    if let Some(e) = self.jobs.get_mut(id) {
                        e.hash = hash;
                    }
                    (old, hash, new, unlocked)
                }
            },
            DocId::Node(id) => match adopt(self.shared.as_deref(), &mut self.nodes, id, parsed, batch)? {
                Outcome::Nothing => return Some(false),
                Outcome::Adopted { previous, old, heads, new, unlocked } => {
                    if *id == self.local {
                        self.own_changes = None;
                    }
                    let hash = entry_hash(doc_id, Some(heads_hash(&heads)));
                    if let Some(e) = self.nodes.get_mut(id) {
                        e.hash = hash;
                    }
                    self.update_membership(id, &previous, old != 0, true);
                    (old, hash, new, unlocked)
                }
            },
        };
        self.buckets[bucket_of(doc_id)] ^= old_hash ^ new_hash;
        // In the order a live document applies them: the unlocked waiting changes first.
        bytes.extend(applied.iter().flat_map(|&i| changes[i].iter().copied()));
        self.raw_unsaved.push(encode(&PersistRecord::Doc { doc: doc_id.clone(), bytes }));
        self.changed.insert(doc_id.clone());
        Some(true)
    }

    /// After an unguarded apply failed on a document loaded from `base`: back to `base`
    /// (or gone, if it was new here).
    fn rebuild_after_failed_apply(&mut self, doc_id: &DocId, base: &Log) {
        let actor = self.actor.clone();
        let empty = base.bytes.len() == 0;
        let base = base.bytes.joined();
        match doc_id {
            DocId::Node(id) if empty => {
                self.nodes.remove(id);
            }
            DocId::Job(id) if empty => {
                self.jobs.remove(id);
            }
            DocId::Node(id) => {
                if let Some(e) = self.nodes.get_mut(id) {
                    e.reload(&base, &actor);
                }
            }
            DocId::Job(id) => {
                if let Some(e) = self.jobs.get_mut(id) {
                    e.reload(&base, &actor);
                }
            }
        }
    }

    // ---- deferred documents ----

    /// Defers a job's document: until it is next needed, remote changes to it are held as
    /// bytes instead of applied. They count in the digest at once (from each change's hash
    /// and dependencies, no apply), are persisted, and are applied in one batch by
    /// [`Table::materialize_job`], a local write or a sync round (a snapshot writes them as held).
    ///
    /// A node defers the jobs it has no part in: of the about seven changes a job makes, an
    /// uninvolved node would otherwise apply each on arrival (about 40 µs each, plus the
    /// re-evaluation). Its record reads stale until materialized; the digest never does.
    pub fn defer_job(&mut self, job: &str) {
        let Some(entry) = self.jobs.get_mut(job) else { return };
        if entry.deferred.is_some() {
            return;
        }
        // Changes waiting inside Automerge (from a sync message) cannot be taken out, and
        // would join the heads when their dependencies arrive, which the deferral could not
        // foresee. Such a document is not deferred, but it goes cold once on disk. Changes
        // waiting in the document's own list move into the deferral, which keeps them by the
        // same rule.
        if entry.doc.as_mut().is_some_and(|d| d.has_queued_in_automerge()) {
            if self.unsaved.contains(&DocId::Job(job.to_string())) {
                entry.cold_when_saved = true;
            } else {
                entry.freeze(self.shared.as_deref());
            }
            return;
        }
        // A deferred document is not read until it is brought up to date: keep it cold (a
        // live one is ~18 KiB; 1,000 active jobs on each of 1,000 simulated nodes were 18 GB).
        // One with changes not yet on disk goes cold once they are (`take_persist_records`).
        if !self.unsaved.contains(&DocId::Job(job.to_string())) {
            entry.freeze(self.shared.as_deref());
        }
        let (heads, known): (_, Arc<[ChangeHash]>) = match (&mut entry.doc, &entry.cold) {
            // A live document lists its whole history too, so what the deferral holds next
            // does not depend on whether the document happened to be cold or live: with
            // shared states (the simulator) that is whether another node reached the same
            // state first, and a node's decisions must not depend on other nodes' timing.
            (Some(doc), _) => (doc.heads(), doc.change_hashes().into()),
            (None, Some(f)) => (f.heads.to_vec(), f.hashes.clone()),
            (None, None) => return,
        };
        if heads.is_empty() {
            return;
        }
        // Beside the document if it went cold just now, else still in it.
        let mut waiting = std::mem::take(&mut entry.waiting);
        if let Some(doc) = entry.doc.as_mut() {
            waiting.extend(doc.take_waiting());
        }
        let deferred = Deferred { known, heads, pending: Vec::new(), persisted: 0, held: 0, waiting };
        entry.deferred = Some(Box::new(deferred));
    }

    /// A job's record including changes a deferred document holds but has not applied (on a
    /// copy: reads do not disturb the deferral). [`Table::job`] is the applied record only.
    pub fn job_current(&self, id: &str) -> Option<Cow<'_, JobRecord>> {
        let entry = self.jobs.get(id)?;
        let Some(deferred) = entry.deferred.as_ref().filter(|d| d.held > 0) else {
            return Some(Cow::Borrowed(&*entry.record));
        };
        if let (true, None, Some(f)) = (deferred.pending.is_empty(), &entry.doc, &entry.cold) {
            return Some(Cow::Borrowed(&*f.record)); // re-based onto the state it leads to
        }
        let mut doc = match (&entry.doc, &entry.cold) {
            (Some(doc), _) => doc.copy(&self.actor),
            (None, Some(f)) => f.load(&self.actor).ok()?,
            (None, None) => return Some(Cow::Borrowed(&*entry.record)),
        };
        if let Ok(parsed) = Doc::parse_changes(&deferred.pending) {
            let _ = doc.apply_changes(parsed);
        }
        let entries = doc.entries();
        Some(Cow::Owned(JobRecord::parse(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())))))
    }

    /// Applies a deferred job's held changes and stops deferring it. The caller is about to
    /// read the job: it is not reported by [`Table::take_changed`].
    pub fn materialize_job(&mut self, job: &str) {
        self.materialize(job, false);
    }

    /// Applies every deferred job's held changes (before reads of the whole table). The jobs
    /// that moved are reported by [`Table::take_changed`].
    pub fn materialize_all(&mut self) {
        for job in std::mem::take(&mut self.deferred_pending) {
            self.materialize(&job, true);
        }
    }

    /// Whether `job` is deferred and holds changes not yet applied.
    pub fn holds_changes(&self, job: &str) -> bool {
        self.deferred_pending.contains(job)
    }

    /// How many changes a deferred job holds, not yet applied.
    pub fn held_changes(&self, job: &str) -> usize {
        self.jobs.get(job).and_then(|e| e.deferred.as_ref()).map_or(0, |d| d.held)
    }

    /// Deferred jobs holding changes not yet applied.
    pub fn deferred_with_changes(&self) -> impl Iterator<Item = &JobId> {
        self.deferred_pending.iter()
    }

    fn materialize(&mut self, job: &str, notify: bool) {
        let Some(entry) = self.jobs.get_mut(job) else { return };
        let Some(mut deferred) = entry.deferred.take() else { return };
        self.deferred_pending.remove(job);
        // Changes the deferral kept waiting wait on beside the document, or in it once it is
        // live (neither holds any while deferred). None of them applies with the held ones:
        // each waits for a change the deferral never held.
        let waiting = std::mem::take(&mut deferred.waiting);
        if !waiting.is_empty() {
            match entry.doc.as_mut() {
                Some(doc) => doc.restore_waiting(waiting),
                None => entry.waiting = waiting,
            }
        }
        if deferred.pending.is_empty() {
            // Re-based (see `Deferred::rebase`): the cold state is the result already.
            if let (true, None, Some(f)) = (deferred.held > 0, &entry.doc, &entry.cold) {
                entry.record = f.record.clone();
                if notify {
                    self.changed.insert(DocId::Job(job.to_string()));
                }
            }
            return;
        }
        let actor = self.actor.clone();
        let all_persisted = deferred.persisted == deferred.pending.len();
        let doc_id = DocId::Job(job.to_string());
        // Another table of this process froze the result: take it (see `frozen`). The entry
        // hash already follows the held changes' heads.
        if entry.doc.is_none() {
            let mut target = deferred.heads.clone();
            target.sort();
            if let Some(shared) = frozen::lookup::<JobRecord>(self.shared.as_deref(), &target) {
                entry.record = shared.record.clone();
                entry.cold = Some(shared);
                entry.log = None;
                if !all_persisted {
                    let bytes = concat(&deferred.pending[deferred.persisted..]);
                    self.raw_unsaved.push(encode(&PersistRecord::Doc { doc: doc_id.clone(), bytes }));
                }
                if notify {
                    self.changed.insert(doc_id);
                }
                return;
            }
        }
        // A cold document is loaded here rather than through `doc_mut`, keeping its bytes:
        // with the held changes appended they describe the result, and freezing it again
        // costs a copy instead of an encode.
        let mut log: Option<Log> = None;
        if entry.doc.is_none() {
            if let Some(shared) = entry.cold.take() {
                match shared.load(&actor) {
                    Ok(mut doc) => {
                        // None while deferred (see `Entry::waiting`); given back all the same.
                        doc.restore_waiting(std::mem::take(&mut entry.waiting));
                        entry.doc = Some(Box::new(doc));
                        log = Some(Log::of(&shared));
                    }
                    Err(_) => entry.cold = Some(shared),
                }
            }
        }
        // The bytes parsed when they arrived. Should Automerge refuse them now, the document
        // stays as it was and `after_change` makes the digest follow the document again.
        if let (Ok(parsed), Some(doc)) = (Doc::parse_changes(&deferred.pending), entry.doc.as_mut()) {
            let was_saved = doc.is_saved();
            // Just loaded from the bytes `log` holds: no protective copy (rebuilt on failure).
            let outcome = match &log {
                Some(_) => doc.apply_changes_or_drop(parsed),
                None => doc.apply_changes(parsed),
            };
            if let (Err(_), Some(l)) = (&outcome, &log) {
                if let Ok(rebuilt) = Doc::load(&l.bytes.joined(), &actor) {
                    **doc = rebuilt;
                }
            }
            let applied = outcome.is_ok() && doc.heads_hash() == heads_hash(&deferred.heads);
            if applied && was_saved && all_persisted {
                // Held changes are persisted raw as they arrive: do not encode them again.
                doc.mark_saved();
            }
            entry.log = match log {
                Some(mut log) if applied && log.appended < MAX_LOG_APPENDS => {
                    for w in &deferred.pending {
                        log.bytes.append(w.bytes());
                    }
                    log.appended += 1;
                    Some(Box::new(log))
                }
                _ => None,
            };
        }
        self.after_change(&doc_id);
        if !notify {
            self.changed.remove(&doc_id);
        }
    }

    /// Holds `changes` in a deferred job's document: `Some(moved)`, whether they moved it
    /// (as applying them to the live document would have; changes whose dependencies are
    /// missing wait, as there). `None` when the job is not deferred.
    fn defer_changes(&mut self, job: &str, parsed: &mut [automerge::Change], batch: &Arc<[Vec<u8>]>) -> Option<bool> {
        let states = self.shared.as_deref();
        let entry = self.jobs.get_mut(job)?;
        let deferred = entry.deferred.as_mut()?;
        let holds = |pending: &[Waiting], h: &ChangeHash| pending.iter().any(|w| w.hash() == *h);
        let plan = {
            let held = |h: &ChangeHash| deferred.known.binary_search(h).is_ok() || holds(&deferred.pending, h);
            frozen::plan_held(held, &deferred.heads, &deferred.waiting, parsed)
        };
        let wait = frozen::waiting(states, parsed, batch, &plan.wait);
        if plan.new.is_empty() {
            push_waiting(&mut deferred.waiting, wait);
            return Some(false);
        }
        // In causal order: the changes unlocked and the new ones, each after what it depends on.
        let (mut items, still): (Vec<Waiting>, Vec<Waiting>) =
            std::mem::take(&mut deferred.waiting).into_iter().partition(|w| plan.unlocked.contains(&w.hash()));
        deferred.waiting = still;
        items.extend(frozen::waiting(states, parsed, batch, &plan.new));
        let mut new: Vec<Waiting> = Vec::new();
        while !items.is_empty() {
            let before = items.len();
            let mut rest = Vec::new();
            for w in items {
                let ready = frozen::WaitingChange::deps(&w)
                    .iter()
                    .all(|d| deferred.known.binary_search(d).is_ok() || holds(&deferred.pending, d) || holds(&new, d));
                if ready {
                    new.push(w);
                } else {
                    rest.push(w);
                }
            }
            items = rest;
            if items.len() == before {
                // Unreachable: the plan's changes form a ready set. Kept in arrival order.
                new.append(&mut items);
            }
        }
        push_waiting(&mut deferred.waiting, wait);
        let heads = plan.heads;
        // A job is in `deferred_pending` exactly while its deferral holds changes: only the
        // first held change adds it (a B-tree insert per push was 5% of a 1,000-node run).
        let first = deferred.held == 0;
        deferred.held += new.len();
        deferred.pending.extend(new);
        let doc_id = DocId::Job(job.to_string());
        let old = entry.hash;
        entry.hash = entry_hash(&doc_id, Some(heads_hash(&heads)));
        deferred.heads = heads;
        self.buckets[bucket_of(&doc_id)] ^= old ^ entry.hash;
        self.unsaved.insert(doc_id);
        if first {
            self.deferred_pending.insert(job.to_string());
        }
        Some(true)
    }

    /// The next sync message for `doc_id` in the session `state`, if any. For a document not
    /// held, the message asks the peer for all of it.
    pub fn generate_sync(&mut self, doc_id: &DocId, state: &mut SyncState) -> Option<Vec<u8>> {
        let actor = self.actor.clone();
        match doc_id {
            DocId::Node(id) => self.nodes.get_mut(id).map(|e| e.generate_sync(&actor, state)),
            DocId::Job(id) => {
                if self.tombstones.contains_key(id) {
                    return None;
                }
                self.jobs.get_mut(id).map(|e| e.generate_sync(&actor, state))
            }
        }
        .unwrap_or_else(|| Doc::new(&actor).generate_sync(state))
    }

    /// Receives a sync message for `doc_id`. Returns whether the document moved. A cold
    /// document the message did not move goes back to its cold state: anti-entropy after a
    /// partition syncs thousands of documents per node, and each used to stay live.
    pub fn receive_sync(&mut self, doc_id: &DocId, state: &mut SyncState, bytes: &[u8]) -> Result<bool, TableError> {
        fn cold<R>(map: &BTreeMap<String, Entry<R>>, id: &str) -> Option<Arc<Frozen<R>>> {
            map.get(id).filter(|e| e.doc.is_none() && e.deferred.is_none()).and_then(|e| e.cold.clone())
        }
        let message = Doc::parse_sync(bytes)?;
        let (prior_node, prior_job) = match doc_id {
            DocId::Node(id) => (cold(&self.nodes, id), None),
            DocId::Job(id) => (None, cold(&self.jobs, id)),
        };
        let moved = self.with_remote_doc(doc_id, |doc| doc.receive_sync(state, message))?.unwrap_or(false);
        if moved {
            self.after_change(doc_id);
            return Ok(true);
        }
        match doc_id {
            DocId::Node(id) => {
                if let (Some(prior), Some(entry)) = (prior_node, self.nodes.get_mut(id)) {
                    entry.refreeze(prior);
                }
            }
            DocId::Job(id) => {
                if let (Some(prior), Some(entry)) = (prior_job, self.jobs.get_mut(id)) {
                    entry.refreeze(prior);
                }
            }
        }
        Ok(false)
    }

    /// Every change a document holds, sorted: applied, or held by a job's deferral (not those
    /// waiting for their dependencies, which a peer may have to send again). A held set is
    /// closed under dependencies. Empty for a document not held, or a compacted job.
    ///
    /// With [`Table::changes_missing`] this is anti-entropy: a document's history is tens of
    /// changes (a node document under faults a few hundred certificates), so two nodes
    /// exchange the names of all of them and then exactly the changes the other lacks.
    /// Automerge's sync protocol (Bloom filters over rounds, per-peer session state, a full
    /// save to send most of a small document) was most of the repair after a 1,000-node
    /// partition healed: first for job documents, then, once those used this, the 196,000
    /// node-document sessions open at the heal.
    pub fn doc_hashes(&mut self, doc_id: &DocId) -> Vec<[u8; 32]> {
        let hashes: Vec<ChangeHash> = match doc_id {
            DocId::Node(id) => match self.nodes.get_mut(id) {
                Some(entry) => entry.held_hashes(),
                None => Vec::new(),
            },
            DocId::Job(id) => {
                if self.tombstones.contains_key(id) {
                    return Vec::new();
                }
                match self.jobs.get_mut(id) {
                    Some(entry) => entry.held_hashes(),
                    None => Vec::new(),
                }
            }
        };
        hashes.into_iter().map(|h| h.0).collect()
    }

    /// [`Table::doc_hashes`] of a job.
    pub fn job_hashes(&mut self, job: &str) -> Vec<[u8; 32]> {
        self.doc_hashes(&DocId::Job(job.to_string()))
    }

    /// The changes of a document that are not among `theirs` (the sorted
    /// [`Table::doc_hashes`] of a peer), in causal order: exactly what the peer lacks of what
    /// this table holds. Reading a cold document loads it once per state (shared, see
    /// `frozen`), never copies it, and leaves it cold.
    pub fn changes_missing(&mut self, doc_id: &DocId, theirs: &[[u8; 32]]) -> Vec<Vec<u8>> {
        let mine = self.doc_hashes(doc_id);
        let (common, missing): (Vec<[u8; 32]>, Vec<[u8; 32]>) =
            mine.into_iter().partition(|h| theirs.binary_search(h).is_ok());
        if missing.is_empty() {
            return Vec::new();
        }
        let missing: BTreeSet<ChangeHash> = missing.into_iter().map(ChangeHash).collect();
        let common: Vec<ChangeHash> = common.into_iter().map(ChangeHash).collect();
        let actor = self.actor.clone();
        match doc_id {
            DocId::Node(id) => self.nodes.get_mut(id).map(|e| e.changes_missing(&actor, &missing, common)),
            DocId::Job(id) => self.jobs.get_mut(id).map(|e| e.changes_missing(&actor, &missing, common)),
        }
        .unwrap_or_default()
    }

    /// [`Table::changes_missing`] of a job.
    pub fn job_changes_missing(&mut self, job: &str, theirs: &[[u8; 32]]) -> Vec<Vec<u8>> {
        self.changes_missing(&DocId::Job(job.to_string()), theirs)
    }

    /// Keeps a job's document cold (saved bytes only) until it is next written or synced.
    /// Documents with changes not yet persisted stay live.
    pub fn freeze_job(&mut self, job: &str) {
        if self.unsaved.contains(&DocId::Job(job.to_string())) {
            return;
        }
        if let Some(entry) = self.jobs.get_mut(job) {
            entry.freeze(self.shared.as_deref());
        }
    }

    /// Bytes held by cold documents (nodes and jobs).
    pub fn cold_bytes(&self) -> usize {
        fn cold<R>(c: &Option<Arc<Frozen<R>>>) -> usize {
            c.as_ref().map_or(0, |f| f.bytes.len())
        }
        self.nodes.values().map(|e| cold(&e.cold)).sum::<usize>()
            + self.jobs.values().map(|e| cold(&e.cold)).sum::<usize>()
    }

    /// Number of job documents held live (not cold).
    pub fn live_job_documents(&self) -> usize {
        self.jobs.values().filter(|e| e.doc.is_some()).count()
    }

    // ---- digests ----

    /// Per-bucket hashes of (document, heads). Equal on two nodes exactly when they hold the
    /// same documents with the same histories (up to hash collisions).
    pub fn bucket_hashes(&self) -> [u64; BUCKETS] {
        self.buckets
    }

    /// A single digest of the whole table.
    pub fn digest(&self) -> u64 {
        let mut bytes = Vec::with_capacity(BUCKETS * 8);
        for b in &self.buckets {
            bytes.extend_from_slice(&b.to_le_bytes());
        }
        stable_hash(&bytes)
    }

    /// The digest as 16 hex digits, for humans and logs.
    pub fn digest_hex(&self) -> String {
        format!("{:016x}", self.digest())
    }

    /// (document, entry hash) for every document in the given buckets.
    pub fn summary(&self, buckets: &[usize]) -> Vec<(DocId, u64)> {
        let wanted: BTreeSet<usize> = buckets.iter().copied().collect();
        let nodes = self.nodes.iter().map(|(id, e)| (DocId::Node(id.clone()), e.hash));
        let jobs = self.jobs.iter().map(|(id, e)| (DocId::Job(id.clone()), e.hash));
        nodes.chain(jobs).filter(|(d, h)| *h != 0 && wanted.contains(&bucket_of(d))).collect()
    }

    /// The entry hash of one document, if held.
    pub fn doc_hash(&self, doc_id: &DocId) -> Option<u64> {
        match doc_id {
            DocId::Node(id) => self.nodes.get(id).map(|e| e.hash),
            DocId::Job(id) => self.jobs.get(id).map(|e| e.hash),
        }
    }

    /// The bucket a document falls in.
    pub fn bucket_of(doc_id: &DocId) -> usize {
        bucket_of(doc_id)
    }

    // ---- compaction ----

    /// Drops a job's document and remembers its id, so a peer cannot hand it back.
    pub fn compact_job(&mut self, job: &str, now_ms: u64) {
        let doc_id = DocId::Job(job.to_string());
        if let Some(entry) = self.jobs.remove(job) {
            self.buckets[bucket_of(&doc_id)] ^= entry.hash;
        }
        self.deferred_pending.remove(job);
        self.unsaved.remove(&doc_id);
        self.changed.insert(doc_id);
        if self.tombstones.insert(job.to_string(), now_ms).is_none() {
            self.tombstone_order.push_back((now_ms, job.to_string()));
        }
        self.compacted_unsaved.push((job.to_string(), now_ms));
    }

    /// Forgets tombstones past `max_count` (oldest first) or older than `max_age_ms`.
    pub fn expire_tombstones(&mut self, now_ms: u64, max_count: usize, max_age_ms: u64) {
        while let Some((at, id)) = self.tombstone_order.front() {
            let too_many = self.tombstones.len() > max_count;
            let too_old = now_ms.saturating_sub(*at) > max_age_ms;
            if !(too_many || too_old) {
                break;
            }
            self.tombstones.remove(id);
            self.tombstone_order.pop_front();
        }
    }

    // ---- persistence ----

    /// Records for everything changed since the last call, to append to durable storage.
    pub fn take_persist_records(&mut self) -> Vec<Vec<u8>> {
        let mut out = std::mem::take(&mut self.raw_unsaved);
        for doc_id in std::mem::take(&mut self.unsaved) {
            let bytes = match &doc_id {
                DocId::Node(id) => self.nodes.get_mut(id).and_then(|e| e.doc.as_mut()).map(|d| d.save_incremental()),
                DocId::Job(id) => self.jobs.get_mut(id).and_then(|e| e.doc.as_mut()).map(|d| d.save_incremental()),
            };
            if let Some(bytes) = bytes.filter(|b| !b.is_empty()) {
                out.push(encode(&PersistRecord::Doc { doc: doc_id.clone(), bytes }));
            }
            // Changes held by a deferred document, after the ones applied before it was
            // deferred: raw change bytes load like an incremental save.
            if let DocId::Job(id) = &doc_id {
                if let Some(entry) = self.jobs.get_mut(id).filter(|e| e.deferred.is_some() || e.cold_when_saved) {
                    entry.cold_when_saved = false;
                    if let Some(deferred) = entry.deferred.as_mut() {
                        if deferred.persisted < deferred.pending.len() {
                            let bytes = concat(&deferred.pending[deferred.persisted..]);
                            deferred.persisted = deferred.pending.len();
                            out.push(encode(&PersistRecord::Doc { doc: doc_id.clone(), bytes }));
                        }
                    }
                    entry.freeze(self.shared.as_deref());
                    if let (Some(deferred), None) = (entry.deferred.as_mut(), &entry.doc) {
                        if let Some(state) = deferred.rebase(self.shared.as_deref()) {
                            entry.cold = Some(state);
                            entry.log = None;
                        }
                    }
                }
            }
            // Other nodes' documents go cold as soon as they are on disk (see
            // `freeze_idle_nodes`): at a 1,000-node boot each node receives 999 of them at once.
            if let DocId::Node(id) = &doc_id {
                if *id != self.local {
                    if let Some(entry) = self.nodes.get_mut(id) {
                        entry.freeze(self.shared.as_deref());
                    }
                }
            }
        }
        for (job, at_ms) in std::mem::take(&mut self.compacted_unsaved) {
            out.push(encode(&PersistRecord::Compacted { job, at_ms }));
        }
        out
    }

    /// A one-line account of how a document is held (for diagnosing divergence).
    #[doc(hidden)]
    pub fn debug_entry(&self, doc_id: &DocId) -> String {
        fn describe<R>(e: &Entry<R>) -> String {
            let short =
                |hs: &[ChangeHash]| hs.iter().map(|h| format!("{:02x}{:02x}", h.0[0], h.0[1])).collect::<Vec<_>>();
            let deferred = e.deferred.as_ref().map(|d| {
                format!(
                    "deferred(heads {:?} known {} pending {} held {} persisted {} waiting {:?})",
                    short(&d.heads),
                    d.known.len(),
                    d.pending.len(),
                    d.held,
                    d.persisted,
                    d.waiting.iter().map(|w| short(&[w.hash()])).collect::<Vec<_>>()
                )
            });
            format!(
                "hash {:016x} live {} cold {:?} log {} waiting {:?} {}",
                e.hash,
                e.doc.is_some(),
                e.cold.as_ref().map(|f| (short(&f.heads), f.hashes.len(), f.appends)),
                e.log.is_some(),
                e.waiting.iter().map(|w| short(&[w.hash()])).collect::<Vec<_>>(),
                deferred.unwrap_or_default()
            )
        }
        match doc_id {
            DocId::Node(id) => self.nodes.get(id).map(describe),
            DocId::Job(id) => self.jobs.get(id).map(describe),
        }
        .unwrap_or_else(|| {
            format!("absent (tombstone {})", matches!(doc_id, DocId::Job(j) if self.tombstones.contains_key(j)))
        })
    }

    /// The whole table, compactly: loading it alone restores this state.
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.snapshot_records().to_bytes()
    }

    /// The whole table as persist records, one per document and tombstone: replayed in order
    /// like the log (see [`Table::restore`]), they restore this state. Two tables holding a
    /// document in the same state produce the same record for it, so a store that keeps many
    /// tables (the simulator's disks) can share them; [`SnapshotRecords::to_bytes`] is the
    /// single-blob form.
    pub fn snapshot_records(&mut self) -> SnapshotRecords {
        let mut records = Vec::with_capacity(self.nodes.len() + self.jobs.len() + self.tombstone_order.len());
        // A document with no history (hash 0: only changes waiting for their dependencies,
        // which are never persisted) restores to nothing: it is left out, however it is held.
        for (id, e) in self.nodes.iter_mut().filter(|(_, e)| e.hash != 0) {
            records.push(encode(&PersistRecord::Doc { doc: DocId::Node(id.clone()), bytes: e.save() }));
        }
        // A deferred document is written as it is held: its bytes, then one record per held
        // change (raw change chunks load like an incremental save). It is not brought up to
        // date: a snapshot is storage and must not change what the node sees (bringing jobs
        // up to date reports them changed, and the engine acts on them), and after a
        // 1,000-node heal every node snapshotting brought every job it held up to date, each
        // in a state of its own. Records of their own, because the bytes of a shared state and
        // of a change are the same on every node that holds them, where their concatenation
        // is one node's: the simulator's disks share equal records.
        for (id, e) in self.jobs.iter_mut().filter(|(_, e)| e.hash != 0) {
            let doc = DocId::Job(id.clone());
            records.push(encode(&PersistRecord::Doc { doc: doc.clone(), bytes: e.save() }));
            if let Some(d) = e.deferred.as_mut() {
                for w in &d.pending {
                    records.push(encode(&PersistRecord::Doc { doc: doc.clone(), bytes: w.bytes().to_vec() }));
                }
                d.persisted = d.pending.len();
            }
        }
        for (at_ms, job) in &self.tombstone_order {
            records.push(encode(&PersistRecord::Compacted { job: job.clone(), at_ms: *at_ms }));
        }
        self.unsaved.clear();
        self.compacted_unsaved.clear();
        self.raw_unsaved.clear();
        SnapshotRecords(records)
    }

    /// The documents and tombstones a snapshot holds (a deferred document's held changes are
    /// records of their own, but not documents).
    pub fn snapshot_documents(&self) -> usize {
        let nodes = self.nodes.values().filter(|e| e.hash != 0).count();
        let jobs = self.jobs.values().filter(|e| e.hash != 0).count();
        nodes + jobs + self.tombstone_order.len()
    }

    /// The size a snapshot would have now, without disturbing persistence (for measurements;
    /// it copies every document, so it is slow).
    pub fn measure_snapshot_len(&self) -> usize {
        fn len<R>(e: &Entry<R>) -> usize {
            let held = e.deferred.as_ref().map_or(0, |d| d.pending.iter().map(|h| h.bytes().len()).sum());
            held + match (&e.doc, &e.cold) {
                (Some(doc), _) => doc.save_copy_len(),
                (None, Some(f)) => f.bytes.len(),
                (None, None) => 0,
            }
        }
        let docs = self.nodes.values().map(len).chain(self.jobs.values().map(len));
        docs.sum::<usize>() + self.tombstones.len() * 24
    }

    /// Restores from a snapshot and the records appended after it. Records are idempotent:
    /// replaying one twice is harmless. A corrupt record is an error; the caller decides.
    pub fn restore(&mut self, snapshot: Option<&[u8]>, records: &[Vec<u8>]) -> Result<(), TableError> {
        if let Some(bytes) = snapshot {
            let snap: Snapshot = postcard::from_bytes(bytes).map_err(|e| TableError::Corrupt(e.to_string()))?;
            for record in snap.records {
                self.restore_record(record)?;
            }
        }
        for bytes in records {
            let record: PersistRecord = postcard::from_bytes(bytes).map_err(|e| TableError::Corrupt(e.to_string()))?;
            self.restore_record(record)?;
        }
        self.unsaved.clear();
        self.compacted_unsaved.clear();
        self.raw_unsaved.clear();
        self.outbox.clear();
        Ok(())
    }

    fn restore_record(&mut self, record: PersistRecord) -> Result<(), TableError> {
        match record {
            PersistRecord::Doc { doc, bytes } => {
                if self.with_remote_doc(&doc, |d| d.load_incremental(&bytes))?.is_some() {
                    self.after_change(&doc);
                }
            }
            PersistRecord::Compacted { job, at_ms } => self.compact_job(&job, at_ms),
        }
        Ok(())
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // INVARIANT: postcard serialization of our own plain data types cannot fail.
    postcard::to_stdvec(value).expect("postcard encodes plain data")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer table ("w") that created job "j", and the change that created it.
    fn writer_of_j() -> (Table, Vec<Vec<u8>>) {
        use crate::spec::JobSpec;
        let header =
            JobHeader { spec: JobSpec::command("sleep", ["1"]), submitted_by: "w".to_string(), submitted_at_ms: 0 };
        let mut w = Table::new("w".to_string(), [1; 16]);
        w.create_job("j", &header);
        let created = w.take_outbox().into_iter().map(|(_, c)| c).collect();
        (w, created)
    }

    /// The change `w` makes claiming instance `index` of "j" at `at_ms`.
    fn claim_of_j(w: &mut Table, index: u32, at_ms: u64) -> Vec<Vec<u8>> {
        w.write_claim("j", index, &Claim { attempt: 0, boot: 1, at_ms });
        w.take_outbox().into_iter().map(|(_, c)| c).collect()
    }

    /// Snapshot blobs written before snapshots were kept as records (the encoding of the
    /// list of records) are what `to_bytes` writes now, so old stores load unchanged.
    #[test]
    fn snapshot_blob_is_the_encoded_list_of_records() {
        let records = [
            PersistRecord::Doc { doc: DocId::Job("j1".into()), bytes: vec![1, 2, 3] },
            PersistRecord::Compacted { job: "j0".into(), at_ms: 7 },
        ];
        let old = encode(&Snapshot { records: records.iter().map(clone_record).collect() });
        let new = SnapshotRecords(records.iter().map(encode).collect());
        assert_eq!(new.to_bytes(), old);
        assert_eq!(new.blob_len(), old.len());
        // 200 records: a count that takes two bytes.
        let many: Vec<PersistRecord> =
            (0..200).map(|i| PersistRecord::Compacted { job: format!("j{i}"), at_ms: i }).collect();
        let old = encode(&Snapshot { records: many.iter().map(clone_record).collect() });
        let new = SnapshotRecords(many.iter().map(encode).collect());
        assert_eq!(new.to_bytes(), old);
        assert_eq!(new.blob_len(), old.len());
    }

    /// A deferred job brought up to date by a change its deferral cannot place goes cold
    /// again from its log (the cold bytes plus exactly the chunks applied since), without
    /// encoding, and what it goes cold to loads to the same document.
    #[test]
    fn a_job_brought_up_to_date_by_an_apply_goes_cold_from_its_log() {
        use crate::spec::JobSpec;
        let header =
            JobHeader { spec: JobSpec::command("sleep", ["1"]), submitted_by: "w".to_string(), submitted_at_ms: 0 };
        let claim = |index| Claim { attempt: 0, boot: 1, at_ms: u64::from(index) };
        let mut writer = Table::new("w".to_string(), [1; 16]);
        writer.create_job("j", &header);
        writer.take_outbox();
        let doc = DocId::Job("j".to_string());
        // The reader gets the job by sync, so its first cold state is an encoding (no log).
        let mut reader = Table::new("r".to_string(), [2; 16]);
        let (mut to_reader, mut to_writer) = (SyncState::default(), SyncState::default());
        for _ in 0..10 {
            if let Some(m) = writer.generate_sync(&doc, &mut to_reader) {
                reader.receive_sync(&doc, &mut to_writer, &m).expect("valid sync message");
            }
            if let Some(m) = reader.generate_sync(&doc, &mut to_writer) {
                writer.receive_sync(&doc, &mut to_reader, &m).expect("valid sync message");
            }
        }
        assert_eq!(reader.digest(), writer.digest());
        reader.take_persist_records();
        reader.defer_job("j");
        assert_eq!(reader.jobs["j"].cold.as_ref().map(|c| c.appends), Some(0), "cold, encoded");

        let mut changes = Vec::new();
        for index in 0..3 {
            writer.write_claim("j", index, &claim(index));
            changes.extend(writer.take_outbox().into_iter().map(|(_, c)| c));
        }
        // The first is held by the deferral; the job is brought up to date to be read (from
        // its log), and the next two apply on the live document.
        assert!(reader.apply_changes(&doc, &changes[..1]).expect("valid changes"));
        assert_eq!(reader.held_changes("j"), 1);
        reader.materialize_job("j");
        assert!(reader.jobs["j"].log.is_some(), "brought up to date from its log");
        assert!(reader.apply_changes(&doc, &changes[1..]).expect("valid changes"));
        assert!(reader.jobs["j"].log.is_some(), "the log follows the apply");
        reader.defer_job("j");
        reader.take_persist_records();
        let cold = reader.jobs["j"].cold.clone().expect("cold again once persisted");
        assert_eq!(cold.appends, 2, "frozen from the log, not encoded afresh");
        assert_eq!(cold.hashes.len(), 4);

        let mut expected = writer.jobs.get_mut("j").and_then(|e| e.doc.take()).expect("writer's document");
        let mut loaded = Doc::load(&cold.bytes.joined(), &ActorId::from(&[3u8; 16][..])).expect("the log loads");
        assert_eq!(loaded.heads(), expected.heads());
        assert_eq!(loaded.entries(), expected.entries());
        assert_eq!(loaded.change_hashes(), expected.change_hashes());
        assert_eq!(*cold.hashes, *expected.change_hashes());
        assert_eq!(reader.digest(), writer.digest());
    }

    /// A cold document is bytes only in a table that shares nothing (a daemon); tables that
    /// share states keep loaded copies of a bounded number of them, the oldest dropped first,
    /// and a state that dropped its copy still loads to the same document.
    #[test]
    fn only_a_bounded_number_of_shared_cold_documents_keep_a_loaded_copy() {
        use crate::spec::JobSpec;
        // Distinct histories (the same write by the same actor is the same change).
        let header = |at: u64| JobHeader {
            spec: JobSpec::command("sleep", ["1"]),
            submitted_by: "w".to_string(),
            submitted_at_ms: at,
        };
        let mut at = 0;
        let mut cold = |t: &mut Table, job: &str| {
            at += 1;
            t.create_job(job, &header(at));
            t.take_persist_records();
            t.freeze_job(job);
            t.jobs[job].cold.clone().expect("cold once on disk")
        };
        let mut alone = Table::new("a".to_string(), [1; 16]);
        assert!(!cold(&mut alone, "j").keeps_live(), "a table sharing nothing keeps bytes only");

        let mut shared = Table::new("b".to_string(), [2; 16]);
        shared.share_states(Arc::new(SharedStates::with_live_cap(2)));
        let (first, second) = (cold(&mut shared, "j1"), cold(&mut shared, "j2"));
        assert!(first.keeps_live() && second.keeps_live());
        let third = cold(&mut shared, "j3");
        assert!(!first.keeps_live() && second.keeps_live() && third.keeps_live(), "the oldest dropped first");
        // Dropped or kept, a state reads and loads the same.
        let all = shared.job_changes_missing("j1", &[]);
        assert_eq!(all.len(), 1);
        assert!(first.keeps_live(), "a read keeps what it loaded");
        shared.write_claim("j1", 0, &Claim { attempt: 0, boot: 1, at_ms: 0 });
        assert!(shared.job("j1").is_some_and(|r| r.claims.len() == 1));
    }

    /// Job repair: each side names every change it holds and gets exactly those it lacks,
    /// from a live, a cold or a deferred document alike, in an order that applies; a node
    /// that holds nothing of the job gets all of it; once equal, nothing more is sent.
    /// With shared states, a change held by two tables' deferrals is one copy of its bytes,
    /// whichever batch brought it to each (a push, shared already, or a repair answer, one
    /// per pair of nodes); without, each holds the batch it got.
    #[test]
    fn held_changes_share_their_bytes_across_tables_given_the_same_states() {
        let doc = DocId::Job("j".to_string());
        let (mut w, created) = writer_of_j();
        let claim = claim_of_j(&mut w, 0, 5);
        for sharing in [true, false] {
            let states = Arc::new(SharedStates::default());
            let mut tables: Vec<Table> = (0..2u8)
                .map(|i| {
                    let mut t = Table::new(format!("n{i}"), [10 + i; 16]);
                    if sharing {
                        t.share_states(states.clone());
                    }
                    t.apply_changes(&doc, &created).expect("valid changes");
                    t.take_persist_records();
                    t.defer_job("j");
                    t
                })
                .collect();
            // The same change, in two batches with equal bytes (as a push and a repair).
            let first: Arc<[Vec<u8>]> = Arc::from(claim.clone());
            let second: Arc<[Vec<u8>]> = Arc::from(claim.clone());
            assert!(tables[0].apply_shared_changes(&doc, &first).expect("valid changes"));
            assert!(tables[1].apply_shared_changes(&doc, &second).expect("valid changes"));
            let batch_of = |t: &Table| t.jobs["j"].deferred.as_ref().expect("deferred").pending[0].batch().clone();
            let (a, b) = (batch_of(&tables[0]), batch_of(&tables[1]));
            assert!(Arc::ptr_eq(&a, &first), "the first table holds the batch it got");
            assert_eq!(Arc::ptr_eq(&a, &b), sharing, "one copy exactly when the states are shared");
            for t in &mut tables {
                t.materialize_job("j");
            }
            assert_eq!(tables[0].job("j"), tables[1].job("j"));
            assert_eq!(tables[0].doc_hash(&doc), tables[1].doc_hash(&doc));
        }
    }

    /// A change that waits for its dependencies is one copy across tables that share states,
    /// whichever batch brought it to each; each table's own otherwise. Once the dependency
    /// arrives it applies in each alike.
    #[test]
    fn waiting_changes_are_one_copy_across_tables_given_the_same_states() {
        let doc = DocId::Job("j".to_string());
        let (mut w, created) = writer_of_j();
        let created: Arc<[Vec<u8>]> = created.into();
        let claim = claim_of_j(&mut w, 0, 5);
        for sharing in [true, false] {
            let states = Arc::new(SharedStates::default());
            let mut tables: Vec<Table> = (0..2u8)
                .map(|i| {
                    let mut t = Table::new(format!("n{i}"), [10 + i; 16]);
                    if sharing {
                        t.share_states(states.clone());
                    }
                    // The claim before the job's creation, in a batch of its own per table.
                    let batch: Arc<[Vec<u8>]> = Arc::from(claim.clone());
                    assert!(!t.apply_shared_changes(&doc, &batch).expect("valid changes"), "it waits");
                    t
                })
                .collect();
            let (a, b) = (&tables[0].jobs["j"].waiting, &tables[1].jobs["j"].waiting);
            assert_eq!((a.len(), b.len()), (1, 1));
            assert_eq!(a[0].is_same(&b[0]), sharing, "one copy exactly when the states are shared");
            for t in &mut tables {
                assert!(t.apply_shared_changes(&doc, &created).expect("valid changes"));
                assert_eq!(t.job("j"), w.job("j"), "the waiting claim applied with its dependency");
            }
        }
    }

    /// A snapshot writes a deferred job as held (its bytes, then the held changes), without
    /// bringing it up to date: the node sees nothing change, nothing is persisted twice, and
    /// the snapshot restores the job with its held changes.
    #[test]
    fn a_snapshot_writes_deferred_changes_as_held() {
        let doc = DocId::Job("j".to_string());
        let (mut w, created) = writer_of_j();
        let claim = claim_of_j(&mut w, 0, 5);
        let mut r = Table::new("r".to_string(), [2; 16]);
        r.apply_changes(&doc, &created).expect("valid changes");
        r.take_persist_records();
        r.defer_job("j");
        assert!(r.apply_changes(&doc, &claim).expect("valid changes"));
        r.take_changed();
        let stale = r.job("j").cloned();
        let records = r.snapshot_records();
        assert_eq!((records.0.len(), r.snapshot_documents()), (2, 1), "the held change is a record of its own");
        let snapshot = records.to_bytes();
        assert_eq!(r.held_changes("j"), 1, "still held");
        assert_eq!(r.job("j").cloned(), stale, "still reads stale");
        assert!(r.take_changed().is_empty(), "nothing reported changed");
        assert!(r.take_persist_records().is_empty(), "the snapshot holds the held change");
        let mut restored = Table::new("r".to_string(), [2; 16]);
        restored.restore(Some(&snapshot), &[]).expect("its snapshot restores");
        assert_eq!(restored.job("j"), w.job("j"));
        assert_eq!(restored.digest(), w.digest());
        // The next change is persisted on its own: the held one is not written again.
        let next = claim_of_j(&mut w, 1, 6);
        assert!(r.apply_changes(&doc, &next).expect("valid changes"));
        let written: Vec<PersistRecord> =
            r.take_persist_records().iter().map(|b| postcard::from_bytes(b).expect("a record")).collect();
        assert!(matches!(&written[..], [PersistRecord::Doc { bytes, .. }] if *bytes == next[0]), "only the new change");
    }

    #[test]
    fn job_repair_sends_exactly_the_changes_the_peer_lacks() {
        use crate::spec::JobSpec;
        let header =
            JobHeader { spec: JobSpec::command("sleep", ["1"]), submitted_by: "w".to_string(), submitted_at_ms: 0 };
        let claim = |index: u32| Claim { attempt: 0, boot: 1, at_ms: u64::from(index) };
        let doc = DocId::Job("j".to_string());
        let changes = |t: &mut Table| -> Vec<Vec<u8>> { t.take_outbox().into_iter().map(|(_, c)| c).collect() };
        let mut w = Table::new("w".to_string(), [1; 16]);
        w.create_job("j", &header);
        let created = changes(&mut w);
        let mut a = Table::new("a".to_string(), [2; 16]);
        let mut b = Table::new("b".to_string(), [3; 16]);
        a.apply_changes(&doc, &created).expect("valid changes");
        b.apply_changes(&doc, &created).expect("valid changes");
        // Concurrent writes on both sides; a also gets a chain of two from w that b never does.
        a.write_claim("j", 0, &claim(0));
        b.write_claim("j", 1, &claim(1));
        w.write_claim("j", 2, &claim(2));
        w.write_claim("j", 3, &claim(3));
        let from_w = changes(&mut w);
        a.apply_changes(&doc, &from_w).expect("valid changes");
        // b goes deferred and cold, then holds a change from v in its deferral.
        b.take_persist_records();
        b.defer_job("j");
        assert!(b.jobs["j"].deferred.is_some() && b.jobs["j"].doc.is_none(), "deferred and cold");
        let mut v = Table::new("v".to_string(), [5; 16]);
        v.apply_changes(&doc, &created).expect("valid changes");
        v.write_claim("j", 4, &claim(4));
        let late = changes(&mut v);
        assert!(b.apply_changes(&doc, &late).expect("valid changes"));
        assert_eq!(b.held_changes("j"), 1);

        let (ha, hb) = (a.job_hashes("j"), b.job_hashes("j"));
        assert_eq!((ha.len(), hb.len()), (4, 3), "a: create, own claim, two of w's; b: create, own, late");
        assert!(ha.windows(2).all(|p| p[0] < p[1]) && hb.windows(2).all(|p| p[0] < p[1]));
        let to_a = b.job_changes_missing("j", &ha);
        let to_b = a.job_changes_missing("j", &hb);
        assert_eq!(to_a.len(), 2, "b's claim and v's (held by the deferral)");
        assert_eq!(to_b.len(), 3, "a's claim and w's chain, in causal order");
        assert!(a.apply_changes(&doc, &to_a).expect("valid changes"));
        assert!(b.apply_changes(&doc, &to_b).expect("valid changes"));
        b.materialize_job("j");
        assert_eq!(a.doc_hash(&doc), b.doc_hash(&doc));
        assert_eq!(a.job("j"), b.job("j"));
        assert_eq!(a.job_hashes("j"), b.job_hashes("j"));
        assert!(a.job_changes_missing("j", &b.job_hashes("j")).is_empty(), "nothing more once equal");

        // A node holding nothing of the job gets all of it, from a cold document.
        a.take_persist_records();
        a.freeze_job("j");
        assert!(a.jobs["j"].doc.is_none(), "cold");
        let mut c = Table::new("c".to_string(), [4; 16]);
        assert!(c.job_hashes("j").is_empty());
        let all = a.job_changes_missing("j", &[]);
        assert_eq!(all.len(), 6);
        assert!(c.apply_changes(&doc, &all).expect("valid changes"));
        assert_eq!(c.doc_hash(&doc), a.doc_hash(&doc));
        assert_eq!(c.job("j"), a.job("j"));
        assert!(a.jobs["j"].doc.is_none(), "reading a cold document leaves it cold");
    }

    /// A deferred job holds a change that arrives before its dependency as a live document
    /// would (waiting, nothing moved), without being brought up to date; the dependency
    /// unlocks it; and changes still waiting when the job is brought up to date wait on in it.
    #[test]
    fn a_deferred_job_keeps_changes_that_wait_for_their_dependencies() {
        use crate::spec::JobSpec;
        let header =
            JobHeader { spec: JobSpec::command("sleep", ["1"]), submitted_by: "w".to_string(), submitted_at_ms: 0 };
        let doc = DocId::Job("j".to_string());
        let mut writer = Table::new("w".to_string(), [1; 16]);
        writer.create_job("j", &header);
        let first: Vec<Vec<u8>> = writer.take_outbox().into_iter().map(|(_, c)| c).collect();
        let mut changes = Vec::new();
        for index in 0..4 {
            writer.write_claim("j", index, &Claim { attempt: 0, boot: 1, at_ms: u64::from(index) });
            changes.extend(writer.take_outbox().into_iter().map(|(_, c)| c));
        }
        let mut reader = Table::new("r".to_string(), [2; 16]);
        reader.apply_changes(&doc, &first).expect("valid changes");
        let mut records = reader.take_persist_records();
        reader.defer_job("j");
        reader.take_changed();
        let digest = reader.digest();

        // The second claim before the first: it waits, and the job stays deferred and cold.
        assert!(!reader.apply_changes(&doc, &changes[1..2]).expect("valid changes"));
        assert_eq!(reader.digest(), digest, "a waiting change moves nothing");
        assert!(reader.jobs["j"].deferred.is_some() && reader.jobs["j"].doc.is_none());
        assert_eq!(reader.held_changes("j"), 0);
        assert!(reader.take_changed().is_empty());
        records.extend(reader.take_persist_records());
        // The first unlocks it: both are held, in causal order.
        assert!(reader.apply_changes(&doc, &changes[..1]).expect("valid changes"));
        assert_eq!(reader.held_changes("j"), 2);
        assert!(reader.jobs["j"].doc.is_none());
        records.extend(reader.take_persist_records());
        // The fourth waits for the third; bringing the job up to date leaves it waiting.
        assert!(!reader.apply_changes(&doc, &changes[3..4]).expect("valid changes"));
        reader.materialize_job("j");
        assert!(reader.jobs["j"].deferred.is_none());
        assert_ne!(reader.digest(), writer.digest());
        assert!(reader.apply_changes(&doc, &changes[2..3]).expect("valid changes"));
        assert_eq!(reader.digest(), writer.digest());
        assert_eq!(reader.job("j"), writer.job("j"));
        records.extend(reader.take_persist_records());

        // What it persisted restores the same document.
        let mut restored = Table::new("r".to_string(), [2; 16]);
        restored.restore(None, &records).expect("its own records restore");
        assert_eq!(restored.digest(), writer.digest());
        assert_eq!(restored.job("j"), writer.job("j"));
    }

    /// A deferral whose held changes lead to a state another table froze holds that state
    /// instead of the changes once they are on disk, and nothing a reader sees changes: the
    /// count of held changes, the stale record, the current record, the digest, what it
    /// serves a peer and what it restores from are those of a deferral that kept the bytes.
    #[test]
    fn a_deferral_rebases_onto_a_state_another_table_froze() {
        let doc = DocId::Job("j".to_string());
        let (mut w, created) = writer_of_j();
        let (first, second) = (claim_of_j(&mut w, 0, 0), claim_of_j(&mut w, 1, 1));
        let states = Arc::new(SharedStates::default());
        // 0 freezes the state; 1 and 3 share states with it, 2 does not.
        let mut tables: Vec<(Table, Vec<Vec<u8>>)> = (0..4u8)
            .map(|i| {
                let mut t = Table::new(format!("n{i}"), [10 + i; 16]);
                if i != 2 {
                    t.share_states(states.clone());
                }
                t.apply_changes(&doc, &created).expect("valid changes");
                let records = t.take_persist_records();
                t.defer_job("j");
                (t, records)
            })
            .collect();
        // The first table brings the job up to date and freezes it: that state is shared.
        let (a, _) = &mut tables[0];
        a.apply_changes(&doc, &first).expect("valid changes");
        a.materialize_job("j");
        a.take_persist_records();
        a.freeze_job("j");
        let stale = tables[2].0.job("j").cloned();
        for (t, records) in &mut tables[1..] {
            assert!(t.apply_changes(&doc, &first).expect("valid changes"));
            records.extend(t.take_persist_records());
        }
        let deferral = |t: &Table| t.jobs["j"].deferred.as_ref().map(|d| d.pending.len()).expect("still deferred");
        assert_eq!(deferral(&tables[1].0), 0, "re-based: no change bytes held");
        assert_eq!(deferral(&tables[3].0), 0, "re-based: no change bytes held");
        assert_eq!(deferral(&tables[2].0), 1, "nothing shared: the bytes are held");
        // Brought up to date with nothing but the shared state: the job reads current and
        // is reported changed, as applying the held change would.
        let frozen = tables[0].0.job("j").cloned();
        let (c, _) = &mut tables[3];
        c.take_changed();
        c.materialize_all();
        assert!(c.take_changed().contains(&doc));
        assert_eq!(c.job("j").cloned(), frozen);
        assert_eq!((c.held_changes("j"), c.holds_changes("j")), (0, false));
        tables.pop();
        for (t, _) in &tables[1..] {
            assert_eq!(t.held_changes("j"), 1);
            assert!(t.holds_changes("j"));
            assert_eq!(t.job("j").cloned(), stale, "reads stale until brought up to date");
            assert_eq!(t.job_current("j").map(Cow::into_owned), tables[0].0.job("j").cloned());
            assert_eq!(t.digest(), tables[0].0.digest());
        }
        // A later change is held on top of the shared state.
        for (t, records) in &mut tables[1..] {
            assert!(t.apply_changes(&doc, &second).expect("valid changes"));
            records.extend(t.take_persist_records());
            assert_eq!(t.held_changes("j"), 2);
            assert_eq!(t.job_current("j").map(Cow::into_owned).as_ref(), w.job("j"));
        }
        assert_eq!(deferral(&tables[1].0), 1);
        let mut served: Vec<Vec<Vec<u8>>> =
            tables[1..].iter_mut().map(|(t, _)| t.job_changes_missing("j", &[])).collect();
        for s in &mut served {
            s.sort();
        }
        assert_eq!(served[0].len(), 3, "the whole history");
        assert_eq!(served[0], served[1], "the same changes, whichever way they are held");
        for (t, records) in &mut tables[1..] {
            t.materialize_job("j");
            assert_eq!(t.job("j"), w.job("j"));
            assert_eq!(t.digest(), w.digest());
            let mut restored = Table::new("r".to_string(), [9; 16]);
            restored.restore(None, records).expect("its own records restore");
            assert_eq!(restored.job("j"), w.job("j"));
        }
    }

    fn clone_record(r: &PersistRecord) -> PersistRecord {
        match r {
            PersistRecord::Doc { doc, bytes } => PersistRecord::Doc { doc: doc.clone(), bytes: bytes.clone() },
            PersistRecord::Compacted { job, at_ms } => PersistRecord::Compacted { job: job.clone(), at_ms: *at_ms },
        }
    }
}
