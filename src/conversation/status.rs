//! A conversation's lifecycle status and its runtime's last reported state, as the API, the
//! sockets and the operators' page report them (one definition: the actors publish these, the
//! API serializes these).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A conversation's lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConversationStatus {
    Starting,
    Running,
    Stopped,
}

/// The runtime's last reported state, as the id of its status update (`runtime_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum RuntimeStatus {
    #[serde(rename = "STATUS$STARTING_RUNTIME")]
    Starting,
    #[serde(rename = "STATUS$READY")]
    Ready,
    #[serde(rename = "STATUS$ERROR_RUNTIME_DISCONNECTED")]
    Error,
}
