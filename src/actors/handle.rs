//! Handles: what the HTTP and socket layers hold instead of raw actor addresses.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;
use tokio::sync::{mpsc, oneshot};

use super::conversation::Conversation;
use super::messages::*;
use super::shared::{Registry, Shared};
use super::supervisor::{lock, AdmitOutcome, Core, Supervisor};
use crate::conversation::{ConversationId, ConversationStatus};
use crate::events::EventBody;
use crate::ops::metrics::metrics;
use crate::runtime::pool::AgentPool;

/// How many times [`SupervisorHandle::open`] tries before it gives up.
const OPEN_ATTEMPTS: usize = 5;
/// The pause between two of its attempts, so that a stopping incarnation can finish.
const OPEN_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// A live conversation that admission handed out.
pub struct Admitted {
    pub conversation: ConversationHandle,
    pub role: Role,
    /// When admission started the conversation: its answer to this request's join, sent once
    /// it has loaded (so the request takes no second actor hop).
    pub(super) first_join: Option<oneshot::Receiver<Result<JoinReply, ConversationError>>>,
}

impl Admitted {
    /// Joins the conversation: the answer the conversation already owes this request when
    /// admission started it, a [`Join`] otherwise.
    pub async fn join(
        &mut self,
        brought_initial_message: bool,
    ) -> Result<JoinReply, ConversationError> {
        match self.first_join.take() {
            Some(reply) => reply.await.unwrap_or(Err(ConversationError::Stopping)),
            None => {
                self.conversation
                    .join(self.role, brought_initial_message)
                    .await
            }
        }
    }

    /// Whether admission started the conversation for this request (a new incarnation that
    /// loads it and acquires it in a cluster) rather than finding it live; until
    /// [`Admitted::join`] or [`Admitted::loaded`] has taken the first answer.
    pub fn started(&self) -> bool {
        self.first_join.is_some()
    }

    /// Waits until the conversation has loaded when admission started it: its error (e.g.
    /// [`ConversationError::NotFound`] when there is nothing to load) if it did not.
    pub async fn loaded(&mut self) -> Result<(), ConversationError> {
        match self.first_join.take() {
            Some(reply) => reply
                .await
                .unwrap_or(Err(ConversationError::Stopping))
                .map(drop),
            None => Ok(()),
        }
    }
}

/// Live conversations by state, and their attached clients.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    pub starting: usize,
    pub running: usize,
    /// Stopped but still releasing their runtime.
    pub stopping: usize,
    pub clients: usize,
}

/// Talks to the supervisor: admission takes its lock on the caller's thread; deletes and
/// shutdown go to its actor.
#[derive(Clone)]
pub struct SupervisorHandle {
    core: Arc<Mutex<Core>>,
    addr: Addr<Supervisor>,
    registry: Arc<Registry>,
    pool: Option<Arc<AgentPool>>,
}

impl SupervisorHandle {
    pub(super) fn new(
        core: Arc<Mutex<Core>>,
        registry: Arc<Registry>,
        pool: Option<Arc<AgentPool>>,
    ) -> Self {
        let addr = lock(&core).supervisor();
        SupervisorHandle {
            core,
            addr,
            registry,
            pool,
        }
    }

    /// Agents waiting in the warm pool now (0 without a pool).
    pub fn pooled_agents(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.waiting())
    }

    /// Finds or starts the conversation `request` names (see [`Admit`]).
    async fn admit(&self, request: Admit) -> Result<Admitted, AdmitError> {
        let outcome = lock(&self.core).admit_or_wait(request);
        let result = match outcome {
            AdmitOutcome::Now(result) => result,
            AdmitOutcome::Later(reply) => reply.await.unwrap_or(Err(AdmitError::ShuttingDown)),
        };
        match &result {
            Err(AdmitError::TooMany) => metrics().rejected("too_many"),
            Err(AdmitError::RateLimited { .. }) => metrics().rejected("rate_limited"),
            Err(AdmitError::ShuttingDown) => metrics().rejected("shutting_down"),
            Err(AdmitError::UserLimit { .. }) => metrics().rejected("user_limit"),
            _ => {}
        }
        result
    }

    /// Opens the conversation `request` names (finding it, or starting it: see [`Admit`]) and
    /// runs `then` on it (join it, subscribe to it), retrying while that races with a stopping
    /// incarnation: `then` answering [`ConversationError::Stopping`], or
    /// [`ConversationError::NotFound`] from an incarnation that was only looking the id up
    /// when the request's mode may create it. A live conversation is taken without an actor
    /// hop when the mode only loads.
    pub async fn open<T, F, Fut>(&self, request: Admit, mut then: F) -> Result<T, OpenError>
    where
        F: FnMut(Admitted) -> Fut,
        Fut: Future<Output = Result<T, ConversationError>>,
    {
        let load_only = matches!(request.mode, AdmitMode::LoadOnly);
        let mut last = ConversationError::Stopping;
        for attempt in 0..OPEN_ATTEMPTS {
            if attempt > 0 {
                actix::clock::sleep(OPEN_RETRY_PAUSE).await;
            }
            let live = load_only
                .then(|| self.live(&request.id))
                .flatten()
                .filter(|c| c.shared.owner() == request.owner.as_ref());
            let admitted = match live {
                Some(conversation) => Admitted {
                    conversation,
                    role: Role::Joiner,
                    first_join: None,
                },
                None => self.admit(request.clone()).await?,
            };
            match then(admitted).await {
                Ok(done) => return Ok(done),
                Err(e @ ConversationError::Stopping) => last = e,
                // It met an incarnation that was only looking the id up (a socket or `start`)
                // and found nothing; that one stops, and the retry creates the conversation.
                Err(e @ ConversationError::NotFound) if !load_only => last = e,
                Err(ConversationError::Admit(e)) => return Err(OpenError::Admit(e)),
                Err(e) => return Err(OpenError::Conversation(e)),
            }
        }
        Err(OpenError::Restarting(last))
    }

    /// Deletes the conversation `id` with its events (stopping it first if it runs); `false`
    /// when there was nothing to delete. Ordered with every admission for `id`.
    pub async fn delete(&self, id: ConversationId) -> Result<bool, DeleteError> {
        self.addr
            .send(Delete { id })
            .await
            .map_err(|_| DeleteError::ShuttingDown)?
    }

    /// Stops every conversation and waits until all have stopped, at most `within`: then
    /// whatever is left is ended (agents killed).
    pub async fn shutdown(&self, within: std::time::Duration) {
        let _ = self.addr.send(Shutdown { within }).await;
    }

    /// How many live conversations are in each state; no actor hop.
    pub fn census(&self) -> Census {
        let mut census = Census::default();
        for entry in self.registry.iter() {
            match entry.shared.status() {
                ConversationStatus::Starting => census.starting += 1,
                ConversationStatus::Running => census.running += 1,
                ConversationStatus::Stopped => census.stopping += 1,
            }
            census.clients += entry.shared.connections() as usize;
        }
        census
    }

    /// Every conversation with an actor (stopping included) and its published state; no
    /// actor hop.
    pub fn conversations(&self) -> Vec<(ConversationId, Arc<Shared>)> {
        self.registry
            .iter()
            .map(|entry| (entry.key().clone(), entry.shared.clone()))
            .collect()
    }

    /// The live (not stopping) conversation `id`, if any; no actor hop.
    pub fn live(&self, id: &ConversationId) -> Option<ConversationHandle> {
        let entry = self.registry.get(id)?;
        if entry.shared.status() == ConversationStatus::Stopped {
            return None;
        }
        let addr = entry.addr.upgrade()?;
        Some(ConversationHandle {
            addr,
            shared: entry.shared.clone(),
        })
    }

    /// The published state of conversation `id` while it has an actor (stopping included).
    pub fn shared(&self, id: &ConversationId) -> Option<Arc<Shared>> {
        self.registry.get(id).map(|e| e.shared.clone())
    }
}

/// Talks to one conversation actor.
#[derive(Clone)]
pub struct ConversationHandle {
    pub(super) addr: Addr<Conversation>,
    pub(super) shared: Arc<Shared>,
}

fn gone<T>(_: actix::MailboxError) -> Result<T, ConversationError> {
    Err(ConversationError::Stopping)
}

impl ConversationHandle {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub async fn join(
        &self,
        role: Role,
        brought_initial_message: bool,
    ) -> Result<JoinReply, ConversationError> {
        self.addr
            .send(Join {
                role,
                brought_initial_message,
            })
            .await
            .or_else(gone)?
    }

    pub async fn user_action(&self, event: EventBody) -> Result<(), ConversationError> {
        self.addr.send(UserAction(event)).await.or_else(gone)?
    }

    /// Stops the conversation; returns once it has fully stopped.
    pub async fn stop(&self, reason: StopReason) {
        let _ = self.addr.send(Stop(reason)).await;
    }

    pub async fn set_title(&self, title: String) -> Result<(), ConversationError> {
        self.addr.send(SetTitle(title)).await.or_else(gone)?
    }

    pub async fn subscribe(
        &self,
        sink: mpsc::Sender<ClientFrame>,
    ) -> Result<Subscribed, ConversationError> {
        self.addr.send(Subscribe { sink }).await.or_else(gone)?
    }

    pub fn unsubscribe(&self, subscriber_id: u64) {
        self.addr.do_send(Unsubscribe(subscriber_id));
    }
}
