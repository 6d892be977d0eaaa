//! Colony: a masterless cluster orchestrator.
//!
//! - [`engine`]: the node core, a deterministic sans-IO state machine. Always built; it is
//!   what the simulator drives.
//! - The daemon, the library facade and the CLI need the `daemon` feature (on by default).

pub mod engine;

pub use colony_crdt as crdt;
