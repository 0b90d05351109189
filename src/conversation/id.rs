//! [`ConversationId`]: the one place for the conversation id rule.
//!
//! An id is made only by [`ConversationId::parse`] (which applies the rule), by
//! [`ConversationId::generate`], or by deserializing (which parses), so every
//! `ConversationId` in the program is valid and no layer checks the rule again. The rule is
//! written once, as the pattern the OpenAPI document states ([`ConversationId::PATTERN`]):
//! `parse` matches that pattern ([`Pattern`]: compiled once into a DFA).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, LazyLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::pattern::Pattern;

/// A valid conversation id: 1–[`ConversationId::MAX_LEN`] characters of `[A-Za-z0-9_-]`.
/// Cheap to clone (shared text); compares, hashes and borrows as its text, so maps keyed by it
/// are looked up with a `&str`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationId(Arc<str>);

/// Text that breaks the id rule ([`ConversationId::RULE`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", ConversationId::RULE)]
pub struct InvalidConversationId;

/// The id rule's constants, all made from its one length (a literal, so that the texts can be
/// built at compile time).
macro_rules! id_rule {
    ($max_len:literal) => {
        /// Most characters of an id.
        pub const MAX_LEN: usize = $max_len;
        /// The rule as a JSON Schema pattern.
        pub const PATTERN: &'static str = concat!("^[A-Za-z0-9_-]{1,", $max_len, "}$");
        /// The rule as a JSON Schema pattern for a field where an empty string counts as
        /// absent.
        pub const PATTERN_OR_EMPTY: &'static str = concat!("^[A-Za-z0-9_-]{0,", $max_len, "}$");
        /// The rule in words, as a 422 states it.
        pub const RULE: &'static str = concat!(
            "conversation_id must be 1-",
            $max_len,
            " characters of A-Z, a-z, 0-9, '_' or '-'"
        );
    };
}

impl ConversationId {
    id_rule!(64);

    /// The id `text` is, if it matches [`ConversationId::PATTERN`].
    pub fn parse(text: &str) -> Result<Self, InvalidConversationId> {
        static RULE: LazyLock<Pattern> = LazyLock::new(|| Pattern::new(ConversationId::PATTERN));
        let valid = RULE.is_match(text);
        if valid {
            Ok(ConversationId(Arc::from(text)))
        } else {
            Err(InvalidConversationId)
        }
    }

    /// A new id: 32 lowercase hex digits, time-ordered (a UUIDv7: 48 bits of milliseconds, 74
    /// random bits), so that a new conversation lands at the right edge of the SQLite store's
    /// id index (see `store::sqlite::open`'s layout note) instead of on a random page.
    pub fn generate() -> Self {
        ConversationId(Arc::from(uuid::Uuid::now_v7().simple().to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for ConversationId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ConversationId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ConversationId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl PartialEq<str> for ConversationId {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for ConversationId {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl std::str::FromStr for ConversationId {
    type Err = InvalidConversationId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ConversationId::parse(text)
    }
}

/// The id rule as the OpenAPI document states it: a string, 1–64 characters, the pattern.
impl utoipa::PartialSchema for ConversationId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(Self::PATTERN))
            .min_length(Some(1))
            .max_length(Some(Self::MAX_LEN))
            .into()
    }
}

impl utoipa::ToSchema for ConversationId {}

impl Serialize for ConversationId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ConversationId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        ConversationId::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_texts_name_its_length() {
        assert_eq!(ConversationId::PATTERN, "^[A-Za-z0-9_-]{1,64}$");
        assert_eq!(ConversationId::PATTERN_OR_EMPTY, "^[A-Za-z0-9_-]{0,64}$");
        assert_eq!(
            ConversationId::RULE,
            "conversation_id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"
        );
    }

    #[test]
    fn the_rule() {
        assert!(ConversationId::parse("abc-DEF_123").is_ok());
        assert!(ConversationId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "../etc", "a b", "é", &"a".repeat(65)] {
            assert_eq!(
                ConversationId::parse(bad),
                Err(InvalidConversationId),
                "{bad:?}"
            );
        }
        let generated = ConversationId::generate();
        assert_eq!(ConversationId::parse(&generated).as_ref(), Ok(&generated));
    }

    /// The pattern as [`ConversationId::parse`] reads it is the pattern as another engine
    /// (regex-lite, close to what an OpenAPI client runs) reads it, for generated texts: every
    /// length up to past the limit, each of a spread of characters in every position.
    #[test]
    fn parse_reads_the_pattern_as_another_engine_does() {
        let other = regex_lite::Regex::new(ConversationId::PATTERN).unwrap();
        let chars: Vec<char> = (0u8..=127)
            .map(char::from)
            .chain(['é', 'ß', '\u{212a}', '\u{ff21}', '\u{1f600}'])
            .collect();
        let mut checked = 0;
        for len in 0..=ConversationId::MAX_LEN + 2 {
            for (i, c) in chars.iter().enumerate() {
                let mut text: String = "aZ0_-".chars().cycle().take(len).collect();
                if len > 0 {
                    let at = i % len;
                    text = text
                        .chars()
                        .enumerate()
                        .map(|(j, t)| if j == at { *c } else { t })
                        .collect();
                }
                for text in [text.clone(), format!("{text}\n"), format!("\n{text}")] {
                    assert_eq!(
                        ConversationId::parse(&text).is_ok(),
                        other.is_match(&text),
                        "{text:?}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 20_000);
    }

    #[test]
    fn deserializing_applies_the_rule() {
        let id: Result<ConversationId, _> = serde_json::from_str("\"ok_1\"");
        assert_eq!(id.map(|i| i.to_string()).ok().as_deref(), Some("ok_1"));
        assert!(serde_json::from_str::<ConversationId>("\"../x\"").is_err());
    }
}
