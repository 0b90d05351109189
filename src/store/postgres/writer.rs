//! The PostgreSQL store's writer: one task, one connection, every write request of a batch in
//! one transaction (group commit), owned writes checked against their leases in it.

use super::*;

/// The writer task's connection (re-made after it breaks) and the quotas it enforces.
pub(super) struct Writer {
    pub(super) pool: Pool,
    pub(super) conn: Option<Object>,
    pub(super) limits: StoreLimits,
    /// The bytes all conversations hold, as of the last commit (shared with the handles).
    pub(super) used: Arc<AtomicU64>,
    /// This node, whose leases owned appends carry.
    pub(super) node_id: String,
}

/// What one transaction attempt has done so far, besides its SQL.
struct Pending<'a> {
    conn: &'a Object,
    node_id: &'a str,
    limits: StoreLimits,
    /// `used` when the transaction began.
    used: u64,
    /// Bytes the transaction added (creates and appends).
    added: u64,
    /// Bytes of the conversations it deleted.
    freed: u64,
    /// The conversations appended to, with the bytes appended: their `last_updated_at` and
    /// `bytes` move once, at the end of the batch.
    appended: HashMap<String, u64>,
    /// The leases of the batch's owned creates and appends that this node still holds,
    /// checked (and their ownership rows locked) by one statement before the first write.
    held: HashSet<(String, i64, i64)>,
}

/// Why one request was not applied.
type ApplyError = durable::ApplyError<tokio_postgres::Error>;

impl From<tokio_postgres::Error> for ApplyError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApplyError::Sql(e)
    }
}

/// A byte count as a BIGINT (saturating; no count gets near).
fn bigint(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Writer {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>, batch_max: usize) {
        let mut batch: Vec<WriteRequest> = Vec::new();
        while let Some(first) = rx.recv().await {
            fill_batch(first, &mut rx, batch_max, &mut batch);
            self.commit_batch(&mut batch).await;
        }
        tracing::debug!("PostgreSQL store writer finished");
    }

    /// Applies `batch` in one transaction, then answers every request in it.
    async fn commit_batch(&mut self, batch: &mut Vec<WriteRequest>) {
        if only_flushes(batch) {
            for request in batch.drain(..) {
                request.reply.send(Ok(true));
            }
            return;
        }
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = None;
            match self.pool.get().await {
                Ok(conn) => self.conn = Some(conn),
                Err(e) => {
                    fail_batch(batch, &pool_failure(e));
                    return;
                }
            }
        }
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let now = meta_timestamp();
        let used = self.used.load(Ordering::Relaxed);
        let mut outcome = self
            .transaction(conn, used, batch, &now, Isolation::Direct)
            .await;
        if let Err(BatchError::Retry) = outcome {
            outcome = self
                .transaction(conn, used, batch, &now, Isolation::Savepoints)
                .await;
        }
        match outcome {
            Ok((outcomes, used)) => {
                self.used.store(used, Ordering::Relaxed);
                for (request, outcome) in batch.drain(..).zip(outcomes) {
                    request.reply.send(outcome);
                }
            }
            Err(BatchError::Retry) => fail_batch(batch, &"the write failed".into()),
            Err(BatchError::Failed(failure)) => {
                // A connection left inside a failed transaction is not used again.
                if let Some(conn) = self.conn.take() {
                    if !conn.is_closed() && conn.batch_execute("ROLLBACK").await.is_ok() {
                        self.conn = Some(conn);
                    } else {
                        let _ = Object::take(conn);
                    }
                }
                fail_batch(batch, &failure)
            }
        }
    }

    /// Runs the batch in one transaction and commits it; returns each request's outcome and
    /// the bytes in use after it. On failure the transaction is rolled back (or the connection
    /// is broken) and nothing of the batch is kept.
    async fn transaction(
        &self,
        conn: &Object,
        used: u64,
        batch: &[WriteRequest],
        now: &str,
        isolation: Isolation,
    ) -> Result<(Vec<Result<bool, StoreError>>, u64), BatchError> {
        let failed = |e: tokio_postgres::Error| BatchError::Failed(postgres_failure(e));
        conn.batch_execute("BEGIN").await.map_err(failed)?;
        let mut pending = Pending {
            conn,
            node_id: &self.node_id,
            limits: self.limits,
            used,
            added: 0,
            freed: 0,
            appended: HashMap::new(),
            held: HashSet::new(),
        };
        match pending.apply_batch(batch, now, isolation).await {
            Ok(outcomes) => {
                conn.batch_execute("COMMIT").await.map_err(failed)?;
                let used = used
                    .saturating_add(pending.added)
                    .saturating_sub(pending.freed);
                Ok((outcomes, used))
            }
            Err(e) => {
                if conn.batch_execute("ROLLBACK").await.is_err() {
                    return Err(BatchError::Failed(match e {
                        BatchError::Failed(failure) => failure,
                        BatchError::Retry => "the write failed and could not be rolled back".into(),
                    }));
                }
                Err(e)
            }
        }
    }
}

impl Pending<'_> {
    async fn apply_batch(
        &mut self,
        batch: &[WriteRequest],
        now: &str,
        isolation: Isolation,
    ) -> Result<Vec<Result<bool, StoreError>>, BatchError> {
        let statement_failed = |e: tokio_postgres::Error| match isolation {
            Isolation::Direct => BatchError::Retry,
            Isolation::Savepoints => BatchError::Failed(postgres_failure(e)),
        };
        self.held = self.check_leases(batch).await.map_err(statement_failed)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for request in batch {
            let outcome = match isolation {
                Isolation::Direct => match self.apply(&request.command, now).await {
                    Ok(value) => Ok(value),
                    Err(ApplyError::Refused(e)) => Err(e),
                    Err(ApplyError::Sql(_)) => return Err(BatchError::Retry),
                },
                Isolation::Savepoints => self.apply_in_savepoint(&request.command, now).await?,
            };
            outcomes.push(outcome);
        }
        // One `last_updated_at` and `bytes` update per conversation appended to.
        if !self.appended.is_empty() {
            let (ids, bytes): (Vec<&str>, Vec<i64>) = self
                .appended
                .iter()
                .map(|(id, bytes)| (id.as_str(), bigint(*bytes)))
                .unzip();
            let touch = self
                .conn
                .prepare_cached(sql::TOUCH)
                .await
                .map_err(statement_failed)?;
            self.conn
                .execute(&touch, &[&ids, &bytes, &now])
                .await
                .map_err(statement_failed)?;
        }
        Ok(outcomes)
    }

    /// Runs one request inside a savepoint, so that its failure leaves the rest of the batch
    /// alone. `Err` when the failure took the whole transaction with it.
    async fn apply_in_savepoint(
        &mut self,
        command: &WriteCommand,
        now: &str,
    ) -> Result<Result<bool, StoreError>, BatchError> {
        if matches!(command, WriteCommand::Flush | WriteCommand::Probe) {
            return Ok(Ok(true));
        }
        let failed = |e: tokio_postgres::Error| BatchError::Failed(postgres_failure(e));
        self.conn
            .batch_execute("SAVEPOINT request")
            .await
            .map_err(failed)?;
        let outcome = match self.apply(command, now).await {
            Ok(value) => {
                self.conn
                    .batch_execute("RELEASE SAVEPOINT request")
                    .await
                    .map_err(failed)?;
                return Ok(Ok(value));
            }
            Err(ApplyError::Refused(e)) => e,
            Err(ApplyError::Sql(e)) => io_error(e),
        };
        self.conn
            .batch_execute("ROLLBACK TO SAVEPOINT request; RELEASE SAVEPOINT request")
            .await
            .map_err(failed)?;
        Ok(Err(outcome))
    }

    /// Applies one request. A refusal writes nothing and leaves the transaction healthy; the
    /// writer's bookkeeping changes only once every statement of the request has succeeded.
    async fn apply(&mut self, command: &WriteCommand, now: &str) -> Result<bool, ApplyError> {
        let conn = self.conn;
        match command {
            WriteCommand::Create {
                meta,
                events,
                lease,
            } => {
                if let Some(lease) = lease {
                    self.check_lease(&meta.conversation_id, *lease)?;
                }
                self.create(meta, events, lease.map_or(0, |l| l.epoch))
                    .await
            }
            WriteCommand::SetTitle { id, title } => {
                let statement = conn.prepare_cached(sql::SET_TITLE).await?;
                let changed = conn.execute(&statement, &[id, title, &now]).await?;
                Ok(changed > 0)
            }
            WriteCommand::Append { id, events, lease } => {
                if let Some(lease) = lease {
                    self.check_lease(id, *lease)?;
                }
                self.append(id, events, lease.map_or(0, |l| l.epoch)).await
            }
            WriteCommand::Delete { id } => {
                let statement = conn.prepare_cached(sql::DELETE).await?;
                let Some(row) = conn.query_opt(&statement, &[id]).await? else {
                    return Ok(false);
                };
                let bytes: i64 = row.try_get(0)?;
                self.freed = self.freed.saturating_add(u64::try_from(bytes).unwrap_or(0));
                self.appended.remove(id);
                Ok(true)
            }
            WriteCommand::SaveSettings { user, json } => {
                let statement = conn.prepare_cached(sql::SAVE_SETTINGS).await?;
                conn.execute(&statement, &[user, json]).await?;
                Ok(true)
            }
            WriteCommand::AddKey { key, hash } => {
                let statement = conn.prepare_cached(sql::ADD_KEY).await?;
                let added = conn
                    .execute(&statement, &[&key.name, hash, &key.admin, &key.created_at])
                    .await?;
                if added == 0 {
                    return Err(ApplyError::Refused(StoreError::KeyExists(key.name.clone())));
                }
                Ok(true)
            }
            WriteCommand::RevokeKey { name } => {
                let statement = conn.prepare_cached(sql::REVOKE_KEY).await?;
                Ok(conn.execute(&statement, &[name]).await? > 0)
            }
            WriteCommand::Flush | WriteCommand::Probe => Ok(true),
        }
    }

    /// The bytes in use if this transaction commits now (deletes not subtracted: they may yet
    /// roll back with their savepoint).
    fn in_use(&self) -> u64 {
        self.used.saturating_add(self.added)
    }

    /// Inserts a new conversation and its first events. Everything the append could refuse is
    /// checked before the first write, so a refusal writes nothing.
    async fn create(
        &mut self,
        meta: &ConversationMeta,
        events: &[StoredEvent],
        epoch: i64,
    ) -> Result<bool, ApplyError> {
        let id = &meta.conversation_id;
        let init = encode_init(&meta.init).map_err(ApplyError::Refused)?;
        let bytes = meta_bytes(&init);
        let more = events_bytes(events);
        self.limits.check_conversation(id, 0, bytes)?;
        self.limits.check_store(self.in_use(), bytes)?;
        check_append(id, None, events)?;
        self.limits.check_conversation(id, bytes, more)?;
        self.limits
            .check_store(self.in_use(), bytes.saturating_add(more))?;
        let statement = self.conn.prepare_cached(sql::CREATE).await?;
        let inserted = self
            .conn
            .execute(
                &statement,
                &[
                    &meta.conversation_id.as_str(),
                    &meta.title,
                    &meta.created_at,
                    &meta.last_updated_at,
                    &meta.trigger.as_str(),
                    &meta.owner,
                    &init,
                    &bigint(bytes),
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(ApplyError::Refused(StoreError::Exists(
                meta.conversation_id.clone(),
            )));
        }
        self.added = self.added.saturating_add(bytes);
        self.append(id, events, epoch).await
    }

    /// Which leases of `batch`'s owned creates and appends this node still holds, with one
    /// statement ([`sql::OWNS`]) that also holds their ownership rows (shared) until the
    /// transaction ends; nothing is asked when the batch has none.
    async fn check_leases(
        &self,
        batch: &[WriteRequest],
    ) -> Result<HashSet<(String, i64, i64)>, tokio_postgres::Error> {
        let asked: HashSet<(&str, i64, i64)> = batch
            .iter()
            .filter_map(|request| match &request.command {
                WriteCommand::Create {
                    meta,
                    lease: Some(lease),
                    ..
                } => Some((
                    meta.conversation_id.as_str(),
                    lease.incarnation,
                    lease.epoch,
                )),
                WriteCommand::Append {
                    id,
                    lease: Some(lease),
                    ..
                } => Some((id.as_str(), lease.incarnation, lease.epoch)),
                _ => None,
            })
            .collect();
        if asked.is_empty() {
            return Ok(HashSet::new());
        }
        let mut ids = Vec::with_capacity(asked.len());
        let mut incarnations = Vec::with_capacity(asked.len());
        let mut epochs = Vec::with_capacity(asked.len());
        for &(id, incarnation, epoch) in &asked {
            ids.push(id);
            incarnations.push(incarnation);
            epochs.push(epoch);
        }
        let statement = self.conn.prepare_cached(sql::OWNS).await?;
        let rows = self
            .conn
            .query(&statement, &[&self.node_id, &ids, &incarnations, &epochs])
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect()
    }

    /// Refuses an owned create or append whose lease [`Pending::check_leases`] did not find
    /// held.
    fn check_lease(&self, id: &str, lease: Lease) -> Result<(), ApplyError> {
        if !self
            .held
            .contains(&(id.to_string(), lease.incarnation, lease.epoch))
        {
            return Err(ApplyError::Refused(StoreError::Fenced(format!(
                "conversation {id}: this node (incarnation {}) no longer owns it at epoch {} \
                 (taken over, or the node's registration lapsed); nothing was written",
                lease.incarnation, lease.epoch
            ))));
        }
        Ok(())
    }

    /// Appends `events` under `epoch` in one statement that inserts them only if the log ends
    /// right before the first and the conversation's quota has room; when it does not (or the
    /// conversation is unknown), reads why and refuses.
    async fn append(
        &mut self,
        id: &str,
        events: &[StoredEvent],
        epoch: i64,
    ) -> Result<bool, ApplyError> {
        let Some(first) = events.first() else {
            // Nothing to store; an unknown conversation is fine too (as in every store).
            return Ok(true);
        };
        // The ids must be consecutive and fit the column; `first - 1` is then the log's end.
        let Ok(first_id) = i64::try_from(first.id) else {
            return Err(ApplyError::Refused(StoreError::Io(
                format!("conversation {id}: event id {} is too large", first.id).into(),
            )));
        };
        let expected_last = (first_id > 0).then(|| first_id - 1);
        check_append(id, expected_last, events)?;
        let more = events_bytes(events);
        self.limits.check_store(self.in_use(), more)?;
        let earlier = self.appended.get(id).copied().unwrap_or(0);
        let room = match self.limits.max_bytes_per_conversation {
            0 => i64::MAX,
            limit => bigint(limit),
        };
        let ids: Vec<i64> = events.iter().map(|e| e.id as i64).collect();
        let texts: Vec<&str> = events.iter().map(|e| &*e.json).collect();
        let statement = self.conn.prepare_cached(sql::APPEND).await?;
        let expected_end = expected_last.unwrap_or(-1);
        let inserted = self
            .conn
            .execute(
                &statement,
                &[
                    &id,
                    &expected_end,
                    &ids,
                    &texts,
                    &bigint(earlier.saturating_add(more)),
                    &room,
                    &epoch,
                ],
            )
            .await?;
        if inserted as usize == events.len() {
            self.added = self.added.saturating_add(more);
            *self.appended.entry(id.to_string()).or_default() += more;
            return Ok(true);
        }
        // Nothing was inserted (the statement is all or nothing): say why.
        let statement = self.conn.prepare_cached(sql::LOG_END).await?;
        let Some(row) = self.conn.query_opt(&statement, &[&id]).await? else {
            return Err(ApplyError::Refused(StoreError::Io(
                format!("conversation {id} does not exist; cannot append events to it").into(),
            )));
        };
        let last: Option<i64> = row.try_get(0)?;
        let held: i64 = row.try_get(1)?;
        check_append(id, last, events)?;
        let held = u64::try_from(held).unwrap_or(0).saturating_add(earlier);
        self.limits.check_conversation(id, held, more)?;
        // Cannot happen while this writer is the only one; said plainly if it does.
        Err(ApplyError::Refused(StoreError::Io(
            format!(
                "conversation {id}: the log changed while appending at event id {}",
                first.id
            )
            .into(),
        )))
    }
}
