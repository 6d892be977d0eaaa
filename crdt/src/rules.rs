//! The deterministic rules: who is alive, who wins a claim, what state an instance is in.
//!
//! Every function here is pure: the same table gives the same answer on every node. That is
//! what lets nodes agree without asking each other. The reasoning is in ARCHITECTURE.md
//! ("The claim rule").

use crate::hash::{fnv_continue, fnv_prefix, mix64, unit_interval};
use crate::records::{Claim, JobRecord, NodeId, NodeMode, NodeRecord, Run, RunStatus};
use crate::spec::{JobKind, JobSpec, Resources};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A node's state as the table shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// No certificate against its current incarnation.
    Alive,
    /// Some observer suspects its current incarnation; its claims still count.
    Suspect,
    /// Some observer certified its current incarnation dead; its claims no longer count.
    Dead,
    /// It left on purpose; its claims no longer count.
    Left,
}

impl NodeState {
    /// Whether the node's claims count (alive or merely suspected).
    pub fn counts(self) -> bool {
        matches!(self, NodeState::Alive | NodeState::Suspect)
    }
}

/// Every node's state, from every node's record. A node is dead when any observer holds a
/// death certificate for an incarnation at least its own: one observer suffices, because
/// waiting for agreement would need a quorum, and a wrong certificate costs only a refutation.
pub fn membership(records: &BTreeMap<NodeId, NodeRecord>) -> BTreeMap<NodeId, NodeState> {
    membership_of(records.iter())
}

/// [`membership`] over any iteration of (node, record), so callers need not collect a map.
pub fn membership_of<'a>(
    records: impl Iterator<Item = (&'a NodeId, &'a NodeRecord)> + Clone,
) -> BTreeMap<NodeId, NodeState> {
    let mut worst_death: BTreeMap<&str, u64> = BTreeMap::new();
    let mut worst_suspect: BTreeMap<&str, u64> = BTreeMap::new();
    for (observer, record) in records.clone() {
        for (target, inc) in &record.deaths {
            if target != observer {
                let e = worst_death.entry(target.as_str()).or_insert(0);
                *e = (*e).max(*inc);
            }
        }
        for (target, inc) in &record.suspects {
            if target != observer {
                let e = worst_suspect.entry(target.as_str()).or_insert(0);
                *e = (*e).max(*inc);
            }
        }
    }
    let mut out = BTreeMap::new();
    for (id, record) in records {
        out.insert(id.clone(), node_state_of(record, worst_death.get(id.as_str()), worst_suspect.get(id.as_str())));
    }
    // Certified nodes whose own record has not arrived yet: dead at incarnation 0.
    for (target, _) in worst_death {
        out.entry(target.to_string()).or_insert(NodeState::Dead);
    }
    out
}

/// One node's state from its own record (if held) and the highest incarnations any *other*
/// observer suspects or certifies dead. `None`: the node is unknown (no record, no
/// certificate). [`membership_of`] is this function over every node; the table keeps it
/// incrementally, recomputing only the nodes a change touches.
pub fn node_state(
    record: Option<&NodeRecord>,
    worst_death: Option<u64>,
    worst_suspect: Option<u64>,
) -> Option<NodeState> {
    match record {
        Some(record) => Some(node_state_of(record, worst_death.as_ref(), worst_suspect.as_ref())),
        None => worst_death.map(|_| NodeState::Dead),
    }
}

fn node_state_of(record: &NodeRecord, death: Option<&u64>, suspect: Option<&u64>) -> NodeState {
    if record.mode == NodeMode::Left {
        return NodeState::Left;
    }
    if death.is_some_and(|inc| *inc >= record.incarnation) {
        return NodeState::Dead;
    }
    if suspect.is_some_and(|inc| *inc >= record.incarnation) {
        return NodeState::Suspect;
    }
    NodeState::Alive
}

/// The rank key of `node` for (`job`, `index`, `attempt`): a rendezvous hash. The lowest key
/// among valid claims wins. It depends on nothing but these four values, so two nodes that see
/// the same claims pick the same winner whatever else they disagree on (load, membership).
pub fn rank_key(job: &str, index: u32, attempt: u32, node: &str) -> u64 {
    rank_key_of(instance_key(job, index, attempt), node)
}

/// The instance half of [`rank_key`] (an unfinished hash state): compute it once per
/// decision, then [`rank_key_of`] per node, instead of hashing the job id once per node.
pub fn instance_key(job: &str, index: u32, attempt: u32) -> u64 {
    fnv_prefix(&[job.as_bytes(), &index.to_le_bytes(), &attempt.to_le_bytes()])
}

/// [`rank_key`] from its instance half: exactly `rank_key(job, index, attempt, node)`.
pub fn rank_key_of(instance_key: u64, node: &str) -> u64 {
    mix64(fnv_continue(instance_key, &[node.as_bytes()]))
}

/// Placement preference of `node`: weighted rendezvous (higher is better). The weight is the
/// node's free share of its scarcer resource, so emptier nodes tend to claim first. This only
/// orders the claim back-off; it never decides a winner.
pub fn placement_score(
    job: &str,
    index: u32,
    attempt: u32,
    node: &str,
    capacity: Resources,
    allocated: Resources,
) -> f64 {
    placement_score_of(instance_key(job, index, attempt), node, capacity, allocated)
}

/// [`placement_score`] from the instance half of the key: what a node ranking many peers calls.
pub fn placement_score_of(instance_key: u64, node: &str, capacity: Resources, allocated: Resources) -> f64 {
    let free_share = |cap: u64, used: u64| if cap == 0 { 0.0 } else { cap.saturating_sub(used) as f64 / cap as f64 };
    let weight = 0.05
        + free_share(capacity.cpu_millis, allocated.cpu_millis)
            .min(free_share(capacity.memory_mb, allocated.memory_mb));
    let u = unit_interval(rank_key_of(instance_key, node));
    // -w / ln(u): the standard weighted rendezvous score; ln(u) < 0 for u in (0,1).
    if u >= 1.0 {
        return f64::INFINITY;
    }
    -weight / u.ln()
}

/// Whether a claim is valid: for this attempt, by a node whose claims count.
///
/// A node that gives an instance up (its copy lost, stopped, or found after a restart)
/// deletes its claim in the same step as it records the run, so a claim present is a claim
/// meant. Earlier versions also voided a claim when its node had a lost or stopped run at
/// that attempt; that wedged an instance for good once every node had given it up once
/// (simulator seed 7), so the run history no longer bears on validity.
pub fn claim_is_valid(
    _record: &JobRecord,
    _index: u32,
    attempt: u32,
    node: &str,
    claim: &Claim,
    state: &dyn Fn(&str) -> NodeState,
) -> bool {
    claim.attempt == attempt && state(node).counts()
}

/// The winner among the claims on (`job`, `index`) at `attempt`: the valid claim with the
/// lowest rank key (node id breaks a tie, which a 64-bit hash makes only theoretical).
pub fn winner<'a>(
    job: &str,
    record: &'a JobRecord,
    index: u32,
    attempt: u32,
    state: &dyn Fn(&str) -> NodeState,
) -> Option<&'a NodeId> {
    crate::records::range_from(&record.claims, &(index, String::new()))
        .take_while(|((i, _), _)| *i == index)
        .filter(|((_, node), claim)| claim_is_valid(record, index, attempt, node, claim, state))
        .min_by_key(|((_, node), _)| (rank_key(job, index, attempt, node), (*node).clone()))
        .map(|((_, node), _)| node)
}

/// Where one instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Waiting for a claim (or for a restart delay).
    Pending,
    /// Claimed; the winner starts it after the settle window.
    Claimed,
    /// Running on its owner.
    Running,
    /// Finished with exit 0 (batch).
    Succeeded,
    /// Out of attempts (batch).
    Failed,
    /// Stopped on request.
    Stopped,
}

impl InstanceStatus {
    /// Whether nothing more will happen to it.
    pub fn is_terminal(self) -> bool {
        matches!(self, InstanceStatus::Succeeded | InstanceStatus::Failed | InstanceStatus::Stopped)
    }
}

/// The derived view of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    /// Instance index.
    pub index: u32,
    /// Its state.
    pub status: InstanceStatus,
    /// The current attempt (the one to claim, when pending).
    pub attempt: u32,
    /// The node that owns it: the winner, the runner, or the node that finished it.
    pub owner: Option<NodeId>,
    /// When pending after a failure: not to be claimed before this time.
    pub not_before_ms: u64,
    /// Attempts that failed.
    pub failures: u32,
    /// The exit code of the deciding run, when finished.
    pub exit_code: Option<i32>,
    /// Runs beyond one per attempt, not counting runs lost to a restart: copies that ran
    /// concurrently (during a partition, or before a lost claim was noticed). Counted, never
    /// hidden (I3).
    pub duplicate_runs: u32,
    /// Nodes that failed this instance (for `restart.placement = other`).
    pub failed_on: BTreeSet<NodeId>,
}

fn is_exit(kind: JobKind, status: RunStatus) -> bool {
    match kind {
        JobKind::Batch => status == RunStatus::Failed,
        JobKind::Service => matches!(status, RunStatus::Failed | RunStatus::Succeeded),
    }
}

/// Derives the state of instance `index` of a job. Pure: a function of the record and the
/// membership only.
pub fn evaluate_instance(
    job: &str,
    record: &JobRecord,
    spec: &JobSpec,
    index: u32,
    state: &dyn Fn(&str) -> NodeState,
) -> InstanceView {
    let runs: Vec<(u32, &NodeId, &Run)> = crate::records::range_from(&record.runs, &(index, 0, String::new()))
        .take_while(|((i, _, _), _)| *i == index)
        .map(|((_, a, n), r)| (*a, n, r))
        .collect();
    // A lost run (its node restarted) and a copy handed over by a draining or leaving node did
    // not run side by side with their replacements: not duplicates.
    let mut per_attempt: BTreeMap<u32, u32> = BTreeMap::new();
    for (attempt, _, run) in &runs {
        let handed_over = run.status == RunStatus::Stopped && run.reason.as_deref() == Some("drained");
        if run.status != RunStatus::Lost && !handed_over {
            *per_attempt.entry(*attempt).or_default() += 1;
        }
    }
    let duplicate_runs = per_attempt.values().map(|n| n.saturating_sub(1)).sum();
    let failed_attempts: BTreeSet<u32> =
        runs.iter().filter(|(_, _, r)| is_exit(spec.kind, r.status)).map(|(a, _, _)| *a).collect();
    let failures = failed_attempts.len() as u32;
    let failed_on =
        runs.iter().filter(|(_, _, r)| r.status == RunStatus::Failed).map(|(_, n, _)| (*n).clone()).collect();
    let mut view = InstanceView {
        index,
        status: InstanceStatus::Pending,
        attempt: 0,
        owner: None,
        not_before_ms: 0,
        failures,
        exit_code: None,
        duplicate_runs,
        failed_on,
    };

    // A batch instance that succeeded once is done, whoever ran it (I2 asks at least once).
    if spec.kind == JobKind::Batch {
        if let Some((attempt, node, run)) = runs.iter().find(|(_, _, r)| r.status == RunStatus::Succeeded) {
            view.status = InstanceStatus::Succeeded;
            view.attempt = *attempt;
            view.owner = Some((*node).clone());
            view.exit_code = run.exit_code;
            return view;
        }
    }

    let claims_max = crate::records::range_from(&record.claims, &(index, String::new()))
        .take_while(|((i, _), _)| *i == index)
        .map(|(_, c)| c.attempt)
        .max();
    let runs_max = runs.iter().map(|(a, _, _)| *a).max();
    let current = claims_max.max(runs_max).unwrap_or(0);
    view.attempt = current;

    if !record.stops.is_empty() {
        let live_runner = runs
            .iter()
            .find(|(_, n, r)| r.status == RunStatus::Running && state(n).counts())
            .map(|(_, n, _)| (*n).clone());
        view.status = if live_runner.is_some() { InstanceStatus::Running } else { InstanceStatus::Stopped };
        view.owner = live_runner;
        return view;
    }

    let winner = winner(job, record, index, current, state).cloned();
    // An exit at the current attempt, by the winner or (when the winner is gone) by anyone.
    let exit = runs
        .iter()
        .filter(|(a, n, r)| *a == current && is_exit(spec.kind, r.status) && winner.as_ref().is_none_or(|w| w == *n))
        .max_by_key(|(_, _, r)| r.finished_ms);
    if let Some((_, node, run)) = exit {
        view.owner = Some((*node).clone());
        view.exit_code = run.exit_code;
        if spec.kind == JobKind::Batch && failures >= spec.restart.attempts {
            view.status = InstanceStatus::Failed;
            return view;
        }
        view.status = InstanceStatus::Pending;
        view.attempt = current + 1;
        view.not_before_ms = run.finished_ms.unwrap_or(run.started_ms) + spec.restart.delay_after_failures_ms(failures);
        return view;
    }

    match winner {
        Some(w) => {
            let run = record.runs.get(&(index, current, w.clone()));
            view.status = match run.map(|r| r.status) {
                Some(RunStatus::Running) => InstanceStatus::Running,
                _ => InstanceStatus::Claimed,
            };
            view.owner = Some(w);
        }
        None => view.status = InstanceStatus::Pending,
    }
    view
}

/// A job's overall state, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// No instance has started yet.
    Pending,
    /// Some instance is claimed or running.
    Running,
    /// Every instance succeeded.
    Succeeded,
    /// Every instance finished, and some failed.
    Failed,
    /// Stopped on request, and nothing runs any more.
    Stopped,
}

impl JobStatus {
    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Stopped)
    }
}

/// Aggregates instance views into a job status.
pub fn job_status(stopped: bool, instances: &[InstanceView]) -> JobStatus {
    let all = |s: InstanceStatus| instances.iter().all(|i| i.status == s);
    let any = |s: InstanceStatus| instances.iter().any(|i| i.status == s);
    if instances.iter().all(|i| i.status.is_terminal()) {
        if stopped {
            JobStatus::Stopped
        } else if all(InstanceStatus::Succeeded) {
            JobStatus::Succeeded
        } else {
            JobStatus::Failed
        }
    } else if any(InstanceStatus::Running) || any(InstanceStatus::Claimed) || any(InstanceStatus::Succeeded) {
        JobStatus::Running
    } else {
        JobStatus::Pending
    }
}

/// When a finished job finished: the latest end among its runs and stop requests.
pub fn finished_at_ms(record: &JobRecord) -> u64 {
    let runs = record.runs.values().map(|r| r.finished_ms.unwrap_or(r.started_ms));
    let stops = record.stops.values().map(|s| s.at_ms);
    runs.chain(stops).max().unwrap_or_else(|| record.header.as_ref().map_or(0, |h| h.submitted_at_ms))
}

/// Which finished jobs to compact: those older than `retain_age_ms`, and all but the newest
/// `retain_count`. `finished` holds (finished_at_ms, job id) of finished jobs. The result is a
/// function of the set and `now_ms`, so every node holding the same set compacts the same jobs.
pub fn jobs_to_compact(
    finished: &[(u64, String)],
    now_ms: u64,
    retain_count: usize,
    retain_age_ms: u64,
) -> Vec<String> {
    let mut sorted: Vec<&(u64, String)> = finished.iter().collect();
    sorted.sort();
    let over = sorted.len().saturating_sub(retain_count);
    sorted
        .iter()
        .enumerate()
        .filter(|(i, (at, _))| *i < over || now_ms.saturating_sub(*at) > retain_age_ms)
        .map(|(_, (_, id))| id.clone())
        .collect()
}
