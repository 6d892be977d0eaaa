//! The crate's error type.

use libp2p::{Multiaddr, PeerId};

/// Everything that can go wrong in `colony-net`.
///
/// No function of this crate panics on bad input; it returns one of these instead.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A filesystem operation failed (reading or writing the keypair file).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// The keypair file exists but does not contain a protobuf-encoded keypair.
    #[error("invalid keypair: {0}")]
    InvalidKeypair(String),

    /// A cluster key (pre-shared key) file could not be parsed.
    #[error("invalid cluster key: {0}")]
    InvalidClusterKey(String),

    /// A [`NetConfig`](crate::NetConfig) value is unusable (for example a zero-sized queue).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The transport (TCP + pnet + noise + yamux) or a behaviour could not be built.
    #[error("transport setup failed: {0}")]
    Transport(String),

    /// Listening on one of the configured addresses failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address that was requested.
        addr: Multiaddr,
        /// Why it failed.
        reason: String,
    },

    /// The peer is not currently connected, so nothing was sent.
    ///
    /// Also returned when the connection dropped before a request could be answered.
    #[error("peer {0} is not connected")]
    NotConnected(PeerId),

    /// A bounded queue is full: either the command queue to the network task
    /// (`NetConfig::outbound_queue`) or the per-peer limit of in-flight messages.
    /// Nothing was sent; the caller may retry later.
    #[error("outbound queue full")]
    QueueFull,

    /// The payload is larger than `NetConfig::max_message_bytes`.
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Size of the rejected payload.
        size: usize,
        /// The configured limit.
        max: usize,
    },

    /// A request got no reply in time.
    #[error("request timed out")]
    Timeout,

    /// A request failed on the wire (stream error, remote refused, remote dropped the reply, ...).
    #[error("request failed: {0}")]
    RequestFailed(String),

    /// The network task has stopped (after [`NetHandle::shutdown`](crate::NetHandle::shutdown),
    /// or because the event receiver was dropped).
    #[error("network task has shut down")]
    Shutdown,
}
