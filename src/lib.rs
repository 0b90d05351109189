//! switchboard: a self-hosted, OpenHands-compatible conversation orchestrator.
//!
//! Module map:
//! - [`config`]: layered, typed settings.
//! - [`conversation`]: the domain: what a conversation is (metadata, init data), which api,
//!   sockets, actors and store all speak.
//! - [`startup`]: builds and runs the server from settings.
//! - [`http`]: the front gate (Origin and Host checks, body limits) and the session key.
//! - [`keys`]: user keys (made, hashed, named) and the `switchboard keys` command.
//! - [`api`]: HTTP routes, request validation and error bodies.
//! - [`actors`]: the supervisor and the per-conversation actors.
//! - [`runtime`]: what runs behind a conversation (echo, agent processes and their warm pool,
//!   the openhands preset).
//! - [`events`]: the OpenHands event model and its JSON form.
//! - [`pattern`]: rules stated as JSON Schema patterns (the conversation id, event names),
//!   matched with that pattern compiled into a DFA.
//! - [`store`]: persistence behind the [`store::Store`] trait (memory, SQLite, PostgreSQL).
//! - [`ws`]: socket transports (Socket.IO and plain JSON WebSocket).
//! - [`load`]: the load generator behind `switchboard load`.
//! - [`frontend`]: serving a built OpenHands web app at `/`.
//! - [`workspace`]: a conversation's working directory and path confinement.
//! - [`ops`]: readiness (`/ready`), Prometheus metrics (`/metrics`), request ids, access logs and
//!   the operators' page (`/status`).
//! - [`telemetry`]: logging setup.

pub mod actors;
pub mod api;
pub mod config;
pub mod conversation;
pub mod events;
pub mod failure;
pub mod frontend;
pub mod http;
pub mod keys;
pub mod load;
pub mod ops;
pub mod pattern;
pub mod runtime;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod workspace;
pub mod ws;
