//! Colony: a masterless cluster orchestrator.
//!
//! - [`engine`]: the node core, a deterministic sans-IO state machine. Always built; it is
//!   what the simulator drives.
//! - The daemon, the library facade and the CLI need the `daemon` feature (on by default).

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
