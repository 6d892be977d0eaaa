//! # colony-net — Colony's peer-to-peer mesh
//!
//! This crate moves opaque bytes between Colony nodes. It knows nothing about the
//! replicated table, claims or any other state: the daemon decides *what* to send and
//! *to whom*; this crate only keeps nodes connected and delivers bytes.
//!
//! ## What it does
//!
//! * **Transport**: TCP (nodelay) → optional private-network encryption with a pre-shared
//!   [`ClusterKey`] (libp2p `pnet`) → noise (authenticated by the node's ed25519
//!   [`Keypair`]) → yamux. A peer with a different or missing cluster key cannot complete a
//!   handshake. TCP only (pnet does not work over QUIC).
//! * **Discovery**: configured seeds are dialled at start and re-dialled with backoff while
//!   not connected (so a node started before its seed still joins); optional mDNS on the
//!   LAN (discovered peers are dialled); Kademlia (`/colony/kad/1`, always in server mode)
//!   fed with identify-reported listen addresses, bootstrapped at start and every 30 s. Any
//!   peer Kademlia learns about is dialled, so small clusters converge to a full mesh.
//! * **Messaging** on `/colony/msg/1` (one yamux stream per message, length-prefixed raw
//!   bytes, up to [`NetConfig::max_message_bytes`], 16 MiB by default):
//!   one-way messages ([`NetHandle::try_send`] → [`NetEvent::Message`]) and requests with a
//!   reply ([`NetHandle::request`] → [`NetEvent::Request`]).
//! * **Liveness**: ping every 10 s; a connection whose ping fails is closed. Idle
//!   connections are otherwise kept for an hour.
//! * Connection changes are reported as [`NetEvent::PeerUp`] / [`NetEvent::PeerDown`] and
//!   logged at `info` via `tracing`.
//!
//! ## What it does not do
//!
//! * No application state, retries, ordering guarantees across messages, or persistence of
//!   unsent messages. Messages are only sent to *connected* peers; there is no buffering for
//!   absent ones ([`NetError::NotConnected`]).
//! * No relaying or NAT traversal: every node must be reachable over TCP by its peers.
//! * No authorisation beyond the cluster key: any holder of the key is a member.
//!
//! ## Resource bounds
//!
//! Every queue is bounded: the command queue ([`NetConfig::outbound_queue`]), the event
//! channel (8192 events; when it is full the network task stops reading from the network
//! instead of dropping events, so consume events promptly and do not block the event loop
//! on [`NetHandle::request`]), in-flight messages per peer ([`MAX_IN_FLIGHT_PER_PEER`]),
//! unanswered inbound requests (4096) and message sizes. Malformed input from the network
//! or from files produces errors, never panics.
//!
//! ## Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), colony_net::NetError> {
//! use colony_net::{start, Keypair, NetConfig, NetEvent};
//!
//! let mut config = NetConfig::new(Keypair::generate_ed25519());
//! config.seeds = vec!["/ip4/10.0.0.1/tcp/7475".parse().expect("valid multiaddr")];
//! let (net, mut events) = start(config).await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         NetEvent::PeerUp { peer, .. } => net.try_send(peer, b"hello".to_vec())?,
//!         NetEvent::Request { bytes, reply, .. } => {
//!             let _ = reply.send(bytes); // echo
//!         }
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod codec;
mod config;
mod driver;
mod error;
mod handle;

use std::sync::Arc;

pub use libp2p::{identity::Keypair, Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

pub use crate::{
    config::{
        load_or_create_keypair, ClusterKey, NetConfig, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_OUTBOUND_QUEUE, DEFAULT_PORT,
        DEFAULT_REQUEST_TIMEOUT,
    },
    error::NetError,
    handle::{NetHandle, MAX_IN_FLIGHT_PER_PEER},
};

/// Something that happened on the mesh, delivered in order on the channel returned by
/// [`start`].
#[derive(Debug)]
pub enum NetEvent {
    /// The node is now listening on this address (one event per concrete address; a
    /// `0.0.0.0` listener yields one per interface).
    Listening(Multiaddr),
    /// The first connection to `peer` is established (after the pnet and noise handshakes).
    /// `addrs` holds the remote address of that connection.
    PeerUp {
        /// The remote node.
        peer: PeerId,
        /// Remote address of the connection that brought the peer up.
        addrs: Vec<Multiaddr>,
    },
    /// The last connection to `peer` closed.
    PeerDown {
        /// The remote node.
        peer: PeerId,
    },
    /// A one-way message sent with [`NetHandle::try_send`]. It was already acknowledged
    /// to the sender.
    Message {
        /// The sender.
        from: PeerId,
        /// The payload, byte-identical to what was sent.
        bytes: Vec<u8>,
    },
    /// A request sent with [`NetHandle::request`]. Answer by sending the reply bytes on
    /// `reply` within [`NetConfig::request_timeout`]; dropping `reply` makes the remote's
    /// request fail.
    Request {
        /// The sender.
        from: PeerId,
        /// The payload.
        bytes: Vec<u8>,
        /// Where the reply goes (at most [`NetConfig::max_message_bytes`]).
        reply: oneshot::Sender<Vec<u8>>,
    },
}

/// Starts the mesh on the current tokio runtime.
///
/// Builds the transport and behaviours, binds every [`NetConfig::listen`] address (waiting
/// until each has reported its concrete address, so [`NetHandle::listen_addrs`] is usable at
/// once), dials the seeds and spawns the network task. Returns the handle and the bounded
/// event channel. The task runs until [`NetHandle::shutdown`], until every handle is dropped,
/// or until the event receiver is dropped.
///
/// Errors: [`NetError::InvalidConfig`], [`NetError::Transport`], [`NetError::Listen`].
pub async fn start(config: NetConfig) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), NetError> {
    if config.outbound_queue == 0 {
        return Err(NetError::InvalidConfig("outbound_queue must be at least 1".into()));
    }
    if config.max_message_bytes == 0 || u32::try_from(config.max_message_bytes).is_err() {
        return Err(NetError::InvalidConfig(format!("max_message_bytes must be in 1..={}", u32::MAX)));
    }
    if config.request_timeout.is_zero() {
        return Err(NetError::InvalidConfig("request_timeout must be positive".into()));
    }

    let swarm = driver::build_swarm(&config)?;
    let local_peer_id = *swarm.local_peer_id();
    let (cmd_tx, cmd_rx) = mpsc::channel(config.outbound_queue);
    let (events_tx, events_rx) = mpsc::channel(driver::EVENT_QUEUE);
    let peers = Arc::new(handle::PeerTable::default());

    let mut driver = driver::Driver::new(swarm, &config, cmd_rx, events_tx, peers.clone());
    driver.listen(&config.listen).await?;
    driver.start_seeds();
    tracing::info!(peer = %local_peer_id, cluster_key = ?config.cluster_key.map(|k| k.fingerprint()), "network started");
    tokio::spawn(driver.run());

    let handle = NetHandle::new(local_peer_id, cmd_tx, peers, config.max_message_bytes, config.request_timeout);
    Ok((handle, events_rx))
}
