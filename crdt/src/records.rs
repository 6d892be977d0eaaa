//! The values stored in the table, and the typed views parsed from a document.
//!
//! Every document is a flat Automerge map of string keys to JSON strings. Flat keys are
//! deliberate: two nodes that create the same nested map concurrently get rival objects in
//! Automerge, and one side's writes seem lost. A flat key has exactly one writer (see
//! [`crate::table`]), so no write ever races another.

use crate::spec::{JobSpec, Resources};
pub use litemap::LiteMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// A node's id: its libp2p peer id, as a string.
pub type NodeId = String;
/// A job's id: 16 random bytes, hex.
pub type JobId = String;

/// Which document: one per node (written only by that node) and one per job.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DocId {
    /// A node's own record.
    Node(NodeId),
    /// A job's spec, claims and runs.
    Job(JobId),
}

impl DocId {
    /// A stable short form for hashing and logs.
    pub fn key(&self) -> String {
        match self {
            DocId::Node(id) => format!("n/{id}"),
            DocId::Job(id) => format!("j/{id}"),
        }
    }
}

/// Written once by the accepting node when the job is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobHeader {
    /// The spec, validated before it was written.
    pub spec: JobSpec,
    /// The node that accepted the submission.
    pub submitted_by: NodeId,
    /// When, in the accepting node's milliseconds.
    pub submitted_at_ms: u64,
}

/// A node's claim on one instance for one attempt. Key `claim/<index>/<node>`, written only
/// by `<node>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The attempt claimed.
    pub attempt: u32,
    /// The claimant's boot id: a claim from an earlier boot is withdrawn at restart.
    pub boot: u64,
    /// When the claim was made, claimant's clock.
    pub at_ms: u64,
}

/// The state of one run (one node's execution of one attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// The process is running.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, or failed to start.
    Failed,
    /// Its node restarted and the process was gone.
    Lost,
    /// Stopped on purpose: the job was stopped, or this copy lost its claim to another.
    Stopped,
}

impl RunStatus {
    /// Whether the run is over.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Running)
    }
}

/// One run. Key `run/<index>/<attempt>/<node>`, written only by `<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Where it is.
    pub status: RunStatus,
    /// The runner's boot id.
    pub boot: u64,
    /// Start time, runner's clock.
    pub started_ms: u64,
    /// End time, runner's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// The process's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it ended, when that is not an exit code (`superseded`, `stopped`, `restart`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A request to stop the job. Key `stop/<node>`, written by the node that took the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRequest {
    /// When, in that node's clock.
    pub at_ms: u64,
}

/// Everything the table knows about one job, parsed from its document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobRecord {
    /// The header; `None` while only other keys have arrived (changes out of order). Shared:
    /// parsed once per process (`shared_header`).
    pub header: Option<Arc<JobHeader>>,
    /// Stop requests by node.
    pub stops: LiteMap<NodeId, StopRequest>,
    /// Claims by (instance, node).
    pub claims: LiteMap<(u32, NodeId), Claim>,
    /// Runs by (instance, attempt, node).
    pub runs: LiteMap<(u32, u32, NodeId), Run>,
}

/// The entries of `map` from `from` on, in key order (`BTreeMap::range(from..)`).
pub fn range_from<'a, K: Ord, V>(map: &'a LiteMap<K, V>, from: &K) -> impl Iterator<Item = (&'a K, &'a V)> {
    let start = map.find_index(from).unwrap_or_else(|at| at);
    map.as_slice()[start..].iter().map(|(k, v)| (k, v))
}

/// Static facts about a node, written by the node itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Human name.
    pub name: String,
    /// Addresses it listens on (multiaddrs as strings).
    #[serde(default)]
    pub addrs: Vec<String>,
    /// What it offers.
    pub capacity: Resources,
    /// Labels for constraints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Task drivers it can run (`exec`, or in-process handler names). A job whose driver a
    /// node lacks is never placed there.
    #[serde(default = "default_drivers")]
    pub drivers: Vec<String>,
}

fn default_drivers() -> Vec<String> {
    vec!["exec".to_string()]
}

impl Default for NodeInfo {
    fn default() -> Self {
        NodeInfo {
            name: String::new(),
            addrs: Vec::new(),
            capacity: Resources::default(),
            labels: BTreeMap::new(),
            drivers: default_drivers(),
        }
    }
}

/// What a node says of its own participation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NodeMode {
    /// Takes work.
    #[default]
    Active,
    /// Takes no new work, and hands its work to others.
    Draining,
    /// Left the cluster on purpose; others need not wait for a timeout.
    Left,
}

/// Everything the table knows about one node, parsed from its document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeRecord {
    /// Static facts; `None` until they arrive.
    pub info: Option<NodeInfo>,
    /// Raised by the node to refute a suspicion or death certificate.
    pub incarnation: u64,
    /// Active, draining or left.
    pub mode: NodeMode,
    /// This node suspects these peers, at these incarnations.
    pub suspects: BTreeMap<NodeId, u64>,
    /// This node certifies these peers dead, at these incarnations.
    pub deaths: BTreeMap<NodeId, u64>,
}

/// Key names. Kept in one place so parsing and writing cannot drift apart.
pub(crate) mod keys {
    pub const SPEC: &str = "spec";
    pub const INFO: &str = "info";
    pub const INCARNATION: &str = "incarnation";
    pub const MODE: &str = "mode";

    pub fn stop(node: &str) -> String {
        format!("stop/{node}")
    }
    pub fn claim(index: u32, node: &str) -> String {
        format!("claim/{index}/{node}")
    }
    pub fn run(index: u32, attempt: u32, node: &str) -> String {
        format!("run/{index}/{attempt}/{node}")
    }
    pub fn suspect(node: &str) -> String {
        format!("suspect/{node}")
    }
    pub fn dead(node: &str) -> String {
        format!("dead/{node}")
    }
}

impl JobRecord {
    /// Parses a job document's entries. Unknown or malformed keys are skipped, never fatal: a
    /// peer's bad write must not make the job unreadable (I7).
    pub fn parse<'a>(entries: impl Iterator<Item = (&'a str, &'a str)>) -> JobRecord {
        let mut record = JobRecord::default();
        for (key, value) in entries {
            let mut parts = key.split('/');
            match parts.next() {
                Some("spec") => record.header = shared_header(value),
                Some("stop") => {
                    if let (Some(node), Ok(stop)) = (parts.next(), serde_json::from_str(value)) {
                        record.stops.insert(node.to_string(), stop);
                    }
                }
                Some("claim") => {
                    let index = parts.next().and_then(|s| s.parse().ok());
                    if let (Some(index), Some(node), Ok(claim)) = (index, parts.next(), serde_json::from_str(value)) {
                        record.claims.insert((index, node.to_string()), claim);
                    }
                }
                Some("run") => {
                    let index = parts.next().and_then(|s| s.parse().ok());
                    let attempt = parts.next().and_then(|s| s.parse().ok());
                    if let (Some(index), Some(attempt), Some(node), Ok(run)) =
                        (index, attempt, parts.next(), serde_json::from_str(value))
                    {
                        record.runs.insert((index, attempt, node.to_string()), run);
                    }
                }
                _ => {}
            }
        }
        record
    }
}

/// The parsed header for a `spec` value, shared with every other record parsed from the same
/// text in this process.
///
/// A header is immutable once written, and every node parses the same text into the same
/// value; only the number of copies differs. Each node of a 1,000-node simulation held its
/// own parsed copy of every job's spec (a dozen allocations, and the largest part of a
/// record); so would an embedder running several node cores. Sharing by text is a pure
/// cache: the result is equal to a fresh parse, so no output depends on whether it hit.
fn shared_header(json: &str) -> Option<Arc<JobHeader>> {
    static HEADERS: OnceLock<Mutex<WeakShare<JobHeader>>> = OnceLock::new();
    let parse = || serde_json::from_str::<JobHeader>(json).ok().map(Arc::new);
    // A poisoned lock (a panic elsewhere while holding it) only loses the sharing.
    let Ok(mut headers) = HEADERS.get_or_init(Mutex::default).lock() else { return parse() };
    headers.get_or_insert_with(json, parse)
}

/// One shared copy of a node id per process, for structures that name the same few nodes
/// once per job (a node core's evaluation cache: owners, participants, allocations). A
/// `String` per mention is about 88 bytes; a shared one 16. Like the shared job headers, pure:
/// the value is the id itself, so no decision depends on whether it was shared.
pub fn shared_node_id(id: &str) -> Arc<str> {
    static IDS: OnceLock<Mutex<WeakShare<str>>> = OnceLock::new();
    let make = || Some(Arc::<str>::from(id));
    let shared = match IDS.get_or_init(Mutex::default).lock() {
        Ok(mut ids) => ids.get_or_insert_with(id, make),
        Err(_) => make(),
    };
    shared.unwrap_or_else(|| id.into())
}

/// Values shared by their text, held weakly: an entry lives while something holds its value
/// (jobs compacted away everywhere, nodes gone from every job are forgotten).
struct WeakShare<T: ?Sized> {
    by_text: HashMap<Box<str>, Weak<T>>,
    purge_at: usize,
}

impl<T: ?Sized> Default for WeakShare<T> {
    fn default() -> Self {
        WeakShare { by_text: HashMap::new(), purge_at: 0 }
    }
}

impl<T: ?Sized> WeakShare<T> {
    /// The value shared for `text`, or the one `make` gives, shared from now on.
    fn get_or_insert_with(&mut self, text: &str, make: impl FnOnce() -> Option<Arc<T>>) -> Option<Arc<T>> {
        if let Some(shared) = self.by_text.get(text).and_then(Weak::upgrade) {
            return Some(shared);
        }
        let value = make()?;
        self.by_text.insert(text.into(), Arc::downgrade(&value));
        if self.by_text.len() > self.purge_at {
            self.by_text.retain(|_, v| v.strong_count() > 0);
            self.purge_at = (self.by_text.len() * 2).max(1024);
        }
        Some(value)
    }
}

impl NodeRecord {
    /// Parses a node document's entries; malformed entries are skipped.
    pub fn parse<'a>(entries: impl Iterator<Item = (&'a str, &'a str)>) -> NodeRecord {
        let mut record = NodeRecord::default();
        for (key, value) in entries {
            let mut parts = key.splitn(2, '/');
            match (parts.next(), parts.next()) {
                (Some("info"), None) => record.info = serde_json::from_str(value).ok(),
                (Some("incarnation"), None) => record.incarnation = value.parse().unwrap_or(0),
                (Some("mode"), None) => record.mode = serde_json::from_str(value).unwrap_or_default(),
                (Some("suspect"), Some(node)) => {
                    if let Ok(inc) = value.parse() {
                        record.suspects.insert(node.to_string(), inc);
                    }
                }
                (Some("dead"), Some(node)) => {
                    if let Ok(inc) = value.parse() {
                        record.deaths.insert(node.to_string(), inc);
                    }
                }
                _ => {}
            }
        }
        record
    }
}
