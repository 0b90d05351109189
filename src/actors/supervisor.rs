//! The supervisor: admission, limits and the registry of live conversations.
//!
//! Create-or-join for an id is decided here and only here, under one lock ([`Core`]), so any
//! number of concurrent requests for one id start exactly one actor. Every decision runs on
//! the thread that needs it, under that lock, with no actor hop: an admission on the
//! requesting thread ([`SupervisorHandle`]), a conversation's reports on its own
//! ([`Supervision`]). The supervisor actor keeps deletes, fencing, the rate limiter's sweep
//! and shutdown. The supervisor is the only writer of the [`Registry`]: it inserts an entry
//! when it starts an actor and removes it when that actor reports it is gone from its
//! `stopped()` ([`Supervision::gone`]) — the single teardown path every stop takes.
//! A request for an id whose actor is still stopping waits until it is gone, so an old and a new
//! incarnation never write the same event log at once.
//!
//! Delete is decided here too, in order with admissions: from the moment a delete for an id is
//! accepted until its data is gone from the store, every admission for that id waits. A join
//! admitted before the delete is stopped with the conversation (its clients get the `stopped`
//! event and a close); one admitted after it finds nothing or creates a brand-new conversation.
//! The store's rows are removed only when no actor for the id exists, so no live conversation
//! ever loses its data underneath.
//!
//! A `POST /api/conversations` that brings a conversation up takes a token from its client's
//! bucket ([`CreateLimiter`]) here, before any limit or eviction is considered; joining a live
//! conversation never does. Then its owner's count is checked against
//! `limits.max_running_per_user` (every conversation with an actor counts, stopping ones
//! included; conversations without an owner are not counted), then the server's limit. On a
//! cluster the per-user count here is only this node's: the store's `acquire` checks the
//! user's conversations across all nodes before the conversation is loaded or created.
//! Admission is also where owners are kept apart: a live conversation is joined only by an
//! admission for its owner.
//!
//! Under `evict_oldest`, only a conversation with no client attached and no turn under way is
//! evicted (the least recently active of those); when there is none, admission is refused.
//!
//! Where a conversation actor runs: on the thread of the request that brought it up when that
//! thread is an HTTP worker (marked by [`host_conversations_here`] when the worker starts) and
//! its runtime never blocks the thread (the echo runtime: [`RuntimeFactory::never_blocks`]), so
//! a create's admission, the actor's start and its first answer cross no thread; otherwise (an
//! agent process, spawned with blocking calls; a takeover; an admission that waited for a
//! stopping incarnation) round-robin on a pool of conversation arbiters. The HTTP workers therefore outlive every conversation: shutdown stops
//! the conversations before the HTTP server (see `crate::startup`).
//!
//! The warm pool of agents ([`AgentPool`], with `runtime.process.warm`) is the supervisor's
//! too: it learns the number of live conversations from every registry change (pooled agents
//! give way to conversations, never the reverse), a shutdown waits for its agents as for
//! the conversations, and while the node is fenced from the cluster the pool holds no agent.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::conversation::{Admission, Conversation};
use super::handle::{Admitted, ConversationHandle, SupervisorHandle};
use super::messages::*;
use super::rate_limit::{retry_after_secs, CreateLimiter};
use super::shared::{Registry, RegistryEntry, Shared};
use crate::config::{OnLimit, Settings};
use crate::conversation::{ConversationId, ConversationStatus};
use crate::runtime::pool::AgentPool;
use crate::runtime::RuntimeFactory;
use crate::store::{Membership, Store};

thread_local! {
    /// Whether conversations admitted from this thread run on it (see the module doc).
    static HOSTS_CONVERSATIONS: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread (an HTTP worker, inside its actix arbiter) as one whose requests'
/// conversations run on it, and says so in the log. It must outlive them: the server stops
/// conversations first.
pub fn host_conversations_here() {
    HOSTS_CONVERSATIONS.with(|hosts| hosts.set(true));
    tracing::debug!("HTTP worker started");
}

/// Starts a conversation arbiter, which says so in the log from its own thread.
fn conversation_thread() -> ArbiterHandle {
    let arbiter = Arbiter::new().handle();
    arbiter.spawn_fn(|| tracing::debug!("conversation thread started"));
    arbiter
}

type AdmitReply = oneshot::Sender<Result<Admitted, AdmitError>>;
type DeleteReply = oneshot::Sender<Result<bool, DeleteError>>;

/// The supervisor's state; every decision takes its lock.
pub(super) struct Core {
    /// Itself, for the conversations to report through ([`Supervision`]).
    me: Weak<Mutex<Core>>,
    /// The actor: deletes, fencing and shutdown go through it.
    supervisor: Addr<Supervisor>,
    registry: Arc<Registry>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    settings: Arc<Settings>,
    store: Arc<dyn Store>,
    next_generation: u64,
    /// Conversations told to stop to make room; they no longer count against the limit.
    evicting: HashSet<ConversationId>,
    /// Admissions waiting for a stopping incarnation of their id to be gone, or for its delete.
    deferred: HashMap<ConversationId, Vec<(Admit, AdmitReply)>>,
    /// Deletes decided and not yet done, with everyone waiting for their answer.
    deleting: HashMap<ConversationId, Vec<DeleteReply>>,
    /// Every client's creation token bucket.
    create_limiter: CreateLimiter,
    /// Conversations with an actor, by owner (for `limits.max_running_per_user`).
    per_owner: HashMap<Arc<str>, usize>,
    shutting_down: bool,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    /// The warm pool of agents, with `runtime.process.warm > 0`.
    pool: Option<Arc<AgentPool>>,
    /// Makes each conversation's runtime (with the warm pool).
    runtimes: RuntimeFactory,
}

/// The actor half of the supervisor: what needs a task of its own (see the module doc).
pub struct Supervisor {
    core: Arc<Mutex<Core>>,
}

/// Where an admission that starts a conversation runs it (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The admitting thread, when it hosts conversations; the pool otherwise.
    Caller,
    /// The pool of conversation arbiters.
    Pool,
}

/// An admission's answer: now, or once a stopping incarnation of its id is gone (or its
/// delete done).
pub(super) enum AdmitOutcome {
    Now(Result<Admitted, AdmitError>),
    Later(oneshot::Receiver<Result<Admitted, AdmitError>>),
}

impl Supervisor {
    /// Starts the supervisor on the current arbiter and `threads` conversation arbiters.
    pub fn start(settings: Arc<Settings>, store: Arc<dyn Store>) -> SupervisorHandle {
        let registry = Arc::new(Registry::new());
        let threads = settings.conversation_thread_count();
        let create_limiter = CreateLimiter::new(
            settings.limits.create_rate_per_sec,
            settings.limits.create_burst,
        );
        let arbiters: Vec<ArbiterHandle> = (0..threads).map(|_| conversation_thread()).collect();
        let pool = AgentPool::start(settings.clone(), arbiters.clone());
        let runtimes = RuntimeFactory::new(settings.clone(), pool.clone());
        let mut ctx = Context::new();
        ctx.set_mailbox_capacity(4096);
        let supervisor = ctx.address();
        let core = Arc::new_cyclic(|me| {
            Mutex::new(Core {
                me: me.clone(),
                supervisor,
                registry: registry.clone(),
                arbiters,
                next_arbiter: 0,
                settings,
                store,
                next_generation: 0,
                evicting: HashSet::new(),
                deferred: HashMap::new(),
                deleting: HashMap::new(),
                create_limiter,
                per_owner: HashMap::new(),
                shutting_down: false,
                shutdown_waiters: Vec::new(),
                pool: pool.clone(),
                runtimes,
            })
        });
        ctx.run(Supervisor { core: core.clone() });
        SupervisorHandle::new(core, registry, pool)
    }

    /// The state, for one decision. A panic under the lock (a bug) must not wedge every later
    /// admission, so a poisoned lock is taken as it is.
    fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }
}

/// Removes `id`'s data from the store; no actor for it exists and admissions for it wait.
/// Runs on the current arbiter.
fn delete_stored(core: Arc<Mutex<Core>>, id: ConversationId) {
    let fut = lock(&core).store.delete(&id);
    actix::spawn(async move {
        let result = fut.await;
        match &result {
            Ok(existed) => tracing::info!(conversation_id = %id, existed, "conversation deleted"),
            Err(error) => {
                tracing::error!(conversation_id = %id, %error, "could not delete conversation")
            }
        }
        let mut core = lock(&core);
        for reply in core.deleting.remove(&id).unwrap_or_default() {
            let _ = reply.send(result.clone().map_err(DeleteError::from));
        }
        core.readmit(&id);
        core.maybe_shut_down();
    });
}

/// What a conversation actor reports to the supervisor through. Its reports are decided at
/// once under the supervisor's lock, like admissions, so a request that follows a stop sees
/// the room that stop made.
#[derive(Clone)]
pub(super) struct Supervision {
    core: Weak<Mutex<Core>>,
}

impl Supervision {
    /// The actor has stopped for good (from its `stopped()`), or is done for admissions (the
    /// store refused it the conversation; it only answers what already waits on it): its
    /// registry entry goes, the admissions that waited for it are answered, and a decided
    /// delete now removes its data. Said twice for one generation, the second time changes
    /// nothing of a later incarnation's.
    pub(super) fn gone(&self, id: &ConversationId, generation: u64) {
        let Some(core) = self.core.upgrade() else {
            return;
        };
        let mut guard = lock(&core);
        let removed = guard
            .registry
            .remove_if(id, |_, e| e.generation == generation);
        if let Some((_, entry)) = removed {
            guard.forget(&entry);
            guard.evicting.remove(id);
            if guard.deleting.contains_key(id) {
                // Its actor is gone: now the data goes; admissions wait until it has.
                drop(guard);
                return delete_stored(core, id.clone());
            }
        }
        guard.readmit(id);
        guard.maybe_shut_down();
    }

    /// The actor declined to be evicted: a client attached or a turn began after the
    /// supervisor chose it.
    pub(super) fn eviction_declined(&self, id: &ConversationId, generation: u64) {
        let Some(core) = self.core.upgrade() else {
            return;
        };
        let mut core = lock(&core);
        let current = core
            .registry
            .get(id)
            .is_some_and(|e| e.generation == generation);
        if !current || !core.evicting.remove(id) {
            return;
        }
        tracing::info!(conversation_id = %id, "eviction declined: a client attached or a turn began");
        // It counts again; make room elsewhere if another conversation can go.
        if core.running() > core.settings.limits.max_running_conversations {
            core.evict_oldest();
        }
    }
}

/// Takes `core`'s lock (see [`Supervisor::core`]).
pub(super) fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Core {
    /// The supervisor actor.
    pub(super) fn supervisor(&self) -> Addr<Supervisor> {
        self.supervisor.clone()
    }

    /// Admits `msg` now, or queues it until its id's stopping incarnation is gone.
    pub(super) fn admit_or_wait(&mut self, msg: Admit) -> AdmitOutcome {
        match self.admit(msg, Place::Caller) {
            Ok(result) => AdmitOutcome::Now(result),
            Err(deferred) => {
                let (tx, rx) = oneshot::channel();
                self.deferred
                    .entry(deferred.id.clone())
                    .or_default()
                    .push((deferred, tx));
                AdmitOutcome::Later(rx)
            }
        }
    }

    /// Tells the pool how many conversations live now.
    fn registry_changed(&self) {
        if let Some(pool) = &self.pool {
            pool.set_live(self.registry.len());
        }
    }

    /// Conversations that count against the running limit.
    fn running(&self) -> usize {
        self.registry.len().saturating_sub(self.evicting.len())
    }

    fn admit(&mut self, msg: Admit, place: Place) -> Result<Result<Admitted, AdmitError>, Admit> {
        if self.shutting_down {
            return Ok(Err(AdmitError::ShuttingDown));
        }
        if self.deleting.contains_key(&msg.id) {
            // Decided after the delete: it sees the outcome.
            return Err(msg);
        }
        if let Some(entry) = self.registry.get(&msg.id).map(|e| e.clone()) {
            match entry.addr.upgrade() {
                // Another owner's conversation (the id was deleted and taken again since the
                // caller looked): never joined.
                Some(_) if entry.shared.owner() != msg.owner.as_ref() => {
                    return Ok(Err(AdmitError::NotFound));
                }
                Some(addr) if entry.shared.status() != ConversationStatus::Stopped => {
                    return Ok(Ok(Admitted {
                        conversation: ConversationHandle {
                            addr,
                            shared: entry.shared,
                        },
                        role: Role::Joiner,
                        first_join: None,
                    }));
                }
                // Still stopping: wait until it is gone.
                Some(_) => return Err(msg),
                // The actor vanished without reporting (its thread died): forget it.
                None => self.unregister(&msg.id),
            }
        }
        if let Some(client) = &msg.client {
            // Bringing a conversation up (not joining a live one) takes a token.
            if let Err(wait) = self.create_limiter.check(client) {
                let retry_after_secs = retry_after_secs(wait);
                tracing::debug!(?client, retry_after_secs, "creation rate limit reached");
                return Ok(Err(AdmitError::RateLimited { retry_after_secs }));
            }
        }
        let per_user = self.settings.limits.max_running_per_user;
        if let Some(owner) = &msg.owner {
            if per_user > 0 && self.per_owner.get(owner).copied().unwrap_or(0) >= per_user {
                tracing::info!(%owner, limit = per_user, "user at its running limit");
                return Ok(Err(AdmitError::UserLimit { limit: per_user }));
            }
        }
        if self.running() >= self.settings.limits.max_running_conversations {
            match self.settings.limits.on_limit {
                OnLimit::Reject => return Ok(Err(AdmitError::TooMany)),
                OnLimit::EvictOldest => {
                    if !self.evict_oldest() {
                        return Ok(Err(AdmitError::TooMany));
                    }
                }
            }
        }
        Ok(Ok(self.spawn(msg, place)))
    }

    /// Tells the least recently active conversation with no client attached and no turn under
    /// way to stop; false if there is none.
    fn evict_oldest(&mut self) -> bool {
        let victim = self
            .registry
            .iter()
            .filter(|e| {
                !self.evicting.contains(e.key())
                    && !self.deleting.contains_key(e.key())
                    && e.shared.evictable()
            })
            .min_by_key(|e| e.shared.last_active_ms())
            .map(|e| (e.key().clone(), e.addr.clone()));
        let Some((id, addr)) = victim else {
            return false;
        };
        tracing::info!(conversation_id = %id, "evicting least recently active conversation");
        self.evicting.insert(id);
        if let Some(addr) = addr.upgrade() {
            addr.do_send(Stop(StopReason::Evicted));
        }
        true
    }

    fn spawn(&mut self, msg: Admit, place: Place) -> Admitted {
        let generation = self.next_generation;
        self.next_generation += 1;
        let shared = Arc::new(Shared::new(msg.owner.clone()));
        let role = match msg.mode {
            AdmitMode::LoadOnly => Role::Joiner,
            AdmitMode::Fresh(_) | AdmitMode::LoadOrCreate(_) => Role::Creator,
        };
        let (id, mode, actor_shared) = (msg.id.clone(), msg.mode, shared.clone());
        let (settings, store, supervision) = (
            self.settings.clone(),
            self.store.clone(),
            Supervision {
                core: self.me.clone(),
            },
        );
        let capacity = self.settings.limits.mailbox_capacity;
        let runtimes = self.runtimes.clone();
        let (reply, join_rx) = oneshot::channel();
        let admission = Admission {
            mode,
            join: Join {
                role,
                brought_initial_message: msg.brought_initial_message,
            },
            reply,
        };
        let make = move |cctx: &mut Context<Conversation>| {
            cctx.set_mailbox_capacity(capacity);
            Conversation::new(
                id,
                generation,
                admission,
                actor_shared,
                settings,
                store,
                supervision,
            )
            .with_runtimes(runtimes)
        };
        let here = place == Place::Caller
            && self.runtimes.never_blocks()
            && HOSTS_CONVERSATIONS.with(Cell::get);
        let addr = if here {
            Conversation::create(make)
        } else {
            let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
            self.next_arbiter = self.next_arbiter.wrapping_add(1);
            Conversation::start_in_arbiter(arbiter, make)
        };
        if let Some(owner) = msg.owner {
            *self.per_owner.entry(owner).or_default() += 1;
        }
        self.registry.insert(
            msg.id,
            RegistryEntry {
                addr: addr.downgrade(),
                generation,
                shared: shared.clone(),
            },
        );
        self.registry_changed();
        Admitted {
            conversation: ConversationHandle { addr, shared },
            role,
            first_join: Some(join_rx),
        }
    }

    /// Forgets `id`'s registry entry, if any (whatever its generation).
    fn unregister(&mut self, id: &str) {
        if let Some((_, entry)) = self.registry.remove(id) {
            self.forget(&entry);
        }
        self.evicting.remove(id);
    }

    /// Counts a removed registry entry out of its owner's conversations (and the pool's).
    fn forget(&mut self, entry: &RegistryEntry) {
        self.registry_changed();
        let Some(owner) = entry.shared.owner() else {
            return;
        };
        if let Some(n) = self.per_owner.get_mut(owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_owner.remove(owner);
            }
        }
    }

    /// Answers the admissions that waited for `id` (its old incarnation gone, its delete done).
    fn readmit(&mut self, id: &str) {
        let Some(waiting) = self.deferred.remove(id) else {
            return;
        };
        for (admit, reply) in waiting {
            match self.admit(admit, Place::Pool) {
                Ok(result) => {
                    let _ = reply.send(result);
                }
                // A request admitted just before it started a new incarnation that is already
                // stopping again (or a new delete): wait for that one too.
                Err(admit) => self
                    .deferred
                    .entry(admit.id.clone())
                    .or_default()
                    .push((admit, reply)),
            }
        }
    }

    /// Tells every live conversation to stop for `reason`.
    fn stop_all(&self, reason: StopReason) {
        for entry in self.registry.iter() {
            if let Some(addr) = entry.addr.upgrade() {
                addr.do_send(Stop(reason.clone()));
            }
        }
    }

    /// Answers the shutdown once no conversation and no delete is left.
    fn maybe_shut_down(&mut self) {
        if self.shutting_down && self.registry.is_empty() && self.deleting.is_empty() {
            for waiter in self.shutdown_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

/// How often buckets that have refilled completely are dropped.
const BUCKET_SWEEP: Duration = Duration::from_secs(1);

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let core = self.core();
        if core.create_limiter.enabled() {
            ctx.run_interval(BUCKET_SWEEP, |act, _| act.core().create_limiter.sweep());
        }
        if let Some(mut membership) = core.store.membership() {
            let supervisor = ctx.address();
            let pool = core.pool.clone();
            actix::spawn(async move {
                while membership.changed().await.is_ok() {
                    let fenced = *membership.borrow_and_update() == Membership::Fenced;
                    if let Some(pool) = &pool {
                        pool.set_fenced(fenced);
                    }
                    if fenced {
                        supervisor.do_send(Fence);
                    }
                }
            });
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        let core = self.core();
        for arbiter in &core.arbiters {
            arbiter.stop();
        }
        if let Some(pool) = &core.pool {
            pool.stop_thread();
        }
    }
}

impl Handler<Delete> for Supervisor {
    type Result = ResponseFuture<Result<bool, DeleteError>>;

    fn handle(&mut self, msg: Delete, _ctx: &mut Self::Context) -> Self::Result {
        let mut core = self.core();
        if core.shutting_down {
            return Box::pin(std::future::ready(Err(DeleteError::ShuttingDown)));
        }
        let (tx, rx) = oneshot::channel();
        let answer = Box::pin(async move { rx.await.unwrap_or(Err(DeleteError::ShuttingDown)) });
        if let Some(waiting) = core.deleting.get_mut(&msg.id) {
            // Already being deleted: the same answer for everyone who asked meanwhile.
            waiting.push(tx);
            return answer;
        }
        core.deleting.insert(msg.id.clone(), vec![tx]);
        let live = core.registry.get(&msg.id).map(|e| e.addr.upgrade());
        match live {
            // Stop it first (clients get `stopped` and a close); its report deletes the data.
            Some(Some(addr)) => addr.do_send(Stop(StopReason::Deleted)),
            Some(None) => {
                core.unregister(&msg.id);
                drop(core);
                delete_stored(self.core.clone(), msg.id);
            }
            None => {
                drop(core);
                delete_stored(self.core.clone(), msg.id);
            }
        }
        answer
    }
}

impl Handler<Fence> for Supervisor {
    type Result = ();

    /// Stops every conversation without writing (admissions meanwhile are refused by the store
    /// until the node has registered again).
    fn handle(&mut self, _msg: Fence, _ctx: &mut Self::Context) {
        let core = self.core();
        tracing::warn!(
            conversations = core.registry.len(),
            "fenced from the cluster: stopping every conversation without writing"
        );
        core.stop_all(StopReason::Fenced);
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Shutdown, _ctx: &mut Self::Context) -> Self::Result {
        let mut core = self.core();
        core.shutting_down = true;
        for (_, waiting) in core.deferred.drain() {
            for (_, reply) in waiting {
                let _ = reply.send(Err(AdmitError::ShuttingDown));
            }
        }
        let live = core.registry.len() + core.deleting.len();
        tracing::info!(
            conversations = core.registry.len(),
            "stopping all conversations"
        );
        let pool_done = core.pool.as_ref().map(|pool| pool.shut_down());
        core.stop_all(StopReason::Shutdown);
        let conversations_done = (live > 0).then(|| {
            let (tx, rx) = oneshot::channel();
            core.shutdown_waiters.push(tx);
            rx
        });
        let limit = msg.within;
        let arbiters = core.arbiters.clone();
        drop(core);
        Box::pin(async move {
            let done = async {
                if let Some(rx) = conversations_done {
                    let _ = rx.await;
                }
                if let Some(pool) = pool_done {
                    pool.await;
                }
            };
            if tokio::time::timeout(limit, done).await.is_err() {
                // Past the timeout, what is left (e.g. agents inside their grace periods) is
                // ended with the threads that host it; runtimes kill what they started on drop.
                tracing::warn!("some conversations did not stop before the shutdown timeout");
                for arbiter in arbiters {
                    arbiter.stop();
                }
            }
        })
    }
}
