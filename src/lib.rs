//! switchboard: a self-hosted, OpenHands-compatible conversation orchestrator.
//!
//! Module map:
//! - [`config`]: layered, typed settings.
//! - [`events`]: the OpenHands event model and its JSON form.
//! - [`store`]: persistence behind the [`store::Store`] trait (memory, SQLite).

pub mod config;
pub mod events;
pub mod store;
