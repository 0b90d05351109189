//! The conversation actor: the single writer of one conversation.
//!
//! It owns the conversation's lifecycle — one `Phase`: starting, running, then stopping for one
//! `StopReason` (or ended without ever running: not found, owned elsewhere, its user at the
//! cluster's per-user limit, load failed), from
//! which its status (`STARTING` → `RUNNING` → `STOPPED`) follows — its event ids and
//! timestamps, its subscribers (attached clients) and its runtime. Its promises:
//!
//! - **Own, then load.** Before loading (or creating) its conversation the actor acquires it
//!   from the store ([`Store::acquire`]); when another live cluster node owns it, every request
//!   learns which ([`ConversationError::Elsewhere`]) and the actor stops; so it does when its
//!   user already has `limits.max_running_per_user` conversations owned across the cluster
//!   ([`AdmitError::UserLimit`], nothing written). Everything it writes is
//!   written under that lease, and a write the store fences stops it without writing anything
//!   more; the lease is given back once all it wrote is durable (or at once when it stops).
//! - **Persist, then broadcast.** Every event gets the next dense id, goes to the store, and is
//!   released to clients and the runtime only once the store confirmed it — in id order, with
//!   status payloads kept in order between them (the `outbox`). A user action is answered only
//!   then too: an accepted one is durable.
//! - **A new conversation is one write.** Its first events (`loading`, replayed history, the
//!   initial message, and what a runtime that is ready at once adds) are stamped and its runtime
//!   started before anything is stored; then the conversation and those events go to the store
//!   as one `create_with_events`, and nothing is released, nor the request that created it
//!   answered, before that write is durable. Until then later events wait for it too.
//! - **Subscribe, then replay, then live.** A subscriber is told `replay_before`: every event
//!   with a smaller id is durable (read it from the store); every later one reaches it through
//!   its bounded sink, exactly once. A subscriber whose sink is full is dropped, which closes
//!   its channel: a slow client never grows the server's memory.
//! - **One teardown path.** Stop, delete, idle, start deadline, eviction, runtime or store
//!   failure and shutdown all go through [`Conversation::begin_stop`]: status `STOPPED`, the
//!   `agent_state_changed: stopped` event (and the reason's status update) delivered to
//!   clients, then their attachments closed (callers of `Stop` are answered here), then the
//!   runtime's own stop sequence runs out (an agent's grace periods), then the actor stops and
//!   reports that it is gone — so a restarted conversation never overlaps its previous
//!   runtime. A deleted conversation's data is removed by the supervisor after that report,
//!   never by the actor.
//! - **Turns are published.** A user message opens a turn; the agent announcing that it waits
//!   for the user (or finished, failed, paused, stopped) closes it. Eviction never stops a
//!   conversation with a client attached or a turn under way, and declines a `Stop(Evicted)`
//!   that arrives after one began.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::messages::*;
use super::shared::{now_ms, Shared};
use super::supervisor::Supervision;
use crate::config::Settings;
use crate::conversation::{
    ConversationId, ConversationMeta, ConversationRecord, ConversationStatus, RuntimeStatus,
};
use crate::events::{self, EventBody, Source, StatusUpdate, StoredEvent};
use crate::ops::metrics::metrics;
use crate::runtime::{
    FromRuntime, RefMap, ReferencedEvent, Runtime, RuntimeFactory, RuntimeSignal, RuntimeSink,
    RuntimeStart,
};
use crate::store::{encode_init, meta_bytes, Acquired, Lease, Store, StoreError, UserQuota};

/// What leaves the actor, in order.
enum Outgoing {
    /// An event, released once durable. `for_runtime` carries user events the runtime must see;
    /// `ack` the runtime's `ref` for the event and its timestamp, acknowledged once durable.
    Event {
        event: StoredEvent,
        for_runtime: Option<Box<EventBody>>,
        ack: Option<Box<(serde_json::Value, String)>>,
    },
    /// A non-stored payload for clients.
    Payload(Arc<str>),
    /// Close every attachment (the last step of teardown).
    CloseAll(CloseReason),
}

/// Why an event was not emitted.
enum NotEmitted {
    /// The event limit is reached, or the store failed.
    Full,
    /// It would exceed a byte quota (user and runtime content only; the conversation's own
    /// status events may use the headroom the quota keeps for them).
    OverQuota(StoreError),
}

/// Where a loaded conversation comes from.
enum Origin {
    /// The store.
    Stored,
    /// This incarnation creates it; `meta` is what to store.
    New {
        meta: Box<ConversationMeta>,
        taken_loads: bool,
    },
}

/// The request whose admission started this incarnation: how to bring the conversation up, and
/// its join, answered once the conversation has loaded (or failed to) so that the request needs
/// no `Join` message of its own.
pub(super) struct Admission {
    pub mode: AdmitMode,
    pub join: Join,
    pub reply: oneshot::Sender<Result<JoinReply, ConversationError>>,
}

type FirstJoin = (Join, oneshot::Sender<Result<JoinReply, ConversationError>>);

/// Where an incarnation is in its life; the status clients see follows from it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Loading or creating the conversation and starting its runtime (`STARTING`).
    Starting,
    /// Its runtime is ready (`RUNNING`).
    Running,
    /// It never ran and goes away with nothing to tear down: not found, owned by another
    /// node, or its load failed (`STOPPED`).
    Ended,
    /// On the one teardown path ([`Conversation::begin_stop`]) for this reason (`STOPPED`).
    Stopping(StopReason),
}

impl Phase {
    fn status(&self) -> ConversationStatus {
        match self {
            Phase::Starting => ConversationStatus::Starting,
            Phase::Running => ConversationStatus::Running,
            Phase::Ended | Phase::Stopping(_) => ConversationStatus::Stopped,
        }
    }

    fn is_stopping(&self) -> bool {
        matches!(self, Phase::Stopping(_))
    }
}

pub struct Conversation {
    id: ConversationId,
    generation: u64,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    store: Arc<dyn Store>,
    supervision: Supervision,
    /// Makes its runtime at each start.
    runtimes: RuntimeFactory,
    /// Keeps the mailbox open until the actor decides to stop (registry entries are weak).
    self_addr: Option<Addr<Conversation>>,
    mode: Option<AdmitMode>,
    first_join: Option<FirstJoin>,
    meta: Option<ConversationMeta>,
    /// Whether `meta` is in the store yet (until then a title goes into the create itself).
    meta_stored: bool,
    /// Whether this incarnation created the conversation from the admitting request's data.
    created: bool,
    phase: Phase,
    next_id: u64,
    /// The bytes the conversation holds against its quota, counting what is not durable yet.
    bytes: u64,
    /// Every id below this is durable.
    durable_before: u64,
    /// The user actions waiting for their event to be durable (by event id, ascending) before
    /// they are answered.
    durable_waiters: VecDeque<(u64, oneshot::Sender<Result<(), ConversationError>>)>,
    /// Stamped events not yet handed to the store.
    unsent: Vec<StoredEvent>,
    outbox: VecDeque<Outgoing>,
    subscribers: HashMap<u64, mpsc::Sender<ClientFrame>>,
    next_subscriber: u64,
    runtime: Option<Box<dyn Runtime>>,
    /// Durable user events waiting for the runtime to become ready.
    runtime_backlog: Vec<(u64, EventBody)>,
    /// The ids of the current runtime's `ref`s (allocated only once it names an event).
    runtime_refs: Option<Box<RefMap>>,
    agent_state: &'static str,
    last_status: Option<Arc<str>>,
    store_failed: bool,
    stop_waiters: Vec<oneshot::Sender<()>>,
    last_activity_ms: u64,
    /// Why loading from the store failed, told to every request until the actor stops.
    load_error: Option<StoreError>,
    /// Why the store did not grant the conversation to this node (another node owns it, or its
    /// user is at the cluster's limit), told to every request.
    not_granted: Option<ConversationError>,
    /// This node's hold on the conversation, taken before loading it; every write is made
    /// under it, and it is given back (once) when the conversation stops.
    lease: Option<Lease>,
    /// The STARTING deadline, cancelled once the runtime is ready.
    start_deadline: Option<SpawnHandle>,
    /// Completes once the stopped runtime has released everything (see `Runtime::finished`).
    runtime_finished: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>,
    /// The user's saved app settings for the runtime's start (process runtime only).
    user_settings: Option<serde_json::Value>,
    /// Entered while the actor works, so every line logged below it names the conversation.
    span: tracing::Span,
    /// When this incarnation was admitted (for the start duration).
    admitted_at: std::time::Instant,
}

impl Conversation {
    /// Its runtimes made by `runtimes` (the supervisor's, with the warm pool) rather than by a
    /// factory of its own without one.
    pub(super) fn with_runtimes(mut self, runtimes: RuntimeFactory) -> Self {
        self.runtimes = runtimes;
        self
    }

    pub(super) fn new(
        id: ConversationId,
        generation: u64,
        admission: Admission,
        shared: Arc<Shared>,
        settings: Arc<Settings>,
        store: Arc<dyn Store>,
        supervision: Supervision,
    ) -> Self {
        Conversation {
            runtimes: RuntimeFactory::new(settings.clone(), None),
            generation,
            first_join: Some((admission.join, admission.reply)),
            meta_stored: false,
            shared,
            settings,
            store,
            supervision,
            self_addr: None,
            mode: Some(admission.mode),
            meta: None,
            created: false,
            phase: Phase::Starting,
            next_id: 0,
            bytes: 0,
            durable_before: 0,
            durable_waiters: VecDeque::new(),
            unsent: Vec::new(),
            outbox: VecDeque::new(),
            subscribers: HashMap::new(),
            next_subscriber: 0,
            runtime: None,
            runtime_backlog: Vec::new(),
            runtime_refs: None,
            agent_state: "loading",
            last_status: None,
            store_failed: false,
            stop_waiters: Vec::new(),
            last_activity_ms: now_ms(),
            load_error: None,
            not_granted: None,
            lease: None,
            start_deadline: None,
            runtime_finished: None,
            user_settings: None,
            // A root span: the conversation outlives the request that may be starting it here.
            span: tracing::info_span!(parent: None, "conversation", conversation_id = %id),
            admitted_at: std::time::Instant::now(),
            id,
        }
    }

    /// `NotFound`, or the storage error, when there is no conversation to talk to.
    fn check_loaded(&self) -> Result<(), ConversationError> {
        if let Some(e) = &self.load_error {
            return Err(e.clone().into());
        }
        if let Some(e) = &self.not_granted {
            return Err(e.clone());
        }
        if self.meta.is_none() {
            return Err(ConversationError::NotFound);
        }
        Ok(())
    }

    fn touch(&mut self) {
        self.last_activity_ms = now_ms();
        self.shared.touch();
    }

    fn set_phase(&mut self, phase: Phase) {
        self.shared.set_status(phase.status());
        self.phase = phase;
    }

    // ---- events -------------------------------------------------------------------------

    /// Stamps an event and queues it for persistence; false when the log is full. A user
    /// event goes to the runtime once durable.
    fn emit(&mut self, body: EventBody) -> bool {
        let for_runtime = body.source == Source::User;
        self.emit_event(body, for_runtime, None, false).is_ok()
    }

    /// Stamps an event and queues it for persistence: its id, or why not. `ack`: the runtime's
    /// `ref` for it, acknowledged once the event is durable. `content`: the event is a user's
    /// or the runtime's, held to the byte quotas before anything is queued.
    fn emit_event(
        &mut self,
        body: EventBody,
        for_runtime: bool,
        ack: Option<serde_json::Value>,
        content: bool,
    ) -> Result<u64, NotEmitted> {
        if self.store_failed {
            return Err(NotEmitted::Full);
        }
        if self.next_id >= self.settings.limits.max_events_per_conversation {
            warn!("event limit reached; event dropped");
            return Err(NotEmitted::Full);
        }
        let id = self.next_id;
        let timestamp = events::event_timestamp();
        let event = body.stamp(id, &timestamp);
        let size = event.json.len() as u64;
        if content {
            let limits = self.store.limits();
            let fits = limits
                .check_content(&self.id, self.bytes, size)
                .and_then(|()| limits.check_store(self.store.used_bytes(), size));
            if let Err(e) = fits {
                warn!(error = %e, "event over quota; dropped");
                return Err(NotEmitted::OverQuota(e));
            }
        }
        if let Some(state) = body.announced_agent_state() {
            self.agent_state = events::AGENT_STATES
                .iter()
                .copied()
                .find(|s| *s == state)
                .unwrap_or("unknown");
            if let Some(in_turn) = turn_after(state) {
                self.shared.set_in_turn(in_turn);
            }
        } else if body.source == Source::User && body.action_name() == Some("message") {
            // The agent owes an answer: a turn is under way until it waits for the user again.
            self.shared.set_in_turn(true);
        }
        self.next_id += 1;
        self.bytes += size;
        let title = body
            .user_message_content()
            .and_then(events::title_from_message);
        let for_runtime = for_runtime.then(|| Box::new(body));
        let ack = ack.map(|reference| Box::new((reference, timestamp)));
        self.unsent.push(event.clone());
        self.outbox.push_back(Outgoing::Event {
            event,
            for_runtime,
            ack,
        });
        if let Some(title) = title {
            self.auto_title(title);
        }
        self.touch();
        Ok(id)
    }

    /// Titles the conversation from its first non-blank user message while it still has its
    /// default title, as OpenHands does without an LLM: stored, and told to attached clients
    /// (after the message itself) as the `conversation_title` status update.
    fn auto_title(&mut self, title: String) {
        let Some(meta) = self.meta.as_mut() else {
            return;
        };
        if meta.title != events::default_title(&self.id) {
            return;
        }
        meta.title = title.clone();
        if self.meta_stored {
            let id = self.id.clone();
            let stored = self.store.set_title(&self.id, &title);
            actix::spawn(async move {
                if let Err(e) = stored.await {
                    warn!(conversation_id = %id, error = %e, "cannot store the conversation's title");
                }
            });
        }
        self.publish_status(StatusUpdate::title(&self.id, &title));
    }

    /// Queues a status payload for clients, after every event emitted before it.
    fn publish_status(&mut self, update: StatusUpdate) {
        let json = update.to_json();
        if update.conversation_title.is_none() {
            self.last_status = Some(json.clone());
        }
        self.outbox.push_back(Outgoing::Payload(json));
    }

    /// Hands everything emitted so far to the store as one append (a conversation not stored
    /// yet keeps it for its create).
    fn commit(&mut self, ctx: &mut Context<Self>) {
        if !self.meta_stored {
            return;
        }
        if self.unsent.is_empty() {
            self.flush(ctx);
            return;
        }
        let batch = std::mem::take(&mut self.unsent);
        let upto = batch.last().map_or(0, |e| e.id + 1);
        let count = batch.len() as u64;
        let lease = self.lease.unwrap_or_default();
        let fut = self.store.append_owned(&self.id, lease, batch);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let _span = act.span.clone().entered();
            match res {
                Ok(()) => {
                    metrics().events_appended.inc_by(count);
                    act.mark_durable(upto);
                    act.flush(ctx);
                }
                Err(e) => act.on_store_failure(e, ctx),
            }
        }));
        self.flush(ctx);
    }

    /// Releases, in order, everything at the front of the outbox that may leave.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        let mut emitted = false;
        while let Some(front) = self.outbox.front() {
            if let Outgoing::Event { event, .. } = front {
                if event.id >= self.durable_before {
                    break;
                }
            }
            match self.outbox.pop_front() {
                Some(Outgoing::Event {
                    event,
                    for_runtime,
                    ack,
                }) => {
                    self.broadcast(ClientFrame::Event(event.clone()));
                    if let (Some(ack), Some(rt)) = (ack, self.runtime.as_mut()) {
                        rt.acknowledge(&ack.0, event.id, &ack.1);
                    }
                    if let Some(body) = for_runtime {
                        emitted |= self.hand_to_runtime(event.id, *body, ctx);
                    }
                }
                Some(Outgoing::Payload(json)) => self.broadcast(ClientFrame::Payload(json)),
                Some(Outgoing::CloseAll(reason)) => {
                    for (_, sink) in self.subscribers.drain() {
                        let _ = sink.try_send(ClientFrame::Close(reason.clone()));
                    }
                    self.shared.set_connections(0);
                    self.finish_stop(ctx);
                }
                None => break,
            }
        }
        if emitted {
            self.commit(ctx);
        } else if self.outbox.is_empty() && self.outbox.capacity() > 0 {
            // An idle conversation keeps no buffer around.
            self.outbox = VecDeque::new();
        }
    }

    fn broadcast(&mut self, frame: ClientFrame) {
        let mut dropped = Vec::new();
        for (sid, sink) in &self.subscribers {
            if let Err(e) = sink.try_send(frame.clone()) {
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    warn!(subscriber = sid, "client too slow; detached");
                }
                dropped.push(*sid);
            }
        }
        if !dropped.is_empty() {
            for sid in dropped {
                self.subscribers.remove(&sid);
            }
            self.shared.set_connections(self.subscribers.len());
        }
    }

    /// Gives a durable user event to the runtime (or keeps it until ready). True if that
    /// emitted new events.
    fn hand_to_runtime(&mut self, id: u64, body: EventBody, ctx: &mut Context<Self>) -> bool {
        if self.phase.is_stopping() {
            return false;
        }
        if self.phase != Phase::Running {
            self.runtime_backlog.push((id, body));
            return false;
        }
        let signals = match self.runtime.as_mut() {
            Some(rt) => rt.on_user_event(id, &body),
            None => return false,
        };
        self.apply_signals(signals, ctx)
    }

    /// Applies runtime signals; true if any event was emitted.
    fn apply_signals(&mut self, signals: Vec<RuntimeSignal>, ctx: &mut Context<Self>) -> bool {
        let mut emitted = false;
        for signal in signals {
            if self.phase.is_stopping() {
                break;
            }
            match signal {
                RuntimeSignal::Ready {
                    manages_agent_state,
                } => emitted |= self.on_ready(manages_agent_state, ctx),
                RuntimeSignal::Event(body) => {
                    self.emit_from_runtime(body, None, ctx);
                    emitted = true;
                }
                RuntimeSignal::Referenced(event) => {
                    let ReferencedEvent {
                        mut body,
                        reference,
                        cause_ref,
                    } = *event;
                    if let Some(cause_ref) = cause_ref {
                        let known = self
                            .runtime_refs
                            .as_ref()
                            .and_then(|r| r.resolve(&cause_ref));
                        let Some(cause) = known else {
                            warn!(%cause_ref, "agent event names an unknown cause ref; ignored");
                            self.publish_status(StatusUpdate::error(
                                crate::runtime::process::STATUS_AGENT_PROTOCOL_ERROR,
                                &format!(
                                    "The agent sent an event whose cause names the unknown ref {cause_ref}; it was ignored."
                                ),
                            ));
                            continue;
                        };
                        body.cause = Some(cause);
                    }
                    self.emit_from_runtime(body, reference, ctx);
                    emitted = true;
                }
                RuntimeSignal::Status(update) => {
                    if update.is_error() {
                        self.shared.set_runtime_status(RuntimeStatus::Error);
                    }
                    self.publish_status(update);
                }
                RuntimeSignal::Failed(why) => {
                    self.begin_stop(StopReason::RuntimeFailed(why), ctx);
                    emitted = true;
                }
            }
        }
        emitted
    }

    /// Stores an event the runtime produced (never handed back to it, whatever its source);
    /// remembers its `reference` for later causes. The event limit stops the conversation.
    fn emit_from_runtime(
        &mut self,
        body: EventBody,
        reference: Option<serde_json::Value>,
        ctx: &mut Context<Self>,
    ) {
        match self.emit_event(body, false, reference.clone(), true) {
            Ok(id) => {
                if let Some(reference) = reference {
                    self.runtime_refs
                        .get_or_insert_with(Default::default)
                        .remember(&reference, id);
                }
            }
            Err(NotEmitted::Full) => {
                self.begin_stop(StopReason::RuntimeFailed("event limit reached".into()), ctx)
            }
            Err(NotEmitted::OverQuota(e)) => self.begin_stop(
                StopReason::RuntimeFailed(crate::failure::Failure::of(e)),
                ctx,
            ),
        }
    }

    fn on_ready(&mut self, manages_agent_state: bool, ctx: &mut Context<Self>) -> bool {
        if self.phase != Phase::Starting {
            return false;
        }
        info!("runtime ready");
        metrics().started("ready", self.admitted_at.elapsed());
        if let Some(timer) = self.start_deadline.take() {
            ctx.cancel_future(timer);
        }
        self.set_phase(Phase::Running);
        self.shared.set_runtime_status(RuntimeStatus::Ready);
        self.publish_status(StatusUpdate::info(events::STATUS_READY));
        let backlog = std::mem::take(&mut self.runtime_backlog);
        let user_work_pending = !backlog.is_empty()
            || self.outbox.iter().any(|o| {
                matches!(
                    o,
                    Outgoing::Event {
                        for_runtime: Some(_),
                        ..
                    }
                )
            });
        let mut emitted = false;
        if !user_work_pending && !manages_agent_state {
            emitted = self.emit(EventBody::agent_state("awaiting_user_input", ""));
        }
        for (id, body) in backlog {
            emitted |= self.hand_to_runtime(id, body, ctx);
        }
        emitted
    }

    fn on_store_failure(&mut self, error: StoreError, ctx: &mut Context<Self>) {
        if let StoreError::Fenced(why) = &error {
            // Dropped: another node owns the conversation now; this incarnation writes nothing
            // more and stops.
            metrics().fenced_appends.inc();
            warn!(why = %why, "append fenced; another node owns the conversation");
        }
        if self.store_failed {
            return;
        }
        tracing::error!(%error, "store failed; stopping conversation");
        self.store_failed = true;
        self.drop_undurable(&error);
        self.shared.set_runtime_status(RuntimeStatus::Error);
        self.publish_status(StatusUpdate::error(
            events::STATUS_ERROR_RUNTIME_DISCONNECTED,
            &format!("storage failed: {error}"),
        ));
        self.begin_stop(StopReason::StoreFailed(error), ctx);
        self.flush(ctx);
    }

    /// Every event below `upto` is durable: the user actions waiting for one of them are
    /// answered.
    fn mark_durable(&mut self, upto: u64) {
        self.durable_before = self.durable_before.max(upto);
        while let Some((id, _)) = self.durable_waiters.front() {
            if *id >= self.durable_before {
                break;
            }
            if let Some((_, waiter)) = self.durable_waiters.pop_front() {
                let _ = waiter.send(Ok(()));
            }
        }
    }

    /// Forgets the events that are not durable yet: they are never shown to anyone, and the
    /// user actions waiting for them are answered with `error`.
    fn drop_undurable(&mut self, error: &StoreError) {
        for (_, waiter) in self.durable_waiters.drain(..) {
            let _ = waiter.send(Err(ConversationError::Storage(error.clone())));
        }
        let cutoff = self.durable_before;
        self.outbox
            .retain(|o| !matches!(o, Outgoing::Event { event, .. } if event.id >= cutoff));
        self.unsent.clear();
    }

    // ---- lifecycle ----------------------------------------------------------------------

    /// Loads the stored conversation; when there is none, creates it from `create` if given.
    /// `wait` holds back every other message until the conversation is loaded.
    fn load(&mut self, create: Option<Box<ConversationMeta>>, ctx: &mut Context<Self>) {
        let get = self.store.get(&self.id);
        ctx.wait(get.into_actor(self).map(move |res, act, ctx| {
            let _span = act.span.clone().entered();
            match res {
                // A stored conversation of another owner than the one admitted for is not
                // loaded (its id was deleted and taken again since the caller looked).
                Ok(Some(record))
                    if record.meta.owner.as_deref() != act.shared.owner().map(|o| &**o) =>
                {
                    act.not_found(ctx)
                }
                Ok(Some(record)) => act.resume(record, ctx),
                Ok(None) => match create {
                    Some(meta) => act.create(meta, true, ctx),
                    None => act.not_found(ctx),
                },
                Err(e) => act.load_failed(e, ctx),
            }
        }));
    }

    /// Creates the conversation. Its first events (`loading`, replayed history, the initial
    /// message, and whatever a runtime that is ready at once adds) are stamped and the runtime
    /// started before anything is written; then the conversation and those events are stored in
    /// one write, and released once it is durable. `taken_loads`: an id taken meanwhile (a
    /// client-chosen one) is loaded by a new incarnation instead.
    fn create(&mut self, meta: Box<ConversationMeta>, taken_loads: bool, ctx: &mut Context<Self>) {
        // A new conversation must have room for what it starts with: refused whole otherwise.
        let init_bytes = match encode_init(&meta.init) {
            Ok(init_json) => meta_bytes(&init_json),
            Err(e) => return self.load_failed(e, ctx),
        };
        let limits = self.store.limits();
        let room = limits.check_new_conversation(&self.id, init_bytes, self.store.used_bytes());
        if let Err(e) = room {
            return self.load_failed(e, ctx);
        }
        self.bytes = init_bytes;
        let init = meta.init.clone();
        self.meta = Some(*meta);
        self.emit(EventBody::agent_state("loading", ""));
        for value in &init.replay_events {
            match EventBody::from_value(value) {
                Ok(body) => {
                    // Replayed events are history, not new work for the runtime.
                    let _ = self.emit_event(body, false, None, false);
                }
                Err(e) => {
                    warn!(error = %e, "skipping replayed event")
                }
            }
        }
        // Replayed history is not a turn of this runtime.
        self.shared.set_in_turn(false);
        if init.initial_user_msg.is_some() || !init.image_urls.is_empty() {
            let content = init.initial_user_msg.as_deref().unwrap_or("");
            self.emit(EventBody::message(
                Source::User,
                content,
                serde_json::json!(init.image_urls),
                false,
            ));
        }
        // As stored: titled from the initial message, init data included (the runtime's start
        // takes it out of `self.meta`).
        let Some(stored) = self.meta.clone() else {
            return;
        };
        self.loaded(
            Origin::New {
                meta: Box::new(stored),
                taken_loads,
            },
            ctx,
        );
    }

    /// Stores the new conversation with everything stamped so far, in one write.
    fn store_new(
        &mut self,
        meta: Box<ConversationMeta>,
        taken_loads: bool,
        ctx: &mut Context<Self>,
    ) {
        let first = std::mem::take(&mut self.unsent);
        let upto = self.next_id;
        self.meta_stored = true;
        let lease = self.lease.unwrap_or_default();
        let stored = self.store.create_owned(*meta, lease, first);
        ctx.wait(stored.into_actor(self).map(move |res, act, ctx| {
            let _span = act.span.clone().entered();
            match res {
                Ok(()) => {
                    info!("conversation created");
                    act.created = true;
                    metrics().events_appended.inc_by(upto);
                    act.mark_durable(upto);
                    act.flush(ctx);
                    act.answer_first_join();
                }
                Err(StoreError::Exists(_)) if taken_loads => act.created_elsewhere(ctx),
                Err(e) => {
                    if matches!(e, StoreError::Fenced(_)) {
                        metrics().fenced_appends.inc();
                    }
                    act.end_runtime();
                    act.load_failed(e, ctx);
                }
            }
        }));
    }

    /// The client-chosen id was created meanwhile by someone else: this incarnation stops, and
    /// the requests waiting for it retry with one that loads the stored conversation.
    fn created_elsewhere(&mut self, ctx: &mut Context<Self>) {
        info!("created meanwhile elsewhere; loading it instead");
        self.end_runtime();
        self.unsent.clear();
        self.outbox.clear();
        self.set_phase(Phase::Stopping(StopReason::Shutdown));
        self.answer_first_join();
        ctx.stop();
    }

    /// Stops a runtime started for a conversation that will not run.
    fn end_runtime(&mut self) {
        if let Some(mut rt) = self.runtime.take() {
            rt.stop();
        }
        self.runtime_backlog.clear();
    }

    fn resume(&mut self, record: ConversationRecord, ctx: &mut Context<Self>) {
        info!(next_event_id = record.next_event_id, "conversation resumed");
        self.next_id = record.next_event_id;
        self.bytes = record.bytes;
        self.durable_before = record.next_event_id;
        self.meta = Some(record.meta);
        self.meta_stored = true;
        self.emit(EventBody::agent_state("loading", ""));
        self.loaded(Origin::Stored, ctx);
    }

    /// Drops what a create that did not happen had stamped.
    fn forget_unstored(&mut self) {
        self.meta = None;
        self.meta_stored = false;
        self.next_id = 0;
        self.bytes = 0;
        self.durable_before = 0;
        self.unsent.clear();
        self.outbox.clear();
        self.agent_state = "loading";
        self.shared.set_in_turn(false);
    }

    fn not_found(&mut self, ctx: &mut Context<Self>) {
        debug!("not found");
        self.set_phase(Phase::Ended);
        self.answer_first_join();
        ctx.stop();
    }

    /// The store did not grant the conversation (another live node owns it, or its user is at
    /// the cluster's limit): every request waiting here learns why.
    fn not_granted(&mut self, why: ConversationError, ctx: &mut Context<Self>) {
        debug!(%why, "not granted by the store");
        self.not_granted = Some(why);
        self.set_phase(Phase::Ended);
        self.answer_first_join();
        // Later requests need not wait for this incarnation to go: the supervisor forgets it
        // now (the next one asks the store again). It lingers briefly only so that the requests
        // already waiting here learn why.
        self.supervision.gone(&self.id, self.generation);
        ctx.run_later(Duration::from_millis(200), |_, ctx| ctx.stop());
    }

    fn load_failed(&mut self, error: StoreError, ctx: &mut Context<Self>) {
        tracing::error!(%error, "could not load conversation");
        self.forget_unstored();
        self.store_failed = true;
        self.load_error = Some(error);
        self.set_phase(Phase::Ended);
        self.answer_first_join();
        // Linger briefly so that the requests already waiting learn why.
        ctx.run_later(Duration::from_millis(200), |_, ctx| ctx.stop());
    }

    /// The conversation is loaded (or ready to be created): an agent process first gets the
    /// user's saved LLM/agent settings (the echo runtime has no use for them), then the runtime
    /// starts.
    fn loaded(&mut self, origin: Origin, ctx: &mut Context<Self>) {
        if !self.runtimes.wants_user_settings() {
            return self.start(origin, ctx);
        }
        let user = crate::conversation::settings::user_of(self.shared.owner().map(|o| &**o));
        let saved = self.store.settings(user);
        ctx.wait(saved.into_actor(self).map(|saved, act, ctx| {
            let _span = act.span.clone().entered();
            act.user_settings = match saved {
                Ok(Some(serde_json::Value::Object(map))) => {
                    Some(crate::conversation::settings::for_runtime(&map))
                }
                Ok(_) => None,
                Err(e) => {
                    warn!(error = %e, "cannot read the saved settings; starting without");
                    None
                }
            };
            act.start(origin, ctx);
        }));
    }

    fn start(&mut self, origin: Origin, ctx: &mut Context<Self>) {
        self.shared.set_runtime_status(RuntimeStatus::Starting);
        self.publish_status(StatusUpdate::info(events::STATUS_STARTING_RUNTIME));
        self.start_runtime(ctx);
        self.arm_start_deadline(ctx);
        self.arm_idle_timer(
            ctx,
            Duration::from_secs(self.settings.limits.idle_timeout_secs),
        );
        match origin {
            Origin::Stored => {
                self.commit(ctx);
                self.answer_first_join();
            }
            Origin::New { meta, taken_loads } => self.store_new(meta, taken_loads, ctx),
        }
    }

    /// Answers the admitting request as its `Join` would have been answered now.
    fn answer_first_join(&mut self) {
        if let Some((join, reply)) = self.first_join.take() {
            let _ = reply.send(self.join(join));
        }
    }

    fn join(&mut self, msg: Join) -> Result<JoinReply, ConversationError> {
        self.check_loaded()?;
        let applied = msg.role == Role::Creator && self.created;
        if self.phase.is_stopping() {
            // The request that created it learns the truth (e.g. its runtime failed at once);
            // anyone else retries and gets a fresh incarnation.
            return if applied {
                Ok(JoinReply {
                    status: ConversationStatus::Stopped,
                    message: None,
                })
            } else {
                Err(ConversationError::Stopping)
            };
        }
        self.touch();
        let message = (!applied && msg.brought_initial_message).then(|| {
            "Joined the existing conversation; the request's initial message was not applied"
                .to_string()
        });
        Ok(JoinReply {
            status: self.phase.status(),
            message,
        })
    }

    fn start_runtime(&mut self, ctx: &mut Context<Self>) {
        let mut runtime = self.runtimes.make();
        let Some(meta) = self.meta.as_ref() else {
            return;
        };
        let sink = RuntimeSink::new(ctx.address().recipient());
        self.runtime_refs = None;
        let signals = runtime.start(RuntimeStart {
            conversation_id: &self.id,
            trigger: meta.trigger.as_str(),
            init: &meta.init,
            sink,
            store: self.store.clone(),
            // Every event before this one is durable: the history a restarted agent resumes.
            history_before: self.durable_before,
            settings: self.user_settings.take(),
        });
        self.runtime = Some(runtime);
        // The runtime has what it needs; the store keeps the init data for the next start.
        if let Some(meta) = self.meta.as_mut() {
            meta.init = Default::default();
        }
        self.apply_signals(signals, ctx);
    }

    fn arm_start_deadline(&mut self, ctx: &mut Context<Self>) {
        if self.phase != Phase::Starting {
            return;
        }
        let deadline = Duration::from_secs(self.settings.limits.start_timeout_secs);
        self.start_deadline = Some(ctx.run_later(deadline, |act, ctx| {
            let _span = act.span.clone().entered();
            if act.phase == Phase::Starting {
                warn!("runtime did not start before the deadline");
                act.begin_stop(StopReason::StartTimeout, ctx);
            }
        }));
    }

    /// Checks idleness after `after`; re-arms itself until the conversation stops.
    fn arm_idle_timer(&mut self, ctx: &mut Context<Self>, after: Duration) {
        ctx.run_later(after, |act, ctx| {
            let _span = act.span.clone().entered();
            if act.phase.is_stopping() {
                return;
            }
            let timeout_ms = act.settings.limits.idle_timeout_secs.saturating_mul(1000);
            let idle_ms = now_ms().saturating_sub(act.last_activity_ms);
            let busy = !act.subscribers.is_empty() || act.agent_state == "running";
            if !busy && idle_ms >= timeout_ms {
                info!(idle_ms, "idle; stopping");
                act.begin_stop(StopReason::Idle, ctx);
                return;
            }
            let next = if busy {
                timeout_ms
            } else {
                timeout_ms - idle_ms
            };
            act.arm_idle_timer(ctx, Duration::from_millis(next.max(10)));
        });
    }

    /// The one teardown path.
    fn begin_stop(&mut self, reason: StopReason, ctx: &mut Context<Self>) {
        let _span = self.span.clone().entered();
        if self.phase.is_stopping() {
            return;
        }
        info!(reason = %reason.describe(), "stopping");
        if reason == StopReason::Fenced {
            // Another node may own the conversation by now: nothing more is written.
            self.store_failed = true;
            self.drop_undurable(&StoreError::Fenced(
                "this node lost its cluster membership".into(),
            ));
        }
        if self.phase == Phase::Starting {
            let result = match reason {
                StopReason::StartTimeout => "timeout",
                StopReason::RuntimeFailed(_) | StopReason::StoreFailed(_) => "failed",
                _ => "stopped",
            };
            metrics().started(result, self.admitted_at.elapsed());
        }
        metrics().stopped(reason.label());
        self.set_phase(Phase::Stopping(reason.clone()));
        if let Some(mut rt) = self.runtime.take() {
            rt.stop();
            self.runtime_finished = rt.finished();
        }
        self.runtime_backlog.clear();
        self.runtime_refs = None;
        match &reason {
            StopReason::StartTimeout | StopReason::RuntimeFailed(_) => {
                let why = reason.describe().into_owned();
                self.shared.set_runtime_status(RuntimeStatus::Error);
                self.emit(EventBody::error(&why));
                self.publish_status(StatusUpdate::error(
                    events::STATUS_ERROR_RUNTIME_DISCONNECTED,
                    &why,
                ));
            }
            _ => {}
        }
        self.emit(EventBody::agent_state("stopped", &reason.describe()));
        let close = match reason {
            // Another node owns the conversation (this node's membership lapsed, or a write
            // was refused under a newer epoch): clients reconnect and find it there.
            StopReason::Fenced | StopReason::StoreFailed(StoreError::Fenced(_)) => {
                CloseReason::Fenced
            }
            _ => CloseReason::Stopped(reason.describe().into_owned()),
        };
        self.outbox.push_back(Outgoing::CloseAll(close));
        self.commit(ctx);
    }

    /// Runs once the outbox delivered `CloseAll`: everything is durable and delivered.
    fn finish_stop(&mut self, ctx: &mut Context<Self>) {
        let _span = self.span.clone().entered();
        // Everything this incarnation wrote is durable: another node may take over at once.
        self.release();
        // The conversation is stopped for everyone who asked; what follows is cleanup.
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(());
        }
        if let Some(finished) = self.runtime_finished.take() {
            // The runtime's own stop sequence (an agent's grace periods, bounded by the runtime)
            // runs to its end first; a shutdown that cannot wait that long is bounded by the
            // supervisor.
            ctx.wait(finished.into_actor(self).map(|(), act, ctx| {
                let _span = act.span.clone().entered();
                act.finish_stop(ctx);
            }));
            return;
        }
        // A deleted conversation's data is removed by the supervisor once this actor is gone,
        // while it holds back every admission for the id.
        ctx.stop();
    }

    /// Gives the lease back, once; called only when no write of this incarnation is pending.
    fn release(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let released = self.store.release(&self.id, lease);
        let id = self.id.clone();
        actix::spawn(async move {
            if let Err(e) = released.await {
                warn!(conversation_id = %id, error = %e, "cannot release the conversation");
            }
        });
    }
}

/// Whether a turn is under way after the agent announces `state`; `None` leaves it as it was.
fn turn_after(state: &str) -> Option<bool> {
    match state {
        "running" | "user_confirmed" => Some(true),
        "awaiting_user_input"
        | "awaiting_user_confirmation"
        | "finished"
        | "rejected"
        | "error"
        | "paused"
        | "stopped" => Some(false),
        _ => None,
    }
}

impl Actor for Conversation {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.self_addr = Some(ctx.address());
        let mode = self.mode.take().unwrap_or(AdmitMode::LoadOnly);
        // Ownership first: what is loaded is then the log as its last owner left it.
        let quota = self.shared.owner().map(|user| UserQuota {
            user: user.to_string(),
            max_running: self.settings.limits.max_running_per_user,
        });
        let acquired = self.store.acquire(&self.id, quota);
        ctx.wait(acquired.into_actor(self).map(|acquired, act, ctx| {
            let _span = act.span.clone().entered();
            match acquired {
                Ok(Acquired::Owned(lease)) => {
                    act.lease = Some(lease);
                    match mode {
                        AdmitMode::Fresh(meta) => act.create(meta, false, ctx),
                        AdmitMode::LoadOrCreate(meta) => act.load(Some(meta), ctx),
                        AdmitMode::LoadOnly => act.load(None, ctx),
                    }
                }
                Ok(Acquired::Elsewhere(node)) => {
                    act.not_granted(ConversationError::Elsewhere(node), ctx)
                }
                Ok(Acquired::UserLimit { limit }) => act.not_granted(
                    ConversationError::Admit(AdmitError::UserLimit { limit }),
                    ctx,
                ),
                Err(e) => act.load_failed(e, ctx),
            }
        }));
    }

    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        self.self_addr = None;
        Running::Stop
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        // Gone for everyone, whatever phase it ended in.
        self.shared.set_status(ConversationStatus::Stopped);
        self.shared.set_connections(0);
        if let Some(mut rt) = self.runtime.take() {
            rt.stop();
        }
        self.release();
        self.supervision.gone(&self.id, self.generation);
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(());
        }
        debug!("actor stopped");
    }
}

impl Handler<Join> for Conversation {
    type Result = Result<JoinReply, ConversationError>;

    fn handle(&mut self, msg: Join, _ctx: &mut Self::Context) -> Self::Result {
        let _span = self.span.clone().entered();
        self.join(msg)
    }
}

impl Handler<UserAction> for Conversation {
    type Result = ResponseFuture<Result<(), ConversationError>>;

    /// Answered once the action's event is durable (a store failure or a stop before that is
    /// an error), so an accepted action survives any crash.
    fn handle(&mut self, msg: UserAction, ctx: &mut Self::Context) -> Self::Result {
        let _span = self.span.clone().entered();
        let refused = |e| -> Self::Result { Box::pin(std::future::ready(Err(e))) };
        if let Err(e) = self.check_loaded() {
            return refused(e);
        }
        if self.phase.is_stopping() {
            return refused(ConversationError::Stopping);
        }
        let for_runtime = msg.0.source == Source::User;
        let id = match self.emit_event(msg.0, for_runtime, None, true) {
            Ok(id) => id,
            Err(NotEmitted::Full) => {
                return refused(ConversationError::Refused(
                    "the conversation has reached its event limit".into(),
                ))
            }
            Err(NotEmitted::OverQuota(e)) => return refused(e.into()),
        };
        let (tx, rx) = oneshot::channel();
        self.durable_waiters.push_back((id, tx));
        self.commit(ctx);
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(ConversationError::Storage(StoreError::Io(
                    "the conversation stopped before the action was stored".into(),
                )))
            })
        })
    }
}

impl Handler<Stop> for Conversation {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Stop, ctx: &mut Self::Context) -> Self::Result {
        let _span = self.span.clone().entered();
        if msg.0 == StopReason::Evicted
            && !self.phase.is_stopping()
            && (!self.subscribers.is_empty() || self.shared.in_turn())
        {
            // A client attached or a turn began since the supervisor chose this one.
            debug!("eviction declined: in use");
            self.supervision
                .eviction_declined(&self.id, self.generation);
            return Box::pin(std::future::ready(()));
        }
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        if !self.phase.is_stopping() {
            self.begin_stop(msg.0, ctx);
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<SetTitle> for Conversation {
    type Result = ResponseFuture<Result<(), ConversationError>>;

    fn handle(&mut self, msg: SetTitle, ctx: &mut Self::Context) -> Self::Result {
        let _span = self.span.clone().entered();
        let Some(meta) = self.meta.as_mut() else {
            return Box::pin(std::future::ready(Err(ConversationError::NotFound)));
        };
        meta.title = msg.0.clone();
        self.publish_status(StatusUpdate::title(&self.id, &msg.0));
        self.flush(ctx);
        let fut = self.store.set_title(&self.id, &msg.0);
        Box::pin(async move {
            match fut.await {
                Ok(true) => Ok(()),
                Ok(false) => Err(ConversationError::NotFound),
                Err(e) => Err(ConversationError::Refused(e.to_string())),
            }
        })
    }
}

impl Handler<Subscribe> for Conversation {
    type Result = Result<Subscribed, ConversationError>;

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Self::Context) -> Self::Result {
        let _span = self.span.clone().entered();
        self.check_loaded()?;
        if self.phase.is_stopping() {
            return Err(ConversationError::Stopping);
        }
        if self.subscribers.len() >= self.settings.limits.max_clients_per_conversation {
            return Err(ConversationError::Refused(
                "too many clients are attached to this conversation".into(),
            ));
        }
        let subscriber_id = self.next_subscriber;
        self.next_subscriber += 1;
        self.subscribers.insert(subscriber_id, msg.sink);
        self.shared.set_connections(self.subscribers.len());
        self.touch();
        Ok(Subscribed {
            subscriber_id,
            replay_before: self.durable_before,
            last_status: self.last_status.clone(),
        })
    }
}

impl Handler<Unsubscribe> for Conversation {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        if self.subscribers.remove(&msg.0).is_some() {
            self.shared.set_connections(self.subscribers.len());
            self.touch();
        }
    }
}

impl Handler<FromRuntime> for Conversation {
    type Result = ();

    fn handle(&mut self, msg: FromRuntime, ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        if self.phase.is_stopping() || self.runtime.is_none() {
            return;
        }
        self.apply_signals(vec![msg.0], ctx);
        self.commit(ctx);
    }
}
