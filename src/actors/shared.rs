//! State a conversation actor publishes for lock-free reads by other threads, and the registry
//! of live conversations.
//!
//! Only the conversation actor writes its [`Shared`]; only the supervisor inserts into or
//! removes from the [`Registry`]. Readers (HTTP handlers listing or describing conversations)
//! take no actor hop. Registry entries hold a `WeakAddr`, so an entry never keeps an actor alive.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::time::Instant;

use actix::WeakAddr;
use dashmap::DashMap;

use super::conversation::Conversation;
use crate::conversation::{ConversationId, ConversationStatus, RuntimeStatus};

fn status_from_u8(v: u8) -> ConversationStatus {
    match v {
        0 => ConversationStatus::Starting,
        1 => ConversationStatus::Running,
        _ => ConversationStatus::Stopped,
    }
}

fn runtime_status_from_u8(v: u8) -> RuntimeStatus {
    match v {
        0 => RuntimeStatus::Starting,
        1 => RuntimeStatus::Ready,
        _ => RuntimeStatus::Error,
    }
}

fn clock() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Milliseconds on a process-wide monotonic clock: tokio's, which is the system's monotonic
/// clock except on a runtime whose time a test has paused (so the conversations' timers and
/// the idleness they measure move together there).
pub fn now_ms() -> u64 {
    clock().elapsed().as_millis() as u64
}

/// What one conversation actor publishes.
#[derive(Debug)]
pub struct Shared {
    status: AtomicU8,
    runtime_status: AtomicU8,
    connections: AtomicU32,
    last_active_ms: AtomicU64,
    /// A turn is under way: a user message the agent has not yet answered by waiting for the
    /// user again (or finishing).
    in_turn: AtomicBool,
    /// Its owner, fixed when the supervisor admitted it (the actor refuses to load a stored
    /// conversation of another owner).
    owner: Option<Arc<str>>,
}

impl Shared {
    /// The state of a conversation just admitted for `owner`.
    pub(super) fn new(owner: Option<Arc<str>>) -> Self {
        Shared {
            status: AtomicU8::new(0),
            runtime_status: AtomicU8::new(RuntimeStatus::Starting as u8),
            connections: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(now_ms()),
            in_turn: AtomicBool::new(false),
            owner,
        }
    }

    /// Whose conversation it is (`None`: made without a user key).
    pub fn owner(&self) -> Option<&Arc<str>> {
        self.owner.as_ref()
    }

    pub fn status(&self) -> ConversationStatus {
        status_from_u8(self.status.load(Ordering::Acquire))
    }

    pub(super) fn set_status(&self, status: ConversationStatus) {
        self.status.store(status as u8, Ordering::Release);
    }

    pub fn runtime_status(&self) -> RuntimeStatus {
        runtime_status_from_u8(self.runtime_status.load(Ordering::Acquire))
    }

    pub(super) fn set_runtime_status(&self, status: RuntimeStatus) {
        self.runtime_status.store(status as u8, Ordering::Release);
    }

    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    pub(super) fn set_connections(&self, n: usize) {
        self.connections
            .store(u32::try_from(n).unwrap_or(u32::MAX), Ordering::Release);
    }

    pub fn last_active_ms(&self) -> u64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }

    pub(super) fn touch(&self) {
        self.last_active_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn in_turn(&self) -> bool {
        self.in_turn.load(Ordering::Acquire)
    }

    pub(super) fn set_in_turn(&self, in_turn: bool) {
        self.in_turn.store(in_turn, Ordering::Release);
    }

    /// Whether eviction may stop it: live, no client attached and no turn under way.
    pub fn evictable(&self) -> bool {
        self.status() != ConversationStatus::Stopped && self.connections() == 0 && !self.in_turn()
    }
}

/// One live conversation in the registry.
#[derive(Clone)]
pub struct RegistryEntry {
    pub(super) addr: WeakAddr<Conversation>,
    pub(super) generation: u64,
    pub shared: Arc<Shared>,
}

/// Live conversations by id. Written by the supervisor only; readable from any thread.
pub type Registry = DashMap<ConversationId, RegistryEntry>;
