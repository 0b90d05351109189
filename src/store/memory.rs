//! The in-memory store: fast, non-durable, for tests and throwaway servers (`store = "memory"`).
//!
//! Operations complete immediately; a `std::sync` lock is taken only inside each call, never
//! across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use super::{
    events_bytes, meta_bytes, ApiKey, EventQuery, Existing, KeyLookup, Store, StoreError,
    StoreFuture, StoreLimits,
};
use crate::conversation::{ConversationId, ConversationMeta, ConversationRecord};
use crate::events::{meta_timestamp, StoredEvent};

#[derive(Default)]
struct Entry {
    meta: Option<ConversationMeta>,
    events: Vec<StoredEvent>,
    /// What it counts for against the quotas.
    bytes: u64,
}

#[derive(Default)]
struct Conversations {
    map: HashMap<ConversationId, Entry>,
    /// The sum of every entry's `bytes`.
    used: u64,
}

/// A store that keeps everything in this process.
#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Conversations>>,
    settings: Arc<Mutex<HashMap<String, Value>>>,
    /// User keys by name, with their hashes.
    keys: Arc<Mutex<BTreeMap<String, (ApiKey, String)>>>,
    limits: StoreLimits,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A memory store that enforces `limits`' quotas (it has no disk to keep a reserve on).
    pub fn with_limits(limits: StoreLimits) -> Self {
        MemoryStore {
            limits,
            ..Self::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, Conversations> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keys(&self) -> MutexGuard<'_, BTreeMap<String, (ApiKey, String)>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A page of the conversations `keep` accepts, newest first.
    fn page(
        &self,
        keep: impl Fn(&ConversationMeta) -> bool,
        offset: usize,
        limit: usize,
    ) -> Vec<ConversationMeta> {
        let inner = self.lock();
        let mut all: Vec<&ConversationMeta> = inner
            .map
            .values()
            .filter_map(|e| e.meta.as_ref())
            .filter(|m| keep(m))
            .collect();
        all.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.conversation_id.cmp(&a.conversation_id))
        });
        all.into_iter().skip(offset).take(limit).cloned().collect()
    }
}

fn ready<T: Send + 'static>(value: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(value))
}

impl Store for MemoryStore {
    fn create_with_events(
        &self,
        mut meta: ConversationMeta,
        events: Vec<StoredEvent>,
    ) -> StoreFuture<()> {
        let mut inner = self.lock();
        let id = &meta.conversation_id;
        if inner.map.get(id).is_some_and(|e| e.meta.is_some()) {
            return ready(Err(StoreError::Exists(meta.conversation_id)));
        }
        let init = serde_json::to_string(&meta.init).unwrap_or_default();
        let bytes = meta_bytes(&init);
        let more = events_bytes(&events);
        let checked = self
            .limits
            .check_conversation(id, 0, bytes)
            .and_then(|()| self.limits.check_store(inner.used, bytes))
            .and_then(|()| super::durable::check_append(id, None, &events))
            .and_then(|()| self.limits.check_conversation(id, bytes, more))
            .and_then(|()| {
                self.limits
                    .check_store(inner.used, bytes.saturating_add(more))
            });
        if let Err(e) = checked {
            return ready(Err(e));
        }
        if !events.is_empty() {
            meta.last_updated_at = meta_timestamp();
        }
        inner.used += bytes + more;
        let entry = inner.map.entry(meta.conversation_id.clone()).or_default();
        entry.bytes += bytes + more;
        entry.meta = Some(meta);
        entry.events.extend(events);
        ready(Ok(()))
    }

    fn set_title(&self, id: &ConversationId, title: &str) -> StoreFuture<bool> {
        let mut inner = self.lock();
        let found = match inner.map.get_mut(id).and_then(|e| e.meta.as_mut()) {
            Some(meta) => {
                meta.title = title.to_string();
                meta.last_updated_at = meta_timestamp();
                true
            }
            None => false,
        };
        ready(Ok(found))
    }

    fn exists(&self, id: &ConversationId) -> StoreFuture<Option<Existing>> {
        let inner = self.lock();
        let existing = inner.map.get(id).and_then(|e| {
            e.meta.as_ref().map(|meta| Existing {
                owner: meta.owner.clone(),
            })
        });
        ready(Ok(existing))
    }

    fn get(&self, id: &ConversationId) -> StoreFuture<Option<ConversationRecord>> {
        let inner = self.lock();
        let record = inner.map.get(id).and_then(|e| {
            e.meta.clone().map(|meta| ConversationRecord {
                meta,
                next_event_id: e.events.last().map_or(0, |ev| ev.id + 1),
                bytes: e.bytes,
            })
        });
        ready(Ok(record))
    }

    fn list(&self, offset: usize, limit: usize) -> StoreFuture<Vec<ConversationMeta>> {
        ready(Ok(self.page(|_| true, offset, limit)))
    }

    fn list_owned(
        &self,
        owner: &str,
        offset: usize,
        limit: usize,
    ) -> StoreFuture<Vec<ConversationMeta>> {
        let mine = |m: &ConversationMeta| m.owner.as_deref() == Some(owner);
        ready(Ok(self.page(mine, offset, limit)))
    }

    fn append(&self, id: &ConversationId, events: Vec<StoredEvent>) -> StoreFuture<()> {
        let mut inner = self.lock();
        let bytes = events_bytes(&events);
        let held = inner.map.get(id).map_or(0, |e| e.bytes);
        let checked = self
            .limits
            .check_conversation(id, held, bytes)
            .and_then(|()| self.limits.check_store(inner.used, bytes));
        if let Err(e) = checked {
            return ready(Err(e));
        }
        inner.used += bytes;
        let entry = inner.map.entry(id.clone()).or_default();
        if let Some(meta) = entry.meta.as_mut() {
            meta.last_updated_at = meta_timestamp();
        }
        entry.bytes += bytes;
        entry.events.extend(events);
        ready(Ok(()))
    }

    fn events(&self, id: &ConversationId, q: EventQuery) -> StoreFuture<Vec<StoredEvent>> {
        let inner = self.lock();
        let Some(entry) = inner.map.get(id) else {
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

    fn delete(&self, id: &ConversationId) -> StoreFuture<bool> {
        let mut inner = self.lock();
        let removed = inner.map.remove(id);
        if let Some(entry) = &removed {
            inner.used = inner.used.saturating_sub(entry.bytes);
        }
        ready(Ok(removed.is_some_and(|e| e.meta.is_some())))
    }

    fn flush(&self) -> StoreFuture<()> {
        ready(Ok(()))
    }

    fn limits(&self) -> StoreLimits {
        self.limits
    }

    fn used_bytes(&self) -> u64 {
        self.lock().used
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

    fn add_key(&self, key: ApiKey, hash: String) -> StoreFuture<()> {
        let mut keys = self.keys();
        if keys.contains_key(&key.name) {
            return ready(Err(StoreError::KeyExists(key.name)));
        }
        keys.insert(key.name.clone(), (key, hash));
        ready(Ok(()))
    }

    fn list_keys(&self) -> StoreFuture<Vec<ApiKey>> {
        ready(Ok(self.keys().values().map(|(k, _)| k.clone()).collect()))
    }

    fn revoke_key(&self, name: &str) -> StoreFuture<bool> {
        ready(Ok(self.keys().remove(name).is_some()))
    }

    fn lookup_key(&self, hash: Option<&str>) -> StoreFuture<KeyLookup> {
        let keys = self.keys();
        let key = hash.and_then(|h| {
            keys.values()
                .find(|(_, stored)| stored == h)
                .map(|(k, _)| k.clone())
        });
        ready(Ok(KeyLookup {
            key,
            any: !keys.is_empty(),
        }))
    }
}
