//! User keys: what a key looks like, how it is stored, what a name may be, and the
//! `switchboard keys add|list|revoke` command that manages them in the store.
//!
//! A key is `sbk_` and 64 hex digits: 256 random bits from the operating system, shown once
//! when it is made. The store keeps only its SHA-256 ([`hash`]), unsalted: salting defends
//! low-entropy secrets (passwords) against precomputed tables, and a 256-bit random key has
//! no table to be found in; for the same reason a fast hash is enough (trying keys against a
//! stolen hash is hopeless at any speed). Looking a key up by its hash is an indexed equality
//! lookup: what its timing could tell is about a hash the caller cannot steer.
//!
//! The command uses the same configuration layers as `serve` (so it finds the same store) and
//! works beside a running server: it opens the store itself, without the data directory's
//! lock, and the server reads keys from the store at every request, so an added key works and
//! a revoked key is refused from the next request on. The memory store keeps nothing between
//! processes, so the command refuses it.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::{Settings, StoreKind};
use crate::events::meta_timestamp;
use crate::store::{ApiKey, Store, StoreError};

/// What every user key starts with (tells it from a session key at a glance).
pub const KEY_PREFIX: &str = "sbk_";

/// Random bytes in a user key.
const KEY_BYTES: usize = 32;

/// The longest key name.
pub const MAX_NAME_LEN: usize = 64;

/// Names that the access log uses for callers without a user key.
const RESERVED_NAMES: &[&str] = &["anonymous", "key"];

/// `n` random bytes from the operating system, as `2n` hex digits.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new user key.
pub fn generate() -> std::io::Result<String> {
    Ok(format!("{KEY_PREFIX}{}", random_hex(KEY_BYTES)?))
}

/// What the store keeps of `key`: its SHA-256, as hex.
pub fn hash(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Why `name` cannot name a key, if it cannot: 1–64 characters of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit, and not one of the names the access log uses otherwise.
pub fn name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some(
            "a key needs a name (1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-')".into(),
        );
    }
    if name.len() > MAX_NAME_LEN {
        return Some(format!(
            "the name is {} characters long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if let Some(bad) = name.chars().find(|c| !allowed(*c)) {
        return Some(format!(
            "{name:?} has the character {bad:?}; a name is made of A-Z, a-z, 0-9, '.', '_' and '-'"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Some(format!("{name:?} must start with a letter or a digit"));
    }
    if RESERVED_NAMES.contains(&name) {
        return Some(format!(
            "{name:?} is reserved (the access log calls callers without a user key so)"
        ));
    }
    None
}

/// Why a `switchboard keys` command failed; the message is for the operator.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// Bad input; nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// The store could not be opened or failed.
    #[error("{0}")]
    Store(#[source] StoreError),
    /// The system could not do its part (make a key's randomness, start a runtime).
    #[error("{what}: {source}")]
    System {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl From<StoreError> for KeysError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::KeyExists(name) => KeysError::Invalid(format!(
                "a key named {name:?} exists already; revoke it first to replace it \
                 (`switchboard keys revoke {name}`)"
            )),
            other => KeysError::Store(other),
        }
    }
}

/// Opens the store `settings` name, refusing the memory store.
fn open(settings: &Settings) -> Result<Arc<dyn Store>, KeysError> {
    if settings.store == StoreKind::Memory {
        return Err(KeysError::Invalid(
            "the memory store keeps nothing between processes, so it holds no user keys; \
             use store = \"sqlite\" (the default) or \"postgres\" for user keys"
                .into(),
        ));
    }
    crate::startup::open_store(settings).map_err(KeysError::Store)
}

/// Runs `work` against the store on a runtime of its own.
fn with_store<T>(
    settings: &Settings,
    work: impl AsyncFnOnce(Arc<dyn Store>) -> Result<T, KeysError>,
) -> Result<T, KeysError> {
    let store = open(settings)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| KeysError::System {
            what: "cannot start a runtime",
            source,
        })?;
    runtime.block_on(work(store))
}

/// `keys add NAME [--admin]`: stores a new key and returns it (shown once).
pub fn add(settings: &Settings, name: &str, admin: bool) -> Result<String, KeysError> {
    if let Some(why) = name_error(name) {
        return Err(KeysError::Invalid(why));
    }
    let key = generate().map_err(|source| KeysError::System {
        what: "cannot make a key",
        source,
    })?;
    let record = ApiKey {
        name: name.to_string(),
        admin,
        created_at: meta_timestamp(),
    };
    let hashed = hash(&key);
    with_store(settings, async move |store| {
        store.add_key(record, hashed).await?;
        Ok(key)
    })
}

/// `keys list`: every key, by name.
pub fn list(settings: &Settings) -> Result<Vec<ApiKey>, KeysError> {
    with_store(settings, async |store| Ok(store.list_keys().await?))
}

/// `keys revoke NAME`: removes the key; an unknown name is an error.
pub fn revoke(settings: &Settings, name: &str) -> Result<(), KeysError> {
    if let Some(why) = name_error(name) {
        return Err(KeysError::Invalid(why));
    }
    let name = name.to_string();
    with_store(settings, async move |store| {
        if store.revoke_key(&name).await? {
            Ok(())
        } else {
            Err(KeysError::Invalid(format!(
                "there is no key named {name:?} (`switchboard keys list` shows them)"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that cannot be opened fails the command with the store's own error as the cause
    /// (its message unchanged), not a copy of its text.
    #[test]
    fn a_store_failure_keeps_the_store_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(crate::store::sqlite::DB_FILE_NAME),
            "not a database",
        )
        .expect("write");
        let mut settings = Settings::defaults();
        settings.store = StoreKind::Sqlite;
        settings.data_dir = dir.path().to_path_buf();
        let failed = list(&settings).expect_err("the file is not a database");
        let KeysError::Store(cause @ StoreError::Open(why)) = &failed else {
            panic!("expected the store's open error, got {failed:?}");
        };
        assert_eq!(failed.to_string(), format!("cannot open the store: {why}"));
        let source = std::error::Error::source(&failed).expect("a source");
        assert_eq!(source.downcast_ref::<StoreError>(), Some(cause));
    }

    #[test]
    fn keys_are_random_and_hashed() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), KEY_PREFIX.len() + 2 * KEY_BYTES);
        assert_eq!(hash(&a).len(), 64);
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn names() {
        for good in [
            "alice",
            "a",
            "bob.smith",
            "ci-bot_2",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            assert_eq!(name_error(good), None, "{good}");
        }
        for bad in [
            "",
            "-x",
            ".x",
            "has space",
            "é",
            "a/b",
            "key",
            "anonymous",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(name_error(bad).is_some(), "{bad:?}");
        }
    }
}
