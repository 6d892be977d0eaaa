//! Every tunable of the node core, with the reason for its default.

use colony_crdt::Resources;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Failure detection and placement timings. The defaults are tuned for a LAN: a dead node is
/// certified in about `probe_timeout_ms * 3 + suspicion_ms` after its last answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// How often a care-taker probes each node it watches. 200 ms keeps detection well under
    /// the 2 s healing target while costing k pings per node per interval.
    pub probe_interval_ms: u64,
    /// How long a direct probe waits for its answer. A LAN round trip is well under 1 ms;
    /// 150 ms leaves room for a busy or briefly descheduled peer.
    pub probe_timeout_ms: u64,
    /// Peers asked to probe indirectly before suspecting (SWIM). Two rules out one bad link.
    pub indirect_probes: usize,
    /// How long a node stays suspected before its care-taker certifies it dead. Gives a
    /// paused or overloaded node time to answer and refute.
    pub suspicion_ms: u64,
    /// Care-takers per node (k). Three survive two simultaneous care-taker deaths.
    pub care_takers: usize,
    /// How long a claim must stand unchallenged before its winner starts the work. Covers
    /// one sync round trip, so concurrent claims are seen before anything starts.
    pub settle_ms: u64,
    /// Extra wait per rank position before a lower-ranked node claims. Long enough for the
    /// better-ranked node's claim to arrive (a LAN push takes about 1 ms).
    pub claim_stagger_ms: u64,
    /// Rank positions are counted exactly up to this; past it, a node estimates its position
    /// from its own rendezvous hash (see `Engine::rank_position`). Bounds the ranking's cost.
    pub max_claim_rank: u32,
    /// How often each node starts an anti-entropy round with one random peer.
    pub anti_entropy_ms: u64,
    /// How often finished jobs are checked for compaction.
    pub compaction_ms: u64,
    /// How often jobs this node has no part in (deferred: their changes held, not applied)
    /// are brought up to date, so their statuses, the allocations they imply and their
    /// compaction lag by at most this much. The longer, the more changes one batch applies.
    pub deferred_sweep_ms: u64,
    /// Upper bound of the local-health multiplier (Lifeguard): a node that misses many
    /// answers blames itself first and stretches its timeouts up to (1 + this) times.
    pub max_local_health: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            probe_interval_ms: 200,
            probe_timeout_ms: 150,
            indirect_probes: 2,
            suspicion_ms: 600,
            care_takers: 3,
            settle_ms: 15,
            claim_stagger_ms: 40,
            max_claim_rank: 16,
            anti_entropy_ms: 1_000,
            compaction_ms: 1_000,
            deferred_sweep_ms: 5_000,
            max_local_health: 8,
        }
    }
}

/// How long finished jobs and their tombstones are kept (I6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retention {
    /// Finished jobs kept, newest first. Past this they are compacted on every node.
    pub finished_jobs: usize,
    /// Finished jobs older than this are compacted whatever their number.
    pub finished_age_ms: u64,
    /// Ids of compacted jobs remembered, so a lagging peer cannot hand one back. As many as
    /// the finished jobs kept: state stays flat under churn (I6), and a peer that lags by more
    /// than a whole retention window gets its stale jobs compacted again by the same rule.
    pub tombstones: usize,
    /// Tombstones older than this are forgotten. A peer partitioned for longer may bring a
    /// finished job back; it is then compacted again (finished jobs never re-run).
    pub tombstone_age_ms: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            finished_jobs: 10_000,
            finished_age_ms: 24 * 3_600_000,
            tombstones: 10_000,
            tombstone_age_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// Bounds on what a peer can make this node hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Concurrent Automerge sync sessions (peer, document). Past this all are dropped and
    /// restart from scratch, which costs one extra round trip each.
    pub sync_sessions: usize,
    /// Persisted bytes appended since the last snapshot before a new snapshot is taken
    /// (at least; also twice the last snapshot's estimated size, 1 KiB per record).
    pub snapshot_after_bytes: usize,
    /// Documents offered in one anti-entropy summary.
    pub summary_entries: usize,
    /// Job documents a node asks peers to repair (`Have`) per anti-entropy interval at most,
    /// a random choice among those that differ; later intervals take the rest. Node
    /// documents are repaired first and always: one per member, and they say who is alive,
    /// so who owns what (they count against the budget, but are never deferred). The regular
    /// round and the eager rounds with new peers share it. Repair is rate-limited, as in
    /// Cassandra's or Riak's anti-entropy: under a partition where every node sees a different
    /// half (a ring), two neighbours differ in thousands of documents, and syncing all of them
    /// every second kept two million sessions open across 1,000 simulated nodes. 256
    /// documents an interval is more than a 5-node cluster of 200 jobs ever differs by.
    #[serde(default = "default_sync_docs_per_round")]
    pub sync_docs_per_round: usize,
}

fn default_sync_docs_per_round() -> usize {
    256
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sync_sessions: 65_536,
            snapshot_after_bytes: 4 << 20,
            summary_entries: 20_000,
            sync_docs_per_round: default_sync_docs_per_round(),
        }
    }
}

/// The node core's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Human name.
    pub name: String,
    /// Addresses others may reach this node at (informational).
    pub addrs: Vec<String>,
    /// What this node offers.
    pub capacity: Resources,
    /// Labels for constraints.
    pub labels: BTreeMap<String, String>,
    /// Task drivers this node can run; jobs for other drivers are never claimed here.
    pub drivers: Vec<String>,
    /// Timings.
    pub timing: Timing,
    /// Retention.
    pub retention: Retention,
    /// Limits.
    pub limits: Limits,
}

impl EngineConfig {
    /// A config with defaults and the given name and capacity.
    pub fn new(name: impl Into<String>, capacity: Resources) -> EngineConfig {
        EngineConfig {
            name: name.into(),
            addrs: Vec::new(),
            capacity,
            labels: BTreeMap::new(),
            drivers: vec!["exec".to_string()],
            timing: Timing::default(),
            retention: Retention::default(),
            limits: Limits::default(),
        }
    }
}
