//! The messages node cores exchange. Encoded with postcard; a decode failure is an error the
//! caller logs and drops, never a panic (I7).

use colony_crdt::{DocId, JobId, NodeId};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A message between two node cores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// A liveness probe; answered with `Ack` carrying the same `seq`.
    Ping {
        /// Echoed by the answer.
        seq: u64,
    },
    /// The answer to `Ping`, or a relayed answer to `PingReq`.
    Ack {
        /// The probe's `seq`.
        seq: u64,
    },
    /// Asks the receiver to probe `target` on the sender's behalf (SWIM indirect probe).
    PingReq {
        /// Echoed in the relayed `Ack`.
        seq: u64,
        /// The node to probe.
        target: NodeId,
    },
    /// New changes to one document, pushed right after they were made.
    Changes {
        /// Which document.
        doc: DocId,
        /// Automerge change bytes. Shared: a push to every peer clones a pointer, not the
        /// bytes (at 1,000 nodes copying each change 999 times was a tenth of the simulator's
        /// time). The wire form is a plain sequence.
        changes: Arc<[Vec<u8>]>,
    },
    /// Anti-entropy, step 1: the sender's per-bucket hashes.
    Digest {
        /// `colony_crdt::BUCKETS` hashes.
        buckets: Vec<u64>,
    },
    /// Anti-entropy, step 2: the documents in the buckets that differed, with their hashes.
    Summary {
        /// The buckets covered.
        buckets: Vec<u16>,
        /// (document, hash) for every document the sender holds in those buckets.
        entries: Vec<(DocId, u64)>,
    },
    /// One Automerge sync message for one document. Node cores repair by `Have` and never
    /// start a sync session; they answer one a peer starts.
    Sync {
        /// Which document.
        doc: DocId,
        /// The encoded `automerge::sync::Message`.
        data: Vec<u8>,
    },
    /// These jobs were compacted by the sender: drop them too.
    Forget {
        /// The compacted jobs.
        jobs: Vec<JobId>,
    },
    /// Anti-entropy, step 3: the name (hash) of every change of one document the sender
    /// holds, sorted. The receiver answers with `Changes` holding exactly what the sender
    /// lacks and, if the sender holds changes the receiver lacks and `reply` is set, a `Have`
    /// of its own (with `reply` unset, so the exchange ends there). Last, so the variants
    /// before it keep their wire tags.
    Have {
        /// Which document.
        doc: DocId,
        /// Sorted change hashes.
        hashes: Vec<[u8; 32]>,
        /// Whether the receiver should answer with its own `Have`.
        reply: bool,
    },
}

/// A message that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct DecodeError(String);

impl Message {
    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        // INVARIANT: postcard encodes plain data without failing.
        postcard::to_stdvec(self).expect("postcard encodes plain data")
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        postcard::from_bytes(bytes).map_err(|e| DecodeError(e.to_string()))
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Ping { .. } => "ping",
            Message::Ack { .. } => "ack",
            Message::PingReq { .. } => "ping_req",
            Message::Changes { .. } => "changes",
            Message::Digest { .. } => "digest",
            Message::Summary { .. } => "summary",
            Message::Sync { .. } => "sync",
            Message::Have { .. } => "have",
            Message::Forget { .. } => "forget",
        }
    }
}
