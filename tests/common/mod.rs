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

/// The first error of type `E` in `error`'s source chain (`error` itself included); panics
/// naming the chain when there is none.
#[allow(dead_code)] // not every store test binary looks at causes
pub fn cause_of<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> &'a E {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<E>() {
            return found;
        }
        next = e.source();
    }
    panic!(
        "no {} in the source chain of {error:?}",
        std::any::type_name::<E>()
    );
}

/// Checks that `user`'s stored settings (made unreadable behind `store`'s back) are refused
/// with the same message as ever and the JSON parser's error as the cause.
#[allow(dead_code)] // not every store test binary looks at causes
pub async fn settings_unreadable_for_their_json(store: &dyn switchboard::store::Store, user: &str) {
    let unreadable = store
        .settings(user)
        .await
        .expect_err("the stored settings are not JSON");
    assert!(
        unreadable
            .to_string()
            .starts_with("storage error: the stored settings are unreadable: "),
        "{unreadable}"
    );
    assert!(cause_of::<serde_json::Error>(&unreadable).is_syntax());
}
