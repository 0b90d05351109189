//! [`Failure`]: an error that is a message worth showing as it is (a store's, a runtime's, a
//! start-up check's) and keeps the typed error that caused it, when there is one, as its
//! source. Errors with a fixed set of causes get their own enums; this is for the messages
//! built where the failure is understood.

use std::sync::Arc;

/// A failure in words (what users, operators and logs see, the cause's own text included)
/// and, when a driver, codec, the system or another part reported it, that error as the
/// [`source`](std::error::Error::source), typed (downcast it to `rusqlite::Error`,
/// `tokio_postgres::Error`, `io::Error`, `StoreError`, …). Cheap to clone (one failed store
/// batch answers many waiters with the same failure): the source is shared. Two failures are
/// equal when they say the same thing. It reads as its message (`Deref<Target = str>`).
#[derive(Clone)]
pub struct Failure {
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Failure {
    /// A failure in its own words, with no underlying error.
    pub fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            source: None,
        }
    }

    /// A failure `cause` reported, saying `message` (which should include what `cause` says).
    pub fn caused(
        message: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Failure {
        Failure {
            message: message.into(),
            source: Some(Arc::new(cause)),
        }
    }

    /// The failure `cause` reported, in its own words.
    pub fn of(cause: impl std::error::Error + Send + Sync + 'static) -> Failure {
        Failure::caused(cause.to_string(), cause)
    }

    /// This failure with `context` put before its message; the source stays.
    pub fn within(self, context: impl std::fmt::Display) -> Failure {
        Failure {
            message: format!("{context}: {}", self.message),
            source: self.source,
        }
    }

    /// What it says.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_tuple("Failure");
        out.field(&self.message);
        if let Some(source) = &self.source {
            out.field(source);
        }
        out.finish()
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl PartialEq for Failure {
    fn eq(&self, other: &Failure) -> bool {
        self.message == other.message
    }
}

impl Eq for Failure {}

impl std::ops::Deref for Failure {
    type Target = str;

    fn deref(&self) -> &str {
        &self.message
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Failure {
        Failure::new(message)
    }
}
