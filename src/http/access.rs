//! Which conversations a caller may see: every route and both sockets find a conversation
//! through [`find`] (or [`visible`]), which applies the one rule, [`Caller::may_see`].
//!
//! A conversation that exists but belongs to another user is answered exactly as one that does
//! not exist — `null`, 404, `false`, `Conversation not found`, whatever the route says for an
//! unknown id — so a user learns nothing about others' conversations. The one exception is
//! creating a conversation with a client-chosen id that another user's conversation has:
//! ids are global, so that create cannot succeed, and it is refused with 409 (saying only
//! that the id is taken) instead of joining it.
//!
//! The owner found here goes with every admission ([`crate::actors::SupervisorHandle::admit`]),
//! so that should the id be deleted and taken by another user in between, the supervisor does
//! not join and the conversation actor does not load what is no longer the caller's.

use std::sync::Arc;

use crate::conversation::{ConversationId, ConversationStatus};
use crate::http::auth::Caller;
use crate::http::{ApiError, AppState};

/// A conversation's owner (`None`: made without a user key).
pub type Owner = Option<Arc<str>>;

/// What [`find`] found for an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// It exists and the caller may see it; its owner.
    Visible(Owner),
    /// It exists and belongs to someone else.
    Hidden,
    /// No such conversation.
    Missing,
}

/// Looks conversation `id` up for `caller`: live ones in the registry (no store read), the
/// others in the store ([`crate::store::Store::exists`]: one indexed lookup, the record is not
/// loaded).
pub async fn find(
    state: &AppState,
    caller: &Caller,
    id: &ConversationId,
) -> Result<Found, ApiError> {
    let owner = match state.supervisor.shared(id) {
        Some(shared) => shared.owner().cloned(),
        None => match state.store.exists(id).await? {
            Some(existing) => existing.owner.map(Arc::from),
            None => return Ok(Found::Missing),
        },
    };
    Ok(if caller.may_see(owner.as_deref()) {
        Found::Visible(owner)
    } else {
        Found::Hidden
    })
}

/// The owner of `id` when it exists and `caller` may see it; `None` for an unknown id and
/// for another user's conversation alike.
pub async fn visible(
    state: &AppState,
    caller: &Caller,
    id: &ConversationId,
) -> Result<Option<Owner>, ApiError> {
    Ok(match find(state, caller, id).await? {
        Found::Visible(owner) => Some(owner),
        Found::Hidden | Found::Missing => None,
    })
}

/// Refuses a request for conversation `id` when another live cluster node owns it and this
/// node does not run it: [`ApiError::Elsewhere`], which [`crate::http::forward`] sends on to the
/// owner for a command, and which the socket routes splice to the owner (or answer 503 without
/// a cluster key).
///
/// Only a conversation that runs here (`RUNNING`) answers without the store. One still
/// `STARTING` here may be only asking the store for ownership — for the takeover sweep, a
/// command or another socket — while another node holds it; taken here, the request would be
/// refused once that ask fails (a socket closed with 1012 and made to reconnect), so the store
/// decides: a conversation this node acquired has no other owner.
pub async fn owned_here(state: &AppState, id: &ConversationId) -> Result<(), ApiError> {
    let running = state
        .supervisor
        .live(id)
        .is_some_and(|c| c.shared().status() == ConversationStatus::Running);
    if running {
        return Ok(());
    }
    match state.store.owner(id).await? {
        Some(owner) => Err(ApiError::Elsewhere(id.to_string(), owner)),
        None => Ok(()),
    }
}
