//! Colony: a masterless cluster orchestrator.
//!
//! Every machine runs the same node; there is no master, leader or quorum. The nodes find each
//! other, share one replicated table of jobs and nodes, place work with a deterministic claim
//! rule every node evaluates alike, run it, and move work off a node that dies or leaves.
//!
//! # Embedding
//!
//! A [`Node`] is a Colony node inside your program, on your tokio runtime. Jobs run as child
//! processes (the `exec` driver) or as async handlers you register ([`Driver`],
//! [`driver_fn`]); the second is a way to shard work over a service's replicas: submit one
//! job per shard, each runs on exactly one live replica that has the handler, and moves when
//! that replica dies or leaves. Several nodes can share one process (there is no global
//! state).
//!
//! One node on loopback, a handler, a job, its events, and a graceful shutdown:
//!
//! ```
//! use colony::crdt::JobStatus;
//! use colony::{driver_fn, Event, JobSpec, Node, TaskContext};
//! use futures::StreamExt; // for `EventStream::next`
//! use std::time::Duration;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Node::builder()
//!     .name("solo")
//!     .in_memory() // fresh identity, nothing persisted
//!     .listen("/ip4/127.0.0.1/tcp/0".parse()?) // any free port, loopback only
//!     .mdns(false) // join only the seeds given (none here)
//!     .driver(
//!         "greet",
//!         driver_fn(|ctx: TaskContext| async move {
//!             println!("{} says hello to {:?} on node {}", ctx.task, ctx.spec.args, ctx.node);
//!             0 // the exit code: 0 is success
//!         }),
//!     )
//!     .start()
//!     .await?;
//!
//! let mut events = node.events(); // subscribe before submitting, to miss nothing
//! let mut spec = JobSpec::command("greet", ["world"]);
//! spec.driver = "greet".into();
//! let id = node.submit(spec).await?;
//!
//! tokio::time::timeout(Duration::from_secs(20), async {
//!     while let Some(event) = events.next().await {
//!         if event == (Event::Job { id: id.clone(), status: JobStatus::Succeeded }) {
//!             break;
//!         }
//!     }
//! })
//! .await?;
//! assert_eq!(node.job(&id).await?.status, JobStatus::Succeeded);
//! node.shutdown().await; // leave gracefully; dropping every handle instead is a crash
//! # Ok(())
//! # }
//! ```
//!
//! Job specs are plain structs; [`JobSpec::command`] fills in the defaults:
//!
//! ```
//! use colony::crdt::{Constraint, ConstraintOp, JobKind, Resources};
//! use colony::JobSpec;
//!
//! let mut spec = JobSpec::command("sh", ["-c", "echo hi"]);
//! spec.name = "hello".into();
//! spec.kind = JobKind::Batch; // runs to completion; `Service` restarts forever
//! spec.count = 3; // three instances, placed independently
//! spec.resources = Resources { cpu_millis: 250, memory_mb: 64 };
//! spec.restart.attempts = 5;
//! spec.constraints.push(Constraint { label: "zone".into(), op: ConstraintOp::Eq, value: "eu-1".into() });
//! spec.env.insert("GREETING".into(), "hi".into());
//! assert_eq!(spec.driver, "exec");
//! assert!(spec.validate().is_ok());
//!
//! // What `Node::submit` would refuse, and why.
//! let bad = colony::JobSpec { count: 0, ..spec };
//! assert_eq!(bad.validate().unwrap_err().field, "count");
//! ```
//!
//! More: [`Node`] (joining nodes, a cluster key), [`NodeBuilder`] (a persistent node),
//! [`Driver`] (a handler as a type, tested without a node) and [`driver_fn`] (one partition
//! per job), `docs/embedding.md` and `examples/embed.rs` in the repository.
//!
//! # Modules
//!
//! - [`engine`]: the node core, a deterministic sans-IO state machine. Always built; it is
//!   what the simulator drives.
//! - [`daemon`]: the IO around it (tokio driver task, mesh, storage, process driver), and
//!   [`api`]: the HTTP API of the `colony` agent.
//! - The daemon, the library facade and the CLI need the `daemon` feature (on by default).
#![deny(missing_docs)]

pub mod engine;

pub use colony_crdt as crdt;
pub use colony_crdt::JobSpec;

#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
mod node;
#[cfg(feature = "daemon")]
pub use colony_net::Multiaddr;
#[cfg(feature = "daemon")]
pub use node::*;
#[cfg(feature = "daemon")]
pub mod api;
