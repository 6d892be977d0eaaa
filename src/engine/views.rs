//! The JSON shapes of jobs and nodes: what the HTTP API returns, what `--json` prints, and
//! what the library's typed accessors return. One definition, so they cannot drift.

use super::Engine;
use colony_crdt::rules::{self, evaluate_instance, JobStatus, NodeState};
use colony_crdt::{InstanceStatus, JobKind, JobSpec, NodeMode, Resources, RunStatus};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One run of an instance (one attempt on one node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunJson {
    /// Attempt number.
    pub attempt: u32,
    /// Node name.
    pub node: String,
    /// Node id.
    pub node_id: String,
    /// Run status.
    pub status: RunStatus,
    /// Start, runner's clock (ms).
    pub started_ms: u64,
    /// End, runner's clock (ms).
    pub finished_ms: Option<u64>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Why it ended, when not by itself.
    pub reason: Option<String>,
}

/// One instance of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceJson {
    /// Instance index.
    pub index: u32,
    /// The owner's node name (`null` when none).
    pub node: Option<String>,
    /// The owner's node id.
    pub node_id: Option<String>,
    /// Status.
    pub status: InstanceStatus,
    /// The deciding exit code.
    pub exit_code: Option<i32>,
    /// The current attempt.
    pub attempt: u32,
    /// Failed attempts.
    pub failures: u32,
    /// Copies that ran concurrently (counted, never hidden).
    pub duplicate_runs: u32,
    /// Every run, oldest attempt first.
    pub runs: Vec<RunJson>,
}

/// A job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobJson {
    /// Job id.
    pub id: String,
    /// Job name.
    pub name: String,
    /// Status.
    pub status: JobStatus,
    /// Batch or service.
    pub kind: JobKind,
    /// Accepting node's id.
    pub submitted_by: String,
    /// When accepted (accepting node's clock, ms).
    pub submitted_at_ms: u64,
    /// Sum of the instances' duplicate runs.
    pub duplicate_runs: u32,
    /// Instances.
    pub instances: Vec<InstanceJson>,
    /// The spec as submitted.
    pub spec: JobSpec,
}

/// A node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeJson {
    /// Node id (libp2p peer id).
    pub id: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: NodeState,
    /// Active, draining or left.
    pub mode: NodeMode,
    /// Addresses.
    pub addrs: Vec<String>,
    /// Capacity.
    pub capacity: Resources,
    /// Allocated by claimed and running instances.
    pub allocated: Resources,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Incarnation.
    pub incarnation: u64,
}

impl Engine {
    fn node_name(&self, id: &str) -> String {
        self.table.node(id).and_then(|r| r.info.as_ref()).map_or_else(|| short(id), |i| i.name.clone())
    }

    /// A job as JSON, if held.
    pub fn job_json(&self, id: &str) -> Option<JobJson> {
        let record = self.table.job_current(id)?;
        let record = &*record;
        let header = record.header.as_ref()?;
        let spec = &header.spec;
        let state = |n: &str| self.node_states.get(n).copied().unwrap_or(NodeState::Alive);
        let views: Vec<_> = (0..spec.count).map(|i| evaluate_instance(id, record, spec, i, &state)).collect();
        let status = rules::job_status(!record.stops.is_empty(), &views);
        let instances: Vec<InstanceJson> = views
            .iter()
            .map(|v| {
                let runs = colony_crdt::records::range_from(&record.runs, &(v.index, 0, String::new()))
                    .take_while(|((i, _, _), _)| *i == v.index)
                    .map(|((_, attempt, node), r)| RunJson {
                        attempt: *attempt,
                        node: self.node_name(node),
                        node_id: node.clone(),
                        status: r.status,
                        started_ms: r.started_ms,
                        finished_ms: r.finished_ms,
                        exit_code: r.exit_code,
                        reason: r.reason.clone(),
                    })
                    .collect();
                InstanceJson {
                    index: v.index,
                    node: v.owner.as_deref().map(|n| self.node_name(n)),
                    node_id: v.owner.clone(),
                    status: v.status,
                    exit_code: v.exit_code,
                    attempt: v.attempt,
                    failures: v.failures,
                    duplicate_runs: v.duplicate_runs,
                    runs,
                }
            })
            .collect();
        Some(JobJson {
            id: id.to_string(),
            name: spec.name.clone(),
            status,
            kind: spec.kind,
            submitted_by: header.submitted_by.clone(),
            submitted_at_ms: header.submitted_at_ms,
            duplicate_runs: instances.iter().map(|i| i.duplicate_runs).sum(),
            instances,
            spec: spec.clone(),
        })
    }

    /// Every job held, newest first.
    pub fn jobs_json(&self) -> Vec<JobJson> {
        let mut jobs: Vec<JobJson> = self.table.jobs().filter_map(|(id, _)| self.job_json(id)).collect();
        jobs.sort_by(|a, b| b.submitted_at_ms.cmp(&a.submitted_at_ms).then_with(|| a.id.cmp(&b.id)));
        jobs
    }

    /// Every node known, by name.
    pub fn nodes_json(&self) -> Vec<NodeJson> {
        let mut nodes: Vec<NodeJson> = self
            .table
            .nodes()
            .filter_map(|(id, r)| {
                let info = r.info.as_ref()?;
                let allocated = if *id == self.id {
                    self.local_allocation()
                } else {
                    self.allocated.get(id).copied().unwrap_or_default()
                };
                Some(NodeJson {
                    id: id.clone(),
                    name: info.name.clone(),
                    state: self.table.node_state(id),
                    mode: r.mode,
                    addrs: info.addrs.clone(),
                    capacity: info.capacity,
                    allocated,
                    labels: info.labels.clone(),
                    incarnation: r.incarnation,
                })
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        nodes
    }

    /// The node whose logs tell instance `index`'s story: the owner (the winner, or the node
    /// that finished it) when it ran it, else the node of the latest run that was not lost.
    pub fn runner_of(&self, job: &str, index: u32) -> Option<String> {
        let record = self.table.job_current(job)?;
        let record = &*record;
        let header = record.header.as_ref()?;
        let state = |n: &str| self.node_states.get(n).copied().unwrap_or(NodeState::Alive);
        let view = evaluate_instance(job, record, &header.spec, index, &state);
        let runs = || {
            colony_crdt::records::range_from(&record.runs, &(index, 0, String::new()))
                .take_while(|((i, _, _), _)| *i == index)
        };
        if let Some(owner) = view.owner {
            if runs().any(|((_, _, n), _)| *n == owner) {
                return Some(owner);
            }
        }
        runs()
            .filter(|(_, r)| r.status != RunStatus::Lost)
            .max_by_key(|((a, _, n), r)| (*a, r.started_ms, n.clone()))
            .map(|((_, _, n), _)| n.clone())
    }
}

fn short(id: &str) -> String {
    id.chars().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect()
}
