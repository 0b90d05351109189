//! Pieces shared by the store test binaries.

use switchboard::conversation::{ConversationMeta, InitData};

/// A conversation's metadata with defaults, created at `created_at`.
pub fn meta(id: &str, created_at: &str) -> ConversationMeta {
    ConversationMeta {
        conversation_id: id.to_string(),
        title: format!("Conversation {id}"),
        created_at: created_at.to_string(),
        last_updated_at: created_at.to_string(),
        trigger: "gui".to_string(),
        owner: None,
        init: InitData::default(),
    }
}
