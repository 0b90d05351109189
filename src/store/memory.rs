//! The in-memory store: fast, non-durable, for tests and throwaway servers (`store = "memory"`).
//!
//! Operations complete immediately; a `std::sync` lock is taken only inside each call, never
//! across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use super::{ConversationMeta, ConversationRecord, EventQuery, Store, StoreError, StoreFuture};
use crate::events::{meta_timestamp, StoredEvent};

#[derive(Default)]
struct Entry {
    meta: Option<ConversationMeta>,
    events: Vec<StoredEvent>,
}

/// A store that keeps everything in this process.
#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
    settings: Arc<Mutex<HashMap<String, Value>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn ready<T: Send + 'static>(value: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(value))
}

impl Store for MemoryStore {
    fn create(&self, meta: ConversationMeta) -> StoreFuture<()> {
        let mut map = self.lock();
        let entry = map.entry(meta.conversation_id.clone()).or_default();
        if entry.meta.is_some() {
            return ready(Err(StoreError::Exists(meta.conversation_id)));
        }
        entry.meta = Some(meta);
        ready(Ok(()))
    }

    fn set_title(&self, id: &str, title: &str) -> StoreFuture<bool> {
        let mut map = self.lock();
        let found = match map.get_mut(id).and_then(|e| e.meta.as_mut()) {
            Some(meta) => {
                meta.title = title.to_string();
                meta.last_updated_at = meta_timestamp();
                true
            }
            None => false,
        };
        ready(Ok(found))
    }

    fn get(&self, id: &str) -> StoreFuture<Option<ConversationRecord>> {
        let map = self.lock();
        let record = map.get(id).and_then(|e| {
            e.meta.clone().map(|meta| ConversationRecord {
                meta,
                next_event_id: e.events.last().map_or(0, |ev| ev.id + 1),
            })
        });
        ready(Ok(record))
    }

    fn list(&self, offset: usize, limit: usize) -> StoreFuture<Vec<ConversationMeta>> {
        let map = self.lock();
        let mut all: Vec<&ConversationMeta> =
            map.values().filter_map(|e| e.meta.as_ref()).collect();
        all.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.conversation_id.cmp(&a.conversation_id))
        });
        let page = all.into_iter().skip(offset).take(limit).cloned().collect();
        ready(Ok(page))
    }

    fn append(&self, id: &str, events: Vec<StoredEvent>) -> StoreFuture<()> {
        let mut map = self.lock();
        let entry = map.entry(id.to_string()).or_default();
        if let Some(meta) = entry.meta.as_mut() {
            meta.last_updated_at = meta_timestamp();
        }
        entry.events.extend(events);
        ready(Ok(()))
    }

    fn events(&self, id: &str, q: EventQuery) -> StoreFuture<Vec<StoredEvent>> {
        let map = self.lock();
        let Some(entry) = map.get(id) else {
            return ready(Ok(Vec::new()));
        };
        // Ids are dense from 0, so the id is the index.
        let len = entry.events.len() as u64;
        let start = q.start_id.min(len) as usize;
        let end = q.end_id.map_or(len, |e| e.saturating_add(1).min(len)) as usize;
        let slice = if start < end {
            &entry.events[start..end]
        } else {
            &[]
        };
        let out = if q.reverse {
            slice.iter().rev().take(q.limit).cloned().collect()
        } else {
            slice.iter().take(q.limit).cloned().collect()
        };
        ready(Ok(out))
    }

    fn delete(&self, id: &str) -> StoreFuture<bool> {
        let removed = self.lock().remove(id).is_some_and(|e| e.meta.is_some());
        ready(Ok(removed))
    }

    fn flush(&self) -> StoreFuture<()> {
        ready(Ok(()))
    }

    fn settings(&self, user: &str) -> StoreFuture<Option<Value>> {
        let map = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        ready(Ok(map.get(user).cloned()))
    }

    fn save_settings(&self, user: &str, settings: Value) -> StoreFuture<()> {
        let mut map = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(user.to_string(), settings);
        ready(Ok(()))
    }
}
