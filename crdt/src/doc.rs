//! One Automerge document holding a flat map of string keys to string values.
//! This is the only module that touches Automerge.

use crate::hash::mix64;
use automerge::sync::SyncDoc;
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, Change, ChangeHash, ReadDoc, ScalarValueRef, ValueRef, ROOT};
use std::collections::BTreeSet;
use std::sync::{Arc, Weak};

/// Errors from Automerge on remote input. The document is unchanged when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// Bytes that are not a valid Automerge change, document or sync message.
    #[error("malformed automerge data: {0}")]
    Malformed(String),
}

/// A peer's sync session for one document (Automerge's `sync::State`).
#[derive(Debug, Default)]
pub struct SyncState(automerge::sync::State);

/// A hash of a set of heads, in any order: equal on two nodes exactly when they hold the same
/// history. Deferred documents compute it from change metadata, without applying.
///
/// Change hashes are SHA-256 digests, so their first 16 bytes are already uniform: each head
/// is folded to 64 bits and the folds are summed (the sum does not depend on the order, so
/// nothing is sorted or allocated). Deferred documents call this on every change they hold;
/// at 1,000 nodes the sort-and-hash form was 5% of the simulator's time.
pub(crate) fn heads_hash(heads: &[ChangeHash]) -> u64 {
    let mut sum: u64 = 0;
    let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    for h in heads {
        sum = sum.wrapping_add(mix64(word(&h.0[..8]) ^ mix64(word(&h.0[8..16]))));
    }
    mix64(sum ^ (heads.len() as u64).rotate_left(32))
}

/// Applies changes under `catch_unwind`: a peer's bytes must never crash the node (I7).
fn apply_caught(am: &mut AutoCommit, changes: Vec<Change>) -> Result<(), DocError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| am.apply_changes(changes))) {
        Ok(Ok(())) => {
            drop_patch_events(am);
            Ok(())
        }
        Ok(Err(e)) => Err(DocError::Malformed(e.to_string())),
        Err(_) => Err(DocError::Malformed("automerge panicked on these changes".into())),
    }
}

/// Drops the patch events Automerge recorded. Automerge 0.12 records one for every op it
/// applies even while no diff cursor is set (its patch log is inactive), and keeps them until
/// patches are made, which we never do: every live document grew by about 100 bytes per op
/// ever applied to it, and every copy copied them. heaptrack put them at 160 MB of a
/// 200-node simulation's 2.3 GB. Resetting the (unset) diff cursor drops them; the document
/// itself is untouched.
fn drop_patch_events(am: &mut AutoCommit) {
    am.reset_diff_cursor();
}

/// One held change's bytes, shared with the batch that brought it: a change pushed to every
/// peer of a simulation is one allocation however many of them hold it (a copy per holder was
/// the largest single use of memory at 400 nodes).
#[derive(Clone)]
pub(crate) struct Held {
    pub batch: Arc<[Vec<u8>]>,
    pub index: usize,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::Deref for Held {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.batch[self.index]
    }
}

/// A change waiting for its dependencies, in a live document or beside a cold one: its hash
/// and dependencies, and its bytes shared with the batch that brought it. About 100 bytes,
/// where a parsed change is several times its bytes (under message loss the waiting changes
/// of 200 simulated nodes were 600 MB parsed), and parsed again only when it applies (parsed
/// on every load of its document, they were a fifth of a fault episode at 1,000 nodes).
///
/// A handle: tables that share states hold one copy of a waiting change between them (see
/// [`crate::frozen::waiting`]). Under a 1,000-node ring partition most nodes hold the same
/// changes waiting for the same missing ones, 3.5 million of them at once.
#[derive(Clone)]
pub(crate) struct Waiting(Arc<WaitingData>);

/// What a [`Waiting`] handle holds.
pub(crate) struct WaitingData {
    hash: ChangeHash,
    deps: Box<[ChangeHash]>,
    bytes: Held,
}

impl Waiting {
    pub fn new(change: &mut Change, bytes: Held) -> Waiting {
        Waiting(Arc::new(WaitingData { hash: change.hash(), deps: change.deps().into(), bytes }))
    }

    /// For a change that came parsed without its batch: its bytes on their own.
    fn from_parsed((hash, change): (ChangeHash, Change)) -> Waiting {
        let bytes = Held { batch: Arc::from(vec![change.raw_bytes().to_vec()]), index: 0 };
        Waiting(Arc::new(WaitingData { hash, deps: change.deps().into(), bytes }))
    }

    /// A reference that does not keep the change alive (see [`crate::frozen::waiting`]).
    pub fn downgrade(&self) -> Weak<WaitingData> {
        Arc::downgrade(&self.0)
    }

    /// The change `weak` names, if some holder still has it.
    pub fn upgrade(weak: &Weak<WaitingData>) -> Option<Waiting> {
        weak.upgrade().map(Waiting)
    }

    /// Parsed again, to apply. The bytes parsed once already; should they not now, the
    /// change is dropped (anti-entropy brings it again).
    fn parse(&self) -> Option<Change> {
        Doc::parse_changes(&[&*self.0.bytes]).ok()?.pop()
    }

    pub fn hash(&self) -> ChangeHash {
        self.0.hash
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0.bytes
    }

    /// Whether `other` is this very copy (tests of sharing).
    #[cfg(test)]
    pub fn is_same(&self, other: &Waiting) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The batch its bytes are in (tests of sharing).
    #[cfg(test)]
    pub fn batch(&self) -> &Arc<[Vec<u8>]> {
        &self.0.bytes.batch
    }
}

impl AsRef<[u8]> for Waiting {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl crate::frozen::WaitingChange for Waiting {
    fn hash(&self) -> ChangeHash {
        self.0.hash
    }

    fn deps(&self) -> &[ChangeHash] {
        &self.0.deps
    }
}

/// A flat string map in one Automerge document.
pub(crate) struct Doc {
    // Boxed: an AutoCommit is 4 KiB inline, and tables hold documents in BTreeMap nodes of
    // eleven entries, so cold entries would pay for it too (45 KiB per map node).
    am: Box<AutoCommit>,
    /// The heads at the last save or incremental save: what is on disk already. Kept here
    /// rather than in Automerge's own cursor so a caller that persisted changes itself (raw
    /// bytes) can move it without encoding them again ([`Doc::mark_saved`]).
    saved: Vec<ChangeHash>,
    /// When `Some`: the chunks of exactly the changes applied or committed since `saved`, in
    /// the order they were. [`Doc::save_incremental`] returns them instead of encoding the
    /// changes anew (Automerge loads change chunks like an incremental save); a change that
    /// came in by sync or by loading makes it `None`, and the next incremental save encodes.
    /// Re-encoding a change just received was about a tenth of a 1,000-node simulation.
    unsaved_raw: Option<Vec<u8>>,
    /// Changes received before their dependencies, applied once those arrive (see
    /// [`Doc::apply_changes`]).
    waiting: Vec<Waiting>,
    /// When `Some`: the hash of every change held, sorted, kept up to date as changes are
    /// applied and committed; `None` after a sync or a load from bytes, until
    /// [`Doc::change_hashes`] reads them from Automerge. Reading them there decodes every
    /// change's metadata: it was a seventh of a 1,000-node simulation's time under a ring
    /// partition, where most documents going cold reach states no other node froze.
    hashes: Option<Vec<ChangeHash>>,
}

/// What a batch of changes does to a document (see [`Doc::ready`]).
#[derive(Default)]
struct Ready {
    /// Changes to apply now.
    apply: Vec<Change>,
    /// Waiting changes among them.
    unlocked: BTreeSet<ChangeHash>,
    /// New changes that must wait.
    wait: Vec<Waiting>,
}

/// Changes a document holds for missing dependencies, at most. Past it the oldest are
/// dropped: anti-entropy brings them again with their dependencies.
const MAX_WAITING: usize = 1024;

/// The changes of `pool` (hash, dependencies) that apply together: every dependency `held`
/// or itself in the set, to a fixed point. The one rule for live documents ([`Doc::ready`])
/// and for planning on cold ones (`frozen::plan`).
pub(crate) fn ready_set(
    pool: &[(ChangeHash, &[ChangeHash])],
    held: impl Fn(&ChangeHash) -> bool,
) -> BTreeSet<ChangeHash> {
    let mut ok: BTreeSet<ChangeHash> = BTreeSet::new();
    loop {
        let before = ok.len();
        for (h, deps) in pool {
            if !ok.contains(h) && deps.iter().all(|d| held(d) || ok.contains(d)) {
                ok.insert(*h);
            }
        }
        if ok.len() == before {
            return ok;
        }
    }
}

/// Appends `changes` to a waiting list, dropping the oldest past [`MAX_WAITING`]. The one rule
/// for live documents and for a table's cold ones alike.
pub(crate) fn push_waiting<T>(list: &mut Vec<T>, changes: Vec<T>) {
    list.extend(changes);
    if list.len() > MAX_WAITING {
        let excess = list.len() - MAX_WAITING;
        list.drain(..excess);
    }
}

impl std::fmt::Debug for Doc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doc").finish_non_exhaustive()
    }
}

impl Doc {
    pub fn new(actor: &ActorId) -> Doc {
        Doc {
            am: Box::new(AutoCommit::new().with_actor(actor.clone())),
            saved: Vec::new(),
            unsaved_raw: Some(Vec::new()),
            waiting: Vec::new(),
            hashes: Some(Vec::new()),
        }
    }

    /// Loads a document saved with [`Doc::save`], writing as `actor` from now on.
    pub fn load(bytes: &[u8], actor: &ActorId) -> Result<Doc, DocError> {
        let mut am = AutoCommit::load(bytes).map_err(|e| DocError::Malformed(e.to_string()))?.with_actor(actor.clone());
        drop_patch_events(&mut am);
        // The incremental-save point is what was loaded: it is already on disk. (Moving
        // Automerge's own cursor would encode the whole history once more.)
        let saved = am.get_heads();
        Ok(Doc { am: Box::new(am), saved, unsaved_raw: Some(Vec::new()), waiting: Vec::new(), hashes: None })
    }

    /// A copy to read from (and write to as `actor`), leaving this one untouched.
    pub fn copy(&self, actor: &ActorId) -> Doc {
        Doc {
            am: Box::new(self.am.as_ref().clone().with_actor(actor.clone())),
            saved: self.saved.clone(),
            unsaved_raw: self.unsaved_raw.clone(),
            waiting: self.waiting.clone(),
            hashes: self.hashes.clone(),
        }
    }

    /// Tells a document loaded from bytes the hashes of its history (sorted), known to the
    /// caller, so [`Doc::change_hashes`] need not read them from Automerge.
    pub fn set_change_hashes(&mut self, hashes: &[ChangeHash]) {
        debug_assert!(hashes.windows(2).all(|w| w[0] < w[1]));
        self.hashes = Some(hashes.to_vec());
        #[cfg(any(debug_assertions, test))]
        self.check_hashes();
    }

    /// Before an apply of `changes`: their hashes, or `None` when Automerge holds changes in
    /// its own queue (from a sync message), which the apply may release too.
    fn applying(&mut self, changes: &[Change]) -> Option<Vec<ChangeHash>> {
        if self.hashes.is_none() || !self.am.get_missing_deps(&[]).is_empty() {
            return None;
        }
        Some(changes.iter().map(Change::hash).collect())
    }

    /// After an apply from heads `before`: the tracked hashes take the changes applied (from
    /// [`Doc::applying`]), or, if those are not known, every change not behind `before`.
    fn note_applied(&mut self, before: &[ChangeHash], applied: Option<Vec<ChangeHash>>) {
        if self.hashes.is_none() {
            return;
        }
        let new = match applied {
            Some(applied) => applied,
            None => self.am.get_changes_meta(before).into_iter().map(|m| m.hash).collect(),
        };
        self.note_hashes(new);
    }

    /// Adds newly held changes to the tracked hashes.
    fn note_hashes(&mut self, new: impl IntoIterator<Item = ChangeHash>) {
        if let Some(hashes) = &mut self.hashes {
            for hash in new {
                if let Err(at) = hashes.binary_search(&hash) {
                    hashes.insert(at, hash);
                }
            }
        }
    }

    /// In debug builds and this crate's tests: the tracked hashes are exactly Automerge's.
    #[cfg(any(debug_assertions, test))]
    fn check_hashes(&mut self) {
        if let Some(hashes) = &self.hashes {
            let mut actual: Vec<ChangeHash> = self.am.get_changes_meta(&[]).into_iter().map(|m| m.hash).collect();
            actual.sort();
            assert_eq!(*hashes, actual, "tracked change hashes drifted from the document's");
        }
    }

    /// Whether changes wait inside Automerge for dependencies not received yet.
    pub fn has_waiting_changes(&mut self) -> bool {
        !self.waiting.is_empty() || !self.am.get_missing_deps(&[]).is_empty()
    }

    /// Whether the document holds no change at all.
    pub fn is_empty(&mut self) -> bool {
        self.am.get_heads().is_empty()
    }

    /// Parses change bytes without touching any document.
    pub fn parse_changes<B: AsRef<[u8]>>(changes: &[B]) -> Result<Vec<Change>, DocError> {
        changes
            .iter()
            .map(|b| Change::from_bytes(b.as_ref().to_vec()).map_err(|e| DocError::Malformed(e.to_string())))
            .collect()
    }

    /// Parses a sync message without touching any document.
    pub fn parse_sync(bytes: &[u8]) -> Result<automerge::sync::Message, DocError> {
        automerge::sync::Message::decode(bytes).map_err(|e| DocError::Malformed(e.to_string()))
    }

    /// Sets `key` to `value`, committing at once. Returns the change's bytes, for pushing to
    /// peers. Writing the value already there writes nothing and returns `None`.
    pub fn put(&mut self, key: &str, value: &str) -> Option<Vec<u8>> {
        if self.get(key).as_deref() == Some(value) && self.conflicts(key) <= 1 {
            return None;
        }
        // INVARIANT: ROOT is a map, and a put of a scalar string onto a map cannot fail.
        self.am.put(ROOT, key, value).expect("put on the root map");
        self.commit()
    }

    /// Deletes `key`; returns the change's bytes, or `None` when it was absent.
    pub fn delete(&mut self, key: &str) -> Option<Vec<u8>> {
        self.get(key)?;
        // INVARIANT: deleting a present key of the root map cannot fail.
        self.am.delete(ROOT, key).expect("delete on the root map");
        self.commit()
    }

    fn commit(&mut self) -> Option<Vec<u8>> {
        // A fixed timestamp: the change bytes (and so the heads and the digest) must not
        // depend on a clock.
        let hash = self.am.commit_with(CommitOptions::default().with_time(0))?;
        drop_patch_events(&mut self.am);
        self.note_hashes([hash]);
        let bytes = self.am.get_last_local_change().map(|c| c.raw_bytes().to_vec());
        self.note_unsaved(bytes.as_deref());
        bytes
    }

    fn conflicts(&self, key: &str) -> usize {
        self.am.get_all(ROOT, key).map(|v| v.len()).unwrap_or(0)
    }

    /// The value of `key`. Where two writes conflict (only possible across two boots of one
    /// writer), the greatest string wins, so every node reads the same value.
    pub fn get(&self, key: &str) -> Option<String> {
        let values = self.am.get_all(ROOT, key).ok()?;
        values.into_iter().filter_map(|(v, _)| v.into_string().ok()).max()
    }

    /// All entries, sorted by key, conflicts resolved as in [`Doc::get`]. One pass over the
    /// map; only conflicted keys (two boots of one writer) take the slower `get_all` path.
    pub fn entries(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for item in self.am.map_range(ROOT, ..) {
            if item.conflict {
                if let Some(value) = self.get(&item.key) {
                    out.push((item.key.into_owned(), value));
                }
            } else if let ValueRef::Scalar(ScalarValueRef::Str(value)) = item.value {
                out.push((item.key.into_owned(), value.into_owned()));
            }
        }
        out
    }

    /// Applies parsed changes from a peer. Changes whose dependencies are missing wait until
    /// those arrive (see [`Doc::ready`]). Returns whether the heads moved.
    ///
    /// Automerge 0.12 can panic on some forged changes (a bad sequence number passes
    /// `Change::from_bytes`). A peer's bytes must never crash the node (I7), so the apply runs
    /// on a copy under `catch_unwind`; on panic or error the document is left as it was.
    pub fn apply_changes(&mut self, changes: Vec<Change>) -> Result<bool, DocError> {
        // Most pushes and anti-entropy rounds carry changes we hold already: skip those without
        // paying for the protective copy below.
        let ready = self.ready(changes);
        if ready.apply.is_empty() {
            self.add_waiting(ready.wait);
            return Ok(false);
        }
        let before = self.am.get_heads();
        let raw = self.unsaved_raw.is_some().then(|| raw_chunks(&ready.apply));
        let applied = self.applying(&ready.apply);
        let mut copy = self.am.clone();
        apply_caught(&mut copy, ready.apply)?;
        self.am = copy;
        self.note_unsaved(raw.as_deref());
        self.note_applied(&before, applied);
        self.waiting.retain(|w| !ready.unlocked.contains(&w.hash()));
        self.add_waiting(ready.wait);
        Ok(self.am.get_heads() != before)
    }

    /// [`Doc::apply_changes`] without the protective copy, for a document the caller can
    /// rebuild (one it has just loaded from bytes it still holds). On an error this document
    /// may be half-changed: the caller must drop it. The copy was the largest single cost of
    /// bringing a cold document up to date at 1,000 simulated nodes (an Automerge clone is a
    /// deep copy of every column and index).
    pub fn apply_changes_or_drop(&mut self, changes: Vec<Change>) -> Result<bool, DocError> {
        let ready = self.ready(changes);
        if ready.apply.is_empty() {
            self.add_waiting(ready.wait);
            return Ok(false);
        }
        let before = self.am.get_heads();
        let raw = self.unsaved_raw.is_some().then(|| raw_chunks(&ready.apply));
        let applied = self.applying(&ready.apply);
        apply_caught(&mut self.am, ready.apply)?;
        self.note_unsaved(raw.as_deref());
        self.note_applied(&before, applied);
        self.waiting.retain(|w| !ready.unlocked.contains(&w.hash()));
        self.add_waiting(ready.wait);
        Ok(self.am.get_heads() != before)
    }

    /// After changes were committed or applied: their chunks join the unsaved ones, or, if
    /// they are not known (`None`), the next incremental save must encode.
    fn note_unsaved(&mut self, chunks: Option<&[u8]>) {
        match (&mut self.unsaved_raw, chunks) {
            (Some(unsaved), Some(chunks)) => unsaved.extend_from_slice(chunks),
            (unsaved, _) => *unsaved = None,
        }
    }

    /// Splits `changes` and the changes already waiting into those this document can apply
    /// now (not held yet, every dependency held or among them) and new ones that must wait
    /// for dependencies; held ones are dropped. Changes nothing.
    ///
    /// Changes wait here rather than inside Automerge: Automerge keeps its own queue, but every
    /// later apply to the document then clones and re-sorts it, and under 10-30% message loss
    /// at 300 simulated nodes that was three quarters of the simulator's time. Here a change
    /// that cannot apply costs only itself; the waiting ones are looked at only when a new
    /// change applies (it may be the dependency they wait for).
    fn ready(&mut self, changes: Vec<Change>) -> Ready {
        let mut new: Vec<(ChangeHash, Change)> = changes.into_iter().map(|c| (c.hash(), c)).collect();
        let hashes: Vec<ChangeHash> = new.iter().map(|(h, _)| *h).collect();
        let not_held: BTreeSet<ChangeHash> = self.am.get_missing_deps(&hashes).into_iter().collect();
        let mut seen: BTreeSet<ChangeHash> = self.waiting.iter().map(Waiting::hash).collect();
        new.retain(|(h, _)| not_held.contains(h) && seen.insert(*h));
        if new.is_empty() {
            return Ready::default();
        }
        let mut pool: Vec<(ChangeHash, &[ChangeHash])> = new.iter().map(|(h, c)| (*h, c.deps())).collect();
        let deps = |pool: &[(ChangeHash, &[ChangeHash])]| -> Vec<ChangeHash> {
            pool.iter().flat_map(|(_, deps)| deps.iter().copied()).collect()
        };
        let mut absent: BTreeSet<ChangeHash> = self.am.get_missing_deps(&deps(&pool)).into_iter().collect();
        // The ready set: changes whose every dependency is held or ready, to a fixed point.
        let mut ok = ready_set(&pool, |d| !absent.contains(d));
        if !ok.is_empty() && !self.waiting.is_empty() {
            let waiting: Vec<(ChangeHash, &[ChangeHash])> =
                self.waiting.iter().map(|w| (w.0.hash, &*w.0.deps)).collect();
            absent.extend(self.am.get_missing_deps(&deps(&waiting)));
            pool.extend(waiting);
            ok = ready_set(&pool, |d| !absent.contains(d));
        }
        drop(pool);
        if ok.is_empty() {
            let wait = new.into_iter().map(Waiting::from_parsed).collect();
            return Ready { apply: Vec::new(), unlocked: BTreeSet::new(), wait };
        }
        let unlocked: BTreeSet<ChangeHash> =
            self.waiting.iter().map(Waiting::hash).filter(|h| ok.contains(h)).collect();
        let mut apply: Vec<Change> =
            self.waiting.iter().filter(|w| unlocked.contains(&w.hash())).filter_map(Waiting::parse).collect();
        let (now, wait): (Vec<_>, Vec<_>) = new.into_iter().partition(|(h, _)| ok.contains(h));
        apply.extend(now.into_iter().map(|(_, c)| c));
        Ready { apply, unlocked, wait: wait.into_iter().map(Waiting::from_parsed).collect() }
    }

    /// Adds changes to the waiting ones, dropping the oldest past [`MAX_WAITING`].
    fn add_waiting(&mut self, changes: Vec<Waiting>) {
        push_waiting(&mut self.waiting, changes);
    }

    /// The chunks of exactly the changes applied or committed since the last save, when
    /// known (see [`Doc::save_incremental`]).
    pub fn unsaved_chunks(&self) -> Option<&[u8]> {
        self.unsaved_raw.as_deref()
    }

    /// Whether changes wait inside Automerge itself (from a sync message or a load), not in
    /// this document's own list: those cannot be taken out ([`Doc::take_waiting`]).
    pub fn has_queued_in_automerge(&mut self) -> bool {
        !self.am.get_missing_deps(&[]).is_empty()
    }

    /// Takes the changes waiting for dependencies, in arrival order: a table keeps them
    /// beside the document while it is cold, and gives them back with
    /// [`Doc::restore_waiting`] when it is loaded again.
    pub fn take_waiting(&mut self) -> Vec<Waiting> {
        std::mem::take(&mut self.waiting)
    }

    /// Gives back changes taken with [`Doc::take_waiting`] to a document loaded since; they
    /// go before any that wait already (none, for a freshly loaded document).
    pub fn restore_waiting(&mut self, mut waiting: Vec<Waiting>) {
        waiting.append(&mut self.waiting);
        self.waiting = waiting;
    }

    /// The bytes of every held change not behind `have` (hashes this document holds), in
    /// causal order. For `have` closed under dependencies (a peer's whole history, as far as
    /// this document holds it), exactly the changes the peer lacks. One pass over the
    /// document: asking for each change by hash rebuilt it from the op columns each time,
    /// and was a fifth of a 250-node run once a partition healed.
    pub fn changes_after(&mut self, have: &[ChangeHash]) -> Vec<Vec<u8>> {
        self.am.get_changes(have).iter().map(|c| c.raw_bytes().to_vec()).collect()
    }

    /// Every change held, as bytes, in causal order.
    pub fn all_changes(&mut self) -> Vec<Vec<u8>> {
        self.am.get_changes(&[]).iter().map(|c| c.raw_bytes().to_vec()).collect()
    }

    /// The hash of every change held.
    /// The hash of every change held, sorted.
    pub fn change_hashes(&mut self) -> Vec<ChangeHash> {
        #[cfg(any(debug_assertions, test))]
        self.check_hashes();
        if let Some(hashes) = &self.hashes {
            return hashes.clone();
        }
        let mut hashes: Vec<ChangeHash> = self.am.get_changes_meta(&[]).into_iter().map(|m| m.hash).collect();
        hashes.sort();
        self.hashes = Some(hashes.clone());
        hashes
    }

    /// The current heads.
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.am.get_heads()
    }

    /// A hash of the current heads: equal on two nodes exactly when they hold the same history.
    pub fn heads_hash(&mut self) -> u64 {
        heads_hash(&self.am.get_heads())
    }

    pub fn save(&mut self) -> Vec<u8> {
        let bytes = self.am.save();
        self.saved = self.am.get_heads();
        self.unsaved_raw = Some(Vec::new());
        bytes
    }

    /// The length of a full save, leaving this document's save point alone.
    pub fn save_copy_len(&self) -> usize {
        self.am.clone().save().len()
    }

    /// The changes since the last `save` or `save_incremental`.
    pub fn save_incremental(&mut self) -> Vec<u8> {
        let heads = self.am.get_heads();
        if heads == self.saved {
            return Vec::new();
        }
        let bytes = match self.unsaved_raw.replace(Vec::new()) {
            Some(raw) if !raw.is_empty() => raw,
            _ => self.am.save_after(&self.saved),
        };
        self.saved = heads;
        bytes
    }

    /// Whether everything held is saved (nothing for [`Doc::save_incremental`] to return).
    pub fn is_saved(&mut self) -> bool {
        self.am.get_heads() == self.saved
    }

    /// Records that everything held is on disk, without encoding it: the caller persisted
    /// the changes applied since the last save itself.
    pub fn mark_saved(&mut self) {
        self.saved = self.am.get_heads();
        self.unsaved_raw = Some(Vec::new());
    }

    /// Loads bytes from `save`/`save_incremental` into this document.
    pub fn load_incremental(&mut self, bytes: &[u8]) -> Result<(), DocError> {
        self.unsaved_raw = None;
        self.hashes = None;
        let loaded = self.am.load_incremental(bytes).map(|_| ()).map_err(|e| DocError::Malformed(e.to_string()));
        drop_patch_events(&mut self.am);
        loaded
    }

    pub fn generate_sync(&mut self, state: &mut SyncState) -> Option<Vec<u8>> {
        self.am.sync().generate_sync_message(&mut state.0).map(|m| m.encode())
    }

    /// Receives a parsed sync message; same safety as [`Doc::apply_changes`].
    pub fn receive_sync(&mut self, state: &mut SyncState, message: automerge::sync::Message) -> Result<bool, DocError> {
        let before = self.am.get_heads();
        let mut copy = self.am.clone();
        let mut state_copy = SyncState(state.0.clone());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            copy.sync().receive_sync_message(&mut state_copy.0, message)
        }));
        match outcome {
            Ok(Ok(())) => {
                drop_patch_events(&mut copy);
                self.am = copy;
                *state = state_copy;
                self.unsaved_raw = None;
                if self.hashes.is_some() {
                    // The changes the message brought: exactly those not behind the old heads.
                    let new: Vec<ChangeHash> = self.am.get_changes_meta(&before).into_iter().map(|m| m.hash).collect();
                    self.note_hashes(new);
                }
                // Waiting changes the message brought are held now: they wait no more.
                if !self.waiting.is_empty() {
                    let hashes: Vec<ChangeHash> = self.waiting.iter().map(Waiting::hash).collect();
                    let absent: BTreeSet<ChangeHash> = self.am.get_missing_deps(&hashes).into_iter().collect();
                    self.waiting.retain(|w| absent.contains(&w.hash()));
                }
                let moved = self.am.get_heads() != before;
                // Changes that waited for what the message brought apply now, as they would
                // had it come as a push. Left waiting, a change only this node held (its
                // author's copy lost) stayed out of the document for good.
                if moved && !self.waiting.is_empty() {
                    let waiting = std::mem::take(&mut self.waiting);
                    let parsed: Vec<Change> = waiting.iter().filter_map(Waiting::parse).collect();
                    if self.apply_changes(parsed).is_err() {
                        self.waiting = waiting;
                    }
                }
                Ok(moved)
            }
            Ok(Err(e)) => Err(DocError::Malformed(e.to_string())),
            Err(_) => Err(DocError::Malformed("automerge panicked on this sync message".into())),
        }
    }
}

/// The chunks of `changes`, one after another.
fn raw_chunks(changes: &[Change]) -> Vec<u8> {
    let mut out = Vec::with_capacity(changes.iter().map(|c| c.raw_bytes().len()).sum());
    for change in changes {
        out.extend_from_slice(change.raw_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::{ChunkList, Message, MessageVersion};

    /// A sync message can leave a change queued inside Automerge (its dependency missing); a
    /// later apply of that dependency releases it too, and the tracked hashes count both.
    #[test]
    fn hashes_follow_changes_released_from_automerges_queue() {
        let mut writer = Doc::new(&ActorId::from(&[1u8; 16][..]));
        let c1 = writer.put("a", "1").expect("a change");
        let c2 = writer.put("b", "2").expect("a change");
        let mut reader = Doc::new(&ActorId::from(&[2u8; 16][..]));
        let message = Message {
            heads: writer.heads(),
            need: Vec::new(),
            have: Vec::new(),
            changes: ChunkList::from(vec![c2.clone()]),
            flags: None,
            version: MessageVersion::V1,
        };
        let mut state = SyncState::default();
        reader.receive_sync(&mut state, message).expect("a valid message");
        assert!(reader.has_queued_in_automerge(), "the second change waits inside Automerge");
        assert!(reader.apply_changes(Doc::parse_changes(&[c1]).expect("valid")).expect("applies"));
        assert!(!reader.has_queued_in_automerge());
        // Checked against Automerge's own list in this crate's tests.
        assert_eq!(reader.change_hashes(), writer.change_hashes());
        assert_eq!(reader.change_hashes().len(), 2);
    }
}
