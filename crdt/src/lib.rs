//! `colony-crdt`: Colony's replicated cluster table and its deterministic rules.
//!
//! - [`Table`]: the cluster's nodes, jobs, claims and runs, one Automerge document per node and
//!   per job, behind a typed API. No caller touches Automerge.
//! - [`rules`]: pure functions of the table: node liveness, claim ranking, the winner of a
//!   claim, instance and job status, which finished jobs to compact.
//! - [`spec`]: the job spec users submit, and its validation.
//!
//! What it does not do: IO of any kind, clocks, randomness, or deciding *when* to act. Time
//! arrives as arguments; the node core (crate `colony`) decides what to write.
#![deny(missing_docs)]

mod doc;
mod frozen;
pub mod hash;
pub mod records;
pub mod rules;
pub mod spec;
pub mod table;

pub use doc::{DocError, SyncState};
pub use frozen::SharedStates;
pub use records::{
    Claim, DocId, JobHeader, JobId, JobRecord, NodeId, NodeInfo, NodeMode, NodeRecord, Run, RunStatus, StopRequest,
};
pub use rules::{InstanceStatus, InstanceView, JobStatus, NodeState};
pub use spec::{Constraint, ConstraintOp, JobKind, JobSpec, Resources, RestartPlacement, RestartPolicy, SpecError};
pub use table::{SnapshotRecords, Table, TableError, BUCKETS};
