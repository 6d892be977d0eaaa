//! The swarm task: owns the libp2p `Swarm`, executes handle commands, turns swarm events
//! into [`NetEvent`]s and keeps the mesh connected (seeds, mDNS, Kademlia).

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{
    future::{BoxFuture, Either},
    stream::FuturesUnordered,
    FutureExt, StreamExt,
};
use libp2p::{
    core::{
        muxing::StreamMuxerBox,
        transport::{
            Boxed, DialOpts as TransportDialOpts, ListenerId, PortUse, Transport, TransportError, TransportEvent,
        },
        upgrade,
    },
    identify,
    identity::Keypair,
    kad,
    multiaddr::Protocol,
    noise, ping,
    pnet::{PnetConfig, PreSharedKey},
    request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel},
    swarm::{
        behaviour::toggle::Toggle,
        dial_opts::{DialOpts, PeerCondition},
        ConnectionId, DialError, NetworkBehaviour, SwarmEvent,
    },
    tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, MissedTickBehavior},
};

use crate::{
    codec::{BytesCodec, WireRequest, PROTOCOL},
    handle::{Command, PeerTable, ReplySender, MAX_IN_FLIGHT_PER_PEER},
    NetConfig, NetError, NetEvent,
};

/// Identify protocol version string; peers announcing another one are not added to Kademlia.
pub(crate) const IDENTIFY_PROTOCOL: &str = "/colony/id/1";
/// Kademlia protocol name (keeps Colony's DHT separate from the public IPFS one).
pub(crate) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/colony/kad/1");

/// Capacity of the event channel handed to the application.
pub(crate) const EVENT_QUEUE: usize = 8192;
/// Events waiting for room in the event channel. While this many are waiting the swarm is
/// not polled, which back-pressures the network instead of dropping events.
const OUTBOX_HIGH_WATER: usize = 256;
/// Inbound requests waiting for the application's reply; more are refused.
const MAX_PENDING_REPLIES: usize = 4096;
/// Concurrent request-response streams per connection (inbound + outbound). Must cover
/// `MAX_IN_FLIGHT_PER_PEER` in each direction and stay within yamux's 512 streams.
const MAX_STREAMS_PER_CONNECTION: usize = 2 * MAX_IN_FLIGHT_PER_PEER;
/// TCP + pnet + noise + yamux handshake deadline.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections stay open this long without any stream (ping keeps them busy anyway).
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
const BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(30);
/// Minimum gap between event-driven Kademlia bootstraps.
const BOOTSTRAP_THROTTLE: Duration = Duration::from_secs(2);
const SEED_TICK: Duration = Duration::from_millis(500);
const SEED_BACKOFF_MIN: Duration = Duration::from_secs(1);
const SEED_BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How long `start` waits for every listener to report its address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    rr: request_response::Behaviour<BytesCodec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    mdns: Toggle<libp2p::mdns::tokio::Behaviour>,
}

/// TCP (nodelay) → pnet (if a key is set) → noise → yamux.
fn build_transport(key: &Keypair, psk: Option<PreSharedKey>) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetError> {
    let noise = noise::Config::new(key).map_err(|e| NetError::Transport(e.to_string()))?;
    let tcp = FreshPort(tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)));
    let base = tcp.and_then(move |socket, _| async move {
        match psk {
            Some(psk) => PnetConfig::new(psk).handshake(socket).await.map(Either::Left),
            None => Ok(Either::Right(socket)),
        }
    });
    Ok(base
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .timeout(HANDSHAKE_TIMEOUT)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// A transport that dials every connection from a fresh ephemeral port.
///
/// libp2p's TCP transport by default dials *from its listening port* (for NAT hole punching,
/// which Colony does not do). Every agent listens on the same port (7475), so when two agents
/// discover each other at the same moment (mDNS answers arrive within a millisecond of each
/// other) both dial `A:7475 → B:7475` and `B:7475 → A:7475`: one 4-tuple, a TCP simultaneous
/// open, a single connection on which both sides start the Noise handshake as initiator, and
/// neither connection survives. Found as a flaky mDNS test in network namespaces.
struct FreshPort<T>(T);

impl<T: Transport + Unpin> Transport for FreshPort<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<Self::Error>> {
        self.0.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.0.remove_listener(id)
    }

    fn dial(&mut self, addr: Multiaddr, opts: TransportDialOpts) -> Result<Self::Dial, TransportError<Self::Error>> {
        self.0.dial(addr, TransportDialOpts { port_use: PortUse::New, ..opts })
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.0).poll(cx)
    }
}

fn build_behaviour(config: &NetConfig) -> Result<Behaviour, NetError> {
    let local = config.keypair.public().to_peer_id();
    let rr = request_response::Behaviour::with_codec(
        BytesCodec::new(config.max_message_bytes),
        [(PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(config.request_timeout)
            .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION),
    );
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.to_string(), config.keypair.public())
            .with_agent_version(format!("colony-net/{}", env!("CARGO_PKG_VERSION")))
            .with_push_listen_addr_updates(true),
    );
    let ping = ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL).with_timeout(PING_TIMEOUT));
    let mut kad =
        kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad::Config::new(KAD_PROTOCOL));
    kad.set_mode(Some(kad::Mode::Server));
    let mdns = if config.mdns {
        Some(
            libp2p::mdns::tokio::Behaviour::new(libp2p::mdns::Config::default(), local)
                .map_err(|e| NetError::Transport(format!("mDNS: {e}")))?,
        )
    } else {
        None
    };
    Ok(Behaviour { rr, identify, ping, kad, mdns: Toggle::from(mdns) })
}

pub(crate) fn build_swarm(config: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let psk = config.cluster_key.map(|k| k.psk());
    let transport = build_transport(&config.keypair, psk)?;
    let behaviour = build_behaviour(config)?;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| -> NetError { match e {} })?
        .with_behaviour(|_| behaviour)
        .map_err(|e| -> NetError { match e {} })?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
                .with_max_negotiating_inbound_streams(MAX_STREAMS_PER_CONNECTION)
        })
        .build();
    Ok(swarm)
}

/// Splits a trailing `/p2p/<peer id>` off an address.
pub(crate) fn split_peer_id(addr: &Multiaddr) -> (Multiaddr, Option<PeerId>) {
    let mut addr = addr.clone();
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => {
            addr.pop();
            (addr, Some(peer))
        }
        _ => (addr, None),
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// A configured seed we keep dialling while it is not connected.
struct Seed {
    addr: Multiaddr,
    /// From the `/p2p/` suffix, or learned from the first connection to `addr`.
    peer: Option<PeerId>,
    /// `peer` came from the configuration (not learned), so it is never forgotten.
    fixed_peer: bool,
    dialing: Option<ConnectionId>,
    redial: Backoff,
    /// The seed turned out to be this node; never dial it again.
    is_self: bool,
}

/// A peer found by mDNS, redialled with backoff while it is not connected and its record
/// has not expired. mDNS reports a peer once, so a single failed dial would otherwise leave
/// it unconnected until its record expires (minutes).
struct LanPeer {
    addrs: Vec<Multiaddr>,
    redial: Backoff,
}

/// When to dial a disconnected peer again: waits double from `SEED_BACKOFF_MIN` to
/// `SEED_BACKOFF_MAX`, and start over once a connection is made.
struct Backoff {
    next_attempt: Instant,
    wait: Duration,
}

impl Backoff {
    fn starting_at(next_attempt: Instant) -> Backoff {
        Backoff { next_attempt, wait: SEED_BACKOFF_MIN }
    }

    fn is_due(&self, now: Instant) -> bool {
        now >= self.next_attempt
    }

    /// An attempt is made now: schedule the next one.
    fn attempted(&mut self, now: Instant) {
        self.next_attempt = now + self.wait;
        self.wait = (self.wait * 2).min(SEED_BACKOFF_MAX);
    }

    fn connected(&mut self) {
        self.wait = SEED_BACKOFF_MIN;
    }
}

/// What an outbound request is waiting for.
struct Outbound {
    peer: PeerId,
    /// `None` for one-way messages.
    reply: Option<ReplySender>,
}

type PendingReply = BoxFuture<'static, (ResponseChannel<Vec<u8>>, Option<Vec<u8>>)>;

pub(crate) struct Driver {
    swarm: Swarm<Behaviour>,
    cmd_rx: mpsc::Receiver<Command>,
    events_tx: mpsc::Sender<NetEvent>,
    outbox: VecDeque<NetEvent>,
    peers: Arc<PeerTable>,
    outbound: HashMap<OutboundRequestId, Outbound>,
    replies: FuturesUnordered<PendingReply>,
    /// Remote address of every live connection (for the loopback filter on identify).
    connections: HashMap<ConnectionId, Multiaddr>,
    seeds: Vec<Seed>,
    lan_peers: HashMap<PeerId, LanPeer>,
    max_message_bytes: usize,
    request_timeout: Duration,
    last_bootstrap: Option<Instant>,
    shutdown_acks: Vec<oneshot::Sender<()>>,
}

impl Driver {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        config: &NetConfig,
        cmd_rx: mpsc::Receiver<Command>,
        events_tx: mpsc::Sender<NetEvent>,
        peers: Arc<PeerTable>,
    ) -> Self {
        let local = *swarm.local_peer_id();
        let now = Instant::now();
        let seeds = config
            .seeds
            .iter()
            .map(|a| {
                let (addr, peer) = split_peer_id(a);
                Seed {
                    addr,
                    peer,
                    fixed_peer: peer.is_some(),
                    dialing: None,
                    redial: Backoff::starting_at(now),
                    is_self: peer == Some(local),
                }
            })
            .collect();
        Self {
            swarm,
            cmd_rx,
            events_tx,
            outbox: VecDeque::new(),
            peers,
            outbound: HashMap::new(),
            replies: FuturesUnordered::new(),
            connections: HashMap::new(),
            seeds,
            lan_peers: HashMap::new(),
            max_message_bytes: config.max_message_bytes,
            request_timeout: config.request_timeout,
            last_bootstrap: None,
            shutdown_acks: Vec::new(),
        }
    }

    /// Starts listening on every address and waits until each listener reported an address.
    pub(crate) async fn listen(&mut self, addrs: &[Multiaddr]) -> Result<(), NetError> {
        let mut waiting = HashMap::new();
        for addr in addrs {
            let id = self
                .swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen { addr: addr.clone(), reason: e.to_string() })?;
            waiting.insert(id, addr.clone());
        }
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !waiting.is_empty() {
            let event = match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(ev) => ev,
                Err(_) => {
                    let addr = waiting.into_values().next().unwrap_or_else(Multiaddr::empty);
                    return Err(NetError::Listen { addr, reason: "no listen address reported in time".into() });
                }
            };
            match &event {
                SwarmEvent::NewListenAddr { listener_id, .. } => {
                    waiting.remove(listener_id);
                }
                SwarmEvent::ListenerError { listener_id, error } => {
                    if let Some(addr) = waiting.remove(listener_id) {
                        return Err(NetError::Listen { addr, reason: error.to_string() });
                    }
                }
                SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                    if let Some(addr) = waiting.remove(listener_id) {
                        return Err(NetError::Listen {
                            addr,
                            reason: match reason {
                                Ok(()) => "listener closed".into(),
                                Err(e) => e.to_string(),
                            },
                        });
                    }
                }
                _ => {}
            }
            self.on_swarm_event(event);
        }
        Ok(())
    }

    /// Registers the seeds with Kademlia, dials them and bootstraps.
    pub(crate) fn start_seeds(&mut self) {
        for seed in &self.seeds {
            if let (Some(peer), false) = (seed.peer, seed.is_self) {
                self.swarm.behaviour_mut().kad.add_address(&peer, seed.addr.clone());
            }
        }
        self.redial_seeds();
        self.bootstrap();
    }

    pub(crate) async fn run(mut self) {
        let mut seed_tick = tokio::time::interval(SEED_TICK);
        seed_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut bootstrap_tick = tokio::time::interval_at(Instant::now() + BOOTSTRAP_INTERVAL, BOOTSTRAP_INTERVAL);
        bootstrap_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

        // A local clone so a reserved permit does not borrow `self`.
        let events_tx = self.events_tx.clone();
        loop {
            if !self.flush_outbox() {
                tracing::info!("event receiver dropped; shutting the network down");
                break;
            }
            let poll_swarm = self.outbox.len() < OUTBOX_HIGH_WATER;
            tokio::select! {
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(cmd) => {
                        if !self.on_command(cmd) {
                            break;
                        }
                    }
                    None => {
                        tracing::debug!("all network handles dropped; shutting down");
                        break;
                    }
                },
                event = self.swarm.select_next_some(), if poll_swarm => self.on_swarm_event(event),
                permit = events_tx.reserve(), if !self.outbox.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(ev) = self.outbox.pop_front() {
                            permit.send(ev);
                        }
                    }
                    Err(_) => {
                        tracing::info!("event receiver dropped; shutting the network down");
                        break;
                    }
                },
                Some((channel, reply)) = self.replies.next(), if !self.replies.is_empty() => {
                    self.send_reply(channel, reply);
                }
                _ = seed_tick.tick() => {
                    self.redial_seeds();
                    self.redial_lan_peers();
                }
                _ = bootstrap_tick.tick() => self.bootstrap(),
            }
        }
        self.finish();
    }

    fn finish(self) {
        let Driver { swarm, outbound, peers, mut shutdown_acks, mut cmd_rx, .. } = self;
        for (_, out) in outbound {
            if let Some(reply) = out.reply {
                let _ = reply.send(Err(NetError::Shutdown));
            }
        }
        // Stop accepting commands, and answer shutdown requests that raced with us.
        cmd_rx.close();
        while let Ok(cmd) = cmd_rx.try_recv() {
            match cmd {
                Command::Shutdown(ack) => shutdown_acks.push(ack),
                Command::Request { reply, .. } => {
                    let _ = reply.send(Err(NetError::Shutdown));
                }
                _ => {}
            }
        }
        // Dropping the swarm closes listeners and all connections.
        drop(swarm);
        peers.clear();
        tracing::info!("network task stopped");
        for ack in shutdown_acks {
            let _ = ack.send(());
        }
    }

    /// Moves queued events into the channel while there is room. Returns false if the
    /// receiver is gone.
    fn flush_outbox(&mut self) -> bool {
        while let Some(ev) = self.outbox.pop_front() {
            match self.events_tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.outbox.push_front(ev);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    fn emit(&mut self, event: NetEvent) {
        self.outbox.push_back(event);
    }

    /// Returns false when the task must stop.
    fn on_command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Send { peer, bytes } => {
                if !self.swarm.is_connected(&peer) {
                    tracing::debug!(%peer, "dropping message: peer disconnected");
                    self.peers.release(&peer);
                    return true;
                }
                let id = self.swarm.behaviour_mut().rr.send_request(&peer, WireRequest::Message(bytes));
                self.outbound.insert(id, Outbound { peer, reply: None });
            }
            Command::Request { peer, bytes, reply } => {
                if !self.swarm.is_connected(&peer) {
                    self.peers.release(&peer);
                    let _ = reply.send(Err(NetError::NotConnected(peer)));
                    return true;
                }
                let id = self.swarm.behaviour_mut().rr.send_request(&peer, WireRequest::Request(bytes));
                self.outbound.insert(id, Outbound { peer, reply: Some(reply) });
            }
            Command::Dial(addr) => self.dial_addr(addr),
            Command::ListenAddrs(tx) => {
                let _ = tx.send(self.swarm.listeners().cloned().collect());
            }
            Command::Shutdown(ack) => {
                self.shutdown_acks.push(ack);
                return false;
            }
        }
        true
    }

    fn dial_addr(&mut self, addr: Multiaddr) {
        let (addr, peer) = split_peer_id(&addr);
        let opts = match peer {
            Some(peer) if peer == *self.swarm.local_peer_id() => {
                tracing::debug!(%addr, "not dialling ourselves");
                return;
            }
            Some(peer) => DialOpts::peer_id(peer)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%addr, error = %e, "dial not started");
        }
    }

    fn dial_peer(&mut self, peer: PeerId, addresses: Vec<Multiaddr>) {
        if peer == *self.swarm.local_peer_id() || self.swarm.is_connected(&peer) {
            return;
        }
        let opts =
            DialOpts::peer_id(peer).addresses(addresses).condition(PeerCondition::DisconnectedAndNotDialing).build();
        match self.swarm.dial(opts) {
            Ok(()) => tracing::debug!(%peer, "dialling discovered peer"),
            Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => tracing::debug!(%peer, error = %e, "dial not started"),
        }
    }

    fn redial_seeds(&mut self) {
        let now = Instant::now();
        for i in 0..self.seeds.len() {
            let seed = &self.seeds[i];
            if seed.is_self || seed.dialing.is_some() || !seed.redial.is_due(now) {
                continue;
            }
            if seed.peer.is_some_and(|p| self.swarm.is_connected(&p)) {
                continue;
            }
            let opts = match seed.peer {
                Some(peer) => DialOpts::peer_id(peer)
                    .addresses(vec![seed.addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                None => DialOpts::unknown_peer_id().address(seed.addr.clone()).build(),
            };
            let id = opts.connection_id();
            let seed = &mut self.seeds[i];
            seed.redial.attempted(now);
            match self.swarm.dial(opts) {
                Ok(()) => {
                    tracing::debug!(addr = %seed.addr, "dialling seed");
                    seed.dialing = Some(id);
                }
                Err(DialError::DialPeerConditionFalse(_)) => {}
                Err(DialError::LocalPeerId { .. }) => seed.is_self = true,
                Err(e) => tracing::debug!(addr = %seed.addr, error = %e, "seed dial not started"),
            }
        }
    }

    fn redial_lan_peers(&mut self) {
        let now = Instant::now();
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .lan_peers
            .iter_mut()
            .filter(|(peer, lan)| lan.redial.is_due(now) && !self.swarm.is_connected(peer))
            .map(|(peer, lan)| {
                lan.redial.attempted(now);
                (*peer, lan.addrs.clone())
            })
            .collect();
        for (peer, addrs) in due {
            self.dial_peer(peer, addrs);
        }
    }

    fn bootstrap(&mut self) {
        self.last_bootstrap = Some(Instant::now());
        if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
            tracing::trace!(error = %e, "kademlia bootstrap skipped");
        }
    }

    fn bootstrap_throttled(&mut self) {
        if self.last_bootstrap.is_none_or(|t| t.elapsed() >= BOOTSTRAP_THROTTLE) {
            self.bootstrap();
        }
    }

    fn send_reply(&mut self, channel: ResponseChannel<Vec<u8>>, reply: Option<Vec<u8>>) {
        let Some(bytes) = reply else {
            tracing::debug!("request not answered by the application; dropping it");
            return;
        };
        if bytes.len() > self.max_message_bytes {
            tracing::warn!(size = bytes.len(), max = self.max_message_bytes, "reply too large; dropping it");
            return;
        }
        if self.swarm.behaviour_mut().rr.send_response(channel, bytes).is_err() {
            tracing::debug!("reply arrived after the request stream closed");
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.emit(NetEvent::Listening(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                tracing::info!(%address, "no longer listening");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(%error, "listener error");
            }
            SwarmEvent::ListenerClosed { addresses, reason, .. } => {
                tracing::warn!(?addresses, ?reason, "listener closed");
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                let (remote, _) = split_peer_id(endpoint.get_remote_address());
                self.connections.insert(connection_id, remote.clone());
                for seed in &mut self.seeds {
                    let via_this_dial = seed.dialing == Some(connection_id);
                    if via_this_dial || seed.peer == Some(peer_id) {
                        if via_this_dial {
                            seed.dialing = None;
                        }
                        seed.peer.get_or_insert(peer_id);
                        seed.redial.connected();
                    }
                }
                if let Some(lan) = self.lan_peers.get_mut(&peer_id) {
                    lan.redial.connected();
                }
                if num_established.get() == 1 {
                    tracing::info!(peer = %peer_id, addr = %remote, role = ?endpoint.to_endpoint(), "peer up");
                    self.peers.set_connected(peer_id, true);
                    self.emit(NetEvent::PeerUp { peer: peer_id, addrs: vec![remote] });
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                self.connections.remove(&connection_id);
                if num_established == 0 {
                    tracing::info!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "peer down");
                    self.peers.set_connected(peer_id, false);
                    self.emit(NetEvent::PeerDown { peer: peer_id });
                }
            }
            SwarmEvent::OutgoingConnectionError { connection_id, peer_id, error } => {
                let mut seed_dial = false;
                for seed in &mut self.seeds {
                    if seed.dialing == Some(connection_id) {
                        seed.dialing = None;
                        seed_dial = true;
                        match &error {
                            DialError::LocalPeerId { .. } => {
                                tracing::info!(addr = %seed.addr, "seed is this node; not dialling it again");
                                seed.is_self = true;
                            }
                            // The node at a seed address was replaced: learn the new identity.
                            DialError::WrongPeerId { .. } if !seed.fixed_peer => seed.peer = None,
                            _ => {}
                        }
                    }
                }
                if seed_dial {
                    tracing::debug!(?peer_id, %error, "seed dial failed");
                } else {
                    tracing::debug!(?peer_id, %error, "outgoing connection failed");
                }
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                tracing::debug!(%send_back_addr, %error, "incoming connection failed (wrong or missing cluster key?)");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Rr(ev) => self.on_rr_event(ev),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, connection_id }) => {
                if info.protocol_version != IDENTIFY_PROTOCOL {
                    tracing::warn!(peer = %peer_id, version = %info.protocol_version, "peer speaks another protocol version; not routing to it");
                    return;
                }
                let remote_is_loopback = self.connections.get(&connection_id).is_some_and(is_loopback);
                let mut added = false;
                for addr in info.listen_addrs {
                    let (addr, _) = split_peer_id(&addr);
                    if is_unspecified(&addr) || (is_loopback(&addr) && !remote_is_loopback) {
                        continue;
                    }
                    let update = self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    added |= !matches!(update, kad::RoutingUpdate::Failed);
                }
                if added {
                    self.bootstrap_throttled();
                }
            }
            BehaviourEvent::Identify(_) => {}
            BehaviourEvent::Ping(ping::Event { peer, connection, result }) => match result {
                Ok(_) | Err(ping::Failure::Unsupported) => {}
                Err(failure) => {
                    tracing::warn!(%peer, %failure, "ping failed; closing connection");
                    self.swarm.close_connection(connection);
                }
            },
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, addresses, .. }) => {
                self.dial_peer(peer, addresses.into_vec());
            }
            BehaviourEvent::Kad(ev) => tracing::trace!(?ev, "kademlia"),
            BehaviourEvent::Mdns(libp2p::mdns::Event::Discovered(found)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    by_peer.entry(peer).or_default().push(addr);
                }
                let next_attempt = Instant::now() + SEED_BACKOFF_MIN;
                for (peer, addrs) in by_peer {
                    tracing::debug!(%peer, "discovered via mDNS");
                    let lan = self
                        .lan_peers
                        .entry(peer)
                        .or_insert_with(|| LanPeer { addrs: Vec::new(), redial: Backoff::starting_at(next_attempt) });
                    for addr in &addrs {
                        if !lan.addrs.contains(addr) {
                            lan.addrs.push(addr.clone());
                        }
                    }
                    self.dial_peer(peer, addrs);
                }
            }
            BehaviourEvent::Mdns(libp2p::mdns::Event::Expired(gone)) => {
                for (peer, addr) in gone {
                    if let Some(lan) = self.lan_peers.get_mut(&peer) {
                        lan.addrs.retain(|a| *a != addr);
                        if lan.addrs.is_empty() {
                            self.lan_peers.remove(&peer);
                        }
                    }
                }
            }
        }
    }

    fn on_rr_event(&mut self, event: request_response::Event<WireRequest, Vec<u8>>) {
        use request_response::{Event, Message, OutboundFailure};
        match event {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => match request {
                WireRequest::Message(bytes) => {
                    // Acknowledge at once: the sender only learns "delivered to the node".
                    let _ = self.swarm.behaviour_mut().rr.send_response(channel, Vec::new());
                    self.emit(NetEvent::Message { from: peer, bytes });
                }
                WireRequest::Request(bytes) => {
                    if self.replies.len() >= MAX_PENDING_REPLIES {
                        tracing::warn!(%peer, "too many unanswered requests; refusing one");
                        return; // dropping `channel` fails the remote's request
                    }
                    let (reply, rx) = oneshot::channel();
                    let timeout = self.request_timeout;
                    self.replies.push(
                        async move {
                            let bytes = tokio::time::timeout(timeout, rx).await.ok().and_then(Result::ok);
                            (channel, bytes)
                        }
                        .boxed(),
                    );
                    self.emit(NetEvent::Request { from: peer, bytes, reply });
                }
            },
            Event::Message { message: Message::Response { request_id, response }, .. } => {
                if let Some(out) = self.outbound.remove(&request_id) {
                    self.peers.release(&out.peer);
                    if let Some(reply) = out.reply {
                        let _ = reply.send(Ok(response));
                    }
                }
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                let Some(out) = self.outbound.remove(&request_id) else {
                    return;
                };
                self.peers.release(&out.peer);
                match out.reply {
                    None => tracing::debug!(%peer, %error, "message delivery failed"),
                    Some(reply) => {
                        let err = match error {
                            OutboundFailure::Timeout => NetError::Timeout,
                            OutboundFailure::DialFailure | OutboundFailure::ConnectionClosed => {
                                NetError::NotConnected(peer)
                            }
                            other => NetError::RequestFailed(other.to_string()),
                        };
                        let _ = reply.send(Err(err));
                    }
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_peer_id_handles_both_forms() {
        let peer = PeerId::random();
        let with: Multiaddr = format!("/ip4/10.0.0.1/tcp/7475/p2p/{peer}").parse().unwrap();
        let (addr, p) = split_peer_id(&with);
        assert_eq!(addr, "/ip4/10.0.0.1/tcp/7475".parse::<Multiaddr>().unwrap());
        assert_eq!(p, Some(peer));
        let (addr2, p2) = split_peer_id(&addr);
        assert_eq!(addr2, addr);
        assert_eq!(p2, None);
    }

    #[test]
    fn address_filters() {
        let lo: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let any: Multiaddr = "/ip4/0.0.0.0/tcp/1".parse().unwrap();
        let lan: Multiaddr = "/ip4/192.168.1.2/tcp/1".parse().unwrap();
        assert!(is_loopback(&lo) && !is_loopback(&lan));
        assert!(is_unspecified(&any) && !is_unspecified(&lan));
    }
}
