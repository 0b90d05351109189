//! A conversation's timers on paused time: the idle stop and the start deadline, each checked
//! a second before and a second after its boundary (minutes of the conversation's time in
//! milliseconds of the test's).
//!
//! The supervisor and its conversations run on the test's own runtime, whose clock is paused
//! (tokio moves it on whenever nothing else is ready). That is where a server runs them too: an
//! echo conversation runs on the thread of the request that brought it up
//! ([`host_conversations_here`]). The store is the real in-memory store. The same timers
//! against a real server on real time: `tests/api/lifecycle.rs`. This is a test binary of its
//! own because the conversations' clock ([`switchboard::actors::now_ms`]) is process-wide.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard::actors::messages::ConversationError;
use switchboard::actors::supervisor::{host_conversations_here, Supervisor};
use switchboard::actors::{Admit, AdmitMode, ConversationHandle, SupervisorHandle};
use switchboard::config::{Settings, StoreKind};
use switchboard::conversation::{ConversationId, ConversationStatus, NewConversation, Trigger};
use switchboard::events::{EventBody, Source};
use switchboard::store::memory::MemoryStore;
use switchboard::store::{EventQuery, Store};
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, Instant};

/// Runs `test` in an actix system on a runtime whose clock is paused.
fn on_paused_time<F: Future>(test: F) -> F::Output {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a paused runtime")
    };
    actix_web::rt::System::with_tokio_rt(runtime).block_on(test)
}

struct Setup {
    supervisor: SupervisorHandle,
    store: Arc<dyn Store>,
}

/// A supervisor on this thread, with the default settings as `tweak` changes them.
fn supervisor(tweak: impl FnOnce(&mut Settings)) -> Setup {
    host_conversations_here();
    let mut settings = Settings::defaults();
    settings.store = StoreKind::Memory;
    settings.conversation_threads = 1;
    tweak(&mut settings);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let supervisor = Supervisor::start(Arc::new(settings), store.clone());
    Setup { supervisor, store }
}

impl Setup {
    /// Creates a conversation as `POST /api/conversations` with `{}` does.
    async fn create(&self) -> (ConversationId, ConversationHandle) {
        let id = ConversationId::generate();
        let meta = NewConversation {
            conversation_id: None,
            init: Default::default(),
            trigger: Trigger::Gui,
            title: None,
            brings_initial_message: false,
        }
        .meta(id.clone(), None);
        let request = Admit {
            id: id.clone(),
            mode: AdmitMode::Fresh(Box::new(meta)),
            client: None,
            owner: None,
            brought_initial_message: false,
        };
        let handle = self
            .supervisor
            .open(request, |mut admitted| async move {
                admitted.join(false).await?;
                Ok::<_, ConversationError>(admitted.conversation)
            })
            .await
            .expect("created");
        (id, handle)
    }

    /// The conversation's stored events, oldest first.
    async fn events(&self, id: &ConversationId) -> Vec<Value> {
        let query = EventQuery {
            start_id: 0,
            end_id: None,
            reverse: false,
            limit: 10_000,
        };
        let events = self.store.events(id, query).await.expect("events");
        events
            .iter()
            .map(|e| serde_json::from_str(&e.json).expect("stored JSON"))
            .collect()
    }
}

fn status(conversation: &ConversationHandle) -> ConversationStatus {
    conversation.shared().status()
}

/// Waits (on the paused clock, in 1 ms steps) until the conversation reaches `wanted`; at most
/// 100 ms of its time (a stop due at a boundary happens there: nothing else moves the clock).
async fn reach(conversation: &ConversationHandle, wanted: ConversationStatus) {
    for _ in 0..100 {
        if status(conversation) == wanted {
            return;
        }
        sleep(Duration::from_millis(1)).await;
    }
    panic!("still {:?}, not {wanted:?}", status(conversation));
}

/// The last event's `agent_state` and `reason`.
fn last_agent_state(events: &[Value]) -> (String, String) {
    let last = events.last().expect("an event");
    (
        last["extras"]["agent_state"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        last["extras"]["reason"].as_str().unwrap_or("").to_string(),
    )
}

const IDLE: Duration = Duration::from_secs(600);
const SECOND: Duration = Duration::from_secs(1);

/// The conversation is still `before` a second ahead of `due`, and stopped a second past it.
async fn stops_at(conversation: &ConversationHandle, due: Instant, before: ConversationStatus) {
    sleep_until(due - SECOND).await;
    assert_eq!(status(conversation), before);
    sleep_until(due + SECOND).await;
    reach(conversation, ConversationStatus::Stopped).await;
}

/// A supervisor whose conversations stop after [`IDLE`], and a conversation it runs: with the
/// time it was created.
async fn running_with_idle_timeout() -> (Setup, ConversationId, ConversationHandle, Instant) {
    let setup = supervisor(|s| s.limits.idle_timeout_secs = IDLE.as_secs());
    let (id, conversation) = setup.create().await;
    let created = Instant::now();
    reach(&conversation, ConversationStatus::Running).await;
    (setup, id, conversation, created)
}

#[test]
fn an_idle_conversation_stops_when_its_idle_timeout_is_up_not_before() {
    on_paused_time(async {
        let (setup, id, conversation, created) = running_with_idle_timeout().await;
        stops_at(&conversation, created + IDLE, ConversationStatus::Running).await;
        let events = setup.events(&id).await;
        assert_eq!(
            last_agent_state(&events),
            ("stopped".to_string(), "idle timeout".to_string())
        );
    });
}

#[test]
fn a_user_message_starts_the_idle_time_again() {
    on_paused_time(async {
        let (setup, id, conversation, created) = running_with_idle_timeout().await;
        sleep_until(created + IDLE - SECOND).await;
        let message = EventBody::message(Source::User, "still here", json!([]), false);
        conversation.user_action(message).await.expect("accepted");
        let active = Instant::now();
        // Past the first deadline, not past the one the message set.
        sleep_until(created + IDLE + SECOND).await;
        assert_eq!(status(&conversation), ConversationStatus::Running);
        stops_at(&conversation, active + IDLE, ConversationStatus::Running).await;
        let events = setup.events(&id).await;
        let echoed = events
            .iter()
            .any(|e| e["source"] == "agent" && e["message"] == "still here");
        assert!(echoed, "{events:?}");
        assert_eq!(last_agent_state(&events).1, "idle timeout");
    });
}

#[test]
fn an_attached_client_keeps_a_conversation_up_and_its_leaving_starts_the_idle_time() {
    on_paused_time(async {
        let (_setup, _id, conversation, _) = running_with_idle_timeout().await;
        let (sink, mut frames) = mpsc::channel(64);
        let subscribed = conversation.subscribe(sink).await.expect("subscribed");
        // Ten idle timeouts with a client attached (its frames read, so it is not too slow).
        let reader = actix_web::rt::spawn(async move { while frames.recv().await.is_some() {} });
        sleep(IDLE * 10).await;
        assert_eq!(status(&conversation), ConversationStatus::Running);
        conversation.unsubscribe(subscribed.subscriber_id);
        let left = Instant::now();
        stops_at(&conversation, left + IDLE, ConversationStatus::Running).await;
        reader.abort();
    });
}

#[test]
fn a_runtime_that_is_not_ready_by_the_start_deadline_stops_the_conversation_then() {
    const DEADLINE: Duration = Duration::from_secs(60);
    on_paused_time(async {
        let setup = supervisor(|s| {
            s.limits.start_timeout_secs = DEADLINE.as_secs();
            s.runtime.echo.start_delay_ms = 3_600_000;
        });
        let (id, conversation) = setup.create().await;
        let created = Instant::now();
        stops_at(
            &conversation,
            created + DEADLINE,
            ConversationStatus::Starting,
        )
        .await;
        let events = setup.events(&id).await;
        let error = events
            .iter()
            .find(|e| e["observation"] == "error")
            .expect("an error observation");
        assert!(
            error["content"].as_str().unwrap_or("").contains("deadline"),
            "{error}"
        );
        assert_eq!(last_agent_state(&events).0, "stopped");
    });
}
