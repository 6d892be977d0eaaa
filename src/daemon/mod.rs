//! Everything that does IO around the node core: the tokio driver that owns an
//! [`Engine`](crate::engine::Engine), the process driver, durable storage, task supervision
//! and the small request protocol daemons speak to each other.
//!
//! Most users want the library facade instead ([`Node`](crate::Node)), which is built on
//! these modules.
#![deny(missing_docs)]

pub mod exec;
pub mod protocol;
pub mod runtime;
pub mod storage;
pub mod tasks;
