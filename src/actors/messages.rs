//! Messages between the HTTP/socket layers, the supervisor and conversation actors.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::rate_limit::ClientId;
use crate::conversation::{ConversationId, ConversationMeta, ConversationStatus};
use crate::events::{EventBody, StoredEvent};
use crate::failure::Failure;
use crate::store::StoreError;

/// How the supervisor should bring up a conversation that is not live.
#[derive(Debug, Clone)]
pub enum AdmitMode {
    /// A brand-new id: create it with this metadata, no lookup needed.
    Fresh(Box<ConversationMeta>),
    /// A client-chosen id: resume it if stored, otherwise create it with this metadata.
    LoadOrCreate(Box<ConversationMeta>),
    /// Resume a stored conversation; fail with `NotFound` if there is none.
    LoadOnly,
}

/// Whether the request that admitted a conversation is the one whose metadata created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Creator,
    Joiner,
}

/// Why the supervisor refused to admit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("too many conversations are running")]
    TooMany,
    /// The client's creation rate limit: a token is back after this many seconds.
    #[error("too many new conversations from this client; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The conversation's owner has `limits.max_running_per_user` conversations running.
    #[error(
        "Too many conversations of this user at once: at most {limit} may run \
         (limits.max_running_per_user). Stop one, or wait until one stops"
    )]
    UserLimit { limit: usize },
    #[error("conversation not found")]
    NotFound,
}

/// Why [`SupervisorHandle::open`](super::SupervisorHandle::open) could not open a
/// conversation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// The supervisor refused to admit it.
    #[error(transparent)]
    Admit(#[from] AdmitError),
    /// The conversation answered with an error that a retry does not cure.
    #[error(transparent)]
    Conversation(#[from] ConversationError),
    /// Every attempt raced with a stopping incarnation; the last answer.
    #[error("the conversation is restarting; try again ({0})")]
    Restarting(ConversationError),
}

/// Ask the supervisor for a live conversation.
#[derive(Clone)]
pub struct Admit {
    pub id: ConversationId,
    pub mode: AdmitMode,
    /// Who asks, when bringing the conversation up counts against their creation rate limit
    /// (`POST /api/conversations`); `None` for starts, user actions and sockets.
    pub client: Option<ClientId>,
    /// The conversation's owner as the caller found it (or, for a new one, will make it):
    /// a live conversation of another owner is not joined, a stored one not loaded.
    pub owner: Option<Arc<str>>,
    /// The request carries an initial message (told back when it joins instead of creating).
    pub brought_initial_message: bool,
}

/// Delete a conversation and its events. Decided by the supervisor in order with every
/// admission for the same id: a join admitted before it is stopped and deleted with it, one
/// after it finds no conversation (or creates a new one).
#[derive(Message)]
#[rtype(result = "Result<bool, DeleteError>")]
pub struct Delete {
    pub id: ConversationId,
}

/// Why a delete did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeleteError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Stop every conversation; resolves when all have stopped, or after `within`, when whatever is
/// left (e.g. agents inside their grace periods) has been ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown {
    pub within: std::time::Duration,
}

/// This node fenced itself from its cluster: every conversation stops without writing.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fence;

/// Why a conversation stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// `POST …/stop`.
    User,
    /// `DELETE …`: the conversation's data is removed after it stops.
    Deleted,
    /// Idle past the timeout with no client attached.
    Idle,
    /// STARTING outlived its deadline.
    StartTimeout,
    /// Evicted to make room under the `evict_oldest` policy.
    Evicted,
    /// Its runtime failed.
    RuntimeFailed(Failure),
    /// The store failed (its error); nothing more can be made durable.
    StoreFailed(StoreError),
    /// The server is shutting down.
    Shutdown,
    /// This node fenced itself from its cluster: nothing more is written, clients are
    /// disconnected so that they reconnect to another node.
    Fenced,
}

impl StopReason {
    /// A fixed word for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            StopReason::User => "user",
            StopReason::Deleted => "deleted",
            StopReason::Idle => "idle",
            StopReason::StartTimeout => "start_timeout",
            StopReason::Evicted => "evicted",
            StopReason::RuntimeFailed(_) => "runtime_failed",
            StopReason::StoreFailed(_) => "store_failed",
            StopReason::Shutdown => "shutdown",
            StopReason::Fenced => "fenced",
        }
    }

    /// Why, in words (the stopped agent state's reason, the sockets' close reason).
    pub fn describe(&self) -> std::borrow::Cow<'_, str> {
        let why = match self {
            StopReason::User => "stopped by user",
            StopReason::Deleted => "conversation deleted",
            StopReason::Idle => "idle timeout",
            StopReason::StartTimeout => "runtime did not start before the deadline",
            StopReason::Evicted => "too many conversations",
            StopReason::RuntimeFailed(why) => why.message(),
            StopReason::StoreFailed(error) => return error.to_string().into(),
            StopReason::Shutdown => "server shutting down",
            StopReason::Fenced => "this node lost its cluster membership",
        };
        why.into()
    }
}

/// Answer to a [`Join`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinReply {
    pub status: ConversationStatus,
    /// Set when the request's own initial data was not applied.
    pub message: Option<String>,
}

/// Why a conversation refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversationError {
    #[error("conversation not found")]
    NotFound,
    #[error("the conversation is stopping")]
    Stopping,
    #[error("{0}")]
    Refused(String),
    #[error("storage error: {0}")]
    Storage(StoreError),
    /// A byte quota would be exceeded; nothing was stored.
    #[error("{1}")]
    OverQuota(crate::store::Quota, String),
    /// Another live node of the cluster owns the conversation.
    #[error("conversation is owned by cluster node {} ({})", .0.node_id, .0.url)]
    Elsewhere(crate::store::NodeAddress),
    /// Refused as the supervisor refuses an admission, by a limit kept across the cluster's
    /// nodes: [`AdmitError::UserLimit`] when its user already has `limits.max_running_per_user`
    /// conversations owned by live nodes (the store's count). Nothing was written.
    #[error(transparent)]
    Admit(AdmitError),
}

impl From<crate::store::StoreError> for ConversationError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::QuotaExceeded { quota, message } => {
                ConversationError::OverQuota(quota, message)
            }
            other => ConversationError::Storage(other),
        }
    }
}

/// A request (POST) joins the conversation.
#[derive(Message)]
#[rtype(result = "Result<JoinReply, ConversationError>")]
pub struct Join {
    pub role: Role,
    /// The request carried an initial message that joining will not apply.
    pub brought_initial_message: bool,
}

/// A user action (socket `oh_user_action` or `POST …/events`).
#[derive(Message)]
#[rtype(result = "Result<(), ConversationError>")]
pub struct UserAction(pub EventBody);

/// Stop the conversation; resolves once it has fully stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop(pub StopReason);

/// Rename the conversation.
#[derive(Message)]
#[rtype(result = "Result<(), ConversationError>")]
pub struct SetTitle(pub String);

/// What a conversation sends to an attached client.
#[derive(Debug, Clone)]
pub enum ClientFrame {
    /// A durable event.
    Event(StoredEvent),
    /// A payload that is not a stored event (status update, refusal).
    Payload(Arc<str>),
    /// The conversation detaches the client after everything before this.
    Close(CloseReason),
}

/// Why a conversation closed a client's attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    Stopped(String),
    /// The node fenced itself: the transport closes without saying goodbye (no Socket.IO
    /// `41`), so that the client reconnects, to another node.
    Fenced,
}

/// Attach a client. Events with id below `Subscribed::replay_before` are already durable and
/// must be read from the store; every later event arrives through `sink`.
#[derive(Message)]
#[rtype(result = "Result<Subscribed, ConversationError>")]
pub struct Subscribe {
    pub sink: mpsc::Sender<ClientFrame>,
}

/// Answer to a [`Subscribe`].
#[derive(Debug, Clone)]
pub struct Subscribed {
    pub subscriber_id: u64,
    /// Every event with a smaller id is in the store; later ones come through the sink.
    pub replay_before: u64,
    /// The conversation's latest status update, sent after the replay.
    pub last_status: Option<Arc<str>>,
}

/// Detach a client.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe(pub u64);
