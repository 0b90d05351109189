//! Request validation with FastAPI/pydantic-shaped errors.
//!
//! [`parse_init_session`] turns a `POST /api/conversations` body into a [`NewConversation`] or
//! into every [`FieldError`] the body has, in the order OpenHands reports them: the body's own
//! shape first, then known fields in schema order, then unknown fields. It never panics on
//! input. A conversation id that enters as text becomes a [`ConversationId`] through
//! [`conversation_id`], whose 422 states the id rule.

use std::sync::OnceLock;

use serde::Serialize;
use serde_json::{json, Map, Value};

use utoipa::openapi::schema::{SchemaType, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::PartialSchema;

use super::schema::{
    has_mcp_url_scheme, is_repository, mcp_url_schemes_in_words, Choices, InitSessionRequest,
    McpConfig, ProviderType, StoredSettings, TaskType, UpdateConversationRequest,
    TASK_TYPES_REFUSED, TITLE_MAX_LEN,
};
use crate::conversation::{ConversationId, InitData, NewConversation, Trigger};
use crate::events::EventBody;

/// One entry of a 422 `detail` list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub loc: Vec<Value>,
    pub msg: String,
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Value>,
}

impl FieldError {
    pub fn new(kind: &'static str, loc: Vec<Value>, msg: impl Into<String>, input: Value) -> Self {
        FieldError {
            kind,
            loc,
            msg: msg.into(),
            input,
            ctx: None,
        }
    }

    pub fn value_error(loc: Vec<Value>, msg: &str, input: Value) -> Self {
        let mut e = FieldError::new("value_error", loc, format!("Value error, {msg}"), input);
        e.ctx = Some(json!({"error": msg}));
        e
    }
}

/// The `task_type`s a suggested task may name: those that start a conversation, then those
/// refused with a 422 of their own.
fn task_types() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let refused = TASK_TYPES_REFUSED.iter().map(|t| t.to_string());
        TaskType::names().iter().cloned().chain(refused).collect()
    })
}

/// The field names of a contract type (its schema's properties).
fn fields_of<T: PartialSchema>() -> Vec<String> {
    match T::schema() {
        RefOr::T(Schema::Object(object)) => object.properties.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The keys a `POST /api/conversations` body may have: [`InitSessionRequest`]'s fields.
fn init_session_fields() -> &'static [String] {
    static FIELDS: OnceLock<Vec<String>> = OnceLock::new();
    FIELDS.get_or_init(fields_of::<InitSessionRequest>)
}

/// The keys an `mcp_config` may have: [`McpConfig`]'s fields.
fn mcp_fields() -> &'static [String] {
    static FIELDS: OnceLock<Vec<String>> = OnceLock::new();
    FIELDS.get_or_init(fields_of::<McpConfig>)
}

/// The id at `loc` as a [`ConversationId`], or the 422 entry stating the rule.
pub fn conversation_id(id: &str, loc: Vec<Value>) -> Result<ConversationId, Box<FieldError>> {
    ConversationId::parse(id)
        .map_err(|e| Box::new(FieldError::value_error(loc, &e.to_string(), json!(id))))
}

fn loc(base: &[Value], key: impl Into<Value>) -> Vec<Value> {
    let mut l = base.to_vec();
    l.push(key.into());
    l
}

/// `'a', 'b' or 'c'`: how a 422 lists an enum's values.
pub fn enum_expected(choices: &[String]) -> String {
    let quoted: Vec<String> = choices.iter().map(|c| format!("'{c}'")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    }
}

/// Collects errors while reading one object.
struct Reader<'a> {
    obj: &'a Map<String, Value>,
    base: Vec<Value>,
    errors: &'a mut Vec<FieldError>,
}

impl<'a> Reader<'a> {
    fn missing(&mut self, key: &str) {
        self.errors.push(FieldError::new(
            "missing",
            loc(&self.base, key),
            "Field required",
            Value::Object(self.obj.clone()),
        ));
    }

    fn string_at(&mut self, key: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.errors.push(FieldError::new(
                    "string_type",
                    loc(&self.base, key),
                    "Input should be a valid string",
                    other.clone(),
                ));
                None
            }
        }
    }

    /// `str | None`: absent or null is `None`.
    fn opt_str(&mut self, key: &str) -> Option<String> {
        match self.obj.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => self.string_at(key, &v.clone()),
        }
    }

    /// Required `str`.
    fn req_str(&mut self, key: &str) -> Option<String> {
        match self.obj.get(key) {
            None => {
                self.missing(key);
                None
            }
            Some(v) => self.string_at(key, &v.clone()),
        }
    }

    fn enum_at(&mut self, key: &str, v: &Value, choices: &[String]) -> Option<String> {
        match v.as_str() {
            Some(s) if choices.iter().any(|c| c == s) => Some(s.to_string()),
            _ => {
                let expected = enum_expected(choices);
                let mut e = FieldError::new(
                    "enum",
                    loc(&self.base, key),
                    format!("Input should be {expected}"),
                    v.clone(),
                );
                e.ctx = Some(json!({ "expected": expected }));
                self.errors.push(e);
                None
            }
        }
    }

    fn opt_enum(&mut self, key: &str, choices: &[String]) -> Option<String> {
        match self.obj.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => self.enum_at(key, &v.clone(), choices),
        }
    }

    fn req_enum(&mut self, key: &str, choices: &[String]) -> Option<String> {
        match self.obj.get(key) {
            None => {
                self.missing(key);
                None
            }
            Some(v) => self.enum_at(key, &v.clone(), choices),
        }
    }

    /// `list[str]`; `nullable` allows null.
    fn str_list(&mut self, key: &str, nullable: bool) -> Option<Vec<String>> {
        match self.obj.get(key) {
            None => None,
            Some(Value::Null) if nullable => None,
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        other => {
                            ok = false;
                            let mut l = loc(&self.base, key);
                            l.push(json!(i));
                            self.errors.push(FieldError::new(
                                "string_type",
                                l,
                                "Input should be a valid string",
                                other.clone(),
                            ));
                        }
                    }
                }
                ok.then_some(out)
            }
            Some(other) => {
                self.errors.push(FieldError::new(
                    "list_type",
                    loc(&self.base, key),
                    "Input should be a valid list",
                    other.clone(),
                ));
                None
            }
        }
    }

    /// Required `int`, pydantic's lax mode: integers, integral floats and numeric strings.
    fn req_int(&mut self, key: &str) -> Option<i64> {
        match self.obj.get(key) {
            None => {
                self.missing(key);
                None
            }
            Some(v) => self.record(int_value(&loc(&self.base, key), v)),
        }
    }

    /// Keeps a value, or records its error.
    fn record<T>(&mut self, result: Result<T, Box<FieldError>>) -> Option<T> {
        result.map_err(|e| self.errors.push(*e)).ok()
    }

    /// Opens a nested model; `None` when absent, null, or not an object (error recorded).
    fn model(&mut self, key: &str, nullable: bool) -> Option<(Map<String, Value>, Vec<Value>)> {
        match self.obj.get(key) {
            None => None,
            Some(Value::Null) if nullable => None,
            Some(Value::Object(m)) => Some((m.clone(), loc(&self.base, key))),
            Some(other) => {
                self.errors.push(not_a_model(loc(&self.base, key), other));
                None
            }
        }
    }
}

/// A boxed [`FieldError`] (the helpers below return it in a small `Result`).
fn boxed(kind: &'static str, l: &[Value], msg: &str, v: &Value) -> Box<FieldError> {
    Box::new(FieldError::new(kind, l.to_vec(), msg, v.clone()))
}

/// An `int` in pydantic's lax mode: integers, integral floats, numeric strings, booleans.
fn int_value(l: &[Value], v: &Value) -> Result<i64, Box<FieldError>> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                    .map(|f| f as i64)
            })
            .ok_or_else(|| {
                boxed(
                    "int_from_float",
                    l,
                    "Input should be a valid integer, got a number with a fractional part",
                    v,
                )
            }),
        Value::String(s) => s.trim().parse::<i64>().map_err(|_| {
            boxed(
                "int_parsing",
                l,
                "Input should be a valid integer, unable to parse string as an integer",
                v,
            )
        }),
        Value::Bool(b) => Ok(i64::from(*b)),
        _ => Err(boxed("int_type", l, "Input should be a valid integer", v)),
    }
}

/// A `float` in pydantic's lax mode: numbers, numeric strings, booleans.
fn float_value(l: &[Value], v: &Value) -> Result<f64, Box<FieldError>> {
    let parsed = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => return Err(boxed("float_type", l, "Input should be a valid number", v)),
    };
    parsed.ok_or_else(|| {
        boxed(
            "float_parsing",
            l,
            "Input should be a valid number, unable to parse string as a number",
            v,
        )
    })
}

/// A `bool` in pydantic's lax mode: booleans, 0 and 1, and the usual words.
fn bool_value(l: &[Value], v: &Value) -> Result<bool, Box<FieldError>> {
    let parsed = match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Some(false),
            Some(1.0) => Some(true),
            _ => None,
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
            "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
            _ => None,
        },
        _ => return Err(boxed("bool_type", l, "Input should be a valid boolean", v)),
    };
    parsed.ok_or_else(|| {
        boxed(
            "bool_parsing",
            l,
            "Input should be a valid boolean, unable to interpret input",
            v,
        )
    })
}

/// The type of one field of the app settings.
#[derive(Clone, Copy)]
enum SettingType {
    /// `str | None` (secrets too).
    Str,
    /// `int | None`.
    Int,
    /// `float | None`.
    Float,
    /// `bool | None`.
    OptBool,
    /// `bool` with this default.
    Bool(bool),
    /// `MCPConfig | None`.
    Mcp,
    /// A nested model kept as sent (`secrets_store`).
    Model,
}

/// The type of a settings field as [`StoredSettings`]' schema states it: `Option<bool>` with
/// a `default` is [`SettingType::Bool`], another nullable scalar is its optional type, an
/// object is [`SettingType::Model`], a reference (to `MCPConfig`) is [`SettingType::Mcp`].
fn setting_type(field: &RefOr<Schema>) -> Option<SettingType> {
    let object = match field {
        RefOr::T(Schema::Object(object)) => object,
        RefOr::T(Schema::OneOf(_)) | RefOr::Ref(_) => return Some(SettingType::Mcp),
        _ => return None,
    };
    let scalar = match &object.schema_type {
        SchemaType::Type(t) => t,
        SchemaType::Array(types) => types.iter().find(|t| **t != Type::Null)?,
        SchemaType::AnyValue => return None,
    };
    Some(match scalar {
        Type::String => SettingType::Str,
        Type::Integer => SettingType::Int,
        Type::Number => SettingType::Float,
        Type::Boolean => match object.default.as_ref().and_then(Value::as_bool) {
            Some(default) => SettingType::Bool(default),
            None => SettingType::OptBool,
        },
        Type::Object => SettingType::Model,
        _ => return None,
    })
}

/// The fields of OpenHands' `Settings`, in its order (errors are reported in this order):
/// [`StoredSettings`]' fields with their types.
fn settings_fields() -> &'static [(String, SettingType)] {
    static FIELDS: OnceLock<Vec<(String, SettingType)>> = OnceLock::new();
    FIELDS.get_or_init(|| match StoredSettings::schema() {
        RefOr::T(Schema::Object(object)) => object
            .properties
            .iter()
            .filter_map(|(name, field)| Some((name.clone(), setting_type(field)?)))
            .collect(),
        _ => Vec::new(),
    })
}

/// Validates a `POST /api/settings` body as OpenHands' `Settings` model: every field with its
/// lax-mode type, absent fields at their defaults, unknown keys ignored. The result holds every
/// field, in the model's order, with the values as the model would hold them (`"5"` → `5`);
/// `mcp_config` gets all three server lists.
pub fn parse_settings(obj: &Map<String, Value>) -> Result<Map<String, Value>, Vec<FieldError>> {
    let base = vec![json!("body")];
    let mut errors = Vec::new();
    let mut out = Map::new();
    for (key, kind) in settings_fields() {
        let l = loc(&base, key.as_str());
        let value = obj.get(key);
        let parsed = match (kind, value) {
            (SettingType::Bool(default), None) => Ok(json!(default)),
            (SettingType::Model, None | Some(Value::Null)) => Ok(json!({"provider_tokens": {}})),
            (SettingType::Bool(_), Some(v)) => bool_value(&l, v).map(Value::Bool),
            (_, None | Some(Value::Null)) => Ok(Value::Null),
            (SettingType::Str, Some(v)) => match v {
                Value::String(_) => Ok(v.clone()),
                other => Err(boxed(
                    "string_type",
                    &l,
                    "Input should be a valid string",
                    other,
                )),
            },
            (SettingType::Int, Some(v)) => int_value(&l, v).map(|i| json!(i)),
            (SettingType::Float, Some(v)) => float_value(&l, v).map(|f| json!(f)),
            (SettingType::OptBool, Some(v)) => bool_value(&l, v).map(Value::Bool),
            (SettingType::Model, Some(v)) => match v {
                Value::Object(_) => Ok(json!({"provider_tokens": {}})),
                other => Err(Box::new(not_a_model(l, other))),
            },
            (SettingType::Mcp, Some(v)) => match v {
                Value::Object(m) => {
                    let before = errors.len();
                    validate_mcp(m, &l, &mut errors);
                    if errors.len() > before {
                        continue;
                    }
                    let mut full = Map::new();
                    for list in mcp_fields() {
                        full.insert(list.clone(), m.get(list).cloned().unwrap_or(json!([])));
                    }
                    Ok(Value::Object(full))
                }
                other => Err(Box::new(not_a_model(l, other))),
            },
        };
        match parsed {
            Ok(v) => {
                out.insert(key.clone(), v);
            }
            Err(e) => errors.push(*e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// A nested model given something other than an object. FastAPI validates request bodies with
/// `from_attributes`, so pydantic reports `model_attributes_type` (not `model_type`) at every
/// depth.
pub fn not_a_model(loc: Vec<Value>, input: &Value) -> FieldError {
    FieldError::new(
        "model_attributes_type",
        loc,
        "Input should be a valid dictionary or object to extract fields from",
        input.clone(),
    )
}

pub fn extra_forbidden(
    errors: &mut Vec<FieldError>,
    base: &[Value],
    obj: &Map<String, Value>,
    known: &[impl AsRef<str>],
) {
    for (key, value) in obj {
        if !known.iter().any(|k| k.as_ref() == key) {
            errors.push(FieldError::new(
                "extra_forbidden",
                loc(base, key.as_str()),
                "Extra inputs are not permitted",
                value.clone(),
            ));
        }
    }
}

/// Byte offset of a serde_json error, from its line and column.
fn error_offset(text: &[u8], err: &serde_json::Error) -> usize {
    if err.is_eof() {
        return text.len();
    }
    let (line, column) = (err.line(), err.column());
    let mut offset = 0;
    for (i, l) in text.split(|b| *b == b'\n').enumerate() {
        if i + 1 == line {
            return (offset + column.saturating_sub(1)).min(text.len());
        }
        offset += l.len() + 1;
    }
    text.len()
}

/// Whether a `Content-Type` is JSON (absent counts as JSON, as in OpenHands).
pub fn is_json_content_type(content_type: Option<&str>) -> bool {
    match content_type {
        None => true,
        Some(ct) => {
            let essence = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            essence.is_empty() || essence == "application/json" || essence.ends_with("+json")
        }
    }
}

/// Parses a request body as a JSON object the way FastAPI does for a model body.
pub fn parse_object_body(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Map<String, Value>, Vec<FieldError>> {
    let body_loc = vec![json!("body")];
    let not_object = |input: Value| vec![not_a_model(body_loc.clone(), &input)];
    if !is_json_content_type(content_type) {
        return Err(not_object(json!(String::from_utf8_lossy(body))));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(vec![FieldError::new(
            "missing",
            body_loc,
            "Field required",
            Value::Null,
        )]);
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            let mut err = FieldError::new(
                "json_invalid",
                vec![json!("body"), json!(error_offset(body, &e))],
                "JSON decode error",
                json!({}),
            );
            err.ctx = Some(json!({ "error": e.to_string() }));
            return Err(vec![err]);
        }
    };
    match value {
        Value::Null => Err(vec![FieldError::new(
            "missing",
            body_loc,
            "Field required",
            Value::Null,
        )]),
        Value::Object(m) => Ok(m),
        other => Err(not_object(other)),
    }
}

/// Validates a `POST /api/conversations` body.
pub fn parse_init_session(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<NewConversation, Vec<FieldError>> {
    let obj = parse_object_body(content_type, body)?;
    let mut errors = Vec::new();
    let base = vec![json!("body")];
    let mut r = Reader {
        obj: &obj,
        base: base.clone(),
        errors: &mut errors,
    };

    let mut repository = r.opt_str("repository").filter(|s| !s.is_empty());
    let mut git_provider = r.opt_enum("git_provider", ProviderType::names());
    let selected_branch = r.opt_str("selected_branch").filter(|s| !s.is_empty());
    let initial_user_msg = r.opt_str("initial_user_msg");
    let image_urls = r.str_list("image_urls", true).unwrap_or_default();
    let replay_json = r.opt_str("replay_json");
    let suggested = r.model("suggested_task", true);
    let microagent = r.model("create_microagent", true);
    let conversation_instructions = r.opt_str("conversation_instructions");
    let mcp = r.model("mcp_config", true);
    let requested_id = match obj.get("conversation_id") {
        None => None,
        Some(v) => r.string_at("conversation_id", v).filter(|s| !s.is_empty()),
    };

    if let Some(repo) = &repository {
        if !is_repository(repo) {
            errors.push(FieldError::value_error(
                loc(&base, "repository"),
                "repository must look like owner/repo (GitLab groups allowed: group/sub/repo)",
                json!(repo),
            ));
        }
    }
    let conversation_id = requested_id.and_then(|id| {
        conversation_id(&id, loc(&base, "conversation_id"))
            .map_err(|e| errors.push(*e))
            .ok()
    });

    let task = suggested.map(|(task, tloc)| suggested_task(task, tloc, &mut errors));
    let mut task_prompt = None;
    let mut task_value = None;
    if let Some(task) = task {
        task_prompt = task.prompt;
        repository = repository.or(task.repo);
        git_provider = git_provider.or(task.provider);
        task_value = Some(task.value);
    }

    let microagent = microagent.map(|(m, mloc)| create_microagent(m, mloc, &mut errors));
    let mut microagent_value = None;
    let mut title = None;
    if let Some(m) = microagent {
        title = m.title;
        repository = repository.or(m.repo);
        git_provider = git_provider.or(m.provider);
        microagent_value = Some(m.value);
    }

    let mcp_config = mcp.map(|(m, mloc)| {
        validate_mcp(&m, &mloc, &mut errors);
        Value::Object(m)
    });

    let replay_events = match &replay_json {
        Some(text) => replay(text, &base, initial_user_msg.is_some(), &mut errors),
        None => Vec::new(),
    };

    extra_forbidden(&mut errors, &base, &obj, init_session_fields());
    if !errors.is_empty() {
        return Err(errors);
    }

    let trigger = if task_value.is_some() {
        Trigger::SuggestedTask
    } else if microagent_value.is_some() {
        Trigger::MicroagentManagement
    } else {
        Trigger::Gui
    };
    let first_message = task_prompt.or(initial_user_msg);
    let brings_initial_message = first_message.is_some() || !image_urls.is_empty();
    Ok(NewConversation {
        conversation_id,
        trigger,
        title,
        brings_initial_message,
        init: InitData {
            repository,
            selected_branch,
            git_provider,
            conversation_instructions,
            mcp_config,
            initial_user_msg: first_message,
            image_urls,
            replay_events,
            suggested_task: task_value,
            create_microagent: microagent_value,
        },
    })
}

/// What a valid `suggested_task` brings to a new conversation.
struct TaskParts {
    /// The first message the task stands for, when it can start a conversation.
    prompt: Option<String>,
    /// The repository and provider it names (used when the request names none).
    repo: Option<String>,
    provider: Option<String>,
    /// The task as sent, kept with the conversation.
    value: Value,
}

/// Reads a `suggested_task` (at `tloc`), adding what is wrong with it to `errors`.
fn suggested_task(
    task: Map<String, Value>,
    tloc: Vec<Value>,
    errors: &mut Vec<FieldError>,
) -> TaskParts {
    let mut t = Reader {
        obj: &task,
        base: tloc.clone(),
        errors,
    };
    let provider = t.req_enum("git_provider", ProviderType::names());
    let task_type = t.req_enum("task_type", task_types());
    let repo = t.req_str("repo");
    let number = t.req_int("issue_number");
    let title = t.req_str("title");
    if provider.as_deref() == Some("enterprise_sso") {
        errors.push(FieldError::value_error(
            loc(&tloc, "git_provider"),
            "suggested tasks are not supported for enterprise_sso",
            json!("enterprise_sso"),
        ));
    }
    if let Some(tt) = task_type
        .as_deref()
        .filter(|t| TASK_TYPES_REFUSED.contains(t))
    {
        errors.push(FieldError::value_error(
            loc(&tloc, "task_type"),
            &format!("task type {tt} cannot start a conversation"),
            json!(tt),
        ));
    }
    let mut parts = TaskParts {
        prompt: None,
        repo: None,
        provider: None,
        value: Value::Null,
    };
    if let (Some(provider), Some(task_type), Some(repo), Some(number), Some(title)) =
        (provider, task_type, repo, number, title)
    {
        parts.prompt = task_prompt_for(&task_type, &provider, &repo, number, &title);
        parts.repo = Some(repo);
        parts.provider = Some(provider);
    }
    parts.value = Value::Object(task);
    parts
}

/// What a valid `create_microagent` brings to a new conversation.
struct MicroagentParts {
    repo: Option<String>,
    provider: Option<String>,
    /// The conversation's title, when it names one.
    title: Option<String>,
    /// The request as sent, kept with the conversation.
    value: Value,
}

/// Reads a `create_microagent` (at `mloc`), adding what is wrong with it to `errors`.
fn create_microagent(
    m: Map<String, Value>,
    mloc: Vec<Value>,
    errors: &mut Vec<FieldError>,
) -> MicroagentParts {
    let mut c = Reader {
        obj: &m,
        base: mloc,
        errors,
    };
    let repo = c.req_str("repo");
    let provider = c.opt_enum("git_provider", ProviderType::names());
    let title = c.opt_str("title").filter(|t| !t.trim().is_empty());
    MicroagentParts {
        repo,
        provider,
        title,
        value: Value::Object(m),
    }
}

/// The events of a `replay_json` text, adding what is wrong with it to `errors` (a list of valid
/// events, and no `initial_user_msg` beside it).
fn replay(
    text: &str,
    base: &[Value],
    with_initial_message: bool,
    errors: &mut Vec<FieldError>,
) -> Vec<Value> {
    let rloc = loc(base, "replay_json");
    let mut events = Vec::new();
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if let Err(why) = EventBody::from_value(item) {
                    errors.push(FieldError::value_error(
                        rloc.clone(),
                        &format!("replay_json event {i} is invalid: {why}"),
                        json!(text),
                    ));
                    break;
                }
            }
            events = items;
        }
        Ok(_) => errors.push(FieldError::value_error(
            rloc,
            "replay_json must be a JSON list of events",
            json!(text),
        )),
        Err(e) => errors.push(FieldError::value_error(
            rloc,
            &format!("replay_json is not valid JSON: {e}"),
            json!(text),
        )),
    }
    if with_initial_message {
        errors.push(FieldError::value_error(
            base.to_vec(),
            "replay_json and initial_user_msg cannot be used together",
            Value::Null,
        ));
    }
    events
}

/// Validates a `PATCH /api/conversations/{id}` body (OpenHands' `ConversationUpdate`, which
/// forbids unknown fields): the title, stripped, 1–[`TITLE_MAX_LEN`] characters.
pub fn parse_conversation_update(obj: &Map<String, Value>) -> Result<String, Vec<FieldError>> {
    let base = vec![json!("body")];
    let mut errors = Vec::new();
    let title = Reader {
        obj,
        base: base.clone(),
        errors: &mut errors,
    }
    .req_str("title")
    .map(|t| t.trim().to_string());
    if let Some(t) = &title {
        let chars = t.chars().count();
        if !(1..=TITLE_MAX_LEN).contains(&chars) {
            let (kind, msg, ctx) = if chars == 0 {
                (
                    "string_too_short",
                    "String should have at least 1 character".to_string(),
                    json!({"min_length": 1}),
                )
            } else {
                (
                    "string_too_long",
                    format!("String should have at most {TITLE_MAX_LEN} characters"),
                    json!({"max_length": TITLE_MAX_LEN}),
                )
            };
            let mut e = FieldError::new(kind, loc(&base, "title"), msg, json!(t));
            e.ctx = Some(ctx);
            errors.push(e);
        }
    }
    static FIELDS: OnceLock<Vec<String>> = OnceLock::new();
    let fields = FIELDS.get_or_init(fields_of::<UpdateConversationRequest>);
    extra_forbidden(&mut errors, &base, obj, fields);
    match title {
        Some(t) if errors.is_empty() => Ok(t),
        _ => Err(errors),
    }
}

/// Validates an `mcp_config` (at `mloc`): each of [`McpConfig`]'s server lists, then its keys.
fn validate_mcp(m: &Map<String, Value>, mloc: &[Value], errors: &mut Vec<FieldError>) {
    for key in mcp_fields() {
        let key = key.as_str();
        let Some(value) = m.get(key) else { continue };
        let kloc = loc(mloc, key);
        let Value::Array(items) = value else {
            errors.push(FieldError::new(
                "list_type",
                kloc,
                "Input should be a valid list",
                value.clone(),
            ));
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            let iloc = loc(&kloc, i);
            let Value::Object(server) = item else {
                errors.push(not_a_model(iloc, item));
                continue;
            };
            let mut r = Reader {
                obj: server,
                base: iloc.clone(),
                errors,
            };
            if key == "stdio_servers" {
                r.req_str("name");
                r.req_str("command");
                r.str_list("args", false);
                match server.get("env") {
                    None => {}
                    Some(Value::Object(env)) => {
                        for (k, v) in env {
                            if !v.is_string() {
                                let mut l = loc(&iloc, "env");
                                l.push(json!(k));
                                errors.push(FieldError::new(
                                    "string_type",
                                    l,
                                    "Input should be a valid string",
                                    v.clone(),
                                ));
                            }
                        }
                    }
                    Some(other) => errors.push(FieldError::new(
                        "dict_type",
                        loc(&iloc, "env"),
                        "Input should be a valid dictionary",
                        other.clone(),
                    )),
                }
            } else {
                let url = r.req_str("url");
                r.opt_str("api_key");
                if let Some(url) = url {
                    if !has_mcp_url_scheme(&url) {
                        errors.push(FieldError::value_error(
                            loc(&iloc, "url"),
                            &format!("URL scheme must be {}", mcp_url_schemes_in_words()),
                            json!(url),
                        ));
                    }
                }
            }
        }
    }
    extra_forbidden(errors, mloc, m, mcp_fields());
}

/// Our prompt for a suggested task.
fn task_prompt_for(
    task_type: &str,
    provider: &str,
    repo: &str,
    number: i64,
    title: &str,
) -> Option<String> {
    let job = match task_type {
        "MERGE_CONFLICTS" => format!(
            "Pull request #{number} (\"{title}\") in the {provider} repository {repo} has merge conflicts. \
             Check out its branch, resolve every conflict so the branch merges cleanly, run the tests, and push the result."
        ),
        "FAILING_CHECKS" => format!(
            "Pull request #{number} (\"{title}\") in the {provider} repository {repo} has failing checks. \
             Find out why each check fails, fix the cause on the branch, confirm the checks pass locally, and push the fix."
        ),
        "UNRESOLVED_COMMENTS" => format!(
            "Pull request #{number} (\"{title}\") in the {provider} repository {repo} has unresolved review comments. \
             Read every open comment, make the changes they ask for (or explain why not), and push the result."
        ),
        "OPEN_ISSUE" => format!(
            "Issue #{number} (\"{title}\") is open in the {provider} repository {repo}. \
             Read it and its discussion, implement a fix with tests on a new branch, and open a pull request that references the issue."
        ),
        _ => return None,
    };
    Some(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_list_reads_like_pydantic() {
        assert_eq!(
            enum_expected(ProviderType::names()),
            "'github', 'gitlab', 'bitbucket' or 'enterprise_sso'"
        );
    }

    use crate::api::schema::REPOSITORY_MAX_LEN;

    #[test]
    fn every_settings_field_has_a_type() {
        let fields = fields_of::<StoredSettings>();
        let typed: Vec<&String> = settings_fields().iter().map(|(name, _)| name).collect();
        assert_eq!(typed, fields.iter().collect::<Vec<_>>());
        let defaults: Vec<(&str, bool)> = settings_fields()
            .iter()
            .filter_map(|(name, kind)| match kind {
                SettingType::Bool(default) => Some((name.as_str(), *default)),
                _ => None,
            })
            .collect();
        assert_eq!(
            defaults,
            [
                ("enable_default_condenser", true),
                ("enable_sound_notifications", false),
                ("enable_proactive_conversation_starters", true),
                ("enable_solvability_analysis", true),
            ]
        );
    }

    #[test]
    fn mcp_url_schemes() {
        assert_eq!(mcp_url_schemes_in_words(), "http, https, ws, or wss");
        for good in ["http://x", "HTTPS://x", "ws://x", "wSs://x"] {
            assert!(has_mcp_url_scheme(good), "{good}");
        }
        for bad in ["ftp://x", "httpss://x", "s://x", "http:/x", "x http://y"] {
            assert!(!has_mcp_url_scheme(bad), "{bad}");
        }
    }

    #[test]
    fn repository_rule() {
        assert!(is_repository("owner/repo"));
        assert!(is_repository("group/sub/repo.js"));
        assert!(!is_repository("repo"));
        assert!(!is_repository("owner/../x"));
        assert!(!is_repository("owner//x"));
        assert!(!is_repository("owner/."));
        assert!(!is_repository("own er/x"));
        assert!(is_repository("owner/..."));
        assert!(is_repository(".github/.x-y_z"));
        let long = format!("o/{}", "r".repeat(REPOSITORY_MAX_LEN - 2));
        assert!(is_repository(&long));
        assert!(!is_repository(&format!("{long}r")));
    }

    #[test]
    fn json_error_offset_points_at_the_end_of_a_truncated_body() {
        let body = br#"{"initial_user_msg": "#;
        let err = parse_init_session(None, body).unwrap_err();
        assert_eq!(err[0].kind, "json_invalid");
        assert_eq!(err[0].loc, vec![json!("body"), json!(21)]);
    }
}
