//! The actor system: one [`Supervisor`](supervisor::Supervisor) owning admission and the
//! registry, and one [`Conversation`](conversation::Conversation) actor per live conversation.
//!
//! Callers outside this module use the small handle types [`SupervisorHandle`] and
//! [`ConversationHandle`] and the read-only [`Registry`]; they never hold raw `Addr`s, so the
//! actor library stays an implementation detail of this module.

pub mod conversation;
pub mod messages;
pub mod rate_limit;
pub mod supervisor;
pub mod takeover;

mod handle;
mod shared;

pub use handle::{Census, ConversationHandle, SupervisorHandle};
pub use messages::{
    Admit, AdmitError, AdmitMode, ClientFrame, CloseReason, DeleteError, JoinReply, OpenError,
    Role, StopReason, Subscribed,
};
pub use rate_limit::ClientId;
pub use shared::{now_ms, Registry, RegistryEntry, Shared};
