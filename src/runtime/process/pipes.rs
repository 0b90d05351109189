//! The agent's pipes: the writer task that owns its stdin (the `init` line with the
//! streamed history, then the queued lines), the reader of its stdout with a bounded line
//! buffer, and the rate-limited logger of its stderr.

use super::*;

/// Lines waiting for the agent's stdin; a full queue means the agent does not read its input.
pub(super) const INPUT_QUEUE_LINES: usize = 64;
/// Read buffer for the agent's stdout.
pub(super) const STDOUT_BUFFER: usize = 16 * 1024;
/// A line buffer that grew past this after a long line shrinks back to it.
pub(super) const LINE_BUFFER_KEEP: usize = 64 * 1024;
/// Longest stderr line logged; the rest of the line is dropped.
pub(super) const STDERR_MAX_LINE: usize = 4096;
/// Longest stderr line kept in the tail quoted when the agent exits.
pub(super) const STDERR_TAIL_LINE: usize = 1000;
/// Stderr lines logged per second per agent; the rest are counted, not logged.
pub(super) const STDERR_LOG_PER_SEC: u32 = 200;
/// Invalid lines reported at once before the reports are limited to one per second.
pub(super) const COMPLAINT_BURST: f64 = 5.0;
/// How long the readers may take to pass on what an exited agent wrote before it exited.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// History events read from the store at a time while writing `init`.
pub(super) const HISTORY_PAGE: usize = 512;

/// Where the `init` line's history comes from: every event of conversation `id` with an id
/// below `before`.
#[derive(Clone)]
pub(super) struct History {
    pub(super) id: ConversationId,
    pub(super) store: Arc<dyn Store>,
    pub(super) before: u64,
}

pub(super) enum InitError {
    /// The conversation's history could not be read.
    Store(crate::store::StoreError),
    Io(io::Error),
}

impl From<io::Error> for InitError {
    fn from(e: io::Error) -> Self {
        InitError::Io(e)
    }
}

/// Once attached, writes `init`, then every queued line; closes stdin when the queue closes
/// (or at once when the agent is stopped before it was attached).
pub(super) async fn write_input(
    mut stdin: ChildStdin,
    attach: oneshot::Receiver<(String, History, RuntimeSink)>,
    mut lines: mpsc::Receiver<Vec<u8>>,
    label: Label,
) {
    let Ok((head, history, sink)) = attach.await else {
        debug!(conversation_id = %label, "agent stdin closed before init");
        return;
    };
    let conversation_id = label.get();
    match write_init(&mut stdin, &head, &history).await {
        Ok(()) => {}
        Err(InitError::Store(e)) => {
            sink.send(RuntimeSignal::Failed(
                Failure::of(e).within("cannot read the conversation's history"),
            ));
            return;
        }
        Err(InitError::Io(e)) => {
            debug!(conversation_id = %conversation_id, error = %e, "agent stdin closed during init");
            return;
        }
    }
    while let Some(line) = lines.recv().await {
        if let Err(e) = stdin.write_all(&line).await {
            debug!(conversation_id = %conversation_id, error = %e, "agent stdin closed");
            return;
        }
    }
    let _ = stdin.shutdown().await;
    debug!(conversation_id = %conversation_id, "agent stdin closed by switchboard");
}

pub(super) async fn write_init(
    stdin: &mut ChildStdin,
    head: &str,
    history: &History,
) -> Result<(), InitError> {
    let mut out = BufWriter::with_capacity(16 * 1024, stdin);
    out.write_all(head.as_bytes()).await?;
    let mut next = 0;
    let mut first = true;
    while next < history.before {
        let query = EventQuery {
            start_id: next,
            end_id: Some(history.before - 1),
            reverse: false,
            limit: HISTORY_PAGE,
        };
        let page = history
            .store
            .events(&history.id, query)
            .await
            .map_err(InitError::Store)?;
        if page.is_empty() {
            break;
        }
        for event in &page {
            if !first {
                out.write_all(b",").await?;
            }
            first = false;
            out.write_all(event.json.as_bytes()).await?;
            next = event.id + 1;
        }
    }
    out.write_all(b"]}\n").await?;
    out.flush().await?;
    Ok(())
}

// ---- the readers ------------------------------------------------------------------------

/// Reads lines of at most `max` bytes; a longer line is cut to `max` and its length reported.
pub(super) struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    max: usize,
}

/// One line, without its newline.
pub(super) struct Line<'a> {
    bytes: &'a [u8],
    /// The full length when the line was longer than the limit (`bytes` is its start).
    cut_from: Option<usize>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(inner: R, buffer: usize, max: usize) -> Self {
        LineReader {
            inner: BufReader::with_capacity(buffer, inner),
            buf: Vec::new(),
            max,
        }
    }

    /// The next line; `None` at the end of the stream. Memory stays within `max` bytes.
    async fn next_line(&mut self) -> io::Result<Option<Line<'_>>> {
        self.buf.clear();
        if self.buf.capacity() > LINE_BUFFER_KEEP {
            self.buf.shrink_to(LINE_BUFFER_KEEP);
        }
        let mut len = 0usize;
        let mut seen = false;
        loop {
            let chunk = self.inner.fill_buf().await?;
            if chunk.is_empty() {
                if !seen {
                    return Ok(None);
                }
                break;
            }
            seen = true;
            let (part, used, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], i + 1, true),
                None => (chunk, chunk.len(), false),
            };
            len = len.saturating_add(part.len());
            let room = self.max.saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&part[..part.len().min(room)]);
            self.inner.consume(used);
            if done {
                break;
            }
        }
        let mut bytes = &self.buf[..];
        if len <= self.max {
            if let Some(stripped) = bytes.strip_suffix(b"\r") {
                bytes = stripped;
            }
        }
        Ok(Some(Line {
            bytes,
            cut_from: (len > self.max).then_some(len),
        }))
    }
}

/// Once attached, reads the agent's stdout and hands each message to the conversation, one at
/// a time. A pooled agent's links to its moved directories go at its `ready`: it has read
/// `init` by then, and whatever it looks up by path uses the conversation's names.
pub(super) async fn read_output(
    stdout: impl AsyncRead + Unpin,
    attach: oneshot::Receiver<(RuntimeSink, Vec<PathBuf>)>,
    max_line_bytes: usize,
    label: Label,
) {
    let mut reader = LineReader::new(stdout, STDOUT_BUFFER, max_line_bytes);
    let mut complaints = Complaints::new();
    // Never attached: the output is read and dropped, so that the agent never blocks.
    let (sink, mut aliases, mut attached) = match attach.await {
        Ok((sink, aliases)) => (Some(sink), aliases, true),
        Err(_) => (None, Vec::new(), false),
    };
    let conversation_id = label.get();
    loop {
        let line = match reader.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                warn!(conversation_id = %conversation_id, error = %e, "cannot read the agent's stdout");
                break;
            }
        };
        if !attached {
            // The conversation is gone; keep reading so that the agent never blocks on a full
            // pipe while it stops.
            continue;
        }
        let signal = match line.cut_from {
            Some(len) => Err(format!(
                "a line of {len} bytes is longer than the limit of {max_line_bytes} bytes \
                 (runtime.process.max_line_bytes)"
            )),
            None => parse_line(line.bytes),
        };
        let signal = match signal {
            Ok(Some(signal)) => signal,
            Ok(None) => continue,
            Err(why) => match complaints.complain(&conversation_id, &why, line.bytes) {
                Some(signal) => signal,
                None => continue,
            },
        };
        if matches!(signal, RuntimeSignal::Ready { .. }) {
            remove_aliases(&std::mem::take(&mut aliases));
        }
        if let Some(sink) = &sink {
            if !sink.deliver(signal).await {
                attached = false;
            }
        }
    }
    debug!(conversation_id = %conversation_id, "agent stdout closed");
}

/// Turns invalid lines into error statuses: a few at once, then at most one per second (the
/// next one says how many were skipped), so that a misbehaving agent cannot flood its clients.
pub(super) struct Complaints {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

impl Complaints {
    fn new() -> Self {
        Complaints {
            tokens: COMPLAINT_BURST,
            refilled: Instant::now(),
            suppressed: 0,
        }
    }

    fn complain(&mut self, conversation_id: &str, why: &str, line: &[u8]) -> Option<RuntimeSignal> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed).min(COMPLAINT_BURST);
        self.refilled = now;
        let preview = preview(line);
        if self.tokens < 1.0 {
            self.suppressed += 1;
            debug!(conversation_id = %conversation_id, line = %preview, "invalid agent line: {why}");
            return None;
        }
        self.tokens -= 1.0;
        let suppressed = std::mem::take(&mut self.suppressed);
        warn!(
            conversation_id = %conversation_id,
            line = %preview,
            suppressed,
            "invalid agent line ignored: {why}"
        );
        let mut message = format!("The agent sent an invalid line, which was ignored: {why}.");
        if suppressed > 0 {
            message.push_str(&format!(
                " {suppressed} more invalid lines were ignored before it."
            ));
        }
        Some(RuntimeSignal::Status(StatusUpdate::error(
            STATUS_AGENT_PROTOCOL_ERROR,
            &message,
        )))
    }
}

/// The start of a line, for logs.
pub(super) fn preview(line: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&line[..line.len().min(MAX)]);
    if line.len() > MAX {
        format!("{text}…")
    } else {
        text.into_owned()
    }
}

/// Logs the agent's stderr and keeps its last `keep` lines in `tail`.
pub(super) async fn read_stderr(
    stderr: impl AsyncRead + Unpin,
    tail: Arc<Mutex<VecDeque<String>>>,
    keep: usize,
    conversation_id: Label,
) {
    let mut reader = LineReader::new(stderr, 4096, STDERR_MAX_LINE);
    let mut window = Instant::now();
    let mut logged = 0u32;
    let mut skipped = 0u64;
    while let Ok(Some(line)) = reader.next_line().await {
        let mut text = String::from_utf8_lossy(line.bytes).into_owned();
        if line.cut_from.is_some() {
            text.push('…');
        }
        if window.elapsed() >= Duration::from_secs(1) {
            if skipped > 0 {
                warn!(conversation_id = %conversation_id, skipped, "agent stderr lines not logged (too many)");
            }
            window = Instant::now();
            logged = 0;
            skipped = 0;
        }
        if logged < STDERR_LOG_PER_SEC {
            logged += 1;
            info!(conversation_id = %conversation_id, "agent stderr: {text}");
        } else {
            skipped += 1;
        }
        if keep > 0 {
            if text.len() > STDERR_TAIL_LINE {
                let mut cut = STDERR_TAIL_LINE;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
            }
            let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
            if tail.len() >= keep {
                tail.pop_front();
            }
            tail.push_back(text);
        }
    }
    if skipped > 0 {
        warn!(conversation_id = %conversation_id, skipped, "agent stderr lines not logged (too many)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix::test]
    async fn line_reader_bounds_lines() {
        let data: &[u8] = b"short\nabcdefghijkl\r\n\nlast";
        let mut r = LineReader::new(data, 4, 8);
        let mut out = Vec::new();
        while let Some(line) = r.next_line().await.unwrap() {
            out.push((
                String::from_utf8_lossy(line.bytes).into_owned(),
                line.cut_from,
            ));
        }
        assert_eq!(
            out,
            [
                ("short".to_string(), None),
                ("abcdefgh".to_string(), Some(13)),
                (String::new(), None),
                ("last".to_string(), None),
            ]
        );
    }
}
