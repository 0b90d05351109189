//! Integration tests: the real server on 127.0.0.1:0, driven over HTTP (and WebSocket).
//!
//! One test binary (faster to link) with one module per area; `helpers` starts servers.

mod conversations;
mod fake_openhands;
mod frontend;
mod helpers;
mod keys;
mod lifecycle;
mod limits;
mod load;
mod openapi;
mod restart;
mod routes;
mod security;
mod session_key;
mod settings;
mod sockets;
mod status;
mod third_party;
mod validation;
mod workspace;
