//! The driver task: one tokio task that owns one [`Engine`] and joins it to IO.
//!
//! It loops over, in this priority (`select!` is biased): commands from the facade, network
//! events, task exits, and a timer set to [`Engine::poll_timeout`]. After every engine input
//! it drains [`Engine::poll_output`] in order:
//!
//! - `Persist` is appended to the [`Store`] and fsync'd before anything after it happens (a
//!   submission is acknowledged only after the `Persist` its own call produced is durable);
//! - `Snapshot` replaces the store's snapshot;
//! - `Send` is queued on the mesh (dropped and counted when the queue is full or the peer is
//!   not connected: the node core's anti-entropy repairs losses);
//! - `StartTask` / `StopTask` go to the driver named by the spec (`exec` or an in-process
//!   [`Driver`]);
//! - `Event` is logged and published on a broadcast channel.
//!
//! Engine time is milliseconds since the UNIX epoch, read here and nowhere else (kept
//! monotonic against clock steps backwards). The engine's seed is drawn from the OS here,
//! logged, and never again: the engine itself has no other randomness.
//!
//! Dropping the task (the facade aborts it when its last handle goes) is a crash: in-process
//! task futures are dropped, exec process groups are killed, nothing is announced.

use super::protocol::{DaemonReply, DaemonRequest};
use super::storage::{StorageError, Store};
use super::tasks::{self, CancelToken, Canceller, Driver, ExecDriver, TaskContext, TaskOutcome};
use crate::engine::{Engine, Event, Output, TaskStart};
use crate::node::{Error, Health};
use colony_crdt::{JobSpec, NodeState};
use colony_net::{Multiaddr, NetError, NetEvent, NetHandle, PeerId};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

/// Capacity of the facade's command queue.
pub const COMMAND_QUEUE: usize = 1024;
/// Capacity of the event broadcast channel; slower receivers skip what they missed.
pub const EVENT_CHANNEL: usize = 1024;
/// How long a leaving node keeps the mesh up after its last state change, so the `left`
/// announcement and the final run records reach the peers.
pub const LEAVE_FLUSH: Duration = Duration::from_millis(250);
/// How often log files of compacted jobs are looked for.
pub const LOG_GC_INTERVAL: Duration = Duration::from_secs(60);
/// Log files younger than this are never removed (a job may not have reached the table yet).
const LOG_GC_MIN_AGE: Duration = Duration::from_secs(60);
/// How often the table's live members are compared with the connections (`dial_members`).
const MEMBER_DIAL_TICK: Duration = Duration::from_secs(1);
/// First and longest wait between dials of one unconnected member.
const MEMBER_DIAL_MIN: Duration = Duration::from_secs(2);
const MEMBER_DIAL_MAX: Duration = Duration::from_secs(60);
/// Bad messages from peers logged at `warn`; later ones only at `debug` (a hostile peer
/// must not flood the log).
const LOUD_BAD_MESSAGES: u64 = 20;

/// Messages held per peer while the mesh's per-peer queue is full. A burst of submissions
/// makes one push per change per peer, faster than a peer drains them; dropping them made
/// nodes miss each other's claims and run 11-38% of a 1,000-job burst twice. Past this many
/// the newest are dropped (anti-entropy repairs what they carried).
const SEND_BACKLOG_PER_PEER: usize = 16_384;

/// How soon a backlog is retried while it is not empty.
const SEND_BACKLOG_RETRY: Duration = Duration::from_millis(2);

/// Hands one message to the mesh and counts the outcome.
fn try_send_counted(net: &NetHandle, stats: &mut IoStats, peer: PeerId, bytes: Vec<u8>) -> Result<(), NetError> {
    let result = net.try_send(peer, bytes);
    match &result {
        Ok(()) => stats.sends += 1,
        Err(NetError::QueueFull) => {
            // The mesh's command queue itself is full (rare: the whole node is behind).
            stats.sends_dropped += 1;
            tracing::debug!(%peer, "outbound queue full; message dropped");
        }
        Err(NetError::NotConnected(_)) => stats.sends_unreachable += 1,
        Err(e) => {
            stats.send_errors += 1;
            tracing::debug!(%peer, error = %e, "message not sent");
        }
    }
    result
}

/// Milliseconds since the UNIX epoch by the system clock.
pub fn system_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A task driver registered on a node.
#[derive(Clone)]
pub(crate) enum Registered {
    /// The built-in process driver (start failures are reported as such).
    Exec(ExecDriver),
    /// An in-process driver.
    Custom(Arc<dyn Driver>),
}

/// A read-only query of the runtime, answered in order with commands.
pub(crate) type Query = Box<dyn FnOnce(&Runtime) + Send>;

/// What the facade asks of the driver task.
pub(crate) enum Command {
    /// Accept a job; answered once it is durable.
    Submit { spec: Box<JobSpec>, reply: oneshot::Sender<Result<String, Error>> },
    /// Stop a job everywhere.
    Stop { id: String, reply: oneshot::Sender<Result<(), Error>> },
    /// Stop taking work and hand running work over.
    Drain { reply: oneshot::Sender<()> },
    /// Take work again.
    Undrain { reply: oneshot::Sender<()> },
    /// Look at the engine or the counters.
    Read(Query),
    /// Leave the cluster and stop.
    Shutdown { reply: oneshot::Sender<()> },
}

/// Counters of the IO around the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoStats {
    /// Messages queued on the mesh.
    pub sends: u64,
    /// Messages dropped because the outbound queue and this node's backlog were both full.
    pub sends_dropped: u64,
    /// Messages that waited in the backlog because the outbound queue was full.
    pub sends_deferred: u64,
    /// Messages dropped because the peer was not connected.
    pub sends_unreachable: u64,
    /// Messages that failed otherwise (too large, malformed peer id, mesh gone).
    pub send_errors: u64,
    /// Messages from peers that did not decode.
    pub bad_messages: u64,
    /// Daemon requests served.
    pub requests_served: u64,
    /// Daemon requests that did not decode.
    pub bad_requests: u64,
    /// `Persist` batches made durable.
    pub persists: u64,
    /// Snapshots written.
    pub snapshots: u64,
    /// Persist or snapshot writes that failed.
    pub storage_errors: u64,
    /// Tasks started.
    pub tasks_started: u64,
    /// Tasks that could not be started (unknown driver, spawn failure).
    pub tasks_start_failed: u64,
    /// Tasks that ended.
    pub tasks_exited: u64,
}

struct RunningTask {
    canceller: Canceller,
    driver: String,
}

struct Leaving {
    replies: Vec<oneshot::Sender<()>>,
    flush_at: Instant,
    give_up_at: Instant,
}

/// Removes a directory tree when dropped (the scratch directory of an in-memory node).
#[derive(Debug)]
pub(crate) struct RemoveDirOnDrop(pub PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything the driver task is made of.
pub(crate) struct Parts {
    pub engine: Engine,
    pub seed: u64,
    pub net: NetHandle,
    pub net_events: mpsc::Receiver<NetEvent>,
    pub store: Option<Store>,
    pub drivers: BTreeMap<String, Registered>,
    pub log_dir: PathBuf,
    pub stop_grace: Duration,
    pub events: broadcast::Sender<Event>,
    pub commands: mpsc::Receiver<Command>,
    pub scratch: Option<RemoveDirOnDrop>,
}

/// The driver task's state. Fields drop in declaration order: running tasks first (which
/// kills exec process groups), the scratch directory last.
pub(crate) struct Runtime {
    tasks: FuturesUnordered<BoxFuture<'static, (String, TaskOutcome)>>,
    running: HashMap<String, RunningTask>,
    engine: Engine,
    net: NetHandle,
    net_events: Option<mpsc::Receiver<NetEvent>>,
    store: Option<Store>,
    persistent: bool,
    store_ok: bool,
    drivers: BTreeMap<String, Registered>,
    log_dir: PathBuf,
    stop_grace: Duration,
    events: broadcast::Sender<Event>,
    commands: mpsc::Receiver<Command>,
    peer_ids: HashMap<String, PeerId>,
    connected: BTreeSet<PeerId>,
    /// Encoded messages waiting for room in a peer's outbound queue, oldest first.
    backlog: HashMap<PeerId, VecDeque<Vec<u8>>>,
    stats: IoStats,
    last_now: u64,
    last_timer_ms: u64,
    started: Instant,
    leaving: Option<Leaving>,
    next_log_gc: Instant,
    next_member_dial: Instant,
    /// Members dialled from the table and not connected since: when to try again, and the
    /// wait after that.
    member_dials: HashMap<PeerId, (Instant, Duration)>,
    _scratch: Option<RemoveDirOnDrop>,
}

enum Input {
    Command(Option<Command>),
    Net(Option<NetEvent>),
    Task(String, TaskOutcome),
    Timer,
}

impl Runtime {
    pub(crate) fn new(parts: Parts) -> Runtime {
        tracing::info!(
            node = %parts.engine.id(),
            name = %parts.engine.config().name,
            seed = parts.seed,
            boot = parts.engine.boot(),
            incarnation = parts.engine.incarnation(),
            drivers = ?parts.engine.config().drivers,
            "engine started"
        );
        // The engine claims only jobs whose driver its config names: a name without a
        // registered driver here would make this node claim work it then fails to start.
        for name in &parts.engine.config().drivers {
            if !parts.drivers.contains_key(name) {
                tracing::warn!(driver = %name, "the engine config names a driver not registered on this node");
            }
        }
        Runtime {
            tasks: FuturesUnordered::new(),
            running: HashMap::new(),
            persistent: parts.store.is_some(),
            store_ok: true,
            engine: parts.engine,
            net: parts.net,
            net_events: Some(parts.net_events),
            store: parts.store,
            drivers: parts.drivers,
            log_dir: parts.log_dir,
            stop_grace: parts.stop_grace,
            events: parts.events,
            commands: parts.commands,
            peer_ids: HashMap::new(),
            connected: BTreeSet::new(),
            backlog: HashMap::new(),
            stats: IoStats::default(),
            last_now: 0,
            last_timer_ms: 0,
            started: Instant::now(),
            leaving: None,
            next_log_gc: Instant::now() + LOG_GC_INTERVAL,
            next_member_dial: Instant::now() + MEMBER_DIAL_TICK,
            member_dials: HashMap::new(),
            _scratch: parts.scratch,
        }
    }

    /// The engine, read-only.
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The IO counters.
    pub(crate) fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// Tasks running here now.
    pub(crate) fn running_tasks(&self) -> usize {
        self.running.len()
    }

    fn now_ms(&mut self) -> u64 {
        self.last_now = self.last_now.max(system_now_ms());
        self.last_now
    }

    /// Runs until shutdown (or until aborted, which is a crash).
    pub(crate) async fn run(mut self) {
        // The boot step's outputs (node record, lost runs of an earlier boot).
        self.drain_outputs().await;
        loop {
            if let Some(leaving) = &self.leaving {
                let now = Instant::now();
                if (self.running.is_empty() && now >= leaving.flush_at) || now >= leaving.give_up_at {
                    break;
                }
            }
            self.flush_backlog();
            let deadline = self.next_wakeup();
            let input = tokio::select! {
                biased;
                cmd = self.commands.recv() => Input::Command(cmd),
                ev = next_net_event(&mut self.net_events) => Input::Net(ev),
                Some((task, outcome)) = self.tasks.next(), if !self.tasks.is_empty() => Input::Task(task, outcome),
                () = tokio::time::sleep_until(deadline) => Input::Timer,
            };
            match input {
                Input::Command(Some(cmd)) => self.on_command(cmd).await,
                Input::Command(None) => {
                    // Every handle is gone without a shutdown: behave as a crash.
                    return;
                }
                Input::Net(Some(ev)) => self.on_net_event(ev).await,
                Input::Net(None) => {
                    tracing::error!("the network task stopped; this node is cut off");
                    self.net_events = None;
                }
                Input::Task(task, outcome) => self.on_task_done(task, outcome).await,
                Input::Timer => self.on_timer().await,
            }
        }
        self.finish().await;
    }

    fn next_wakeup(&mut self) -> Instant {
        let now = self.now_ms();
        // At least 1 ms after the last timer step, so an engine that did not move its
        // deadline cannot make us spin.
        let due = self.engine.poll_timeout().max(self.last_timer_ms + 1);
        let mut at = Instant::now() + Duration::from_millis(due.saturating_sub(now));
        if !self.backlog.is_empty() {
            at = at.min(Instant::now() + SEND_BACKLOG_RETRY);
        }
        if let Some(leaving) = &self.leaving {
            at = at.min(leaving.flush_at.max(Instant::now() + Duration::from_millis(1))).min(leaving.give_up_at);
        }
        at
    }

    async fn on_timer(&mut self) {
        let now = self.now_ms();
        if now >= self.engine.poll_timeout() {
            self.last_timer_ms = now;
            self.engine.handle_timeout(now);
            self.drain_outputs().await;
        }
        if Instant::now() >= self.next_log_gc {
            self.collect_logs();
        }
        if Instant::now() >= self.next_member_dial {
            self.dial_members();
        }
    }

    /// Dials the members the table holds alive (or suspect) that this node has no connection
    /// to, at the addresses their node documents list, backing off per member from
    /// `MEMBER_DIAL_MIN` to `MEMBER_DIAL_MAX`. Discovery (seeds, mDNS, Kademlia) connects them
    /// first almost always; this covers what it misses. Two agents that join through the
    /// same seed learn of each other from Kademlia only if one of them bootstraps after the
    /// other has joined the seed, else at the next bootstrap 30 s later, while the table
    /// (through the seed) already knows both: the three-agent mesh of `tests/embed.rs` timed
    /// out on that about one run in ten.
    fn dial_members(&mut self) {
        let now = Instant::now();
        self.next_member_dial = now + MEMBER_DIAL_TICK;
        let connected = &self.connected;
        self.member_dials.retain(|peer, _| !connected.contains(peer));
        let me = self.engine.id().clone();
        let table = self.engine.table();
        let mut dials: Vec<Multiaddr> = Vec::new();
        for (id, record) in table.nodes() {
            if *id == me || !matches!(table.node_state(id), NodeState::Alive | NodeState::Suspect) {
                continue;
            }
            let (Ok(peer), Some(info)) = (PeerId::from_str(id), record.info.as_ref()) else { continue };
            if self.connected.contains(&peer) {
                continue;
            }
            let (next, wait) = self.member_dials.entry(peer).or_insert((now, MEMBER_DIAL_MIN));
            if now < *next {
                continue;
            }
            *next = now + *wait;
            *wait = (*wait * 2).min(MEMBER_DIAL_MAX);
            for addr in &info.addrs {
                // With the peer id appended the network task dials only a disconnected peer
                // it is not dialling already, and checks that the right node answers.
                if let Ok(addr) = Multiaddr::from_str(addr) {
                    dials.push(addr.with_p2p(peer).unwrap_or_else(|a| a));
                }
            }
        }
        for addr in dials {
            tracing::debug!(%addr, "dialling a member the table knows and discovery did not connect");
            if let Err(e) = self.net.dial(addr) {
                tracing::debug!(error = %e, "member dial not queued");
            }
        }
    }

    /// Deletes the log files of jobs the table no longer holds (compacted), off the driver
    /// task, so disk use stays bounded under endless job churn (I6).
    fn collect_logs(&mut self) {
        self.next_log_gc = Instant::now() + LOG_GC_INTERVAL;
        let mut keep: HashSet<String> = self.engine.table().jobs().map(|(id, _)| id.clone()).collect();
        keep.extend(self.running.keys().filter_map(|t| t.split('/').next().map(str::to_string)));
        let dir = self.log_dir.clone();
        tokio::task::spawn_blocking(move || {
            let removed = tasks::remove_stale_logs(&dir, &keep, LOG_GC_MIN_AGE);
            if removed > 0 {
                tracing::info!(removed, "removed log files of compacted jobs");
            }
        });
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { spec, reply } => {
                let now = self.now_ms();
                let result = match self.engine.submit(now, *spec) {
                    Ok(id) => match self.drain_outputs().await {
                        None => {
                            tracing::info!(job = %id, "job accepted");
                            Ok(id)
                        }
                        Some(e) => Err(Error::Storage(e)),
                    },
                    Err(e) => {
                        self.drain_outputs().await;
                        Err(Error::from(e))
                    }
                };
                let _ = reply.send(result);
            }
            Command::Stop { id, reply } => {
                let now = self.now_ms();
                let result = self.engine.stop_job(now, &id).map_err(Error::from);
                if result.is_ok() {
                    tracing::info!(job = %id, "job stop requested");
                }
                let failed = self.drain_outputs().await;
                let _ = reply.send(match (result, failed) {
                    (Ok(()), Some(e)) => Err(Error::Storage(e)),
                    (r, _) => r,
                });
            }
            Command::Drain { reply } => {
                let now = self.now_ms();
                tracing::info!("draining");
                self.engine.drain(now);
                self.drain_outputs().await;
                let _ = reply.send(());
            }
            Command::Undrain { reply } => {
                let now = self.now_ms();
                tracing::info!("taking work again");
                self.engine.undrain(now);
                self.drain_outputs().await;
                let _ = reply.send(());
            }
            Command::Read(query) => query(self),
            Command::Shutdown { reply } => {
                if let Some(leaving) = &mut self.leaving {
                    leaving.replies.push(reply);
                    return;
                }
                tracing::info!(tasks = self.running.len(), "leaving the cluster");
                let now = self.now_ms();
                self.engine.leave(now);
                self.drain_outputs().await;
                let at = Instant::now();
                self.leaving = Some(Leaving {
                    replies: vec![reply],
                    flush_at: at + LEAVE_FLUSH,
                    give_up_at: at + self.stop_grace + LEAVE_FLUSH * 2,
                });
            }
        }
    }

    async fn on_net_event(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Listening(addr) => tracing::debug!(%addr, "listening"),
            NetEvent::PeerUp { peer, addrs } => {
                self.connected.insert(peer);
                tracing::info!(%peer, addr = ?addrs.first().map(ToString::to_string), "peer up");
                let now = self.now_ms();
                self.engine.handle_peer_up(now, peer.to_string());
                self.drain_outputs().await;
            }
            NetEvent::PeerDown { peer } => {
                self.connected.remove(&peer);
                self.backlog.remove(&peer);
                tracing::info!(%peer, "peer down");
                let now = self.now_ms();
                self.engine.handle_peer_down(now, &peer.to_string());
                self.drain_outputs().await;
            }
            NetEvent::Message { from, bytes } => {
                tracing::trace!(peer = %from, len = bytes.len(), "message");
                let now = self.now_ms();
                if let Err(e) = self.engine.handle_bytes(now, &from.to_string(), &bytes) {
                    self.stats.bad_messages += 1;
                    if self.stats.bad_messages <= LOUD_BAD_MESSAGES {
                        tracing::warn!(peer = %from, len = bytes.len(), error = %e, "dropped a malformed message");
                    } else {
                        tracing::debug!(peer = %from, len = bytes.len(), error = %e, "dropped a malformed message");
                    }
                }
                self.drain_outputs().await;
            }
            NetEvent::Request { from, bytes, reply } => match DaemonRequest::decode(&bytes) {
                Ok(DaemonRequest::Logs { task_prefix, max_bytes }) => {
                    self.stats.requests_served += 1;
                    tracing::debug!(peer = %from, task_prefix, "logs requested");
                    let dir = self.log_dir.clone();
                    // File reads stay off the driver task.
                    tokio::task::spawn_blocking(move || {
                        let answer = match tasks::read_task_logs(&dir, &task_prefix, max_bytes) {
                            Ok(logs) => DaemonReply::Logs(logs),
                            Err(e) => DaemonReply::Error(e.to_string()),
                        };
                        let _ = reply.send(answer.encode());
                    });
                }
                Err(e) => {
                    self.stats.bad_requests += 1;
                    tracing::debug!(peer = %from, error = %e, "malformed daemon request");
                    let _ = reply.send(DaemonReply::Error("malformed request".into()).encode());
                }
            },
        }
    }

    async fn on_task_done(&mut self, task: String, outcome: TaskOutcome) {
        let driver = self.running.remove(&task).map(|r| r.driver).unwrap_or_default();
        let now = self.now_ms();
        match outcome {
            TaskOutcome::Exited(code) => {
                self.stats.tasks_exited += 1;
                tracing::info!(task = %task, driver, code, "task exited");
                self.engine.handle_task_exited(now, &task, code);
            }
            TaskOutcome::StartFailed(reason) => {
                self.stats.tasks_start_failed += 1;
                tracing::warn!(task = %task, driver, reason, "task failed to start");
                self.engine.handle_task_start_failed(now, &task, &reason);
            }
        }
        if let Some(leaving) = &mut self.leaving {
            leaving.flush_at = Instant::now() + LEAVE_FLUSH;
        }
        self.drain_outputs().await;
    }

    /// Acts on every pending engine output, in order. Returns the first storage failure.
    async fn drain_outputs(&mut self) -> Option<StorageError> {
        let mut failure = None;
        while let Some(output) = self.engine.poll_output() {
            match output {
                Output::Persist(records) => {
                    if let Err(e) = self.persist(records).await {
                        failure.get_or_insert(e);
                    }
                }
                Output::Snapshot(records) => {
                    if let Err(e) = self.snapshot(records.to_bytes()).await {
                        failure.get_or_insert(e);
                    }
                }
                Output::Send { to, message } => {
                    tracing::trace!(to = %to, kind = message.kind(), "send");
                    self.send(&to, message.encode())
                }
                Output::StartTask(start) => self.start_task(*start),
                Output::StopTask { task } => match self.running.get(&task) {
                    Some(running) => {
                        tracing::info!(task = %task, driver = %running.driver, "stopping task");
                        running.canceller.cancel();
                    }
                    None => tracing::debug!(task = %task, "stop for a task not running here"),
                },
                Output::Event(event) => {
                    log_event(&event);
                    // No receivers is fine.
                    let _ = self.events.send(event);
                }
            }
        }
        failure
    }

    async fn persist(&mut self, records: Vec<Vec<u8>>) -> Result<(), StorageError> {
        if !self.persistent {
            return Ok(());
        }
        let Some(mut store) = self.store.take() else {
            self.store_ok = false;
            self.stats.storage_errors += 1;
            return Err(StorageError::Poisoned);
        };
        // fsync off the runtime's threads; awaiting it keeps the outputs' order.
        let joined = tokio::task::spawn_blocking(move || {
            let result = store.append(&records);
            (store, result)
        })
        .await;
        self.storage_result(joined.map_err(|e| e.to_string()), "append to the table log").map(|()| {
            self.stats.persists += 1;
        })
    }

    async fn snapshot(&mut self, bytes: Vec<u8>) -> Result<(), StorageError> {
        if !self.persistent {
            return Ok(());
        }
        let Some(mut store) = self.store.take() else {
            self.store_ok = false;
            self.stats.storage_errors += 1;
            return Err(StorageError::Poisoned);
        };
        let len = bytes.len();
        let joined = tokio::task::spawn_blocking(move || {
            let result = store.write_snapshot(&bytes);
            (store, result)
        })
        .await;
        self.storage_result(joined.map_err(|e| e.to_string()), "write the snapshot").map(|()| {
            self.stats.snapshots += 1;
            tracing::info!(bytes = len, "snapshot written");
        })
    }

    fn storage_result(
        &mut self,
        joined: Result<(Store, Result<(), StorageError>), String>,
        what: &str,
    ) -> Result<(), StorageError> {
        match joined {
            Ok((store, result)) => {
                self.store = Some(store);
                match result {
                    Ok(()) => {
                        self.store_ok = true;
                        Ok(())
                    }
                    Err(e) => {
                        self.store_ok = false;
                        self.stats.storage_errors += 1;
                        tracing::error!(error = %e, "cannot {what}; state is not durable");
                        Err(e)
                    }
                }
            }
            Err(e) => {
                self.store_ok = false;
                self.stats.storage_errors += 1;
                tracing::error!(error = %e, "storage task failed; the store is lost");
                Err(StorageError::Poisoned)
            }
        }
    }

    fn peer_id(&mut self, node: &str) -> Option<PeerId> {
        if let Some(p) = self.peer_ids.get(node) {
            return Some(*p);
        }
        let parsed = PeerId::from_str(node).ok()?;
        if self.peer_ids.len() > 100_000 {
            self.peer_ids.clear();
        }
        self.peer_ids.insert(node.to_string(), parsed);
        Some(parsed)
    }

    fn send(&mut self, to: &str, bytes: Vec<u8>) {
        let Some(peer) = self.peer_id(to) else {
            self.stats.send_errors += 1;
            tracing::debug!(to, "not a peer id; message dropped");
            return;
        };
        // Order per peer is kept: nothing overtakes a message already waiting.
        if let Some(waiting) = self.backlog.get_mut(&peer) {
            if waiting.len() >= SEND_BACKLOG_PER_PEER {
                self.stats.sends_dropped += 1;
            } else {
                waiting.push_back(bytes);
                self.stats.sends_deferred += 1;
            }
            return;
        }
        if self.connected.contains(&peer) && !self.net.has_room(&peer) {
            self.backlog.entry(peer).or_default().push_back(bytes);
            self.stats.sends_deferred += 1;
            return;
        }
        let _ = try_send_counted(&self.net, &mut self.stats, peer, bytes);
    }

    /// Sends what waits in the backlogs, in order, while the peers' queues take it.
    fn flush_backlog(&mut self) {
        if self.backlog.is_empty() {
            return;
        }
        let peers: Vec<PeerId> = self.backlog.keys().copied().collect();
        for peer in peers {
            let Some(waiting) = self.backlog.get_mut(&peer) else { continue };
            while !waiting.is_empty() && self.net.has_room(&peer) {
                let Some(bytes) = waiting.pop_front() else { break };
                match try_send_counted(&self.net, &mut self.stats, peer, bytes) {
                    Err(NetError::QueueFull) => break,
                    Err(NetError::NotConnected(_)) => {
                        self.stats.sends_unreachable += waiting.len() as u64;
                        waiting.clear();
                    }
                    _ => {}
                }
            }
            if waiting.is_empty() {
                self.backlog.remove(&peer);
            }
        }
    }

    fn start_task(&mut self, start: TaskStart) {
        let TaskStart { task, job, index, attempt, spec } = start;
        let driver_name = spec.driver.clone();
        let (canceller, cancel) = CancelToken::new();
        let future = match self.drivers.get(&driver_name) {
            Some(Registered::Exec(exec)) => exec.start_task(&task, &spec, cancel),
            Some(Registered::Custom(driver)) => {
                let ctx = TaskContext {
                    task: task.clone(),
                    node: self.engine.id().clone(),
                    job,
                    index,
                    attempt,
                    spec,
                    cancel,
                };
                tasks::supervise(Arc::clone(driver), ctx, self.stop_grace)
            }
            None => {
                self.stats.tasks_start_failed += 1;
                let reason = format!("no driver named `{driver_name}` on this node");
                tracing::warn!(task = %task, reason, "task failed to start");
                let now = self.now_ms();
                // Its outputs join the queue being drained.
                self.engine.handle_task_start_failed(now, &task, &reason);
                return;
            }
        };
        self.stats.tasks_started += 1;
        tracing::info!(task = %task, driver = %driver_name, "task started");
        self.running.insert(task.clone(), RunningTask { canceller, driver: driver_name });
        self.tasks.push(future.map(move |outcome| (task, outcome)).boxed());
    }

    async fn finish(mut self) {
        let replies = self.leaving.take().map(|l| l.replies).unwrap_or_default();
        if !self.running.is_empty() {
            tracing::warn!(tasks = self.running.len(), "tasks still running at shutdown; killing them");
        }
        // Dropping the futures kills exec process groups and in-process work.
        self.tasks = FuturesUnordered::new();
        self.running.clear();
        self.net.shutdown().await;
        tracing::info!("node stopped");
        // The store's lock and the scratch directory go with it, before anyone is told.
        drop(self);
        for reply in replies {
            let _ = reply.send(());
        }
    }

    /// This node's health.
    pub(crate) fn health(&self) -> Health {
        Health {
            ok: self.store_ok && self.net_events.is_some() && self.leaving.is_none(),
            node_id: self.engine.id().clone(),
            name: self.engine.config().name.clone(),
            peers: self.connected.len(),
            jobs: self.engine.table().job_count(),
            digest: self.engine.table().digest_hex(),
            local_health: self.engine.local_health(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    /// Prometheus text exposition of this node's metrics.
    pub(crate) fn metrics(&self) -> String {
        let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
        for s in ["pending", "running", "succeeded", "failed", "stopped"] {
            by_status.insert(s.to_string(), 0);
        }
        let mut duplicate_runs = 0u64;
        for job in self.engine.jobs_json() {
            let status = serde_json::to_value(job.status).ok().and_then(|v| v.as_str().map(str::to_string));
            *by_status.entry(status.unwrap_or_else(|| "unknown".into())).or_default() += 1;
            duplicate_runs += u64::from(job.duplicate_runs);
        }
        let c = self.engine.counters();
        let s = &self.stats;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: u64| vec![(String::new(), v)];
        let jobs: Vec<(String, u64)> = by_status.iter().map(|(k, v)| (format!("{{status=\"{k}\"}}"), *v)).collect();
        metric("colony_jobs", "gauge", "Jobs held in the table, by status.", &jobs);
        metric("colony_tasks_running", "gauge", "Tasks running on this node.", &one(self.running.len() as u64));
        metric("colony_peers", "gauge", "Connected peers.", &one(self.connected.len() as u64));
        metric("colony_nodes", "gauge", "Nodes in the table.", &one(self.engine.table().nodes().count() as u64));
        metric(
            "colony_local_health",
            "gauge",
            "Lifeguard local health multiplier (0 = healthy).",
            &one(u64::from(self.engine.local_health())),
        );
        metric(
            "colony_uptime_seconds",
            "gauge",
            "Seconds since this node started.",
            &one(self.started.elapsed().as_secs()),
        );
        metric(
            "colony_duplicate_runs",
            "gauge",
            "Runs beyond one per attempt, summed over held jobs (I3).",
            &one(duplicate_runs),
        );
        metric("colony_claims_total", "counter", "Claims written.", &one(c.claims));
        metric(
            "colony_claims_replacing_total",
            "counter",
            "Claims on instances whose earlier claims all stopped counting (re-placements).",
            &one(c.claims_replacing),
        );
        metric("colony_claims_lost_total", "counter", "Claims withdrawn after losing.", &one(c.claims_lost));
        metric("colony_engine_tasks_started_total", "counter", "Tasks the engine started.", &one(c.tasks_started));
        metric(
            "colony_tasks_superseded_total",
            "counter",
            "Tasks stopped because another node won (duplicates).",
            &one(c.tasks_superseded),
        );
        metric("colony_deaths_written_total", "counter", "Death certificates written.", &one(c.deaths_written));
        metric(
            "colony_refutations_total",
            "counter",
            "Refutations of suspicion (own incarnation raised).",
            &one(c.refutations),
        );
        metric("colony_jobs_compacted_total", "counter", "Finished jobs compacted.", &one(c.jobs_compacted));
        metric(
            "colony_wakes_left_to_sweep_total",
            "counter",
            "Claim back-off timers of deferred jobs left to the periodic sweep.",
            &one(c.wakes_left_to_sweep),
        );
        metric(
            "colony_sync_docs_deferred_total",
            "counter",
            "Differing documents an anti-entropy round left to later rounds (rate limit).",
            &one(c.sync_docs_deferred),
        );
        metric(
            "colony_repair_changes_sent_total",
            "counter",
            "Job changes sent to peers that lacked them (anti-entropy answers).",
            &one(c.repair_changes_sent),
        );
        metric(
            "colony_certificates_forwarded_total",
            "counter",
            "Death certificates passed on to an accused node still seen alive (a healed cut).",
            &one(c.certificates_forwarded),
        );
        metric(
            "colony_bad_messages_total",
            "counter",
            "Peer messages that failed to decode or apply.",
            &one(c.bad_messages),
        );
        metric("colony_sends_total", "counter", "Messages queued on the mesh.", &one(s.sends));
        metric(
            "colony_sends_dropped_total",
            "counter",
            "Messages dropped: outbound queue full.",
            &one(s.sends_dropped),
        );
        metric(
            "colony_sends_deferred_total",
            "counter",
            "Messages that waited for room in a peer's outbound queue.",
            &one(s.sends_deferred),
        );
        metric(
            "colony_send_backlog",
            "gauge",
            "Messages waiting for room in peers' outbound queues.",
            &one(self.backlog.values().map(|q| q.len() as u64).sum()),
        );
        metric(
            "colony_sends_unreachable_total",
            "counter",
            "Messages dropped: peer not connected.",
            &one(s.sends_unreachable),
        );
        metric(
            "colony_send_errors_total",
            "counter",
            "Messages that could not be sent otherwise.",
            &one(s.send_errors),
        );
        metric("colony_daemon_requests_total", "counter", "Daemon requests served (logs).", &one(s.requests_served));
        metric(
            "colony_bad_daemon_requests_total",
            "counter",
            "Daemon requests that did not decode.",
            &one(s.bad_requests),
        );
        metric("colony_persists_total", "counter", "Record batches made durable.", &one(s.persists));
        metric("colony_snapshots_total", "counter", "Snapshots written.", &one(s.snapshots));
        metric("colony_storage_errors_total", "counter", "Failed writes to durable storage.", &one(s.storage_errors));
        metric("colony_tasks_started_total", "counter", "Tasks handed to a driver.", &one(s.tasks_started));
        metric("colony_tasks_start_failed_total", "counter", "Tasks that could not start.", &one(s.tasks_start_failed));
        metric("colony_tasks_exited_total", "counter", "Tasks that ended.", &one(s.tasks_exited));
        out
    }
}

async fn next_net_event(rx: &mut Option<mpsc::Receiver<NetEvent>>) -> Option<NetEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn log_event(event: &Event) {
    match event {
        Event::Job { id, status } => tracing::info!(job = %id, status = ?status, "job"),
        Event::Instance { job, index, status, node } => {
            tracing::info!(job = %job, index, status = ?status, node = node.as_deref().unwrap_or("-"), "instance")
        }
        Event::Node { id, state } => tracing::info!(node = %id, state = ?state, "node state"),
    }
}
