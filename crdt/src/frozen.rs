//! Documents at rest, shared by content.
//!
//! A cold document is its bytes, its heads and its parsed record. Heads name a history
//! exactly (each is a hash over a change and its dependencies), and a history determines the
//! document, so two tables holding a document at the same heads hold the same thing. A table
//! keeps its cold documents in [`Frozen`] values; tables given the same [`SharedStates`]
//! share them through a memo keyed by heads: a table that brings a document to heads another
//! has frozen before takes that state instead of loading, applying and encoding it again.
//!
//! It is a pure cache: what a hit returns equals what the work would have produced. The bytes
//! may differ in layout (never in what they load to), and so may persisted byte counts and
//! with them snapshot timing; the memo is therefore explicit and per run, never global, so a
//! run is a function of its seed alone. A daemon holds one node core and shares nothing; a
//! simulator of 1,000 nodes repeats every job's every state on every node, and loading,
//! applying and re-encoding those states were most of its time.

use crate::doc::{ready_set, Doc, DocError, Held};
use crate::records::{JobRecord, NodeRecord};
use automerge::{ActorId, ChangeHash};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

/// A document at rest.
pub(crate) struct Frozen<R> {
    /// Automerge bytes that load to the document: a save, possibly followed by change chunks
    /// (see [`Chunks`]).
    pub bytes: Chunks,
    /// Its heads, sorted.
    pub heads: Box<[ChangeHash]>,
    /// Every change of its history, sorted.
    pub hashes: Arc<[ChangeHash]>,
    /// How many change-chunk appends follow the save in `bytes`.
    pub appends: u32,
    /// The record parsed from it.
    pub record: Arc<R>,
    /// The document loaded, kept after some table froze or loaded it: the next one copies it
    /// instead of loading the bytes again (an Automerge load rebuilds and hashes every change,
    /// several times the cost of a copy). Kept only for states shared through a memo, and at
    /// most [`MAX_LIVE`] of them (see [`LiveBudget`]).
    live: Mutex<Option<Doc>>,
    /// The budget of the memo this state is shared through; `None`: nothing is kept.
    budget: Option<Arc<LiveBudget>>,
}

/// Loaded documents kept in frozen states, per [`SharedStates`]: about 18 KiB each. Every
/// state kept its document for as long as a table held it, and under a partition of 1,000
/// simulated nodes, where each node reaches states no other does, those documents were most
/// of the simulator's memory growth. A daemon shares nothing, so its cold documents keep
/// none: cold means bytes only.
///
/// 2,048 with [`MAX_PARSED`] at 8,192, against 16,384 and 65,536 before: a 250-node ring
/// (`--nodes 250 --jobs 2500 --retain-jobs 250 --faults ring --fault-phase-ms 8000`) peaked
/// at 4.67 GB instead of 5.40 GB, in 374.6 s of wall instead of 362.7 s. Both caps are per
/// process, so the saving holds at any scale; the cost is more loads and parses.
pub(crate) const MAX_LIVE: usize = 1 << 11;

/// The states that keep a loaded document, oldest first; see [`MAX_LIVE`].
pub(crate) struct LiveBudget {
    kept: Mutex<VecDeque<Weak<dyn ClearLive>>>,
    cap: usize,
}

impl Default for LiveBudget {
    fn default() -> Self {
        LiveBudget { kept: Mutex::new(VecDeque::new()), cap: MAX_LIVE }
    }
}

/// A state whose kept document can be dropped.
pub(crate) trait ClearLive: Send + Sync {
    fn clear_live(&self);
}

impl<R: Send + Sync> ClearLive for Frozen<R> {
    fn clear_live(&self) {
        if let Ok(mut live) = self.live.lock() {
            *live = None;
        }
    }
}

/// A document's bytes as the state it was loaded from left them, shared, followed by the
/// change chunks applied since, its own. Under a partition every node reaches states no other
/// does, each its earlier state plus a few changes: copying the earlier state's bytes into
/// each (about 2 KB a job) was a large share of the simulator's memory per job per node.
#[derive(Clone, Default)]
pub(crate) struct Chunks {
    /// A save (possibly followed by chunks), shared with the state it came from.
    pub base: Arc<[u8]>,
    /// Change chunks appended to `base`.
    pub tail: Box<[u8]>,
}

impl Chunks {
    /// Bytes of a fresh save.
    pub fn saved(bytes: Vec<u8>) -> Chunks {
        Chunks { base: bytes.into(), tail: Box::default() }
    }

    /// Total length.
    pub fn len(&self) -> usize {
        self.base.len() + self.tail.len()
    }

    /// Appends change chunks.
    pub fn append(&mut self, chunks: &[u8]) {
        let mut tail = std::mem::take(&mut self.tail).into_vec();
        tail.extend_from_slice(chunks);
        self.tail = tail.into_boxed_slice();
    }

    /// The bytes in one piece: borrowed when nothing was appended.
    pub fn joined(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.tail.is_empty() {
            return std::borrow::Cow::Borrowed(&self.base);
        }
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.base);
        out.extend_from_slice(&self.tail);
        std::borrow::Cow::Owned(out)
    }
}

impl<R> Frozen<R> {
    /// A frozen state that no table has loaded yet, from a fresh save.
    #[cfg(test)]
    pub fn new(bytes: Vec<u8>, heads: Vec<ChangeHash>, hashes: Vec<ChangeHash>, appends: u32, record: Arc<R>) -> Self {
        Frozen::from_chunks(Chunks::saved(bytes), heads, hashes, appends, record)
    }

    /// A frozen state from bytes that may share their base with another state.
    pub fn from_chunks(
        bytes: Chunks,
        heads: Vec<ChangeHash>,
        hashes: Vec<ChangeHash>,
        appends: u32,
        record: Arc<R>,
    ) -> Self {
        Frozen {
            bytes,
            heads: heads.into(),
            hashes: hashes.into(),
            appends,
            record,
            live: Mutex::new(None),
            budget: None,
        }
    }

    /// The document loaded from its bytes, its change hashes known.
    fn load_bytes(&self, actor: &ActorId) -> Result<Doc, DocError> {
        let mut doc = Doc::load(&self.bytes.joined(), actor)?;
        doc.set_change_hashes(&self.hashes);
        Ok(doc)
    }

    /// Whether a loaded document is kept.
    #[cfg(test)]
    pub fn keeps_live(&self) -> bool {
        self.live.lock().is_ok_and(|l| l.is_some())
    }
}

impl<R: Send + Sync + 'static> Frozen<R> {
    /// Keeps `doc` (this state, loaded) for the next table that needs it, if this state is
    /// shared and keeps none yet; the oldest kept beyond [`MAX_LIVE`] are dropped.
    pub fn keep_live(self: &Arc<Self>, doc: Doc) {
        let Some(budget) = &self.budget else { return };
        {
            let Ok(mut live) = self.live.lock() else { return };
            if live.is_some() {
                return;
            }
            *live = Some(doc);
        }
        let mut evicted = Vec::new();
        if let Ok(mut kept) = budget.kept.lock() {
            let weak: Weak<dyn ClearLive> = Arc::downgrade(self) as Weak<dyn ClearLive>;
            kept.push_back(weak);
            while kept.len() > budget.cap {
                evicted.extend(kept.pop_front());
            }
        }
        // Outside the budget's lock: clearing locks each state.
        for state in evicted.iter().filter_map(Weak::upgrade) {
            state.clear_live();
        }
    }

    /// The document, live, writing as `actor`. A table holds a cold document only once it is
    /// on its disk, so the copy counts as saved.
    pub fn load(self: &Arc<Self>, actor: &ActorId) -> Result<Doc, DocError> {
        if let Ok(live) = self.live.lock() {
            if let Some(doc) = live.as_ref() {
                let mut copy = doc.copy(actor);
                copy.mark_saved();
                copy.set_change_hashes(&self.hashes);
                return Ok(copy);
            }
        }
        let doc = self.load_bytes(actor)?;
        if self.budget.is_none() {
            return Ok(doc);
        }
        let copy = doc.copy(actor);
        self.keep_live(doc);
        Ok(copy)
    }

    /// Runs `read` on the document loaded (kept, or loaded now and kept as [`Frozen::load`]
    /// keeps it), without copying it: reads need no document of their own. `read` must leave
    /// the document as it found it (it may only read, though Automerge's reads take `&mut`).
    pub fn read<T>(self: &Arc<Self>, actor: &ActorId, read: impl FnOnce(&mut Doc) -> T) -> Result<T, DocError> {
        if let Ok(mut live) = self.live.lock() {
            if let Some(doc) = live.as_mut() {
                return Ok(read(doc));
            }
        }
        let mut doc = self.load_bytes(actor)?;
        let out = read(&mut doc);
        self.keep_live(doc);
        Ok(out)
    }
}

/// Frozen documents by heads. Entries are weak: a state lives as long as some table holds it.
pub(crate) struct Memo<R> {
    by_heads: HashMap<Box<[ChangeHash]>, Weak<Frozen<R>>>,
    purge_at: usize,
}

impl<R> Default for Memo<R> {
    fn default() -> Self {
        Memo { by_heads: HashMap::new(), purge_at: 1024 }
    }
}

/// Document states shared by the tables given the same value (see the module docs): the
/// simulator gives one to every node of a run.
#[derive(Default)]
pub struct SharedStates {
    nodes: Mutex<Memo<NodeRecord>>,
    jobs: Mutex<Memo<JobRecord>>,
    /// Parsed changes by their bytes: a pushed change reaches every node, and parsing it
    /// (checksum, decompression, op verification) once per node was a tenth of a 1,000-node
    /// run.
    changes: Mutex<ParsedChanges>,
    /// Which states keep a loaded document.
    live: Arc<LiveBudget>,
    /// Every change some table holds beside a document, by hash (see [`waiting`]).
    held: Mutex<HeldIndex>,
}

/// Changes held in deferrals and waiting lists, by change hash: weak, so a change lives as
/// long as some table holds it.
#[derive(Default)]
struct HeldIndex {
    by_hash: HashMap<ChangeHash, Weak<crate::doc::WaitingData>>,
    purge_at: usize,
}

/// Changes `indexes` of `batch`, to hold beside a document (waiting for their dependencies,
/// or in a deferral): with shared states, the record of each that some table of the process
/// holds already, if any. It changes no decision: hash, dependencies and bytes are the same.
///
/// A push reaches every node as one shared batch, but a repair (`Have` answered with
/// `Changes`) is one batch per pair of nodes: when a 1,000-node ring partition healed, every
/// node held the changes it was repaired with as private copies until its next sweep,
/// gigabytes together. And under the ring most nodes held the same changes waiting for the
/// same missing ones, 4.5 million at once, each a record of about 120 bytes per node.
pub(crate) fn waiting(
    states: Option<&SharedStates>,
    parsed: &mut [automerge::Change],
    batch: &Arc<[Vec<u8>]>,
    indexes: &[usize],
) -> Vec<crate::doc::Waiting> {
    let own = |parsed: &mut [automerge::Change], i: usize| {
        crate::doc::Waiting::new(&mut parsed[i], Held { batch: batch.clone(), index: i })
    };
    // A poisoned lock (a panic elsewhere while holding it) only loses the sharing.
    let Some(mut held) = states.and_then(|s| s.held.lock().ok()) else {
        return indexes.iter().map(|&i| own(parsed, i)).collect();
    };
    let mut out = Vec::with_capacity(indexes.len());
    for &i in indexes {
        let hash = parsed[i].hash();
        if let Some(w) = held.by_hash.get(&hash).and_then(crate::doc::Waiting::upgrade) {
            out.push(w);
            continue;
        }
        let w = own(parsed, i);
        held.by_hash.insert(hash, w.downgrade());
        out.push(w);
    }
    if held.by_hash.len() > held.purge_at {
        held.by_hash.retain(|_, w| w.strong_count() > 0);
        held.purge_at = (held.by_hash.len() * 2).max(1024);
    }
    out
}

/// Parsed changes kept at most, per [`SharedStates`] (see [`MAX_LIVE`] for the figures).
const MAX_PARSED: usize = 1 << 13;

/// Recently parsed changes in two generations of at most half of [`MAX_PARSED`] each: a
/// lookup that hits the older one moves the change to the newer, and when the newer is
/// full it becomes the older and the older is dropped. The cache used to be cleared when
/// full, which forgot the changes still being delivered along with the rest: after the
/// 1,000-node ring healed, with millions of messages in flight, parsing changes again was a
/// seventh of the run.
#[derive(Default)]
pub(crate) struct ParsedChanges {
    newer: HashMap<Box<[u8]>, automerge::Change>,
    older: HashMap<Box<[u8]>, automerge::Change>,
}

impl ParsedChanges {
    fn get(&mut self, bytes: &[u8]) -> Option<automerge::Change> {
        if let Some(change) = self.newer.get(bytes) {
            return Some(change.clone());
        }
        let (key, change) = self.older.remove_entry(bytes)?;
        self.insert(key, change.clone());
        Some(change)
    }

    fn insert(&mut self, bytes: Box<[u8]>, change: automerge::Change) {
        if self.newer.len() >= MAX_PARSED / 2 {
            self.older = std::mem::take(&mut self.newer);
        }
        self.newer.insert(bytes, change);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.newer.len() + self.older.len()
    }
}

impl SharedStates {
    /// Shared states that keep at most `cap` loaded documents (tests).
    #[cfg(test)]
    pub(crate) fn with_live_cap(cap: usize) -> SharedStates {
        SharedStates { live: Arc::new(LiveBudget { cap, ..LiveBudget::default() }), ..SharedStates::default() }
    }

    /// How many frozen states keep a loaded document (at most `MAX_LIVE`, plus those already
    /// dropped whose entries have not been reached yet).
    pub fn kept_live(&self) -> usize {
        self.live.kept.lock().map_or(0, |k| k.iter().filter(|w| w.strong_count() > 0).count())
    }

    /// Job-document states some table holds: how many, their bytes, and the change hashes
    /// they list (for the simulator's memory report).
    pub fn job_states(&self) -> (usize, usize, usize) {
        let Ok(memo) = self.jobs.lock() else { return (0, 0, 0) };
        let mut out = (0, 0, 0);
        for frozen in memo.by_heads.values().filter_map(Weak::upgrade) {
            out.0 += 1;
            out.1 += frozen.bytes.len();
            out.2 += frozen.hashes.len();
        }
        out
    }

    /// Parses change bytes, from the shared cache where another table parsed them before.
    pub(crate) fn parse(&self, changes: &[Vec<u8>]) -> Result<Vec<automerge::Change>, DocError> {
        let Ok(mut cache) = self.changes.lock() else { return Doc::parse_changes(changes) };
        let mut out = Vec::with_capacity(changes.len());
        for bytes in changes {
            if let Some(change) = cache.get(bytes.as_slice()) {
                out.push(change);
                continue;
            }
            for change in Doc::parse_changes(std::slice::from_ref(bytes))? {
                cache.insert(bytes.clone().into_boxed_slice(), change.clone());
                out.push(change);
            }
        }
        Ok(out)
    }
}

impl std::fmt::Debug for SharedStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStates").finish_non_exhaustive()
    }
}

/// A record type with its own memo.
pub(crate) trait Shared: Sized + Send + Sync + 'static {
    fn memo(states: &SharedStates) -> &Mutex<Memo<Self>>;
}

impl Shared for NodeRecord {
    fn memo(states: &SharedStates) -> &Mutex<Memo<Self>> {
        &states.nodes
    }
}

impl Shared for JobRecord {
    fn memo(states: &SharedStates) -> &Mutex<Memo<Self>> {
        &states.jobs
    }
}

/// The frozen state at `heads` (sorted), if some table sharing `states` holds it.
pub(crate) fn lookup<R: Shared>(states: Option<&SharedStates>, heads: &[ChangeHash]) -> Option<Arc<Frozen<R>>> {
    if heads.is_empty() {
        return None;
    }
    // A poisoned lock (a panic elsewhere while holding it) only loses the sharing.
    let memo = R::memo(states?).lock().ok()?;
    memo.by_heads.get(heads).and_then(Weak::upgrade)
}

/// Shares `frozen`, or returns the state already shared at its heads.
pub(crate) fn share<R: Shared>(states: Option<&SharedStates>, frozen: Frozen<R>) -> Arc<Frozen<R>> {
    let Some(states) = states.filter(|_| !frozen.heads.is_empty()) else { return Arc::new(frozen) };
    let Ok(mut memo) = R::memo(states).lock() else { return Arc::new(frozen) };
    if let Some(shared) = memo.by_heads.get(&frozen.heads).and_then(Weak::upgrade) {
        return shared;
    }
    let mut frozen = frozen;
    frozen.budget = Some(states.live.clone());
    let frozen = Arc::new(frozen);
    memo.by_heads.insert(frozen.heads.clone(), Arc::downgrade(&frozen));
    if memo.by_heads.len() > memo.purge_at {
        // Forget states no table holds any more.
        memo.by_heads.retain(|_, f| f.strong_count() > 0);
        memo.purge_at = (memo.by_heads.len() * 2).max(1024);
    }
    frozen
}

/// A change waiting for its dependencies, as [`plan`] sees it.
pub(crate) trait WaitingChange {
    fn hash(&self) -> ChangeHash;
    fn deps(&self) -> &[ChangeHash];
}

impl WaitingChange for (ChangeHash, automerge::Change) {
    fn hash(&self) -> ChangeHash {
        self.0
    }

    fn deps(&self) -> &[ChangeHash] {
        self.1.deps()
    }
}

/// What a batch of changes does to a document at rest (see [`plan`]).
pub(crate) struct Plan {
    /// Indexes of the changes it applies: not held or waiting, every dependency held or
    /// applied with them.
    pub new: Vec<usize>,
    /// Waiting changes the batch unlocks (applied too, before `new`), in waiting order.
    pub unlocked: Vec<ChangeHash>,
    /// Indexes of the changes that must wait for dependencies, in order.
    pub wait: Vec<usize>,
    /// Its heads (sorted) once `unlocked` and `new` are applied.
    pub heads: Vec<ChangeHash>,
}

/// Tells, from hashes and dependencies alone, what a document at `state` (or a new one, for
/// `None`) holding `waiting` changes does with `changes`, exactly as [`Doc::apply_changes`]
/// would on the live document: changes held or waiting already are skipped; if none of the
/// rest can apply, they all wait; otherwise every change among them and the waiting ones
/// whose dependencies are held or applied with it applies, and the rest wait.
pub(crate) fn plan<R, W: WaitingChange>(
    state: Option<&Frozen<R>>,
    waiting: &[W],
    changes: &mut [automerge::Change],
) -> Plan {
    let held = |h: &ChangeHash| state.is_some_and(|f| f.hashes.binary_search(h).is_ok());
    let heads = state.map_or(&[][..], |f| &f.heads[..]);
    plan_held(held, heads, waiting, changes)
}

/// [`plan`] for a document whose history is told by `held` and whose heads are `heads`:
/// also a deferred document's, its held changes counted in.
pub(crate) fn plan_held<W: WaitingChange>(
    held: impl Fn(&ChangeHash) -> bool,
    heads: &[ChangeHash],
    waiting: &[W],
    changes: &mut [automerge::Change],
) -> Plan {
    let hashes: Vec<ChangeHash> = changes.iter_mut().map(|c| c.hash()).collect();
    let mut candidates: Vec<usize> = Vec::new();
    for (i, h) in hashes.iter().enumerate() {
        if !held(h) && !waiting.iter().any(|w| w.hash() == *h) && !candidates.iter().any(|&j| hashes[j] == *h) {
            candidates.push(i);
        }
    }
    let mut pool: Vec<(ChangeHash, &[ChangeHash])> =
        candidates.iter().map(|&i| (hashes[i], changes[i].deps())).collect();
    let mut ok = ready_set(&pool, &held);
    if !ok.is_empty() && !waiting.is_empty() {
        pool.extend(waiting.iter().map(|w| (w.hash(), w.deps())));
        ok = ready_set(&pool, &held);
    }
    let unlocked: Vec<ChangeHash> = waiting.iter().map(W::hash).filter(|h| ok.contains(h)).collect();
    let (new, wait): (Vec<usize>, Vec<usize>) = candidates.into_iter().partition(|&i| ok.contains(&hashes[i]));
    let mut heads: Vec<ChangeHash> = heads.to_vec();
    if !new.is_empty() {
        // A waiting change can be held already (it came since by a sync message): it is
        // unlocked and dropped from the waiting ones as the live document does, but it is
        // no new head.
        heads.extend(unlocked.iter().filter(|h| !held(h)).copied());
        heads.extend(new.iter().map(|&i| hashes[i]));
        let deps: Vec<ChangeHash> = waiting
            .iter()
            .filter(|w| unlocked.contains(&w.hash()))
            .flat_map(|w| w.deps().iter().copied())
            .chain(new.iter().flat_map(|&i| changes[i].deps().iter().copied()))
            .collect();
        heads.retain(|h| !deps.contains(h));
        heads.sort();
        heads.dedup();
    }
    Plan { new, unlocked, wait, heads }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::Doc;
    use automerge::ActorId;

    fn parse(changes: &[&Vec<u8>]) -> Vec<automerge::Change> {
        let owned: Vec<Vec<u8>> = changes.iter().map(|c| (*c).clone()).collect();
        Doc::parse_changes(&owned).expect("valid changes")
    }

    fn state_of(doc: &mut Doc) -> Frozen<()> {
        let mut heads = doc.heads();
        heads.sort();
        let mut hashes = doc.change_hashes();
        hashes.sort();
        Frozen::new(doc.save(), heads, hashes, 0, Arc::new(()))
    }

    fn hash_of(change: &Vec<u8>) -> ChangeHash {
        parse(&[change])[0].hash()
    }

    /// The parse cache keeps the most recent changes across a generation change, and a hit
    /// in the older generation keeps that change for another generation; never more than
    /// `MAX_PARSED` changes.
    #[test]
    fn the_parse_cache_keeps_recent_changes_when_it_fills() {
        let mut writer = Doc::new(&ActorId::from(&[1u8; 16][..]));
        let changes: Vec<Vec<u8>> =
            (0..MAX_PARSED + 10).map(|i| writer.put(&format!("k{i}"), "v").expect("a change")).collect();
        let mut cache = ParsedChanges::default();
        let half = MAX_PARSED / 2;
        let add = |cache: &mut ParsedChanges, bytes: &Vec<u8>| {
            cache.insert(bytes.clone().into_boxed_slice(), parse(&[bytes]).remove(0));
        };
        // One generation and one change: the first generation is now the older.
        for bytes in &changes[..=half] {
            add(&mut cache, bytes);
        }
        assert!(cache.get(&changes[0]).is_some(), "the older generation is kept");
        // Another generation: the first is dropped, but for the change used again.
        for bytes in &changes[half + 1..] {
            add(&mut cache, bytes);
        }
        assert!(cache.len() <= MAX_PARSED, "at most MAX_PARSED changes: {}", cache.len());
        let last = changes.last().expect("changes");
        assert_eq!(cache.get(last).map(|c| c.hash()), Some(hash_of(last)), "the newest change is kept");
        assert!(cache.get(&changes[0]).is_some(), "a change used again moved to the newer generation");
        assert!(cache.get(&changes[1]).is_none(), "a change not used again for two generations is dropped");
    }

    /// c1 <- c2 <- c3 by one writer, and cb <- c1 by another, concurrent with c2.
    #[test]
    fn plan_tells_new_held_missing_and_concurrent_changes() {
        let (a, b) = (ActorId::from(&[1u8; 16][..]), ActorId::from(&[2u8; 16][..]));
        let mut writer = Doc::new(&a);
        let c1 = writer.put("k1", "v").expect("a change");
        let mut other = writer.copy(&b);
        let c2 = writer.put("k2", "v").expect("a change");
        let c3 = writer.put("k3", "v").expect("a change");
        let cb = other.put("kb", "v").expect("a change");

        let mut reader = Doc::new(&b);
        reader.apply_changes(parse(&[&c1])).expect("applies");
        let at_c1 = state_of(&mut reader);

        let none: &[(ChangeHash, automerge::Change)] = &[];
        let plan_in_order = plan(Some(&at_c1), none, &mut parse(&[&c2, &c3]));
        assert_eq!(plan_in_order.new, vec![0, 1]);
        assert!(plan_in_order.wait.is_empty());
        assert_eq!(plan_in_order.heads, vec![hash_of(&c3)]);

        let held = plan(Some(&at_c1), none, &mut parse(&[&c1]));
        assert!(held.new.is_empty() && held.wait.is_empty(), "a change held already is neither new nor waiting");

        let gap = plan(Some(&at_c1), none, &mut parse(&[&c3]));
        assert!(gap.new.is_empty(), "c3 without c2 cannot apply");
        assert_eq!(gap.wait, vec![0], "c3 waits");
        assert_eq!(gap.heads, at_c1.heads.to_vec(), "the heads stay");
        assert_eq!(plan::<(), _>(None, none, &mut parse(&[&c2])).wait, vec![0], "a new document cannot start at c2");

        // c3 waiting: c2 unlocks it, and both apply; c3 again is skipped as waiting.
        let waiting = vec![(hash_of(&c3), parse(&[&c3]).remove(0))];
        let unlock = plan(Some(&at_c1), &waiting, &mut parse(&[&c2]));
        assert_eq!(unlock.new, vec![0]);
        assert_eq!(unlock.unlocked, vec![hash_of(&c3)]);
        assert_eq!(unlock.heads, vec![hash_of(&c3)]);
        let again = plan(Some(&at_c1), &waiting, &mut parse(&[&c3]));
        assert!(again.new.is_empty() && again.wait.is_empty(), "a waiting change is not taken twice");

        reader.apply_changes(parse(&[&c2])).expect("applies");
        let at_c2 = state_of(&mut reader);
        let concurrent = plan(Some(&at_c2), none, &mut parse(&[&cb]));
        let mut expected = vec![hash_of(&c2), hash_of(&cb)];
        expected.sort();
        assert_eq!(concurrent.heads, expected);

        // The plan's heads are what applying gives.
        reader.apply_changes(parse(&[&cb])).expect("applies");
        let mut heads = reader.heads();
        heads.sort();
        assert_eq!(heads, concurrent.heads);
    }

    #[test]
    fn a_shared_state_is_found_by_heads_until_no_one_holds_it() {
        let mut doc = Doc::new(&ActorId::from(&[3u8; 16][..]));
        doc.put("k", "v").expect("a change");
        let state = state_of(&mut doc);
        let heads = state.heads.to_vec();
        let record = Arc::new(JobRecord::default());
        let states = SharedStates::default();
        let frozen = || {
            Frozen::new(state.bytes.joined().to_vec(), state.heads.to_vec(), state.hashes.to_vec(), 0, record.clone())
        };
        let shared = share(Some(&states), frozen());
        let found = lookup::<JobRecord>(Some(&states), &heads).expect("shared state is found");
        assert!(Arc::ptr_eq(&shared, &found));
        assert!(lookup::<JobRecord>(Some(&SharedStates::default()), &heads).is_none(), "memos are separate");
        assert!(lookup::<JobRecord>(None, &heads).is_none(), "a table sharing nothing finds nothing");
        let again = share(Some(&states), frozen());
        assert!(Arc::ptr_eq(&shared, &again), "sharing a state held already returns the held one");
        drop((shared, found, again));
        assert!(lookup::<JobRecord>(Some(&states), &heads).is_none(), "a state no table holds is forgotten");
    }
}
