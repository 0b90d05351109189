//! What runs behind a conversation: the [`Runtime`] trait and its implementations.
//!
//! A runtime is owned by its conversation actor and driven only from that actor's thread. It
//! reports through [`RuntimeSignal`]s: returned directly from a call when they happen at once
//! (the echo runtime), or sent later through the [`RuntimeSink`] when they happen
//! asynchronously (a start delay, an agent process). It only ever sees events that are already
//! durable, and it never assigns event ids: the conversation actor does.
//!
//! The seam to the conversation: [`RuntimeFactory`] is the one place that picks a runtime kind
//! from the settings (the conversation only asks it for one), and a runtime writes to its
//! [`RuntimeSink`], behind which any [`SignalTarget`] may sit: [`actor`] makes an actor's
//! address such a target, and is with [`pool`] (which starts agents on the actors' arbiters)
//! the only part that names the actor library. A runtime's own stop sequence (an agent's grace
//! periods) is bounded by that runtime, in [`Runtime::finished`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::conversation::{ConversationId, InitData};
use crate::events::{EventBody, StatusUpdate};
use crate::failure::Failure;
use crate::store::Store;

pub mod actor;
pub mod echo;
mod factory;
pub mod openhands;
pub mod pool;
pub mod process;
pub mod process_tree;
pub mod sandbox;

pub use actor::FromRuntime;
pub use echo::EchoRuntime;
pub use factory::RuntimeFactory;
pub use process::ProcessRuntime;

/// Something a runtime reports to its conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum RuntimeSignal {
    /// The runtime is ready for user events: the conversation becomes `RUNNING`. When the
    /// runtime manages the agent state itself, the conversation announces none of its own
    /// (no `awaiting_user_input` at ready).
    Ready { manages_agent_state: bool },
    /// A new event to stamp, store and broadcast.
    Event(EventBody),
    /// A new event the runtime names with a `ref` (acknowledged with its id once durable,
    /// see [`Runtime::acknowledge`]) or whose cause is named by an earlier event's `ref`.
    Referenced(Box<ReferencedEvent>),
    /// A status update to forward to clients (not stored).
    Status(StatusUpdate),
    /// The runtime failed or exited; the conversation stops with this error (its cause, when
    /// there is one, as its source: the system's error starting the agent, the store's reading
    /// its history; an exit is described in words, the agent's own stderr included).
    Failed(Failure),
}

impl RuntimeSignal {
    /// Ready, with the conversation announcing the agent state as usual.
    pub const READY: RuntimeSignal = RuntimeSignal::Ready {
        manages_agent_state: false,
    };
}

/// An event with the runtime's own references.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferencedEvent {
    pub body: EventBody,
    /// The runtime's name for this event, answered by [`Runtime::acknowledge`].
    pub reference: Option<Value>,
    /// The `ref` of an earlier event of this runtime that this one answers: becomes `cause`.
    pub cause_ref: Option<Value>,
}

/// The ids a runtime's recent `ref`s were given, so that a later event can name its cause by
/// one. Bounded: the oldest are forgotten beyond [`RefMap::CAPACITY`].
#[derive(Debug, Default)]
pub struct RefMap {
    ids: HashMap<String, u64>,
    order: VecDeque<String>,
}

impl RefMap {
    /// How many refs are remembered.
    pub const CAPACITY: usize = 4096;

    /// A ref's key: its JSON text, so that `7` and `"7"` are different refs.
    fn key(reference: &Value) -> String {
        reference.to_string()
    }

    pub fn remember(&mut self, reference: &Value, id: u64) {
        let key = Self::key(reference);
        if self.ids.insert(key.clone(), id).is_none() {
            self.order.push_back(key);
            if self.order.len() > Self::CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    pub fn resolve(&self, reference: &Value) -> Option<u64> {
        self.ids.get(&Self::key(reference)).copied()
    }
}

/// What receives a runtime's later signals: its conversation (see [`actor`] for an actor's
/// address).
pub trait SignalTarget: 'static {
    /// Delivers a signal without waiting; dropped silently when the conversation is gone.
    fn send(&self, signal: RuntimeSignal);
    /// Delivers a signal and completes once the conversation has handled it (waiting for
    /// room first); false when the conversation is gone.
    fn deliver(&self, signal: RuntimeSignal) -> Pin<Box<dyn Future<Output = bool>>>;
}

/// Where a runtime sends signals that happen after the call that caused them returned.
#[derive(Clone)]
pub struct RuntimeSink(Arc<dyn SignalTarget + Send + Sync>);

impl RuntimeSink {
    pub fn new(target: impl SignalTarget + Send + Sync) -> Self {
        RuntimeSink(Arc::new(target))
    }

    /// Delivers a signal; dropped silently when the conversation is already gone.
    ///
    /// This does not wait for the conversation: use it for the occasional signal (ready, a
    /// failure), not for a stream of them.
    pub fn send(&self, signal: RuntimeSignal) {
        self.0.send(signal);
    }

    /// Delivers a signal and waits until the conversation has handled it (waiting for room in
    /// its mailbox first): a producer that awaits each delivery is paced by its conversation
    /// and never piles up signals. False when the conversation is gone.
    pub async fn deliver(&self, signal: RuntimeSignal) -> bool {
        self.0.deliver(signal).await
    }
}

/// What a runtime is started with.
pub struct RuntimeStart<'a> {
    pub conversation_id: &'a ConversationId,
    pub trigger: &'a str,
    pub init: &'a InitData,
    pub sink: RuntimeSink,
    /// The conversation's store, to read its history from.
    pub store: Arc<dyn Store>,
    /// The conversation's history: every event with a smaller id is durable (in `store`) and
    /// was there before this start (0 for a new conversation).
    pub history_before: u64,
    /// The user's saved LLM and agent settings (`GET /api/settings` minus the UI-only fields,
    /// the API key included), `None` when nothing was saved or the runtime does not use them.
    pub settings: Option<serde_json::Value>,
}

/// The behaviour behind one conversation.
pub trait Runtime: 'static {
    /// Starts the runtime; it reports [`RuntimeSignal::Ready`] when it can take events.
    fn start(&mut self, start: RuntimeStart<'_>) -> Vec<RuntimeSignal>;
    /// A durable user event (with its id), delivered only after `Ready`.
    fn on_user_event(&mut self, id: u64, event: &EventBody) -> Vec<RuntimeSignal>;
    /// A [`ReferencedEvent`] with a `reference` is durable under `id`, stamped `timestamp`.
    fn acknowledge(&mut self, _reference: &Value, _id: u64, _timestamp: &str) {}
    /// Stops the runtime. Must not block; later signals are ignored.
    fn stop(&mut self);
    /// After [`Runtime::stop`]: completes once everything the runtime started is gone (an agent
    /// process reaped). The conversation reports itself gone only after this, so a restarted
    /// conversation never overlaps its previous runtime. `None`: nothing to wait for. The
    /// runtime bounds it itself (an agent's grace periods): the conversation waits for it whole.
    fn finished(&mut self) -> Option<Pin<Box<dyn Future<Output = ()>>>> {
        None
    }
}
