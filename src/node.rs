//! The library facade: a Colony node embedded in a Rust program. Documented at the crate root
//! and on [`Node`]; the types are re-exported there.
//!
//! A [`Node`] is a cheap handle (`Clone`, an `Arc` inside) to one tokio task that owns the
//! node core and its IO ([`daemon::runtime`](crate::daemon::runtime)). Several nodes can live
//! in one process: there is no global state. [`Node::shutdown`] leaves the cluster
//! gracefully; dropping every handle without it behaves like a crash (running work stops
//! abruptly, nothing is announced, peers find out by failure detection).
#![deny(missing_docs)]

use crate::daemon::protocol::{DaemonReply, DaemonRequest};
use crate::daemon::runtime::{self, Command, Parts, Registered, RemoveDirOnDrop, Runtime};
use crate::daemon::storage::{StorageError, Store};
use crate::daemon::tasks::{self, ExecDriver};
use crate::engine::{Engine, EngineConfig, EngineError};
use colony_crdt::Resources;
use colony_net::{NetConfig, NetError, NetHandle, PeerId};
use futures::stream::{BoxStream, Stream, StreamExt};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::Instrument;

pub use crate::daemon::tasks::{CancelToken, Canceller, FnDriver, TaskContext};

/// In-process work: register a driver under a name with [`NodeBuilder::driver`], and jobs
/// whose `spec.driver` is that name run as its futures, on nodes that registered it (a node
/// never claims a job whose driver it lacks). [`driver_fn`] makes one from a closure.
///
/// # Example
///
/// A driver as a type, holding shared state: it counts the items of each partition it has
/// done. Tested here without a node: [`CancelToken::new`] makes the token the runtime would
/// pass.
///
/// ```
/// use colony::{CancelToken, Driver, JobSpec, TaskContext};
/// use futures::future::BoxFuture;
/// use std::collections::HashMap;
/// use std::sync::{Arc, Mutex};
/// use std::time::Duration;
///
/// #[derive(Default)]
/// struct Indexer {
///     done: Arc<Mutex<HashMap<String, u32>>>,
/// }
///
/// impl Driver for Indexer {
///     fn run(&self, ctx: TaskContext) -> BoxFuture<'static, i32> {
///         let done = Arc::clone(&self.done);
///         Box::pin(async move {
///             let Some(partition) = ctx.spec.args.first().cloned() else { return 2 };
///             tokio::select! {
///                 () = tokio::time::sleep(Duration::from_millis(10)) => {
///                     *done.lock().unwrap().entry(partition).or_default() += 1;
///                     0
///                 }
///                 // The job was stopped, or this node is leaving: end soon.
///                 () = ctx.cancel.cancelled() => 143,
///             }
///         })
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let indexer = Indexer::default();
/// let context = |cancel: CancelToken| {
///     let mut spec = JobSpec::command("index", ["partition-7"]);
///     spec.driver = "index".into();
///     let (task, node, job) = ("job-1/0/0".into(), "node-1".into(), "job-1".into());
///     TaskContext { task, node, job, index: 0, attempt: 0, spec, cancel }
/// };
/// let (_keep, token) = CancelToken::new();
/// assert_eq!(indexer.run(context(token)).await, 0);
/// let (canceller, token) = CancelToken::new();
/// canceller.cancel();
/// assert_eq!(indexer.run(context(token)).await, 143);
/// assert_eq!(indexer.done.lock().unwrap()["partition-7"], 1);
/// # }
/// ```
///
/// Register it with [`NodeBuilder::driver`]`("index", Indexer::default())` and submit jobs
/// whose `spec.driver` is `"index"`.
///
/// # Contract
///
#[doc(inline)]
pub use crate::daemon::tasks::Driver;

/// An in-process handler from an async closure: the closure gets a [`TaskContext`] per task,
/// and its future's output is the task's exit code.
///
/// # Example: one partition per job
///
/// Every replica of a service registers the same handler; each partition is a `Service` job
/// (it runs until stopped, and is restarted if it ends). Colony runs each partition on one
/// live replica that has the handler, and when that replica dies or shuts down, on another.
/// Two copies can overlap briefly (a handover, a claim race, a network partition); the one
/// that loses is cancelled and the overlap is counted in `duplicate_runs`, so a handler
/// should tolerate it (idempotent writes, or a fencing token from the system it writes to).
///
/// ```no_run
/// use colony::crdt::JobKind;
/// use colony::{driver_fn, JobSpec, Node, TaskContext};
///
/// # async fn replica(seed: colony::Multiaddr) -> Result<(), colony::Error> {
/// let node = Node::builder()
///     .seed(seed)
///     .driver(
///         "consume",
///         driver_fn(|ctx: TaskContext| async move {
///             let partition: u32 = ctx.spec.args[0].parse().unwrap_or(0);
///             println!("consuming partition {partition} on node {}", ctx.node);
///             // ... consume until told to stop (the node leaves, or the job is stopped) ...
///             ctx.cancel.cancelled().await;
///             0
///         }),
///     )
///     .start()
///     .await?;
///
/// // Once, from any replica: one job per partition.
/// for partition in 0..16 {
///     let mut spec = JobSpec::command(format!("partition-{partition}"), [partition.to_string()]);
///     spec.driver = "consume".into();
///     spec.kind = JobKind::Service;
///     node.submit(spec).await?;
/// }
/// # Ok(())
/// # }
/// ```
///
/// # A minimal one
///
#[doc(inline)]
pub use crate::daemon::tasks::driver_fn;
pub use crate::engine::{Event, InstanceJson, JobJson, Limits, NodeJson, Retention, RunJson, Timing};
pub use colony_net::ClusterKey;

/// How long a stopped task may take to end before it is killed (exec: `SIGTERM` then
/// `SIGKILL`; in-process: cancellation, then the future is dropped).
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// The most bytes of each log stream [`Node::logs`] returns.
pub const DEFAULT_LOG_TAIL_BYTES: u64 = 1 << 20;
/// How long [`Node::logs`] waits for a remote node's answer.
pub const LOGS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`NodeBuilder::start`] waits for a data directory still locked by a node of this
/// process that was just dropped (its task is torn down asynchronously).
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Errors of the facade.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The job spec was refused; nothing was written.
    #[error("invalid job spec: field `{field}`: {problem}")]
    InvalidSpec {
        /// The offending field, as a path (`resources.memory_mb`).
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// No such job (never submitted, compacted, or not yet synced here), or nothing to show.
    #[error("not found: {0}")]
    NotFound(String),
    /// The builder's settings cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A file-system operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The mesh failed (not connected to the node asked, timeout, transport setup).
    #[error("network: {0}")]
    Net(#[from] NetError),
    /// Durable storage failed; for a submission, the job is not acknowledged.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The persisted state could not be restored.
    #[error("cannot restore persisted state: {0}")]
    Restore(String),
    /// A remote node could not serve a request.
    #[error("remote node: {0}")]
    Remote(String),
    /// The node has left the cluster and takes no commands.
    #[error("this node has left the cluster")]
    Left,
    /// The node has shut down (or crashed).
    #[error("the node has shut down")]
    Shutdown,
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Error {
        match e {
            EngineError::InvalidSpec(s) => Error::InvalidSpec { field: s.field, problem: s.problem },
            EngineError::UnknownJob(id) => Error::NotFound(id),
            EngineError::Left => Error::Left,
            EngineError::Table(t) => Error::Restore(t.to_string()),
        }
    }
}

/// The facade's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A node's health, as `GET /health` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    /// Storage writes succeed, the mesh runs and the node is not leaving.
    pub ok: bool,
    /// The node id (libp2p peer id).
    pub node_id: String,
    /// The node's name.
    pub name: String,
    /// Connected peers.
    pub peers: usize,
    /// Jobs held in the table.
    pub jobs: usize,
    /// The table's digest (hex): equal on nodes holding the same state.
    pub digest: String,
    /// The Lifeguard local health multiplier (0 = healthy).
    pub local_health: u32,
    /// Milliseconds since the node started.
    pub uptime_ms: u64,
}

/// The end of one task's output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Logs {
    /// The id of the node that ran the task.
    pub node: String,
    /// The task, `<job>/<index>/<attempt>` (the newest attempt that ran on that node).
    pub task: String,
    /// The end of its standard output (lossy UTF-8).
    pub stdout: String,
    /// The end of its standard error (lossy UTF-8).
    pub stderr: String,
}

/// A stream of the node's [`Event`]s, from the moment it was created. A receiver that falls
/// more than 1,024 events behind skips the ones it missed. Ends when the node stops.
pub struct EventStream {
    inner: BoxStream<'static, Event>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl Stream for EventStream {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Event>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl EventStream {
    fn new(rx: Option<broadcast::Receiver<Event>>) -> EventStream {
        let Some(rx) = rx else { return EventStream { inner: futures::stream::empty().boxed() } };
        let inner = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((event, rx)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "event receiver lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed();
        EventStream { inner }
    }
}

/// Configures and starts a [`Node`]. Get one with [`Node::builder`].
///
/// # Example: a persistent node
///
/// A node that keeps its identity and the table across restarts, listens on every interface,
/// joins through two seeds (and mDNS on the LAN), only talks to holders of the cluster key,
/// and offers two cores and 4 GiB to jobs:
///
/// ```no_run
/// use colony::{ClusterKey, Node, Timing};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // Written once by `colony keygen --out cluster.key` (or `ClusterKey::to_file_string`).
/// let key = ClusterKey::from_file_string(&std::fs::read_to_string("/etc/colony/cluster.key")?)?;
/// let node = Node::builder()
///     .name("worker-1")
///     .data_dir("/var/lib/colony")
///     .listen("/ip4/0.0.0.0/tcp/7475".parse()?)
///     .seed("/ip4/10.0.0.1/tcp/7475".parse()?)
///     .seed("/ip4/10.0.0.2/tcp/7475".parse()?)
///     .cluster_key(key)
///     .cpu_millis(2_000)
///     .memory_mb(4_096)
///     .label("zone", "eu-1")
///     .timing(Timing::default())
///     .start()
///     .await?;
/// println!("node {} listening on {:?}", node.id(), node.listen_addrs());
/// # node.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct NodeBuilder {
    name: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Vec<colony_net::Multiaddr>,
    seeds: Vec<colony_net::Multiaddr>,
    mdns: bool,
    cluster_key: Option<ClusterKey>,
    cpu_millis: Option<u64>,
    memory_mb: Option<u64>,
    labels: BTreeMap<String, String>,
    timing: Timing,
    retention: Retention,
    limits: Limits,
    drivers: BTreeMap<String, Arc<dyn Driver>>,
    stop_grace: Duration,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("name", &self.name)
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("seeds", &self.seeds)
            .field("drivers", &self.drivers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// The node's human name (default: the host name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Keep state in this directory: the node key (`node.key`, so the node id survives
    /// restarts), the table (`table.log`, `table.snap`), task logs (`logs/`) and pid files of
    /// running processes (`tasks/`). It is also the default working directory of exec tasks.
    /// One node per directory (it is locked).
    pub fn data_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.data_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Keep no state (the default): a fresh identity on every start, nothing persisted, task
    /// logs in a scratch directory under the system temp dir, removed when the node stops.
    pub fn in_memory(mut self) -> Self {
        self.data_dir = None;
        self
    }

    /// Listen on this TCP multiaddr (repeatable; e.g. `/ip4/127.0.0.1/tcp/0`). Without any,
    /// the node listens on `/ip4/0.0.0.0/tcp/7475`.
    pub fn listen(mut self, addr: colony_net::Multiaddr) -> Self {
        self.listen.push(addr);
        self
    }

    /// Dial this peer at start and keep re-dialling it while not connected (repeatable).
    pub fn seed(mut self, addr: colony_net::Multiaddr) -> Self {
        self.seeds.push(addr);
        self
    }

    /// Discover peers on the LAN with mDNS (default: on).
    pub fn mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }

    /// Only peers holding this key can connect.
    pub fn cluster_key(mut self, key: ClusterKey) -> Self {
        self.cluster_key = Some(key);
        self
    }

    /// CPU offered to jobs, in thousandths of a core (default: cores × 1000).
    pub fn cpu_millis(mut self, cpu_millis: u64) -> Self {
        self.cpu_millis = Some(cpu_millis);
        self
    }

    /// Memory offered to jobs, in MiB (default: the machine's total memory).
    pub fn memory_mb(mut self, memory_mb: u64) -> Self {
        self.memory_mb = Some(memory_mb);
        self
    }

    /// A label for placement constraints (repeatable).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Failure-detection and placement timings (every node of a cluster should agree).
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// How long finished jobs are kept.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Bounds on what peers can make this node hold.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long a stopped task may take to end before it is killed (default 5 s).
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// Runs jobs whose `spec.driver` is `name` with `driver`. `exec` (child processes) is
    /// always registered; registering another driver under that name replaces it.
    ///
    /// The node publishes the names of its drivers and claims only jobs whose driver it has:
    /// a job for a driver registered on some nodes runs on one of those, and stays pending
    /// while none of them is up. Register the same driver on every node that should share
    /// the work.
    pub fn driver(mut self, name: impl Into<String>, driver: impl Driver) -> Self {
        self.drivers.insert(name.into(), Arc::new(driver));
        self
    }

    /// Starts the node: opens the data directory, starts the mesh (listening before this
    /// returns), restores the table and spawns the driver task on the current tokio runtime.
    pub async fn start(self) -> Result<Node> {
        let name = self.name.clone().unwrap_or_else(hostname);
        if name.trim().is_empty() {
            return Err(Error::Config("the node name must not be empty".into()));
        }
        let span = tracing::info_span!("node", name = %name);
        self.start_in(name, span.clone()).instrument(span).await
    }

    async fn start_in(self, name: String, span: tracing::Span) -> Result<Node> {
        if self.stop_grace > Duration::from_secs(3600) {
            return Err(Error::Config("stop grace must be at most an hour".into()));
        }

        // Storage and identity.
        let (base_dir, store, restored, keypair, scratch) = match &self.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let (store, recovered) = open_store(dir).await?;
                if recovered.torn_tail_bytes > 0 {
                    tracing::warn!(bytes = recovered.torn_tail_bytes, "dropped a torn tail of the table log");
                }
                let keypair = colony_net::load_or_create_keypair(&dir.join("node.key"))?;
                (dir.clone(), Some(store), Some((recovered.snapshot, recovered.records)), keypair, None)
            }
            None => {
                let safe: String = name
                    .chars()
                    .take(32)
                    .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
                    .collect();
                let dir = std::env::temp_dir().join(format!(
                    "colony-{safe}-{}-{:016x}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&dir)?;
                let guard = RemoveDirOnDrop(dir.clone());
                (dir, None, None, colony_net::Keypair::generate_ed25519(), Some(guard))
            }
        };
        let log_dir = base_dir.join("logs");
        let tasks_dir = base_dir.join("tasks");
        let killed = tasks::kill_leftover_tasks(&tasks_dir);
        if killed > 0 {
            tracing::info!(killed, "killed tasks left over from a previous run");
        }
        let exec = ExecDriver::new(log_dir.clone(), tasks_dir, base_dir.clone(), self.stop_grace)
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
        let mut drivers: BTreeMap<String, Registered> = BTreeMap::new();
        drivers.insert("exec".into(), Registered::Exec(exec));
        for (driver_name, driver) in self.drivers {
            drivers.insert(driver_name, Registered::Custom(driver));
        }

        // The mesh.
        let mut net_config = NetConfig::new(keypair);
        if !self.listen.is_empty() {
            net_config.listen = self.listen;
        }
        net_config.seeds = self.seeds;
        net_config.mdns = self.mdns;
        net_config.cluster_key = self.cluster_key;
        let (net, net_events) = colony_net::start(net_config).await?;
        let peer_id = net.local_peer_id();
        let listen_addrs: Vec<colony_net::Multiaddr> =
            net.listen_addrs().await.into_iter().filter_map(|a| format!("{a}/p2p/{peer_id}").parse().ok()).collect();

        // The node core.
        let capacity = Resources {
            cpu_millis: self.cpu_millis.unwrap_or_else(default_cpu_millis),
            memory_mb: self.memory_mb.unwrap_or_else(default_memory_mb),
        };
        let mut config = EngineConfig::new(name.clone(), capacity);
        config.addrs = listen_addrs.iter().map(ToString::to_string).collect();
        config.labels = self.labels;
        config.timing = self.timing;
        config.retention = self.retention;
        config.limits = self.limits;
        // The engine claims only jobs whose driver is registered here, and publishes the
        // list in its node record so peers do not rank this node for the others.
        config.drivers = drivers.keys().cloned().collect();
        let seed: u64 = rand::random();
        let id = peer_id.to_string();
        let restored_ref = restored.as_ref().map(|(snap, records)| (snap.as_deref(), records.as_slice()));
        let engine = match Engine::new(id.clone(), config, seed, runtime::system_now_ms(), restored_ref) {
            Ok(engine) => engine,
            Err(e) => {
                net.shutdown().await;
                return Err(Error::Restore(e.to_string()));
            }
        };
        drop(restored);

        let (events_tx, _) = broadcast::channel(runtime::EVENT_CHANNEL);
        let (commands_tx, commands_rx) = mpsc::channel(runtime::COMMAND_QUEUE);
        let weak_events = events_tx.downgrade();
        let parts = Parts {
            engine,
            seed,
            net: net.clone(),
            net_events,
            store,
            drivers,
            log_dir: log_dir.clone(),
            stop_grace: self.stop_grace,
            events: events_tx,
            commands: commands_rx,
            scratch,
        };
        let task = tokio::spawn(Runtime::new(parts).run().instrument(span));
        Ok(Node {
            inner: Arc::new(Inner {
                id,
                name,
                listen_addrs,
                log_dir,
                net,
                commands: commands_tx,
                events: weak_events,
                task,
            }),
        })
    }
}

async fn open_store(dir: &Path) -> Result<(Store, crate::daemon::storage::Recovered)> {
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        let d = dir.to_path_buf();
        let opened = tokio::task::spawn_blocking(move || Store::open(&d))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
        match opened {
            Ok(ok) => return Ok(ok),
            // A node of this process that was just dropped may still hold the lock.
            Err(StorageError::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(Error::Storage(e)),
        }
    }
}

struct Inner {
    id: String,
    name: String,
    listen_addrs: Vec<colony_net::Multiaddr>,
    log_dir: PathBuf,
    net: NetHandle,
    commands: mpsc::Sender<Command>,
    events: broadcast::WeakSender<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone without a shutdown: a crash. Dropping the driver task kills
        // exec process groups and drops in-process work; the mesh stops with its handles.
        self.task.abort();
    }
}

/// A running Colony node: a cheap handle (`Clone`, an `Arc` inside) to one tokio task that
/// owns the node core and its IO. Several nodes can live in one process. Start one with
/// [`Node::builder`]; it must be started (and used) inside a tokio runtime.
///
/// [`Node::shutdown`] leaves the cluster gracefully. Dropping every handle without it behaves
/// like a crash: running work stops abruptly (in-process futures are dropped, exec process
/// groups killed), nothing is announced, and peers find out by failure detection.
///
/// # Example: two nodes joined by a seed, with a cluster key
///
/// ```
/// use colony::crdt::NodeState;
/// use colony::{ClusterKey, Node};
/// use std::time::{Duration, Instant};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let key = ClusterKey::generate(); // every node of the cluster gets the same key
/// let start = |name: &str, seed: Option<colony::Multiaddr>| {
///     let mut builder = Node::builder()
///         .name(name)
///         .in_memory()
///         .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
///         .mdns(false)
///         .cluster_key(key);
///     if let Some(seed) = seed {
///         builder = builder.seed(seed);
///     }
///     builder.start()
/// };
/// let a = start("a", None).await?;
/// // `listen_addrs` end in `/p2p/<id>`: ready to give to another node as a seed.
/// let b = start("b", Some(a.listen_addrs()[0].clone())).await?;
///
/// let deadline = Instant::now() + Duration::from_secs(20);
/// loop {
///     let seen = b.nodes().await?;
///     if seen.len() == 2 && seen.iter().all(|n| n.state == NodeState::Alive) {
///         break;
///     }
///     assert!(Instant::now() < deadline, "b never saw a");
///     tokio::time::sleep(Duration::from_millis(20)).await;
/// }
/// assert_eq!(b.health().await?.peers, 1);
///
/// b.shutdown().await; // a learns at once that b left
/// a.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.inner.id).field("name", &self.inner.name).finish_non_exhaustive()
    }
}

impl Node {
    /// A builder with defaults: in-memory, host name, `/ip4/0.0.0.0/tcp/7475`, mDNS on, no
    /// cluster key, the machine's cores and memory, default timings.
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            name: None,
            data_dir: None,
            listen: Vec::new(),
            seeds: Vec::new(),
            mdns: true,
            cluster_key: None,
            cpu_millis: None,
            memory_mb: None,
            labels: BTreeMap::new(),
            timing: Timing::default(),
            retention: Retention::default(),
            limits: Limits::default(),
            drivers: BTreeMap::new(),
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }

    /// The node id (its libp2p peer id).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The addresses the node listens on, each ending in `/p2p/<id>` (give one to another
    /// node's [`NodeBuilder::seed`]).
    pub fn listen_addrs(&self) -> Vec<colony_net::Multiaddr> {
        self.inner.listen_addrs.clone()
    }

    async fn command<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.inner.commands.send(make(tx)).await.map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)
    }

    async fn read<T: Send + 'static>(&self, f: impl FnOnce(&Runtime) -> T + Send + 'static) -> Result<T> {
        self.command(|tx| {
            Command::Read(Box::new(move |rt: &Runtime| {
                let _ = tx.send(f(rt));
            }))
        })
        .await
    }

    /// Submits a job. Returns its id once the job is durable on this node (with a data
    /// directory; at once in memory). It then runs somewhere in the cluster.
    pub async fn submit(&self, spec: crate::JobSpec) -> Result<String> {
        self.command(|reply| Command::Submit { spec: Box::new(spec), reply }).await?
    }

    /// A job, as this node sees it.
    pub async fn job(&self, id: &str) -> Result<JobJson> {
        let key = id.to_string();
        self.read(move |rt| rt.engine().job_json(&key)).await?.ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Every job this node holds, newest first.
    pub async fn jobs(&self) -> Result<Vec<JobJson>> {
        self.read(|rt| rt.engine().jobs_json()).await
    }

    /// Every node known, by name.
    pub async fn nodes(&self) -> Result<Vec<NodeJson>> {
        self.read(|rt| rt.engine().nodes_json()).await
    }

    /// Requests that a job stop everywhere.
    pub async fn stop(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.command(|reply| Command::Stop { id, reply }).await?
    }

    /// The end of the output of instance `index` (0 when `None`) of a job: its newest run,
    /// read here when this node ran it, otherwise asked of the node that did. In-process
    /// drivers write no logs; their instances give [`Error::NotFound`].
    pub async fn logs(&self, id: &str, index: Option<u32>) -> Result<Logs> {
        self.logs_tail(id, index, DEFAULT_LOG_TAIL_BYTES).await
    }

    /// [`Node::logs`] with at most `max_bytes` of each stream.
    pub async fn logs_tail(&self, id: &str, index: Option<u32>, max_bytes: u64) -> Result<Logs> {
        let index = index.unwrap_or(0);
        let job = id.to_string();
        let (exists, runner) =
            self.read(move |rt| (rt.engine().table().job(&job).is_some(), rt.engine().runner_of(&job, index))).await?;
        if !exists {
            return Err(Error::NotFound(id.to_string()));
        }
        let runner = runner.ok_or_else(|| Error::NotFound(format!("{id}/{index}: no run yet")))?;
        let prefix = format!("{id}/{index}/");
        let found = if runner == self.inner.id {
            let dir = self.inner.log_dir.clone();
            tokio::task::spawn_blocking(move || tasks::read_task_logs(&dir, &prefix, max_bytes))
                .await
                .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))??
        } else {
            let peer = PeerId::from_str(&runner).map_err(|_| Error::Remote(format!("bad node id {runner}")))?;
            let request = DaemonRequest::Logs { task_prefix: prefix, max_bytes };
            let bytes = self.inner.net.request(peer, request.encode(), LOGS_TIMEOUT).await?;
            match DaemonReply::decode(&bytes) {
                Ok(DaemonReply::Logs(logs)) => logs,
                Ok(DaemonReply::Error(e)) => return Err(Error::Remote(e)),
                Err(e) => return Err(Error::Remote(e.to_string())),
            }
        };
        let logs = found.ok_or_else(|| Error::NotFound(format!("logs of {id}/{index} on {runner}")))?;
        Ok(Logs {
            node: runner,
            task: logs.task,
            stdout: String::from_utf8_lossy(&logs.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&logs.stderr).into_owned(),
        })
    }

    /// Stops taking new work and hands running work to other nodes.
    pub async fn drain(&self) -> Result<()> {
        self.command(|reply| Command::Drain { reply }).await
    }

    /// Takes work again after [`Node::drain`].
    pub async fn undrain(&self) -> Result<()> {
        self.command(|reply| Command::Undrain { reply }).await
    }

    /// A stream of this node's events from now on. Empty once the node has stopped.
    pub fn events(&self) -> EventStream {
        EventStream::new(self.inner.events.upgrade().map(|tx| tx.subscribe()))
    }

    /// This node's health.
    pub async fn health(&self) -> Result<Health> {
        self.read(|rt| rt.health()).await
    }

    /// This node's metrics in the Prometheus text format.
    pub async fn metrics(&self) -> Result<String> {
        self.read(|rt| rt.metrics()).await
    }

    /// The counters of the IO around the node core.
    pub async fn io_stats(&self) -> Result<runtime::IoStats> {
        self.read(|rt| rt.stats().clone()).await
    }

    /// Tasks running on this node now.
    pub async fn running_tasks(&self) -> Result<usize> {
        self.read(|rt| rt.running_tasks()).await
    }

    /// Leaves the cluster gracefully and stops: announces the departure (others reschedule
    /// this node's work at once), stops running tasks (killing those past the stop grace),
    /// lets the last messages go out, then stops the mesh. Returns once everything is down
    /// and the data directory is unlocked. Later calls on any handle return
    /// [`Error::Shutdown`]; calling it again returns at once.
    pub async fn shutdown(&self) {
        let _ = self.command(|reply| Command::Shutdown { reply }).await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "colony".to_string())
}

fn default_cpu_millis() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000
}

fn default_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(1024, |kb| kb / 1024)
}
