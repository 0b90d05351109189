//! Pieces shared by the store test binaries.

use switchboard::conversation::{ConversationId, ConversationMeta, InitData};

/// A conversation's metadata with defaults, created at `created_at`.
pub fn meta(id: &str, created_at: &str) -> ConversationMeta {
    ConversationMeta {
        conversation_id: cid(id),
        title: format!("Conversation {id}"),
        created_at: created_at.to_string(),
        last_updated_at: created_at.to_string(),
        trigger: switchboard::conversation::Trigger::Gui,
        owner: None,
        init: InitData::default(),
    }
}

/// The conversation id `text` (a valid one: tests name their conversations).
pub fn cid(text: impl AsRef<str>) -> ConversationId {
    ConversationId::parse(text.as_ref()).expect("a valid conversation id")
}
