//! Daemon-to-daemon requests, carried by `colony_net`'s request/reply channel
//! ([`NetHandle::request`](colony_net::NetHandle::request) →
//! [`NetEvent::Request`](colony_net::NetEvent::Request)).
//!
//! These are distinct from the node core's [`Message`](crate::engine::Message)s, which travel
//! as one-way messages: they ask a specific node about things only it holds (the log files of
//! the tasks it ran) and never touch the replicated table. Encoded with postcard; a request
//! that does not decode is answered with [`DaemonReply::Error`], never a panic.

use serde::{Deserialize, Serialize};

/// The most bytes of each log stream one reply carries (stdout and stderr each), whatever
/// the request asks: two tails must fit in one network message.
pub const MAX_LOG_TAIL_BYTES: u64 = 4 << 20;

/// A request from one daemon to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DaemonRequest {
    /// The stdout and stderr tails of the newest task on the receiving node whose id starts
    /// with `task_prefix` (`"<job>/<index>/"` selects the newest attempt of one instance).
    Logs {
        /// A task id prefix, `"<job>/<index>/"`.
        task_prefix: String,
        /// The most bytes of each stream to return (capped at [`MAX_LOG_TAIL_BYTES`]).
        max_bytes: u64,
    },
}

/// The answer to a [`DaemonRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DaemonReply {
    /// The answer to [`DaemonRequest::Logs`]: `None` when no matching task left logs here.
    Logs(Option<TaskLogs>),
    /// The request could not be served.
    Error(String),
}

/// The log tails of one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLogs {
    /// The task id, `"<job>/<index>/<attempt>"`.
    pub task: String,
    /// The end of its standard output.
    pub stdout: Vec<u8>,
    /// The end of its standard error.
    pub stderr: Vec<u8>,
}

/// Bytes that are not a valid request or reply.
#[derive(Debug, thiserror::Error)]
#[error("malformed daemon request or reply: {0}")]
pub struct ProtocolError(String);

impl DaemonRequest {
    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        // INVARIANT: postcard encodes plain data without failing.
        postcard::to_stdvec(self).expect("postcard encodes plain data")
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8]) -> Result<DaemonRequest, ProtocolError> {
        postcard::from_bytes(bytes).map_err(|e| ProtocolError(e.to_string()))
    }
}

impl DaemonReply {
    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        // INVARIANT: postcard encodes plain data without failing.
        postcard::to_stdvec(self).expect("postcard encodes plain data")
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8]) -> Result<DaemonReply, ProtocolError> {
        postcard::from_bytes(bytes).map_err(|e| ProtocolError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let req = DaemonRequest::Logs { task_prefix: "abc/0/".into(), max_bytes: 10 };
        assert_eq!(DaemonRequest::decode(&req.encode()).unwrap(), req);
        let reply =
            DaemonReply::Logs(Some(TaskLogs { task: "abc/0/1".into(), stdout: b"hi".to_vec(), stderr: vec![] }));
        assert_eq!(DaemonReply::decode(&reply.encode()).unwrap(), reply);
        for garbage in [&b""[..], b"\xff\xff\xff", b"\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"] {
            assert!(DaemonRequest::decode(garbage).is_err());
        }
    }
}
