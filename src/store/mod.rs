//! Persistence: the [`Store`] trait and its backends.
//!
//! A store keeps each conversation's metadata ([`ConversationMeta`], including the init data its
//! runtime needs) and its ordered event log. Every operation returns a future so that backends
//! doing blocking I/O run it on their own threads; callers (actors, HTTP handlers) never block.
//!
//! Promises every backend keeps:
//! - `append` calls complete in the order they were made, and a completed `append` is durable
//!   (for the durable backends) — the conversation actor relies on this to persist, then
//!   broadcast.
//! - `append` also moves the conversation's `last_updated_at` forward.
//! - `list` returns newest `created_at` first, ties broken by id.
//! - `delete` removes one conversation's metadata and events and nothing else.
//! - `settings` returns exactly what the last `save_settings` for that user stored (a JSON
//!   object, secrets included: the store is trusted, the API never echoes them), or `None`
//!   before the first save; it is durable like everything else.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::events::StoredEvent;

pub mod memory;
pub mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

/// A boxed store operation.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Io(String),
    #[error("the store is closed")]
    Closed,
    #[error("conversation {0} already exists")]
    Exists(String),
    /// The store cannot be opened (unusable location, corrupt or foreign file, newer schema);
    /// the message names the file and what to do. The server refuses to start.
    #[error("cannot open the store: {0}")]
    Open(String),
}

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
    pub conversation_id: String,
    pub title: String,
    pub created_at: String,
    pub last_updated_at: String,
    /// `gui`, `suggested_task` or `microagent_management`.
    pub trigger: String,
    /// Who created it (the session key's owner); `None` when no key is configured.
    pub owner: Option<String>,
    pub init: InitData,
}

/// A conversation as loaded: its metadata and the id its next event gets.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationRecord {
    pub meta: ConversationMeta,
    pub next_event_id: u64,
}

/// Which events to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventQuery {
    /// First id, inclusive.
    pub start_id: u64,
    /// Last id, inclusive; `None` for no bound.
    pub end_id: Option<u64>,
    /// Newest first when true.
    pub reverse: bool,
    /// Most events returned.
    pub limit: usize,
}

impl EventQuery {
    /// Every event after `after` (exclusive), oldest first, at most `limit`.
    pub fn after(after: Option<u64>, limit: usize) -> Self {
        EventQuery {
            start_id: after.map_or(0, |a| a + 1),
            end_id: None,
            reverse: false,
            limit,
        }
    }
}

/// A conversation store. See the module docs for the promises every backend keeps.
pub trait Store: Send + Sync + 'static {
    /// Records a new conversation; `Exists` if the id is taken.
    fn create(&self, meta: ConversationMeta) -> StoreFuture<()>;
    /// Replaces a conversation's title; `false` when the id is unknown.
    fn set_title(&self, id: &str, title: &str) -> StoreFuture<bool>;
    /// Loads one conversation.
    fn get(&self, id: &str) -> StoreFuture<Option<ConversationRecord>>;
    /// A page of conversations, newest `created_at` first.
    fn list(&self, offset: usize, limit: usize) -> StoreFuture<Vec<ConversationMeta>>;
    /// Appends events (ids continue the log densely) and moves `last_updated_at`.
    fn append(&self, id: &str, events: Vec<StoredEvent>) -> StoreFuture<()>;
    /// Reads events of one conversation.
    fn events(&self, id: &str, query: EventQuery) -> StoreFuture<Vec<StoredEvent>>;
    /// Removes a conversation and its events; `false` when the id is unknown.
    fn delete(&self, id: &str) -> StoreFuture<bool>;
    /// Completes once everything accepted so far is durable.
    fn flush(&self) -> StoreFuture<()>;
    /// The app settings saved for `user` (`""` when no session key owns them); `None` until
    /// the first save.
    fn settings(&self, user: &str) -> StoreFuture<Option<Value>>;
    /// Replaces `user`'s app settings.
    fn save_settings(&self, user: &str, settings: Value) -> StoreFuture<()>;
    /// A cheap health check for readiness: `Ok` when the store can write now. Durable backends
    /// take their write path (lock included) without changing anything.
    fn probe(&self) -> StoreFuture<()> {
        self.flush()
    }
}
