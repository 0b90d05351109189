//! Typed request and response bodies of the HTTP API, shared by the handlers and the OpenAPI
//! document ([`super::openapi`]).
//!
//! Response types are what the handlers serialize, so the served JSON and the document cannot
//! drift apart: field order is the wire order and `Option` fields serialize as `null`.
//! Request types are the contract of what [`super::validation`] accepts: it reads their
//! schemas (each field's type, nullability, whether it is required, an enum's values, whether
//! unknown keys are refused, in declaration order) and checks a body against them to produce
//! pydantic-shaped errors, so a field is declared only here. Each field rule (repository, MCP
//! URL schemes, title length, page size, …) is written once here, as a constant or a function
//! the validator calls, and the field's schema is built from it (`schema_with`), so the
//! document and the validator cannot state different rules.
//! Bodies built elsewhere (`ApiError` in `errors.rs`, `/alive`) are pinned to their types by the
//! tests at the bottom of this file.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::openapi::schema::{
    AnyOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, ToSchema};

use crate::conversation::{ConversationId, ConversationStatus, RuntimeStatus, Trigger};
use crate::events::{EventBody, Source, StoredEvent, EVENT_NAME_MAX_LEN, EVENT_NAME_PATTERN};
/// The error bodies every route may answer with are defined with the error type
/// ([`crate::http::error`]); the contract lists them too.
pub use crate::http::error::{ErrorMessage, ErrorStatus};
use crate::pattern::Pattern;

/// Rust's `char::is_whitespace` (Unicode `White_Space`, what `str::trim` removes) as the body
/// of a regex character class.
const WHITE_SPACE: &str =
    r"\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

// ---------------------------------------------------------------------------------------------
// Field rules: each written once, used by the validator (`validation.rs`) and stated by the
// OpenAPI document (the `schema_with` functions below build the field schemas from them).

/// Most characters of a `repository`.
pub const REPOSITORY_MAX_LEN: usize = 256;

/// A `repository`, as a JSON Schema pattern: `owner/repo` (GitLab groups allowed:
/// `group/sub/repo`), each part made of `[A-Za-z0-9_.-]` and neither `.` nor `..`. An empty
/// string counts as absent. [`is_repository`] matches this pattern.
pub const REPOSITORY_PATTERN: &str = r"^(?:(?:[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*|\.{3,})(?:/(?:[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*|\.{3,}))+)?$";

/// Whether a `repository` keeps [`REPOSITORY_PATTERN`] and [`REPOSITORY_MAX_LEN`].
pub fn is_repository(repo: &str) -> bool {
    static RULE: LazyLock<Pattern> = LazyLock::new(|| Pattern::new(REPOSITORY_PATTERN));
    repo.len() <= REPOSITORY_MAX_LEN && RULE.is_match(repo)
}

/// The URL schemes of an MCP server reached over the network, each also allowed with an `s`
/// (TLS) appended, in any case: http, https, ws, wss.
pub const MCP_URL_SCHEMES: &[&str] = &["http", "ws"];

/// An MCP server URL's start, as a JSON Schema pattern: one of [`MCP_URL_SCHEMES`], then `://`.
fn mcp_url_pattern() -> String {
    let alternatives: Vec<String> = MCP_URL_SCHEMES
        .iter()
        .map(|s| {
            let letters: String = s
                .chars()
                .map(|c| format!("[{}{}]", c.to_ascii_uppercase(), c))
                .collect();
            format!("{letters}[Ss]?")
        })
        .collect();
    format!("^(?:{})://", alternatives.join("|"))
}

/// Whether an MCP server URL matches [`mcp_url_pattern`].
pub fn has_mcp_url_scheme(url: &str) -> bool {
    static RULE: LazyLock<Pattern> = LazyLock::new(|| Pattern::new(&mcp_url_pattern()));
    RULE.is_match(url)
}

/// [`MCP_URL_SCHEMES`] in words: `http, https, ws, or wss`.
pub fn mcp_url_schemes_in_words() -> String {
    MCP_URL_SCHEMES
        .iter()
        .flat_map(|s| [s.to_string(), format!("{s}s")])
        .collect::<Vec<_>>()
        .join(", ")
        .rsplit_once(", ")
        .map(|(rest, last)| format!("{rest}, or {last}"))
        .unwrap_or_default()
}

/// An MCP server URL as the OpenAPI document states it.
fn mcp_url() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(format!(
            "An {} URL.",
            mcp_url_schemes_in_words().replace(", or", " or")
        )))
        .pattern(Some(mcp_url_pattern()))
        .into()
}

/// Most characters of a conversation title (after trimming).
pub const TITLE_MAX_LEN: usize = 200;

/// The title of a `PATCH` as the OpenAPI document states it: 1–[`TITLE_MAX_LEN`] characters
/// once surrounding whitespace is trimmed.
fn title() -> Schema {
    let (space, other) = (format!("[{WHITE_SPACE}]"), format!("[^{WHITE_SPACE}]"));
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(format!(
            "The new title: 1–{TITLE_MAX_LEN} characters once surrounding whitespace (Unicode `White_Space`)\nis trimmed."
        )))
        .pattern(Some(format!(
            "^{space}*{other}(?:[\\s\\S]{{0,{}}}{other})?{space}*$",
            TITLE_MAX_LEN - 2
        )))
        .into()
}

/// A `repository` as the OpenAPI document states it.
fn repository() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .description(Some(
            "`owner/repo` (GitLab groups allowed: `group/sub/repo`); an empty string counts as absent.",
        ))
        .pattern(Some(REPOSITORY_PATTERN))
        .max_length(Some(REPOSITORY_MAX_LEN))
        .into()
}

/// The `conversation_id` of a create body as the OpenAPI document states it.
fn requested_conversation_id() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(
            "Joins the conversation with this id when it exists, creates it otherwise; an empty\nstring counts as absent (a new id is generated).",
        ))
        .pattern(Some(ConversationId::PATTERN_OR_EMPTY))
        .into()
}

/// The name of a user action other than `message`, as the OpenAPI document states it: the
/// event-name pattern the validator matches ([`crate::events::is_event_name`]), and not the
/// name of a [`MessageAction`]. The exclusion is JSON Schema's own `not`, not a lookahead in
/// the pattern (which a DFA cannot run): a pattern without lookahead that leaves out one word
/// spells the word out letter by letter, and would no longer be the validator's pattern.
fn other_action_name() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(format!(
            "1–{EVENT_NAME_MAX_LEN} characters of `[a-z0-9_]`, other than `message`."
        )))
        .pattern(Some(EVENT_NAME_PATTERN))
        .extensions(Some(
            [(
                "not",
                json!({ "const": to_value(&MessageActionName::Message) }),
            )]
            .into_iter()
            .collect(),
        ))
        .into()
}

/// Serializes a body type into a JSON value (for `ApiError::Exact`).
pub fn to_value<T: Serialize>(body: &T) -> Value {
    serde_json::to_value(body).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------------
// Shared enums

/// An enum of the contract whose values are a closed list of names: validation accepts exactly
/// its values and lists them, in this order, in its 422s.
pub trait Choices: Serialize + Copy + 'static {
    /// Every value, in the order a 422 lists them.
    const ALL: &'static [Self];

    /// The values' names on the wire (their serde names), in order.
    fn names() -> &'static [String];
}

/// Implements [`Choices`] for an enum from its variants (a missing variant does not compile).
macro_rules! choices {
    ($enum:ident { $($variant:ident),+ $(,)? }) => {
        impl Choices for $enum {
            const ALL: &'static [Self] = &[$($enum::$variant),+];

            fn names() -> &'static [String] {
                static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
                NAMES.get_or_init(|| {
                    // Every variant is listed (this match is exhaustive).
                    let _ = |v: $enum| match v { $($enum::$variant => ()),+ };
                    Self::ALL
                        .iter()
                        .map(|v| to_value(v).as_str().unwrap_or_default().to_string())
                        .collect()
                })
            }
        }
    };
}

/// A git hosting provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderType {
    Github,
    Gitlab,
    Bitbucket,
    EnterpriseSso,
}

choices!(ProviderType {
    Github,
    Gitlab,
    Bitbucket,
    EnterpriseSso
});

/// `"ok"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum OkStatus {
    #[serde(rename = "ok")]
    Ok,
}

// ---------------------------------------------------------------------------------------------
// Probes

/// `GET /alive`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Alive {
    #[schema(inline)]
    pub status: OkStatus,
}

/// `GET /health`: the JSON string `"OK"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Health {
    #[serde(rename = "OK")]
    Ok,
}

// ---------------------------------------------------------------------------------------------
// POST /api/conversations

/// The body of `POST /api/conversations` (OpenHands' `InitSessionRequest`). Unknown keys are
/// refused. `replay_json` and `initial_user_msg` cannot both be given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InitSessionRequest {
    /// [`REPOSITORY_PATTERN`], at most [`REPOSITORY_MAX_LEN`] characters (documented by
    /// `repository()`).
    #[schema(schema_with = repository)]
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub git_provider: Option<ProviderType>,
    /// An empty string counts as absent.
    #[serde(default)]
    pub selected_branch: Option<String>,
    /// The first user message.
    #[serde(default)]
    pub initial_user_msg: Option<String>,
    /// Images attached to the first user message.
    #[serde(default)]
    pub image_urls: Option<Vec<String>>,
    /// A JSON text holding a list of event objects, replayed into the new conversation.
    #[schema(content_media_type = "application/json")]
    #[serde(default)]
    pub replay_json: Option<String>,
    #[serde(default)]
    pub suggested_task: Option<SuggestedTask>,
    #[serde(default)]
    pub create_microagent: Option<CreateMicroagent>,
    #[serde(default)]
    pub conversation_instructions: Option<String>,
    #[serde(default)]
    pub mcp_config: Option<McpConfig>,
    /// The id to join or create (documented by `requested_conversation_id()`).
    #[schema(schema_with = requested_conversation_id)]
    #[serde(default)]
    pub conversation_id: String,
}

/// Task types that can start a conversation (`OPEN_PR` and `CREATE_MICROAGENT` are refused
/// with a 422).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskType {
    MergeConflicts,
    FailingChecks,
    UnresolvedComments,
    OpenIssue,
}

/// OpenHands' task types that cannot start a conversation: accepted as a `task_type`, then
/// refused with a 422 that names them.
pub const TASK_TYPES_REFUSED: &[&str] = &["OPEN_PR", "CREATE_MICROAGENT"];

/// The providers a suggested task cannot name: accepted as its `git_provider`, then refused
/// with a 422 that names them.
pub const TASK_PROVIDERS_REFUSED: &[&str] = &["enterprise_sso"];

/// The values validation accepts for an enum of the contract (by its schema name) beyond the
/// ones the enum declares, to refuse them with a 422 that says why; they are listed after the
/// declared ones in a 422 for a value that is neither.
pub fn refused_values(enum_name: &str) -> &'static [&'static str] {
    if enum_name == TaskType::name() {
        TASK_TYPES_REFUSED
    } else if enum_name == TaskProviderType::name() {
        TASK_PROVIDERS_REFUSED
    } else {
        &[]
    }
}

/// Providers a suggested task may name (`enterprise_sso` is refused with a 422).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskProviderType {
    Github,
    Gitlab,
    Bitbucket,
}

/// A suggested task; its prompt becomes the first user message. Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SuggestedTask {
    pub git_provider: TaskProviderType,
    pub task_type: TaskType,
    pub repo: String,
    /// An integer, or a string holding one (pydantic's lax mode).
    #[schema(schema_with = lax_integer)]
    pub issue_number: Value,
    pub title: String,
}

fn lax_integer() -> Schema {
    Schema::OneOf(
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Integer).format(Some(
                utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Int64),
            )))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(format!(
                        "^[{WHITE_SPACE}]*[+-]?[0-9]+[{WHITE_SPACE}]*$"
                    ))),
            )
            .build(),
    )
}

/// A query integer as the handlers read it: the number, or its text with surrounding
/// whitespace and a `+`; an empty value counts as absent.
fn lax_query_integer(description: &str, integer: ObjectBuilder, digits: &str) -> Schema {
    Schema::AnyOf(
        AnyOfBuilder::new()
            .description(Some(description))
            .item(integer.schema_type(Type::Integer))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(format!(
                        "^(?:[{WHITE_SPACE}]*\\+?{digits}[{WHITE_SPACE}]*)?$"
                    ))),
            )
            .build(),
    )
}

/// A page's size when the query names none.
pub const PAGE_LIMIT_DEFAULT: usize = 20;
/// Most items on a page.
pub const PAGE_LIMIT_MAX: usize = 100;

/// `limit`: 1–[`PAGE_LIMIT_MAX`].
fn query_limit() -> Schema {
    // The digits of 1–100; the assertion holds the text to the limit it spells.
    const DIGITS: &str = "0*(?:100|[1-9][0-9]?)";
    const _: () = assert!(
        PAGE_LIMIT_MAX == 100,
        "rewrite DIGITS for the new PAGE_LIMIT_MAX"
    );
    lax_query_integer(
        &format!(
            "Page size, 1–{PAGE_LIMIT_MAX} (default {PAGE_LIMIT_DEFAULT}); anything else is a 400."
        ),
        ObjectBuilder::new()
            .minimum(Some(1))
            .maximum(Some(PAGE_LIMIT_MAX as u64)),
        DIGITS,
    )
}

/// An event id: 0–2⁶⁴−1 (as text: up to 19 significant digits are documented).
fn query_event_id(description: &str) -> Schema {
    lax_query_integer(
        description,
        ObjectBuilder::new()
            .format(Some(utoipa::openapi::SchemaFormat::Custom("uint64".into())))
            .minimum(Some(0))
            .maximum(Some(u64::MAX)),
        "0*[0-9]{1,19}",
    )
}

fn query_start_id() -> Schema {
    query_event_id("Lowest event id, inclusive (default 0).")
}

fn query_end_id() -> Schema {
    query_event_id("Highest event id, inclusive (default: no bound).")
}

/// `reverse` as the handler reads it; an empty value counts as absent.
fn query_reverse() -> Schema {
    Schema::AnyOf(
        AnyOfBuilder::new()
            .description(Some(
                "Newest first within the range (`true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, \
                 ASCII case-insensitive; default false).",
            ))
            .item(ObjectBuilder::new().schema_type(Type::Boolean))
            .item(
                ObjectBuilder::new().schema_type(Type::String).pattern(Some(
                    "^(?:[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0|[Yy][Ee][Ss]|[Nn][Oo]|[Oo][Nn]|[Oo][Ff][Ff])?$",
                )),
            )
            .build(),
    )
}

/// A request to create a microagent. Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateMicroagent {
    pub repo: String,
    #[serde(default)]
    pub git_provider: Option<ProviderType>,
    /// Becomes the conversation's title when not blank.
    #[serde(default)]
    pub title: Option<String>,
}

/// MCP servers handed to the conversation's runtime. Unknown keys are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = MCPConfig)]
pub struct McpConfig {
    #[serde(default)]
    pub sse_servers: Vec<McpSseServerConfig>,
    #[serde(default)]
    pub stdio_servers: Vec<McpStdioServerConfig>,
    #[serde(default)]
    pub shttp_servers: Vec<McpShttpServerConfig>,
}

/// An MCP server reached over SSE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = MCPSSEServerConfig)]
pub struct McpSseServerConfig {
    /// One of [`MCP_URL_SCHEMES`] (documented by `mcp_url()`).
    #[schema(schema_with = mcp_url)]
    pub url: String,
    #[serde(default)]
    pub api_key: Option<String>,
}

/// An MCP server run over stdio inside the runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = MCPStdioServerConfig)]
pub struct McpStdioServerConfig {
    pub name: String,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// An MCP server reached over streamable HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = MCPSHTTPServerConfig)]
pub struct McpShttpServerConfig {
    /// One of [`MCP_URL_SCHEMES`] (documented by `mcp_url()`).
    #[schema(schema_with = mcp_url)]
    pub url: String,
    #[serde(default)]
    pub api_key: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Other request bodies

/// The body of `PATCH /api/conversations/{conversation_id}`. Unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateConversationRequest {
    /// At most [`TITLE_MAX_LEN`] characters (documented by `title()`).
    #[schema(schema_with = title)]
    pub title: String,
}

/// The optional body of `POST /api/conversations/{conversation_id}/start`. Unknown keys are
/// ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProvidersSetModel {
    #[serde(default)]
    pub providers_set: Option<Vec<ProviderType>>,
}

/// A user action (`POST /api/conversations/{conversation_id}/events`), as the socket's
/// `oh_user_action` carries it. Any `id`, `timestamp` or `source` is ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum UserAction {
    Message(MessageAction),
    Other(OtherAction),
}

/// `"message"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum MessageActionName {
    #[serde(rename = "message")]
    Message,
}

/// A chat message from the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MessageAction {
    #[schema(inline)]
    pub action: MessageActionName,
    pub args: MessageArgs,
}

/// The arguments of a user `message` action. Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MessageArgs {
    pub content: String,
    #[serde(default)]
    pub image_urls: Option<Vec<String>>,
    #[serde(default)]
    pub file_urls: Option<Vec<String>>,
}

/// Any other user action, stored and handed to the runtime as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OtherAction {
    /// Documented by `other_action_name()`.
    #[schema(schema_with = other_action_name)]
    pub action: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub args: Option<Map<String, Value>>,
    /// The event's `message`; kept when it is a string, ignored otherwise.
    #[serde(default)]
    pub message: Value,
}

/// The event a user action is stored as: a message with its content as the event's
/// `message`, its lists (absent or `null`: empty) and `wait_for_response: false`; any other
/// action with its `args` (absent or `null`: empty) and its `message` when it is a string.
impl From<UserAction> for EventBody {
    fn from(action: UserAction) -> Self {
        match action {
            UserAction::Message(MessageAction { args, .. }) => EventBody::user_message(
                &args.content,
                args.image_urls.unwrap_or_default(),
                args.file_urls.unwrap_or_default(),
            ),
            UserAction::Other(OtherAction {
                action,
                args,
                message,
            }) => EventBody::user_action(
                action,
                args.unwrap_or_default(),
                match message {
                    Value::String(s) => s,
                    _ => String::new(),
                },
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

/// The answer to creating, joining, starting or stopping a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConversationResponse {
    #[schema(inline)]
    pub status: OkStatus,
    pub conversation_id: String,
    #[schema(required = true)]
    pub message: Option<String>,
    pub conversation_status: ConversationStatus,
}

/// A conversation as listed and fetched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConversationInfo {
    pub conversation_id: String,
    pub title: String,
    #[schema(format = DateTime)]
    pub last_updated_at: String,
    pub status: ConversationStatus,
    /// Set while the conversation runs, once its runtime reported.
    #[schema(required = true)]
    pub runtime_status: Option<RuntimeStatus>,
    #[schema(required = true)]
    pub selected_repository: Option<String>,
    #[schema(required = true)]
    pub selected_branch: Option<String>,
    #[schema(required = true, value_type = Option<ProviderType>)]
    pub git_provider: Option<String>,
    pub trigger: Trigger,
    /// Clients attached over the socket.
    pub num_connections: u32,
    /// `/api/conversations/{id}` while not stopped, `null` when stopped.
    #[schema(required = true)]
    pub url: Option<String>,
    /// Always `null`.
    #[schema(required = true)]
    pub session_api_key: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Always empty.
    pub pr_number: Vec<u64>,
}

/// A page of conversations, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConversationInfoResultSet {
    pub results: Vec<ConversationInfo>,
    /// Pass as `page_id` for the next page; `null` on the last one.
    #[schema(required = true)]
    pub next_page_id: Option<String>,
}

/// A stored event: an action or an observation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Event {
    Action(ActionEvent),
    Observation(ObservationEvent),
}

/// A stored action event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionEvent {
    pub id: u64,
    /// UTC, ISO-8601 with microseconds and no offset (`2026-11-29T17:41:25.002345`).
    pub timestamp: String,
    pub source: Source,
    pub message: String,
    /// The id of the event this answers, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cause: Option<u64>,
    pub action: String,
    #[schema(value_type = Object)]
    pub args: Map<String, Value>,
    /// Every other field the event's producer sent (an agent's `tool_call_metadata`,
    /// `llm_metrics`, `timeout`, …), unchanged.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A stored observation event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ObservationEvent {
    pub id: u64,
    /// UTC, ISO-8601 with microseconds and no offset (`2026-11-29T17:41:25.002345`).
    pub timestamp: String,
    pub source: Source,
    pub message: String,
    /// The id of the action this observes, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cause: Option<u64>,
    pub observation: String,
    pub content: String,
    #[schema(value_type = Object)]
    pub extras: Map<String, Value>,
    /// Every other field the event's producer sent (an agent's `success`, `llm_metrics`, …),
    /// unchanged.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A page of a conversation's events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventsPage {
    pub events: Vec<Event>,
    pub has_more: bool,
}

impl EventsPage {
    /// The JSON of an `EventsPage` holding `events`, with their stored JSON texts spliced in as
    /// they are (no re-encoding). The unit tests hold it to `EventsPage`'s serialization.
    pub fn render(events: &[StoredEvent], has_more: bool) -> String {
        let mut body = render_event_list("{\"events\":", events);
        body.push_str(",\"has_more\":");
        body.push_str(if has_more { "true" } else { "false" });
        body.push('}');
        body
    }
}

/// `head` followed by a JSON list of `events`, their stored JSON texts spliced in as they are.
pub fn render_event_list(head: &str, events: &[StoredEvent]) -> String {
    let mut body = String::with_capacity(
        head.len() + 24 + events.iter().map(|e| e.json.len() + 1).sum::<usize>(),
    );
    body.push_str(head);
    body.push('[');
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&event.json);
    }
    body.push(']');
    body
}

/// `POST /api/conversations/{conversation_id}/events` accepted the action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionAccepted {
    /// Always `true`.
    pub success: bool,
}

/// The conversation refused the action (event limit reached, or it is stopping).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionRefused {
    /// Always `false`.
    pub success: bool,
    pub detail: String,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// `{"detail": "<why>"}`: 400, 401, 404, 405, 413, 500 and 503 answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub detail: String,
}

/// The 401 every `/api` route documents: the session key or a user key is missing or wrong.
#[derive(utoipa::IntoResponses)]
#[response(
    status = 401,
    description = "Missing or wrong `X-Session-API-Key` (when a session key is configured or user keys exist)",
    example = json!({"detail": "Unauthorized"})
)]
pub struct Unauthorized(pub ErrorDetail);

/// The 503 of a route whose only such failure is the store's.
#[derive(utoipa::IntoResponses)]
#[response(
    status = 503,
    description = "The store failed",
    example = json!({"detail": "Storage error: …"})
)]
pub struct StoreFailed(pub ErrorDetail);

/// A 422: every problem of the request, FastAPI/pydantic-shaped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = HTTPValidationError)]
pub struct HttpValidationError {
    pub detail: Vec<ValidationError>,
}

/// One problem of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidationError {
    /// pydantic's error type (`missing`, `extra_forbidden`, `string_type`, `value_error`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Where: `body`, `path` or `query`, then keys and list indexes.
    #[schema(schema_with = location)]
    pub loc: Vec<Value>,
    pub msg: String,
    /// The offending input.
    #[schema(required = true)]
    pub input: Value,
    /// Details such as `expected` or `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, nullable = false)]
    pub ctx: Option<Value>,
}

fn location() -> Schema {
    Schema::Array(
        ArrayBuilder::new()
            .items(RefOr::T(Schema::OneOf(
                OneOfBuilder::new()
                    .item(ObjectBuilder::new().schema_type(Type::String))
                    .item(ObjectBuilder::new().schema_type(Type::Integer))
                    .build(),
            )))
            .build(),
    )
}

/// `{"status":"error","conversation_id":…}`: an unknown conversation on start or stop (404).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConversationNotFound {
    #[schema(inline)]
    pub status: ErrorStatus,
    pub conversation_id: String,
}

// ---------------------------------------------------------------------------------------------
// Parameters

/// The `{conversation_id}` path segment.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ConversationIdPath {
    /// 1–64 characters of `[A-Za-z0-9_-]`; anything else is a 422.
    #[param(inline)]
    pub conversation_id: ConversationId,
}

/// Query of `GET /api/conversations`. An empty value counts as absent.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `next_page_id` of the previous page: base64 of a decimal offset (documented up to 18
    /// digits); anything else is a 400.
    #[param(
        pattern = "^(?:(?:M[DTjz]|N[DTjz]|O[DT])[AEIMQUYcgk][w-z0-5])*(?:(?:M[AQgw]|N[AQgw]|O[AQ])==|(?:M[DTjz]|N[DTjz]|O[DT])[AEIMQUYcgk]=)?$",
        max_length = 24
    )]
    pub page_id: Option<String>,
    /// Page size, 1–100 (default 20); anything else is a 400.
    #[param(schema_with = query_limit)]
    pub limit: Option<u32>,
}

/// Query of `GET /api/conversations/{conversation_id}/events`. An empty value counts as absent.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Lowest event id, inclusive (default 0).
    #[param(schema_with = query_start_id)]
    pub start_id: Option<u64>,
    /// Highest event id, inclusive (default: no bound).
    #[param(schema_with = query_end_id)]
    pub end_id: Option<u64>,
    /// Newest first within the range.
    #[param(schema_with = query_reverse)]
    pub reverse: Option<bool>,
    /// Page size, 1–100 (default 20); anything else is a 400.
    #[param(schema_with = query_limit)]
    pub limit: Option<u32>,
}

/// `EIO=4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum EngineIoVersion {
    #[serde(rename = "4")]
    V4,
}

/// `transport=websocket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EngineIoTransport {
    Websocket,
}

/// Query of `GET /socket.io/`. Problems with the conversation, the key or `providers_set` are
/// refused inside the socket (a Socket.IO `44` packet), not with an HTTP status.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SocketIoQuery {
    /// Engine.IO protocol version: only 4.
    #[serde(rename = "EIO")]
    #[param(inline)]
    pub eio: EngineIoVersion,
    /// Only the WebSocket transport (no long-polling).
    #[param(inline)]
    pub transport: EngineIoTransport,
    /// The conversation to attach to (1–64 characters of `[A-Za-z0-9_-]`).
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub conversation_id: Option<String>,
    /// Events with a greater id are replayed; a non-integer counts as -1 (replay everything).
    pub latest_event_id: Option<String>,
    /// Comma-separated providers (`github`, `gitlab`, `bitbucket`, `enterprise_sso`); may be empty.
    pub providers_set: Option<String>,
    /// The session key, when one is configured (also accepted as the `X-Session-API-Key`
    /// header or in the CONNECT packet's auth payload).
    pub session_api_key: Option<String>,
}

/// The headers of a WebSocket upgrade (RFC 6455); without them a socket route answers 400.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct WebSocketUpgrade {
    /// A comma-separated list with `upgrade` and without `close`.
    #[serde(rename = "Connection")]
    #[param(
        pattern = "^(?!(?:[^,]*,)*[ \\t]*[Cc][Ll][Oo][Ss][Ee][ \\t]*(?:,|$))(?:[^,]*,)*[ \\t]*[Uu][Pp][Gg][Rr][Aa][Dd][Ee][ \\t]*(?:,[^,]*)*$"
    )]
    pub connection: String,
    /// `websocket`.
    #[serde(rename = "Upgrade")]
    #[param(pattern = "^[ \\t]*[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt][ \\t]*$")]
    pub upgrade: String,
    /// 16 random bytes, base64.
    #[serde(rename = "Sec-WebSocket-Key")]
    #[param(pattern = "^[A-Za-z0-9+/]{21}[AQgw]==$")]
    pub key: String,
    #[serde(rename = "Sec-WebSocket-Version")]
    #[param(inline)]
    pub version: WebSocketVersion,
}

/// `13`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum WebSocketVersion {
    #[serde(rename = "13")]
    V13,
}

/// Query of `GET /ws/conversations/{conversation_id}`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PlainSocketQuery {
    /// Events with a greater id are replayed; a non-integer counts as -1 (replay everything).
    pub latest_event_id: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The web app's settings side (`/api/options/*`, `/api/settings`)

/// The web app's feature flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct FeatureFlags {
    pub enable_billing: bool,
    pub hide_llm_settings: bool,
    pub hide_microagent_management: bool,
}

/// `GET /api/options/config`: what the web app needs to know about the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct ServerConfig {
    /// `oss` (single user, no login) or `saas`.
    #[schema(value_type = String, pattern = "^(oss|saas)$")]
    pub app_mode: crate::config::AppMode,
    pub github_client_id: String,
    /// Empty: the app sends no analytics.
    pub posthog_client_key: String,
    pub feature_flags: FeatureFlags,
}

impl From<&crate::config::FrontendSettings> for ServerConfig {
    fn from(f: &crate::config::FrontendSettings) -> Self {
        ServerConfig {
            app_mode: f.app_mode,
            github_client_id: f.github_client_id.clone(),
            posthog_client_key: f.posthog_client_key.clone(),
            feature_flags: FeatureFlags {
                enable_billing: f.enable_billing,
                hide_llm_settings: f.hide_llm_settings,
                hide_microagent_management: f.hide_microagent_management,
            },
        }
    }
}

/// The body of `POST /api/settings` (OpenHands' `Settings`; unknown keys are ignored). Absent
/// fields take their defaults, except the ones kept from the saved settings (see the route).
// The validator (`validation::parse_settings`) reads the fields, their order, types and
// defaults from this type's schema: the settings are listed only here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StoredSettings {
    pub language: Option<String>,
    pub agent: Option<String>,
    pub max_iterations: Option<i64>,
    pub security_analyzer: Option<String>,
    pub confirmation_mode: Option<bool>,
    pub llm_model: Option<String>,
    /// Stored, never echoed.
    pub llm_api_key: Option<String>,
    pub llm_base_url: Option<String>,
    pub remote_runtime_resource_factor: Option<i64>,
    #[schema(value_type = Object)]
    pub secrets_store: Option<Value>,
    #[schema(default = true)]
    pub enable_default_condenser: Option<bool>,
    #[schema(default = false)]
    pub enable_sound_notifications: Option<bool>,
    #[schema(default = true)]
    pub enable_proactive_conversation_starters: Option<bool>,
    #[schema(default = true)]
    pub enable_solvability_analysis: Option<bool>,
    pub user_consents_to_analytics: Option<bool>,
    pub sandbox_base_container_image: Option<String>,
    pub sandbox_runtime_container_image: Option<String>,
    pub mcp_config: Option<McpConfig>,
    /// Stored, never echoed.
    pub search_api_key: Option<String>,
    /// Stored, never echoed.
    pub sandbox_api_key: Option<String>,
    pub max_budget_per_task: Option<f64>,
    pub email: Option<String>,
    pub email_verified: Option<bool>,
    pub git_user_name: Option<String>,
    pub git_user_email: Option<String>,
}

/// `GET /api/settings`: the saved settings (every `StoredSettings` field, secrets `null`) and
/// whether the secrets are set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AppSettings {
    #[serde(flatten)]
    pub settings: StoredSettings,
    /// Git providers with a token (none: switchboard keeps no provider tokens).
    #[schema(value_type = Object)]
    pub provider_tokens_set: Map<String, Value>,
    pub llm_api_key_set: bool,
    pub search_api_key_set: bool,
}

/// `POST /api/settings` saved the settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SettingsStored {
    /// `Settings stored`.
    pub message: String,
}

/// `{"error": "<why>"}`: OpenHands' shape for the settings and workspace routes' refusals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorMessageOnly {
    pub error: String,
}

// ---------------------------------------------------------------------------------------------
// The per-conversation workspace routes

/// `GET …/config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RuntimeConfig {
    /// Always null: no remote runtime.
    pub runtime_id: Option<String>,
    /// The conversation id.
    pub session_id: String,
}

/// `GET …/vscode-url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VscodeUrl {
    /// Always null: switchboard runs no editor.
    pub vscode_url: Option<String>,
}

/// `GET …/web-hosts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WebHosts {
    /// URL → port.
    pub hosts: BTreeMap<String, u16>,
}

/// One changed file of `GET …/git/changes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GitChange {
    /// `M`, `A` (untracked files too), `D`, `R` or `U`.
    pub status: String,
    /// Relative to the working directory.
    pub path: String,
}

/// `GET …/select-file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FileContent {
    pub code: String,
}

/// `POST …/upload-files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UploadedFiles {
    /// The names written, relative to the working directory.
    pub uploaded_files: Vec<String>,
    /// `{"name": …, "reason": …}` for each file refused.
    #[schema(value_type = Vec<Object>)]
    pub skipped_files: Vec<Value>,
}

/// `GET …/microagents`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Microagents {
    /// `{"name", "type", "content", "triggers", "inputs", "tools"}` each.
    #[schema(value_type = Vec<Object>)]
    pub microagents: Vec<Value>,
}

/// `GET …/trajectory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Trajectory {
    pub trajectory: Vec<Event>,
}

/// Query of `GET …/list-files`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListFilesQuery {
    /// A directory relative to the working directory (default: the working directory).
    pub path: Option<String>,
}

/// Query of `GET …/select-file`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SelectFileQuery {
    /// A file relative to the working directory.
    pub file: String,
}

#[cfg(test)]
mod tests {
    use actix_web::http::StatusCode;
    use actix_web::ResponseError;
    use serde_json::json;

    use super::*;
    use crate::events::EventBody;
    use crate::http::error::FieldError;
    use crate::http::ApiError;

    /// The characters of a regex class body made of `\\t`, `\\n`, `\\f`, `\\r`, `\\uXXXX`,
    /// literal characters and `a-b` ranges.
    fn class_chars(body: &str) -> Vec<char> {
        let mut singles = Vec::new();
        let mut rest = body;
        while let Some(c) = rest.chars().next() {
            rest = &rest[c.len_utf8()..];
            let ch = if c == '\\' {
                let e = rest.chars().next().expect("escape");
                rest = &rest[e.len_utf8()..];
                match e {
                    't' => '\t',
                    'n' => '\n',
                    'f' => '\u{c}',
                    'r' => '\r',
                    'u' => {
                        let (hex, tail) = rest.split_at(4);
                        rest = tail;
                        char::from_u32(u32::from_str_radix(hex, 16).expect("hex")).expect("char")
                    }
                    other => panic!("unexpected escape {other}"),
                }
            } else {
                c
            };
            singles.push(ch);
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < singles.len() {
            if i + 2 < singles.len() && singles[i + 1] == '-' {
                out.extend(singles[i]..=singles[i + 2]);
                i += 3;
            } else {
                out.push(singles[i]);
                i += 1;
            }
        }
        out.sort_unstable();
        out
    }

    #[test]
    fn patterns_trim_what_rust_trims() {
        let expected: Vec<char> = (0..=0x10FFFF)
            .filter_map(char::from_u32)
            .filter(|c| c.is_whitespace())
            .collect();
        assert_eq!(class_chars(WHITE_SPACE), expected);
        let class = format!("[{WHITE_SPACE}]");
        let title = to_value(&<UpdateConversationRequest as utoipa::PartialSchema>::schema());
        let pattern = title["properties"]["title"]["pattern"]
            .as_str()
            .unwrap_or("");
        assert_eq!(pattern.matches(&class).count(), 2, "{pattern}");
        assert_eq!(pattern.matches(&format!("[^{WHITE_SPACE}]")).count(), 2);
    }

    #[test]
    fn events_page_render_is_its_serialization() {
        let stored: Vec<StoredEvent> = vec![
            EventBody::agent_state("loading", "").stamp(0, "2026-11-29T17:41:23.572547"),
            EventBody::message(Source::User, "What is 2+2?", json!([]), false)
                .stamp(1, "2026-11-29T17:41:25.002345"),
            EventBody::message(Source::Agent, "4", Value::Null, true)
                .stamp(2, "2026-11-29T17:41:25.102345"),
            EventBody::error("boom").stamp(3, "2026-11-29T17:41:26.000000"),
            EventBody::from_value(&json!({
                "source": "environment", "cause": 1, "observation": "run",
                "content": "ok", "extras": {"exit_code": 0}
            }))
            .unwrap()
            .stamp(4, "2026-11-29T17:41:27.000000"),
            EventBody::from_value(&json!({
                "cause": 4, "action": "run", "args": {"command": "ls"},
                "tool_call_metadata": {"tool_call_id": "c1"}, "timeout": 120
            }))
            .unwrap()
            .stamp(5, "2026-11-29T17:41:28.000000"),
        ];
        for has_more in [false, true] {
            for n in [0, 1, stored.len()] {
                let events: Vec<Event> = stored[..n]
                    .iter()
                    .map(|e| serde_json::from_str(&e.json).expect("stored event is an Event"))
                    .collect();
                let typed = serde_json::to_string(&EventsPage { events, has_more }).unwrap();
                assert_eq!(EventsPage::render(&stored[..n], has_more), typed);
            }
        }
        let kinds: Vec<bool> = stored
            .iter()
            .map(|e| matches!(serde_json::from_str(&e.json).unwrap(), Event::Action(_)))
            .collect();
        assert_eq!(kinds, [false, true, true, false, false, true]);
    }

    /// The name of an other action as the document states it (its pattern, read by regex-lite
    /// as a client would, and its `not`) is what the server takes as one, for generated names.
    #[test]
    fn other_action_names_are_what_the_document_states() {
        let doc = to_value(&<OtherAction as utoipa::PartialSchema>::schema());
        let action = &doc["properties"]["action"];
        let pattern =
            regex_lite::Regex::new(action["pattern"].as_str().unwrap_or_default()).unwrap();
        let excluded = &action["not"]["const"];
        assert_eq!(excluded, "message");
        let mut names: Vec<String> = ["message", "messages", "messag", "xmessage", "Message"]
            .map(String::from)
            .to_vec();
        for len in 0..=EVENT_NAME_MAX_LEN + 1 {
            for c in ['a', 'z', '0', '9', '_', 'A', '-', ' ', '.', 'é', '\n'] {
                for at in [0, len / 2, len.saturating_sub(1)] {
                    let name: String = (0..len).map(|i| if i == at { c } else { 'q' }).collect();
                    names.push(name);
                }
            }
        }
        for name in names {
            let documented = pattern.is_match(&name) && *excluded != json!(name);
            let other = crate::events::is_event_name(&name) && name != "message";
            assert_eq!(documented, other, "{name:?}");
        }
    }

    async fn body_of(error: ApiError) -> (StatusCode, Value) {
        let response = error.error_response();
        let status = response.status();
        let bytes = actix_web::body::to_bytes(response.into_body())
            .await
            .unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Every body `ApiError` produces deserializes into its documented type and back unchanged.
    #[actix_web::test]
    async fn api_error_bodies_have_their_documented_shapes() {
        fn round_trip<T: Serialize + for<'de> Deserialize<'de>>(body: &Value) {
            let typed: T = serde_json::from_value(body.clone()).expect("documented shape");
            assert_eq!(&to_value(&typed), body);
        }
        let mut field = FieldError::value_error(vec![json!("body"), json!(0)], "bad", json!(1));
        let plain = FieldError::new(
            "missing",
            vec![json!("body")],
            "Field required",
            Value::Null,
        );
        field.ctx = Some(json!({"error": "bad"}));
        let (status, body) = body_of(ApiError::Validation(vec![field, plain])).await;
        assert_eq!(status, 422);
        round_trip::<HttpValidationError>(&body);
        for (error, code) in [
            (ApiError::Unauthorized, 401),
            (ApiError::BadRequest("Invalid limit".into()), 400),
            (ApiError::NotFound("Conversation x not found".into()), 404),
            (ApiError::PayloadTooLarge(10), 413),
            (ApiError::Unavailable("shutting down".into()), 503),
            (
                ApiError::Storage(crate::store::StoreError::Io("disk full".into())),
                503,
            ),
            (ApiError::Internal("disk".into()), 500),
        ] {
            let (status, body) = body_of(error).await;
            assert_eq!(status, code);
            round_trip::<ErrorDetail>(&body);
        }
        let (status, body) = body_of(ApiError::TooManyConversations).await;
        assert_eq!(status, 429);
        round_trip::<ErrorMessage>(&body);
        let alive = crate::api::not_found().await;
        let bytes = actix_web::body::to_bytes(alive.into_body()).await.unwrap();
        round_trip::<ErrorDetail>(&serde_json::from_slice(&bytes).unwrap());
    }
}
