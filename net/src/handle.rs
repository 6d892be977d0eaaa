//! The application-facing handle to the network task.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::NetError;

/// Maximum number of messages + requests to one peer that may be queued or on the wire at
/// once. Beyond it [`NetHandle::try_send`] / [`NetHandle::request`] return
/// [`NetError::QueueFull`]. Kept well below the per-connection stream limits so a burst
/// never overflows them.
pub const MAX_IN_FLIGHT_PER_PEER: usize = 256;

/// Reply slot of an outbound request.
pub(crate) type ReplySender = oneshot::Sender<Result<Vec<u8>, NetError>>;

/// Commands from handles to the network task.
pub(crate) enum Command {
    Send { peer: PeerId, bytes: Vec<u8> },
    Request { peer: PeerId, bytes: Vec<u8>, reply: ReplySender },
    Dial(Multiaddr),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Shutdown(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct PeerSlot {
    connected: bool,
    in_flight: usize,
}

/// Connection state and per-peer in-flight counters, shared between the handles (which
/// reserve a slot before queueing) and the network task (which releases it when the message
/// is answered, fails or is dropped).
#[derive(Debug, Default)]
pub(crate) struct PeerTable {
    peers: Mutex<HashMap<PeerId, PeerSlot>>,
}

impl PeerTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<PeerId, PeerSlot>> {
        // A poisoned lock only means another thread panicked while holding it; the map is
        // still structurally valid.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reserve(&self, peer: PeerId) -> Result<(), NetError> {
        let mut peers = self.lock();
        match peers.get_mut(&peer) {
            Some(slot) if slot.connected => {
                if slot.in_flight >= MAX_IN_FLIGHT_PER_PEER {
                    Err(NetError::QueueFull)
                } else {
                    slot.in_flight += 1;
                    Ok(())
                }
            }
            _ => Err(NetError::NotConnected(peer)),
        }
    }

    fn has_room(&self, peer: &PeerId) -> bool {
        self.lock().get(peer).is_some_and(|slot| slot.connected && slot.in_flight < MAX_IN_FLIGHT_PER_PEER)
    }

    pub(crate) fn release(&self, peer: &PeerId) {
        let mut peers = self.lock();
        if let Some(slot) = peers.get_mut(peer) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
            if !slot.connected && slot.in_flight == 0 {
                peers.remove(peer);
            }
        }
    }

    pub(crate) fn set_connected(&self, peer: PeerId, connected: bool) {
        let mut peers = self.lock();
        if connected {
            peers.entry(peer).or_default().connected = true;
        } else if let Some(slot) = peers.get_mut(&peer) {
            slot.connected = false;
            if slot.in_flight == 0 {
                peers.remove(&peer);
            }
        }
    }

    /// Forgets every peer (the swarm is gone).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn is_connected(&self, peer: &PeerId) -> bool {
        self.lock().get(peer).is_some_and(|s| s.connected)
    }

    fn connected(&self) -> Vec<PeerId> {
        self.lock().iter().filter(|(_, s)| s.connected).map(|(p, _)| *p).collect()
    }
}

/// A reserved in-flight slot; released on drop unless handed over to the network task.
struct Reservation<'a> {
    table: &'a PeerTable,
    peer: PeerId,
    armed: bool,
}

impl<'a> Reservation<'a> {
    fn new(table: &'a PeerTable, peer: PeerId) -> Result<Self, NetError> {
        table.reserve(peer)?;
        Ok(Self { table, peer, armed: true })
    }

    /// The network task now owns the slot and will release it.
    fn hand_over(mut self) {
        self.armed = false;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.table.release(&self.peer);
        }
    }
}

struct Inner {
    local_peer_id: PeerId,
    cmd_tx: mpsc::Sender<Command>,
    peers: Arc<PeerTable>,
    max_message_bytes: usize,
    request_timeout: Duration,
}

/// A cheap, cloneable handle to the running network task.
///
/// When every handle is dropped the network task shuts down.
#[derive(Clone)]
pub struct NetHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle").field("local_peer_id", &self.inner.local_peer_id).finish_non_exhaustive()
    }
}

impl NetHandle {
    pub(crate) fn new(
        local_peer_id: PeerId,
        cmd_tx: mpsc::Sender<Command>,
        peers: Arc<PeerTable>,
        max_message_bytes: usize,
        request_timeout: Duration,
    ) -> Self {
        Self { inner: Arc::new(Inner { local_peer_id, cmd_tx, peers, max_message_bytes, request_timeout }) }
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.inner.local_peer_id
    }

    /// Common checks before queueing: still running, payload within the size limit.
    fn precheck(&self, bytes: &[u8]) -> Result<(), NetError> {
        if self.inner.cmd_tx.is_closed() {
            return Err(NetError::Shutdown);
        }
        let max = self.inner.max_message_bytes;
        if bytes.len() > max {
            return Err(NetError::MessageTooLarge { size: bytes.len(), max });
        }
        Ok(())
    }

    /// Queues a one-way message to a connected peer. Never blocks.
    ///
    /// `Ok` means the message was queued, not that it was delivered: delivery failures
    /// (connection lost mid-flight, remote overloaded) are only logged. The remote sees it
    /// as [`NetEvent::Message`](crate::NetEvent::Message).
    ///
    /// Errors: [`NetError::NotConnected`] if there is no connection to `peer` (this crate
    /// never buffers for disconnected peers), [`NetError::QueueFull`] if the command queue or
    /// the per-peer in-flight limit ([`MAX_IN_FLIGHT_PER_PEER`]) is full,
    /// [`NetError::MessageTooLarge`], [`NetError::Shutdown`].
    pub fn try_send(&self, peer: PeerId, bytes: Vec<u8>) -> Result<(), NetError> {
        self.precheck(&bytes)?;
        let reservation = Reservation::new(&self.inner.peers, peer)?;
        match self.inner.cmd_tx.try_send(Command::Send { peer, bytes }) {
            Ok(()) => {
                reservation.hand_over();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(NetError::QueueFull),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(NetError::Shutdown),
        }
    }

    /// Whether `peer` is connected and its in-flight limit has room for one more message:
    /// callers that would rather wait than lose a message (see [`NetError::QueueFull`]) keep
    /// it until this holds.
    pub fn has_room(&self, peer: &PeerId) -> bool {
        self.inner.peers.has_room(peer)
    }

    /// Sends a request to a connected peer and waits for its reply.
    ///
    /// The remote sees it as [`NetEvent::Request`](crate::NetEvent::Request). The effective
    /// timeout is the smaller of `timeout` and [`NetConfig::request_timeout`](crate::NetConfig::request_timeout).
    ///
    /// Errors: [`NetError::NotConnected`], [`NetError::QueueFull`] (per-peer in-flight limit),
    /// [`NetError::MessageTooLarge`], [`NetError::Timeout`], [`NetError::RequestFailed`]
    /// (including the remote dropping the reply sender), [`NetError::Shutdown`].
    pub async fn request(&self, peer: PeerId, bytes: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, NetError> {
        self.precheck(&bytes)?;
        let deadline = tokio::time::Instant::now() + timeout.min(self.inner.request_timeout);
        let reservation = Reservation::new(&self.inner.peers, peer)?;
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Request { peer, bytes, reply };
        match tokio::time::timeout_at(deadline, self.inner.cmd_tx.send(cmd)).await {
            Err(_) => return Err(NetError::Timeout),
            Ok(Err(_)) => return Err(NetError::Shutdown),
            Ok(Ok(())) => reservation.hand_over(),
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(NetError::Timeout),
            Ok(Err(_)) => Err(NetError::Shutdown),
            Ok(Ok(result)) => result,
        }
    }

    /// The addresses the node is currently listening on (empty once shut down).
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd_tx.send(Command::ListenAddrs(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Peers with at least one established connection, consistent with the
    /// [`PeerUp`](crate::NetEvent::PeerUp) / [`PeerDown`](crate::NetEvent::PeerDown) events
    /// already emitted.
    pub async fn connected_peers(&self) -> Vec<PeerId> {
        self.inner.peers.connected()
    }

    /// Whether `peer` currently has an established connection.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.inner.peers.is_connected(peer)
    }

    /// Asks the network task to dial `addr` (a trailing `/p2p/<peer id>` is optional).
    /// Never blocks; the outcome shows up as a [`PeerUp`](crate::NetEvent::PeerUp) event or
    /// a log line. Errors: [`NetError::QueueFull`], [`NetError::Shutdown`].
    pub fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        match self.inner.cmd_tx.try_send(Command::Dial(addr)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(NetError::QueueFull),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(NetError::Shutdown),
        }
    }

    /// Stops the network task: closes listeners and connections and fails pending
    /// requests with [`NetError::Shutdown`]. Returns once the task has stopped; calling it
    /// again (or on a clone) returns immediately.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd_tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}
