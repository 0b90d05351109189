//! The conversation domain: what a conversation is, independent of how it is stored, served
//! or run. The api, the sockets, the actors and the store all speak these types; the store
//! keeps them, it does not define them.
//!
//! - [`ConversationId`]: the id, and the one place for the id rule.
//! - [`ConversationMeta`]: everything kept about a conversation besides its events, with the
//!   [`InitData`] it was started with.
//! - [`NewConversation`]: a conversation to create, and the metadata it is created with.
//! - [`ConversationRecord`]: a conversation as loaded (its metadata, next event id and bytes).
//! - [`ConversationStatus`], [`RuntimeStatus`]: its lifecycle status and its runtime's last
//!   reported state.
//! - [`settings`]: whose saved settings a conversation's owner has, and what its runtime gets
//!   of them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod id;
pub mod settings;
mod status;

pub use id::{ConversationId, InvalidConversationId};
pub use status::{ConversationStatus, RuntimeStatus, Trigger, UnknownTrigger};

/// What a conversation was started with; handed to its runtime and kept across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InitData {
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub selected_branch: Option<String>,
    #[serde(default)]
    pub git_provider: Option<String>,
    #[serde(default)]
    pub conversation_instructions: Option<String>,
    /// MCP servers as validated JSON; may hold secrets, never echoed in a response.
    #[serde(default)]
    pub mcp_config: Option<Value>,
    /// The first user message (from `initial_user_msg` or a suggested task's prompt).
    #[serde(default)]
    pub initial_user_msg: Option<String>,
    #[serde(default)]
    pub image_urls: Vec<String>,
    /// Events from `replay_json`, replayed into the log when the conversation is created.
    #[serde(default)]
    pub replay_events: Vec<Value>,
    /// The suggested task, as sent.
    #[serde(default)]
    pub suggested_task: Option<Value>,
    /// The microagent request, as sent.
    #[serde(default)]
    pub create_microagent: Option<Value>,
}

/// Everything kept about a conversation besides its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationMeta {
    pub conversation_id: ConversationId,
    pub title: String,
    pub created_at: String,
    pub last_updated_at: String,
    pub trigger: Trigger,
    /// Who created it (the session key's owner); `None` when no key is configured.
    pub owner: Option<String>,
    pub init: InitData,
}

/// A conversation as loaded: its metadata and the id its next event gets.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationRecord {
    pub meta: ConversationMeta,
    pub next_event_id: u64,
    /// The bytes it holds against `max_bytes_per_conversation` (see
    /// [`crate::store::meta_bytes`], [`crate::store::events_bytes`]).
    pub bytes: u64,
}

/// A conversation to create (or, with a client-chosen id, to join), as a valid
/// `POST /api/conversations` body describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewConversation {
    pub conversation_id: Option<ConversationId>,
    pub init: InitData,
    pub trigger: Trigger,
    pub title: Option<String>,
    /// The request carried a first message (or task) that joining would not apply.
    pub brings_initial_message: bool,
}

impl NewConversation {
    /// The metadata of the conversation it creates as `id` for `owner`, created now.
    pub fn meta(self, id: ConversationId, owner: Option<String>) -> ConversationMeta {
        let now = crate::events::meta_timestamp();
        ConversationMeta {
            title: self
                .title
                .unwrap_or_else(|| crate::events::default_title(&id)),
            conversation_id: id,
            created_at: now.clone(),
            last_updated_at: now,
            trigger: self.trigger,
            owner,
            init: self.init,
        }
    }
}
