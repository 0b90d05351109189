//! A conversation's lifecycle status, its runtime's last reported state and what created it,
//! as the API, the sockets and the operators' page report them (one definition: the actors
//! publish these, the stores keep the trigger, the API serializes them).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A conversation's lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConversationStatus {
    Starting,
    Running,
    Stopped,
}

/// What created a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Gui,
    SuggestedTask,
    MicroagentManagement,
}

impl Trigger {
    /// Its name on the wire and in the stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Gui => "gui",
            Trigger::SuggestedTask => "suggested_task",
            Trigger::MicroagentManagement => "microagent_management",
        }
    }

    /// The trigger named `name` ([`Trigger::as_str`]).
    pub fn parse(name: &str) -> Result<Trigger, UnknownTrigger> {
        [
            Trigger::Gui,
            Trigger::SuggestedTask,
            Trigger::MicroagentManagement,
        ]
        .into_iter()
        .find(|t| t.as_str() == name)
        .ok_or_else(|| UnknownTrigger(name.to_string()))
    }
}

/// A name that is no [`Trigger`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a trigger (gui, suggested_task, microagent_management)")]
pub struct UnknownTrigger(pub String);

/// The runtime's last reported state, as the id of its status update (`runtime_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum RuntimeStatus {
    #[serde(rename = "STATUS$STARTING_RUNTIME")]
    Starting,
    #[serde(rename = "STATUS$READY")]
    Ready,
    #[serde(rename = "STATUS$ERROR_RUNTIME_DISCONNECTED")]
    Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trigger_s_name_is_its_wire_name_and_parses_back() {
        for trigger in [
            Trigger::Gui,
            Trigger::SuggestedTask,
            Trigger::MicroagentManagement,
        ] {
            let wire = serde_json::to_value(trigger).expect("serializes");
            assert_eq!(wire, trigger.as_str());
            assert_eq!(Trigger::parse(trigger.as_str()), Ok(trigger));
        }
        for name in ["", "GUI", "gui ", "task"] {
            assert_eq!(Trigger::parse(name), Err(UnknownTrigger(name.into())));
        }
    }
}
