//! Persistence: the [`Store`] trait and its backends.
//!
//! A store keeps each conversation's metadata ([`ConversationMeta`], a type of the domain
//! module [`crate::conversation`], including the init data its runtime needs) and its ordered
//! event log. Every operation returns a future so that backends doing blocking I/O run it on
//! their own threads; callers (actors, HTTP handlers) never block.
//!
//! Promises every backend keeps:
//! - `append` calls complete in the order they were made, and a completed `append` is durable
//!   (for the durable backends) — the conversation actor relies on this to persist, then
//!   broadcast.
//! - `append` also moves the conversation's `last_updated_at` forward, and so does a
//!   `create_with_events` that brings events.
//! - `list` returns newest `created_at` first, ties broken by id.
//! - `delete` removes one conversation's metadata and events and nothing else, and works
//!   whatever the quotas say.
//! - **Quotas** ([`StoreLimits`]): a `create` or `append` that would take a conversation past
//!   `max_bytes_per_conversation` (its events' JSON and its init data), or the store past
//!   `max_store_bytes`, is refused with [`StoreError::QuotaExceeded`] and writes nothing.
//! - `settings` returns exactly what the last `save_settings` for that user stored (a JSON
//!   object, secrets included: the store is trusted, the API never echoes them), or `None`
//!   before the first save; it is durable like everything else.
//! - `list_owned` is `list` restricted to one owner's conversations, same order.
//! - `exists` answers what `get` would (the conversation or `None`, its owner) without loading
//!   it.
//! - **User keys** ([`ApiKey`]): stored by name with the key's hash only (the key itself never
//!   reaches a store). Names are unique: `add_key` with a taken name is refused with
//!   [`StoreError::KeyExists`] and changes nothing; `revoke_key` removes the key (`false` when
//!   no key has that name); `lookup_key` sees every completed `add_key`/`revoke_key`, also
//!   those made by another process on the same database (the `switchboard keys` command beside
//!   a running server), so a revoked key is refused from its next request on.
//! - **Ownership** ([`Store::acquire`], [`Store::append_owned`], [`Store::release`]): the
//!   conversation actor takes a [`Lease`] on its conversation before loading it, creates it and
//!   writes its events with that lease and gives it back when it stops. On a single node (memory, SQLite)
//!   ownership is trivially local: `acquire` always grants, and an owned append is a plain
//!   append. The PostgreSQL store shares its database with other nodes: there `acquire` refuses
//!   while another live node owns the conversation, grants with the next *epoch* otherwise, and
//!   an owned append commits only if its lease is still the conversation's current one, checked
//!   in the same transaction ([`StoreError::Fenced`] otherwise, and nothing is written).
//!   Given a [`UserQuota`], the PostgreSQL store's `acquire` also refuses
//!   ([`Acquired::UserLimit`]) when the user already has that many conversations owned by live
//!   nodes, counted in the same transaction and serialised per user across the cluster; single
//!   nodes leave that limit to the supervisor.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::conversation::{ConversationId, ConversationMeta, ConversationRecord};
use crate::events::StoredEvent;

mod durable;
pub mod membership;
pub mod memory;
pub mod postgres;
pub mod sqlite;

pub use crate::failure::Failure;
pub use membership::{ClusterNode, Membership};
pub use memory::MemoryStore;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// A boxed store operation.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database failed the operation (its driver's, codec's or the system's error is the
    /// [`Failure`]'s source), or the store refused data that breaks its rules (an append that
    /// does not continue the log, a conversation that does not exist, unreadable stored data).
    #[error("storage error: {0}")]
    Io(#[source] Failure),
    #[error("the store is closed")]
    Closed,
    #[error("conversation {0} already exists")]
    Exists(ConversationId),
    /// The store cannot be opened (unusable location, corrupt or foreign file, newer schema,
    /// unreachable server); the message names the file or server and what to do, the driver's
    /// or the system's error is the source when one caused it. The server refuses to start.
    #[error("cannot open the store: {0}")]
    Open(#[source] Failure),
    /// The write would exceed a quota; nothing was written.
    #[error("{message}")]
    QuotaExceeded { quota: Quota, message: String },
    /// A user key with this name exists already; nothing was written.
    #[error("a key named {0:?} exists already")]
    KeyExists(String),
    /// An owned write whose lease is no longer the conversation's current one (another node
    /// took the conversation over, or this node's membership lapsed); nothing was written.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// This node's hold on one conversation, from [`Store::acquire`]: which registration of the
/// node took it (`incarnation`) and the conversation's `epoch` then. Both are 0 on a
/// single-node store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lease {
    pub incarnation: i64,
    pub epoch: i64,
}

/// What [`Store::acquire`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// This node owns the conversation now.
    Owned(Lease),
    /// Another live node owns it.
    Elsewhere(NodeAddress),
    /// Not taken: its user already has [`UserQuota::max_running`] conversations owned by live
    /// nodes (nothing was written).
    UserLimit { limit: usize },
}

/// Whose conversation [`Store::acquire`] takes, and how many of that user's conversations may
/// be owned at once across the cluster (`limits.max_running_per_user`; 0: no limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserQuota {
    pub user: String,
    pub max_running: usize,
}

/// A node of the cluster as other nodes reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub node_id: String,
    /// Its `[cluster] advertise_url`.
    pub url: String,
}

/// A conversation held under a registration that lapsed ([`Store::orphaned`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub id: ConversationId,
    /// Its owner (the user key's name), if any.
    pub owner: Option<Arc<str>>,
}

/// Which byte quota a write would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// `limits.max_bytes_per_conversation`.
    Conversation,
    /// `limits.max_store_bytes`.
    Store,
}

/// The byte quotas and the disk reserve a store keeps (`[limits]`); 0 turns each off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreLimits {
    pub max_bytes_per_conversation: u64,
    pub max_store_bytes: u64,
    /// Bytes of disk held in reserve and given up so that deletes work on a full disk.
    pub disk_reserve_bytes: u64,
}

impl StoreLimits {
    pub fn from_limits(limits: &crate::config::Limits) -> Self {
        StoreLimits {
            max_bytes_per_conversation: limits.max_bytes_per_conversation,
            max_store_bytes: limits.max_store_bytes,
            disk_reserve_bytes: limits.disk_reserve_bytes,
        }
    }

    /// Refuses `more` bytes for conversation `id`, which holds `held`, past its quota.
    pub fn check_conversation(&self, id: &str, held: u64, more: u64) -> Result<(), StoreError> {
        self.conversation_room(id, held, more, 0)
    }

    /// As [`StoreLimits::check_conversation`] for a user's or a runtime's event, which must
    /// leave [`STATUS_HEADROOM`] bytes of the quota for the conversation's own status events
    /// (so that it can always record why it stopped).
    pub fn check_content(&self, id: &str, held: u64, more: u64) -> Result<(), StoreError> {
        self.conversation_room(id, held, more, STATUS_HEADROOM)
    }

    /// Refuses a new conversation whose init data (`init_bytes`, see [`meta_bytes`]) leaves no
    /// room, in its quota or in a store that uses `used`, for the events made of it (its first
    /// message, replayed events: about as many bytes again) and its status events.
    pub fn check_new_conversation(
        &self,
        id: &str,
        init_bytes: u64,
        used: u64,
    ) -> Result<(), StoreError> {
        let events = init_bytes.saturating_mul(2);
        self.conversation_room(id, 0, events, STATUS_HEADROOM)?;
        self.check_store(used, events.saturating_add(STATUS_HEADROOM))
    }

    fn conversation_room(
        &self,
        id: &str,
        held: u64,
        more: u64,
        headroom: u64,
    ) -> Result<(), StoreError> {
        let limit = self.max_bytes_per_conversation;
        let total = held.saturating_add(more);
        if limit == 0 || total.saturating_add(headroom) <= limit {
            return Ok(());
        }
        Err(StoreError::QuotaExceeded {
            quota: Quota::Conversation,
            message: format!(
                "Conversation {id} holds {held} bytes; {more} more would exceed its quota of \
                 {limit} bytes (limits.max_bytes_per_conversation{}); nothing was stored",
                if headroom > 0 {
                    format!(", less {headroom} bytes kept for status events")
                } else {
                    String::new()
                }
            ),
        })
    }

    /// Refuses `more` bytes for a store that uses `used`, past its quota.
    pub fn check_store(&self, used: u64, more: u64) -> Result<(), StoreError> {
        let limit = self.max_store_bytes;
        let total = used.saturating_add(more);
        if limit == 0 || total <= limit {
            return Ok(());
        }
        Err(StoreError::QuotaExceeded {
            quota: Quota::Store,
            message: format!(
                "The store would use {total} bytes, more than its quota of {limit} bytes \
                 (limits.max_store_bytes); nothing was stored. Delete conversations to free space"
            ),
        })
    }
}

/// Bytes of `max_bytes_per_conversation` that users' and runtimes' events leave for the
/// conversation's own status events.
pub const STATUS_HEADROOM: u64 = 16 * 1024;

/// A conversation's init data as the stores keep it (JSON).
pub fn encode_init(init: &crate::conversation::InitData) -> Result<String, StoreError> {
    serde_json::to_string(init)
        .map_err(|e| StoreError::Io(Failure::of(e).within("cannot encode init data")))
}

/// The bytes a conversation's metadata counts for against its quota: its init data as stored.
pub fn meta_bytes(init_json: &str) -> u64 {
    init_json.len() as u64
}

/// The bytes events count for against their conversation's quota: their stored JSON.
pub fn events_bytes(events: &[StoredEvent]) -> u64 {
    events.iter().map(|e| e.json.len() as u64).sum()
}

/// A conversation that exists, as [`Store::exists`] finds it: whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    /// Who created it; `None` when no key was configured.
    pub owner: Option<String>,
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

/// A user key as the store keeps it: never the key itself (see [`crate::keys`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    /// Unique; the owner of the conversations made with the key.
    pub name: String,
    /// Sees and touches every conversation.
    pub admin: bool,
    /// When it was added (the events' timestamp format).
    pub created_at: String,
}

/// What [`Store::lookup_key`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLookup {
    /// The key with the hash asked for, if there is one.
    pub key: Option<ApiKey>,
    /// Whether the store holds any user key at all.
    pub any: bool,
}

/// A conversation store. See the module docs for the promises every backend keeps.
pub trait Store: Send + Sync + 'static {
    /// Records a new conversation together with its first events (ids from 0) as one write:
    /// both or neither. `Exists` if the id is taken; the quotas count the init data, then the
    /// events, as a `create` followed by an `append` would.
    fn create_with_events(
        &self,
        meta: ConversationMeta,
        events: Vec<StoredEvent>,
    ) -> StoreFuture<()>;
    /// Records a new conversation with no events; `Exists` if the id is taken.
    fn create(&self, meta: ConversationMeta) -> StoreFuture<()> {
        self.create_with_events(meta, Vec::new())
    }
    /// Replaces a conversation's title; `false` when the id is unknown.
    fn set_title(&self, id: &ConversationId, title: &str) -> StoreFuture<bool>;
    /// Whether conversation `id` exists, and whose it is, in one indexed lookup (nothing else
    /// of it is read): what deciding whether a caller may see it needs.
    fn exists(&self, id: &ConversationId) -> StoreFuture<Option<Existing>>;
    /// Loads one conversation.
    fn get(&self, id: &ConversationId) -> StoreFuture<Option<ConversationRecord>>;
    /// A page of conversations, newest `created_at` first.
    fn list(&self, offset: usize, limit: usize) -> StoreFuture<Vec<ConversationMeta>>;
    /// A page of `owner`'s conversations, newest `created_at` first.
    fn list_owned(
        &self,
        owner: &str,
        offset: usize,
        limit: usize,
    ) -> StoreFuture<Vec<ConversationMeta>>;
    /// Appends events (ids continue the log densely) and moves `last_updated_at`.
    fn append(&self, id: &ConversationId, events: Vec<StoredEvent>) -> StoreFuture<()>;
    /// Reads events of one conversation.
    fn events(&self, id: &ConversationId, query: EventQuery) -> StoreFuture<Vec<StoredEvent>>;
    /// Removes a conversation and its events; `false` when the id is unknown.
    fn delete(&self, id: &ConversationId) -> StoreFuture<bool>;
    /// Completes once everything accepted so far is durable.
    fn flush(&self) -> StoreFuture<()>;
    /// The limits this store enforces.
    fn limits(&self) -> StoreLimits;
    /// The bytes the store uses now, as `max_store_bytes` counts them (the memory store: what
    /// its conversations hold; SQLite: the database pages in use). Cheap; never waits.
    fn used_bytes(&self) -> u64;
    /// The app settings saved for `user` (`""` when no session key owns them); `None` until
    /// the first save.
    fn settings(&self, user: &str) -> StoreFuture<Option<Value>>;
    /// Replaces `user`'s app settings.
    fn save_settings(&self, user: &str, settings: Value) -> StoreFuture<()>;
    /// Adds a user key by its hash; [`StoreError::KeyExists`] when the name is taken.
    fn add_key(&self, key: ApiKey, hash: String) -> StoreFuture<()>;
    /// Every user key, by name.
    fn list_keys(&self) -> StoreFuture<Vec<ApiKey>>;
    /// Removes the key named `name`; `false` when there is none.
    fn revoke_key(&self, name: &str) -> StoreFuture<bool>;
    /// The key whose hash is `hash` (none asked for: `None`), and whether any key exists.
    fn lookup_key(&self, hash: Option<&str>) -> StoreFuture<KeyLookup>;
    /// Whether any user key exists: `lookup_key(None).any`, which a backend may answer from
    /// a cache as long as it sees every completed `add_key`/`revoke_key` as `lookup_key`
    /// does (another process's included). Asked by every `/api` request on a server without
    /// a session key, so it should be cheap.
    fn any_key(&self) -> StoreFuture<bool> {
        let lookup = self.lookup_key(None);
        Box::pin(async move { Ok(lookup.await?.any) })
    }
    /// A cheap health check for readiness: `Ok` when the store can write now. Durable backends
    /// take their write path (lock included) without changing anything.
    fn probe(&self) -> StoreFuture<()> {
        self.flush()
    }
    /// Takes conversation `id` for this node (whether or not it exists yet), within `quota`
    /// when the conversation has a user. Single-node stores always grant the default [`Lease`].
    fn acquire(&self, _id: &ConversationId, _quota: Option<UserQuota>) -> StoreFuture<Acquired> {
        Box::pin(std::future::ready(Ok(Acquired::Owned(Lease::default()))))
    }
    /// [`Store::create_with_events`] under `lease`: [`StoreError::Fenced`] (nothing written)
    /// unless `lease` is still the conversation's current one. Single-node stores create.
    fn create_owned(
        &self,
        meta: ConversationMeta,
        _lease: Lease,
        events: Vec<StoredEvent>,
    ) -> StoreFuture<()> {
        self.create_with_events(meta, events)
    }
    /// [`Store::append`] under `lease`: [`StoreError::Fenced`] (nothing written) unless `lease`
    /// is still the conversation's current one. Single-node stores append.
    fn append_owned(
        &self,
        id: &ConversationId,
        _lease: Lease,
        events: Vec<StoredEvent>,
    ) -> StoreFuture<()> {
        self.append(id, events)
    }
    /// Gives `lease` on `id` back, after this node's last write under it, so that another node
    /// may take the conversation at once. Nothing happens if the lease is no longer current.
    fn release(&self, _id: &ConversationId, _lease: Lease) -> StoreFuture<()> {
        Box::pin(std::future::ready(Ok(())))
    }
    /// The node that owns conversation `id` now, if another live one does (single-node stores:
    /// never).
    fn owner(&self, _id: &ConversationId) -> StoreFuture<Option<NodeAddress>> {
        Box::pin(std::future::ready(Ok(None)))
    }
    /// Which of `ids` another live node owns now — each is live (starting or running) there —
    /// in one query (single-node stores: none).
    fn owned_elsewhere(&self, _ids: Vec<ConversationId>) -> StoreFuture<HashSet<ConversationId>> {
        Box::pin(std::future::ready(Ok(HashSet::new())))
    }
    /// Up to `limit` conversations that a node holds under a registration that expired or is
    /// gone (it died, or was fenced, holding them), in random order: free for this node to
    /// take over (single-node stores: none).
    fn orphaned(&self, _limit: usize) -> StoreFuture<Vec<Orphan>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
    /// Leaves the cluster (graceful shutdown, after the conversations stopped): whatever this
    /// node still owns is free for other nodes at once, and it takes nothing more. Nothing to
    /// do on single-node stores.
    fn leave(&self) -> StoreFuture<()> {
        Box::pin(std::future::ready(Ok(())))
    }
    /// This node's standing in the cluster of the nodes sharing the store, as it changes;
    /// `None` for single-node stores (always live).
    fn membership(&self) -> Option<tokio::sync::watch::Receiver<Membership>> {
        None
    }
}
