//! A user's saved settings as the conversations see them: whose settings a caller or a
//! conversation's owner has, and what of them a conversation's runtime gets. (`/api/settings`
//! reads and writes them.)

use serde_json::{Map, Value};

/// Whose settings a caller without a user key (the session key, or nobody when
/// authentication is off) reads and writes: the server's one set, as in OpenHands' OSS mode.
pub const SINGLE_USER: &str = "";

/// Settings are per user: a user key's user (by name) has its own; every caller without one
/// shares [`SINGLE_USER`]'s. Admin keys have their own too (they are users). A conversation's
/// agent starts with its owner's settings.
pub fn user_of(name: Option<&str>) -> &str {
    name.unwrap_or(SINGLE_USER)
}

/// What a conversation's runtime gets of the saved settings (the process runtime's `init`
/// carries it as `settings`): the LLM and agent choices, the key included.
pub fn for_runtime(stored: &Map<String, Value>) -> Value {
    const FOR_RUNTIME: &[&str] = &[
        "llm_model",
        "llm_base_url",
        "llm_api_key",
        "agent",
        "language",
        "confirmation_mode",
        "max_iterations",
        "security_analyzer",
        "max_budget_per_task",
        "mcp_config",
    ];
    Value::Object(
        FOR_RUNTIME
            .iter()
            .map(|k| {
                (
                    (*k).to_string(),
                    stored.get(*k).cloned().unwrap_or(Value::Null),
                )
            })
            .collect(),
    )
}
