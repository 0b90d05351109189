//! Request validation with FastAPI/pydantic-shaped errors.
//!
//! [`parse_init_session`] turns a `POST /api/conversations` body into a [`NewConversation`] or
//! into every [`FieldError`] the body has, in the order OpenHands reports them: the body's own
//! shape first, then known fields in schema order, then unknown fields. It never panics on
//! input. The fields' types are not restated here: a [`Contract`] read once from the request
//! types' schemas (`schema.rs`) checks each value against its field's schema; this module adds
//! the rules beyond types and builds the result. A conversation id that enters as text becomes a [`crate::conversation::ConversationId`] through
//! [`conversation_id`], whose 422 states the id rule.
//!
//! The same reader checks a user action ([`read_user_action`]: `UserAction`, one of several
//! models told apart by their enum-valued fields, answered in switchboard's own sentences)
//! and the socket's `providers_set` query ([`read_providers_set_query`]: the start body's
//! `providers_set`, comma-separated).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use utoipa::openapi::schema::{AdditionalProperties, ArrayItems, SchemaType, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use super::schema::{
    has_mcp_url_scheme, is_repository, mcp_url_schemes_in_words, refused_values, CreateMicroagent,
    InitSessionRequest, McpConfig, ProvidersSetModel, StoredSettings, SuggestedTask,
    UpdateConversationRequest, UserAction, TASK_PROVIDERS_REFUSED, TASK_TYPES_REFUSED,
    TITLE_MAX_LEN,
};
use crate::conversation::{InitData, NewConversation, Trigger};
use crate::events::{is_event_name, EventBody, EVENT_NAME_MAX_LEN};
use crate::http::error::{conversation_id, FieldError};

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

// ---------------------------------------------------------------------------------------------
// The contract's field types, read from the request types' schemas (`schema.rs`): the types
// are declared once, there, and this reader checks a body's values against what their schemas
// state, reporting each mismatch as pydantic does.

/// What a field's value must be, as its schema states it.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// `str`.
    Str,
    /// One of these names: an enum's values, then those it refuses by value
    /// ([`refused_values`]).
    Choice(Vec<String>),
    /// `int` in pydantic's lax mode (the schema: an integer, or a string holding one).
    Int,
    /// `list[str]`.
    StrList,
    /// A list of one of these names (`list[SomeEnum]`).
    ChoiceList(Vec<String>),
    /// `dict[str, str]`.
    StrMap,
    /// `dict[str, Any]`: an object of any values.
    Object,
    /// Any value at all (a schema without a type).
    Any,
    /// A nested model (its schema's name), read by the caller when it chooses.
    Model(String),
    /// `list[Model]` (the items' schema name), each item read as it comes.
    ModelList(String),
    /// A schema this reader does not know; accepted as sent (the unit tests hold the contract
    /// free of them).
    Unknown,
}

impl Kind {
    /// What a value of this kind is, in words (for switchboard's own messages).
    fn in_words(&self) -> String {
        match self {
            Kind::Str => "a string".into(),
            Kind::Choice(choices) => format!("one of {}", enum_expected(choices)),
            Kind::Int => "an integer".into(),
            Kind::StrList => "a list of strings".into(),
            Kind::ChoiceList(choices) => format!("a list of {}", enum_expected(choices)),
            Kind::StrMap | Kind::Object | Kind::Model(_) => "an object".into(),
            Kind::ModelList(_) => "a list of objects".into(),
            Kind::Any | Kind::Unknown => "a value".into(),
        }
    }
}

/// One field of a request type.
#[derive(Debug)]
struct Field {
    name: String,
    kind: Kind,
    required: bool,
    nullable: bool,
}

/// A request type's fields in declaration order (the order its errors are reported in), and
/// whether it refuses unknown keys (`additionalProperties: false`).
#[derive(Debug)]
struct Model {
    fields: Vec<Field>,
    closed: bool,
}

/// The model of a type the contract does not hold: no fields (the unit tests hold every model
/// the validator reads to be there).
static NO_MODEL: Model = Model {
    fields: Vec::new(),
    closed: false,
};

/// The request types validated here (with every type they refer to), by schema name (a few:
/// a list is quicker to search than a map is to hash).
struct Contract {
    models: Vec<(String, Model)>,
    unions: Vec<(String, Union)>,
}

/// A request type that is one of several models (an untagged enum: a `oneOf` of references).
/// An alternative with enum-valued fields is *tagged*: it is the one a value is when those
/// fields hold one of their values; the last alternative takes every value no tag claims.
#[derive(Debug)]
struct Union {
    /// The alternatives' schema names, in declaration order.
    alternatives: Vec<String>,
    /// The field that tells them apart: the first enum-valued field of a tagged alternative.
    tag: Option<String>,
}

/// The contract, read once from the request types' schemas.
fn contract() -> &'static Contract {
    static CONTRACT: OnceLock<Contract> = OnceLock::new();
    CONTRACT.get_or_init(|| {
        let mut schemas = Vec::new();
        collect::<InitSessionRequest>(&mut schemas);
        collect::<UpdateConversationRequest>(&mut schemas);
        collect::<ProvidersSetModel>(&mut schemas);
        collect::<UserAction>(&mut schemas);
        Contract::new(&schemas)
    })
}

/// `T`'s schema and those of every type it refers to.
fn collect<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

/// A field's schema without its `null`: the schema and whether `null` is allowed.
fn without_null(schema: &RefOr<Schema>) -> (&RefOr<Schema>, bool) {
    let is_null = |s: &RefOr<Schema>| matches!(s, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null));
    match schema {
        RefOr::T(Schema::OneOf(one)) if one.items.len() == 2 && one.items.iter().any(is_null) => {
            match one.items.iter().find(|s| !is_null(s)) {
                Some(other) => (other, true),
                None => (schema, true),
            }
        }
        _ => (schema, false),
    }
}

/// The type a `type` states (`null` aside) and whether it allows `null`.
fn scalar(schema_type: &SchemaType) -> (Option<&Type>, bool) {
    match schema_type {
        SchemaType::Type(t) => (Some(t), *t == Type::Null),
        SchemaType::Array(types) => (
            types.iter().find(|t| **t != Type::Null),
            types.contains(&Type::Null),
        ),
        SchemaType::AnyValue => (None, false),
    }
}

impl Contract {
    fn new(schemas: &[(String, RefOr<Schema>)]) -> Contract {
        let named: HashMap<&str, &RefOr<Schema>> =
            schemas.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let models: Vec<(String, Model)> = schemas
            .iter()
            .filter_map(|(name, schema)| match schema {
                RefOr::T(Schema::Object(o)) if o.enum_values.is_none() => {
                    let fields = o
                        .properties
                        .iter()
                        .map(|(field, schema)| {
                            let (kind, nullable) = Self::kind(schema, &named);
                            Field {
                                name: field.clone(),
                                kind,
                                required: o.required.contains(field),
                                nullable,
                            }
                        })
                        .collect();
                    let closed = matches!(
                        o.additional_properties.as_deref(),
                        Some(AdditionalProperties::FreeForm(false))
                    );
                    Some((name.clone(), Model { fields, closed }))
                }
                _ => None,
            })
            .collect();
        let unions = schemas
            .iter()
            .filter_map(|(name, schema)| match schema {
                RefOr::T(Schema::OneOf(one)) => {
                    let alternatives = one
                        .items
                        .iter()
                        .map(|item| match item {
                            RefOr::Ref(r) => r.ref_location.rsplit('/').next().map(str::to_string),
                            RefOr::T(_) => None,
                        })
                        .collect::<Option<Vec<String>>>()?;
                    let tag = alternatives.iter().find_map(|alternative| {
                        let (_, model) = models.iter().find(|(n, _)| n == alternative)?;
                        model.fields.iter().find_map(|f| match f.kind {
                            Kind::Choice(_) => Some(f.name.clone()),
                            _ => None,
                        })
                    });
                    Some((name.clone(), Union { alternatives, tag }))
                }
                _ => None,
            })
            .collect();
        Contract { models, unions }
    }

    /// The kind of a field with this schema, and whether it may be `null`.
    fn kind(schema: &RefOr<Schema>, named: &HashMap<&str, &RefOr<Schema>>) -> (Kind, bool) {
        let (schema, nullable) = without_null(schema);
        let kind = match schema {
            RefOr::Ref(r) => {
                let name = r.ref_location.rsplit('/').next().unwrap_or_default();
                match named.get(name) {
                    Some(RefOr::T(Schema::Object(o))) => match &o.enum_values {
                        Some(values) => Kind::Choice(
                            values
                                .iter()
                                .filter_map(|v| v.as_str().map(str::to_string))
                                .chain(refused_values(name).iter().map(|v| v.to_string()))
                                .collect(),
                        ),
                        None => Kind::Model(name.to_string()),
                    },
                    _ => Kind::Unknown,
                }
            }
            RefOr::T(Schema::OneOf(one))
                if one.items.iter().any(|s| {
                    matches!(s, RefOr::T(Schema::Object(o)) if scalar(&o.schema_type).0 == Some(&Type::Integer))
                }) =>
            {
                Kind::Int
            }
            RefOr::T(Schema::Object(o)) => {
                let (scalar, null) = scalar(&o.schema_type);
                let kind = match (scalar, o.additional_properties.as_deref()) {
                    // An enum declared in place (`#[schema(inline)]`).
                    (Some(Type::String), _) if o.enum_values.is_some() => Kind::Choice(
                        o.enum_values
                            .iter()
                            .flatten()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect(),
                    ),
                    (Some(Type::String), _) => Kind::Str,
                    (Some(Type::Object), Some(AdditionalProperties::RefOr(values)))
                        if Self::kind(values, named).0 == Kind::Str =>
                    {
                        Kind::StrMap
                    }
                    (Some(Type::Object), None | Some(AdditionalProperties::FreeForm(true))) => {
                        Kind::Object
                    }
                    (None, _) if o.schema_type == SchemaType::AnyValue => Kind::Any,
                    _ => Kind::Unknown,
                };
                return (kind, nullable || null);
            }
            RefOr::T(Schema::Array(a)) => {
                let kind = match &a.items {
                    ArrayItems::RefOrSchema(item) => match Self::kind(item, named).0 {
                        Kind::Str => Kind::StrList,
                        Kind::Choice(choices) => Kind::ChoiceList(choices),
                        Kind::Model(name) => Kind::ModelList(name),
                        _ => Kind::Unknown,
                    },
                    ArrayItems::False => Kind::Unknown,
                };
                return (kind, nullable || scalar(&a.schema_type).1);
            }
            _ => Kind::Unknown,
        };
        (kind, nullable)
    }

    /// The model of the type whose schema is called `name`.
    fn get(&self, name: &str) -> &Model {
        self.models
            .iter()
            .find(|(n, _)| n == name)
            .map_or(&NO_MODEL, |(_, model)| model)
    }

    /// `T`'s model.
    fn model<T: ToSchema>(&self) -> &Model {
        self.get(&T::name())
    }

    /// The union `U` (`None` when it is not in the contract; a unit test holds it there).
    fn union<U: ToSchema>(&self) -> Option<&Union> {
        let name = U::name();
        self.unions
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, union)| union)
    }

    /// The alternative of `union` that `obj` is: the first tagged one whose enum-valued fields
    /// all hold one of their values, or else the last one. Its model, and its tag's value when
    /// a tag claimed it.
    fn alternative<'c>(
        &'c self,
        union: &'c Union,
        obj: &'c Map<String, Value>,
    ) -> Option<(&'c Model, Option<&'c str>)> {
        let claimed = |model: &'c Model| {
            let mut tags = model
                .fields
                .iter()
                .filter_map(|f| match &f.kind {
                    Kind::Choice(choices) => Some((f, choices)),
                    _ => None,
                })
                .peekable();
            tags.peek()?;
            let mut value = None;
            for (field, choices) in tags {
                let v = obj.get(&field.name).and_then(Value::as_str)?;
                choices.iter().any(|c| c == v).then_some(())?;
                value = value.or(Some(v));
            }
            value
        };
        union
            .alternatives
            .iter()
            .map(|a| self.get(a))
            .find_map(|model| claimed(model).map(|tag| (model, Some(tag))))
            .or_else(|| Some((self.get(union.alternatives.last()?), None)))
    }

    /// The field at `path` (a 422's `loc` from `model`, list indices skipped), as it is
    /// declared in the model that holds it.
    fn field_at<'c>(&'c self, model: &'c Model, path: &[Value]) -> Option<&'c Field> {
        let mut names = path.iter().filter_map(Value::as_str);
        let first = names.next()?;
        let mut field = model.fields.iter().find(|f| f.name == first)?;
        for name in names {
            let (Kind::Model(inner) | Kind::ModelList(inner)) = &field.kind else {
                return None;
            };
            field = self.get(inner).fields.iter().find(|f| f.name == name)?;
        }
        Some(field)
    }

    /// Reads `obj` (at `base`) as a `T`: each field in declaration order, its errors added to
    /// `errors`. Unknown keys are left to [`Contract::forbid_extra`].
    fn read<'m, T: ToSchema>(
        &'m self,
        obj: &Map<String, Value>,
        base: &[Value],
        errors: &mut Vec<FieldError>,
    ) -> Fields<'m> {
        self.read_model(self.model::<T>(), obj, base, errors, &mut |_, _, _| {})
    }

    /// [`Contract::read`], calling `on_item` with each item of a list of models once its
    /// fields are read (for the rules an item must keep beyond its types).
    fn read_model<'m>(
        &'m self,
        model: &'m Model,
        obj: &Map<String, Value>,
        base: &[Value],
        errors: &mut Vec<FieldError>,
        on_item: &mut ItemRule<'m>,
    ) -> Fields<'m> {
        let mut values = Vec::with_capacity(model.fields.len());
        for field in &model.fields {
            let name = field.name.as_str();
            let v = match obj.get(name) {
                None => {
                    if field.required {
                        errors.push(FieldError::new(
                            "missing",
                            loc(base, name),
                            "Field required",
                            Value::Object(obj.clone()),
                        ));
                    }
                    continue;
                }
                Some(Value::Null) if field.nullable => continue,
                Some(v) => v,
            };
            // Where the value is, made only when it is needed (an error, a nested model).
            let l = || loc(base, name);
            let checked = match (&field.kind, v) {
                (Kind::Str, Value::String(s)) => Some(Checked::Str(s.clone())),
                (Kind::Str, _) => {
                    errors.push(FieldError::new(
                        "string_type",
                        l(),
                        "Input should be a valid string",
                        v.clone(),
                    ));
                    None
                }
                (Kind::Choice(choices), _) => choice(choices, v, l)
                    .map(Checked::Str)
                    .map_err(|e| errors.push(*e))
                    .ok(),
                (Kind::Int, _) => int_value(&l(), v)
                    .map(Checked::Int)
                    .map_err(|e| errors.push(*e))
                    .ok(),
                (Kind::StrList, Value::Array(items)) => {
                    let before = errors.len();
                    let strings = items
                        .iter()
                        .enumerate()
                        .filter_map(|(i, item)| match item {
                            Value::String(s) => Some(s.clone()),
                            other => {
                                errors.push(FieldError::new(
                                    "string_type",
                                    loc(&l(), i),
                                    "Input should be a valid string",
                                    other.clone(),
                                ));
                                None
                            }
                        })
                        .collect();
                    (errors.len() == before).then_some(Checked::StrList(strings))
                }
                (Kind::ChoiceList(choices), Value::Array(items)) => {
                    let before = errors.len();
                    let names = items
                        .iter()
                        .enumerate()
                        .filter_map(|(i, item)| {
                            choice(choices, item, || loc(&l(), i))
                                .map_err(|e| errors.push(*e))
                                .ok()
                        })
                        .collect();
                    (errors.len() == before).then_some(Checked::StrList(names))
                }
                (Kind::StrMap, Value::Object(map)) => {
                    for (key, value) in map.iter().filter(|(_, value)| !value.is_string()) {
                        errors.push(FieldError::new(
                            "string_type",
                            loc(&l(), key.as_str()),
                            "Input should be a valid string",
                            value.clone(),
                        ));
                    }
                    Some(Checked::Other)
                }
                (Kind::Object, Value::Object(_)) | (Kind::Any, _) => Some(Checked::Other),
                (Kind::StrMap | Kind::Object, _) => {
                    errors.push(FieldError::new(
                        "dict_type",
                        l(),
                        "Input should be a valid dictionary",
                        v.clone(),
                    ));
                    None
                }
                (Kind::Model(_), Value::Object(m)) => Some(Checked::Model(m.clone(), l())),
                (Kind::Model(_), _) => {
                    errors.push(not_a_model(l(), v));
                    None
                }
                (Kind::ModelList(item), Value::Array(items)) => {
                    let list_loc = l();
                    let item_model = self.get(item);
                    for (i, item) in items.iter().enumerate() {
                        let iloc = loc(&list_loc, i);
                        match item {
                            Value::Object(m) => {
                                let fields = self.read_model(item_model, m, &iloc, errors, on_item);
                                on_item(fields, &iloc, errors);
                            }
                            other => errors.push(not_a_model(iloc, other)),
                        }
                    }
                    Some(Checked::Other)
                }
                (Kind::StrList | Kind::ChoiceList(_) | Kind::ModelList(_), _) => {
                    errors.push(FieldError::new(
                        "list_type",
                        l(),
                        "Input should be a valid list",
                        v.clone(),
                    ));
                    None
                }
                (Kind::Unknown, _) => Some(Checked::Other),
            };
            if let Some(checked) = checked {
                values.push((name, checked));
            }
        }
        Fields { values }
    }

    /// Adds an `extra_forbidden` error for each key of `obj` (at `base`) that is not a field of
    /// `T`, when `T` refuses unknown keys.
    fn forbid_extra<T: ToSchema>(
        &self,
        obj: &Map<String, Value>,
        base: &[Value],
        errors: &mut Vec<FieldError>,
    ) {
        let model = self.model::<T>();
        if !model.closed {
            return;
        }
        for (key, value) in obj {
            if !model.fields.iter().any(|f| f.name == *key) {
                errors.push(FieldError::new(
                    "extra_forbidden",
                    loc(base, key.as_str()),
                    "Extra inputs are not permitted",
                    value.clone(),
                ));
            }
        }
    }
}

/// What a list of models checks in each item once the item's fields are read: its fields,
/// where it is, and the errors to add to.
type ItemRule<'m> = dyn FnMut(Fields<'m>, &[Value], &mut Vec<FieldError>) + 'm;

/// A value of its field's kind.
enum Checked {
    Str(String),
    Int(i64),
    StrList(Vec<String>),
    /// A nested model's object and where it is.
    Model(Map<String, Value>, Vec<Value>),
    /// A value checked in place (kept as sent).
    Other,
}

/// The values of a model that have their fields' types (absent, `null` and wrong ones are
/// not here), taken by name.
struct Fields<'m> {
    values: Vec<(&'m str, Checked)>,
}

impl Fields<'_> {
    fn take(&mut self, name: &str) -> Option<Checked> {
        let i = self.values.iter().position(|(n, _)| *n == name)?;
        Some(self.values.swap_remove(i).1)
    }

    /// A `str` field (or an enum's name).
    fn str(&mut self, name: &str) -> Option<String> {
        match self.take(name) {
            Some(Checked::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn int(&mut self, name: &str) -> Option<i64> {
        match self.take(name) {
            Some(Checked::Int(i)) => Some(i),
            _ => None,
        }
    }

    fn str_list(&mut self, name: &str) -> Option<Vec<String>> {
        match self.take(name) {
            Some(Checked::StrList(list)) => Some(list),
            _ => None,
        }
    }

    /// A nested model's object and where it is.
    fn model(&mut self, name: &str) -> Option<(Map<String, Value>, Vec<Value>)> {
        match self.take(name) {
            Some(Checked::Model(m, l)) => Some((m, l)),
            _ => None,
        }
    }
}

/// `v` as one of `choices` (at the place `at` makes, only on an error): pydantic's `enum`
/// error otherwise.
fn choice(
    choices: &[String],
    v: &Value,
    at: impl FnOnce() -> Vec<Value>,
) -> Result<String, Box<FieldError>> {
    match v.as_str() {
        Some(s) if choices.iter().any(|c| c == s) => Ok(s.to_string()),
        _ => {
            let expected = enum_expected(choices);
            let mut e = FieldError::new(
                "enum",
                at(),
                format!("Input should be {expected}"),
                v.clone(),
            );
            e.ctx = Some(json!({ "expected": expected }));
            Err(Box::new(e))
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
    Some(match scalar(&object.schema_type).0? {
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
                    for list in &contract().model::<McpConfig>().fields {
                        let name = &list.name;
                        full.insert(name.clone(), m.get(name).cloned().unwrap_or(json!([])));
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
    let contract = contract();
    let mut fields = contract.read::<InitSessionRequest>(&obj, &base, &mut errors);

    let mut repository = fields.str("repository").filter(|s| !s.is_empty());
    let mut git_provider = fields.str("git_provider");
    let selected_branch = fields.str("selected_branch").filter(|s| !s.is_empty());
    let initial_user_msg = fields.str("initial_user_msg");
    let image_urls = fields.str_list("image_urls").unwrap_or_default();
    let replay_json = fields.str("replay_json");
    let suggested = fields.model("suggested_task");
    let microagent = fields.model("create_microagent");
    let conversation_instructions = fields.str("conversation_instructions");
    let mcp = fields.model("mcp_config");
    let requested_id = fields.str("conversation_id").filter(|s| !s.is_empty());

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

    contract.forbid_extra::<InitSessionRequest>(&obj, &base, &mut errors);
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
    let mut t = contract().read::<SuggestedTask>(&task, &tloc, errors);
    let provider = t.str("git_provider");
    let task_type = t.str("task_type");
    let repo = t.str("repo");
    let number = t.int("issue_number");
    let title = t.str("title");
    if let Some(p) = provider
        .as_deref()
        .filter(|p| TASK_PROVIDERS_REFUSED.contains(p))
    {
        errors.push(FieldError::value_error(
            loc(&tloc, "git_provider"),
            &format!("suggested tasks are not supported for {p}"),
            json!(p),
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
    let mut c = contract().read::<CreateMicroagent>(&m, &mloc, errors);
    let repo = c.str("repo");
    let provider = c.str("git_provider");
    let title = c.str("title").filter(|t| !t.trim().is_empty());
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

/// Validates a `POST /api/conversations/{id}/start` body ([`ProvidersSetModel`]; unknown keys
/// are ignored, as OpenHands does).
pub fn parse_start_body(obj: &Map<String, Value>) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    contract().read::<ProvidersSetModel>(obj, &[json!("body")], &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Reads the `providers_set` query of a Socket.IO CONNECT: provider names separated by commas
/// (blanks around a name and empty names are ignored), each read as an item of the start
/// body's `providers_set` ([`ProvidersSetModel`]). The first name that is not a provider is
/// the error.
pub fn read_providers_set_query(query: &str) -> Result<(), String> {
    let names = query
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(Value::from)
        .collect();
    let body = Map::from_iter([("providers_set".to_string(), Value::Array(names))]);
    let mut errors = Vec::new();
    contract().read::<ProvidersSetModel>(&body, &[], &mut errors);
    match errors.first() {
        None => Ok(()),
        Some(e) => Err(e.input.as_str().unwrap_or_default().to_string()),
    }
}

/// Reads a user action as a client sends it (`oh_user_action`, `POST …/events`) into the
/// user's event: [`read_user_action`], then the event the action makes; any client-supplied
/// `id`, `timestamp` or `source` is ignored: the event is the user's.
pub fn parse_user_action(value: &Value) -> Result<EventBody, String> {
    read_user_action(value).map(EventBody::from)
}

/// Reads a user action as a client sends it (`POST …/events`, the socket's `oh_user_action`)
/// as a [`UserAction`]: the alternative its tag names ([`Contract::alternative`]: a
/// [`MessageAction`](super::schema::MessageAction) when `action` is `message`, an
/// [`OtherAction`](super::schema::OtherAction) otherwise), each field
/// checked against that alternative's schema in declaration order, and the tag's value against
/// the event-name rule ([`is_event_name`], the pattern the schema states). Keys the alternative
/// does not declare are ignored. The first error is the answer, in switchboard's own words
/// ([`user_action_error`]).
pub fn read_user_action(value: &Value) -> Result<UserAction, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| "an action must be a JSON object".to_string())?;
    let contract = contract();
    let union = contract
        .union::<UserAction>()
        .ok_or_else(|| "the contract holds no user action".to_string())?;
    let (model, tag) = contract
        .alternative(union, obj)
        .ok_or_else(|| "the contract holds no user action".to_string())?;
    let tag_field = union.tag.as_deref().unwrap_or_default();
    let mut errors = Vec::new();
    let mut fields = contract.read_model(model, obj, &[], &mut errors, &mut |_, _, _| {});
    if fields
        .str(tag_field)
        .is_some_and(|name| !is_event_name(&name))
    {
        return Err(format!(
            "`{tag_field}` must be 1-{EVENT_NAME_MAX_LEN} characters of a-z, 0-9 or _"
        ));
    }
    // Then the nested models, in the order of their fields.
    for field in &model.fields {
        if let (Kind::Model(inner), Some((m, l))) = (&field.kind, fields.model(&field.name)) {
            contract.read_model(contract.get(inner), &m, &l, &mut errors, &mut |_, _, _| {});
        }
    }
    if let Some(e) = errors.first() {
        return Err(user_action_error(contract, model, tag_field, tag, e));
    }
    // The value keeps every rule of the alternative's schema: serde reads it into the type.
    UserAction::deserialize(value).map_err(|e| e.to_string())
}

/// How the first error of a user action reads. Its tag field missing or not a string: the
/// action needs an `action` name; a model missing or `null`: as its first required field
/// missing; a required field of a tagged alternative (other than an object): a message needs
/// a string `args.content`; any other field: `args.image_urls` must be a list of strings.
fn user_action_error(
    contract: &Contract,
    model: &Model,
    tag_field: &str,
    tag: Option<&str>,
    e: &FieldError,
) -> String {
    let mut path: Vec<&str> = e.loc.iter().filter_map(Value::as_str).collect();
    if path == [tag_field] {
        return format!("the action needs an `{tag_field}` name");
    }
    let mut field = contract.field_at(model, &e.loc);
    if let Some(Field {
        kind: Kind::Model(inner),
        ..
    }) = field
    {
        if e.kind == "missing" || e.input.is_null() {
            field = contract.get(inner).fields.iter().find(|f| f.required);
            path.extend(field.map(|f| f.name.as_str()));
        }
    }
    let path = path.join(".");
    match (field, tag) {
        (Some(f), Some(tag)) if f.required && !matches!(f.kind, Kind::Model(_) | Kind::Object) => {
            format!("a {tag} needs {} `{path}`", f.kind.in_words())
        }
        (f, _) => format!(
            "`{path}` must be {}",
            f.map_or_else(|| "a value".into(), |f| f.kind.in_words())
        ),
    }
}

/// Validates a `PATCH /api/conversations/{id}` body (OpenHands' `ConversationUpdate`, which
/// forbids unknown fields): the title, stripped, 1–[`TITLE_MAX_LEN`] characters.
pub fn parse_conversation_update(obj: &Map<String, Value>) -> Result<String, Vec<FieldError>> {
    let base = vec![json!("body")];
    let mut errors = Vec::new();
    let contract = contract();
    let title = contract
        .read::<UpdateConversationRequest>(obj, &base, &mut errors)
        .str("title")
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
    contract.forbid_extra::<UpdateConversationRequest>(obj, &base, &mut errors);
    match title {
        Some(t) if errors.is_empty() => Ok(t),
        _ => Err(errors),
    }
}

/// Validates an `mcp_config` (at `mloc`): each of [`McpConfig`]'s server lists (an MCP server
/// reached over the network must have a URL with one of [`crate::api::schema::MCP_URL_SCHEMES`]),
/// then its keys.
fn validate_mcp(m: &Map<String, Value>, mloc: &[Value], errors: &mut Vec<FieldError>) {
    let contract = contract();
    let mut url_rule = |mut server: Fields, iloc: &[Value], errors: &mut Vec<FieldError>| {
        if let Some(url) = server.str("url").filter(|url| !has_mcp_url_scheme(url)) {
            errors.push(FieldError::value_error(
                loc(iloc, "url"),
                &format!("URL scheme must be {}", mcp_url_schemes_in_words()),
                json!(url),
            ));
        }
    };
    contract.read_model(
        contract.model::<McpConfig>(),
        m,
        mloc,
        errors,
        &mut url_rule,
    );
    contract.forbid_extra::<McpConfig>(m, mloc, errors);
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
    use crate::api::schema::{Choices, ProviderType};

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
        let RefOr::T(Schema::Object(settings)) = StoredSettings::schema() else {
            panic!("StoredSettings is an object");
        };
        let typed: Vec<&String> = settings_fields().iter().map(|(name, _)| name).collect();
        assert_eq!(typed, settings.properties.keys().collect::<Vec<_>>());
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

    /// Every request type the validator reads is in the contract, with a kind for each field
    /// (the reader knows every schema they use).
    #[test]
    fn the_contract_reads_every_request_type() {
        let contract = contract();
        let names = [
            InitSessionRequest::name(),
            SuggestedTask::name(),
            CreateMicroagent::name(),
            McpConfig::name(),
            crate::api::schema::McpSseServerConfig::name(),
            crate::api::schema::McpStdioServerConfig::name(),
            crate::api::schema::McpShttpServerConfig::name(),
            UpdateConversationRequest::name(),
        ];
        for name in names {
            let model = contract.get(&name);
            assert!(!std::ptr::eq(model, &NO_MODEL), "{name}");
            assert!(!model.fields.is_empty(), "{name}");
            for field in &model.fields {
                assert_ne!(field.kind, Kind::Unknown, "{name}.{}", field.name);
            }
        }
        let actions = contract
            .union::<UserAction>()
            .expect("UserAction is in the contract");
        assert_eq!(actions.alternatives, ["MessageAction", "OtherAction"]);
        assert_eq!(actions.tag.as_deref(), Some("action"));
        for name in actions
            .alternatives
            .iter()
            .map(String::as_str)
            .chain(["MessageArgs"])
        {
            let model = contract.get(name);
            assert!(!model.fields.is_empty(), "{name}");
            for field in &model.fields {
                assert_ne!(field.kind, Kind::Unknown, "{name}.{}", field.name);
            }
        }
        let init = contract.model::<InitSessionRequest>();
        assert!(init.closed && contract.model::<McpConfig>().closed);
        assert!(!contract.model::<SuggestedTask>().closed);
        let task = contract.model::<SuggestedTask>();
        let kinds: Vec<&Kind> = task.fields.iter().map(|f| &f.kind).collect();
        let names = |v: &[&str]| Kind::Choice(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            kinds,
            [
                &names(&["github", "gitlab", "bitbucket", "enterprise_sso"]),
                &names(&[
                    "MERGE_CONFLICTS",
                    "FAILING_CHECKS",
                    "UNRESOLVED_COMMENTS",
                    "OPEN_ISSUE",
                    "OPEN_PR",
                    "CREATE_MICROAGENT"
                ]),
                &Kind::Str,
                &Kind::Int,
                &Kind::Str,
            ]
        );
    }

    /// The socket's `providers_set` query names the start body's providers: none, or a list
    /// of them with blanks around and empty names between; the first other name is refused.
    #[test]
    fn providers_set_query_names_the_start_bodys_providers() {
        for good in [
            "",
            " ",
            ",",
            "github",
            " github , ,enterprise_sso,",
            "gitlab,bitbucket",
        ] {
            assert_eq!(read_providers_set_query(good), Ok(()), "{good:?}");
        }
        for (bad, name) in [
            ("github,svn,x", "svn"),
            ("GitHub", "GitHub"),
            (" a b ,github", "a b"),
            ("github,\"x\"", "\"x\""),
        ] {
            assert_eq!(
                read_providers_set_query(bad),
                Err(name.to_string()),
                "{bad:?}"
            );
        }
        // The same names as the start body's list.
        for name in ProviderType::names() {
            let body = Map::from_iter([("providers_set".to_string(), json!([name]))]);
            assert_eq!(parse_start_body(&body), Ok(()));
            assert_eq!(read_providers_set_query(name), Ok(()));
        }
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
        // The rule as another engine (regex-lite, as a client would) reads the pattern, for
        // every text of up to four of these pieces.
        let other = regex_lite::Regex::new(crate::api::schema::REPOSITORY_PATTERN).unwrap();
        let pieces = ["a", ".", "..", "...", "-", "_", "/", "Z9", " ", "é", "\n"];
        let mut texts = vec![String::new()];
        for _ in 0..4 {
            let longer: Vec<String> = texts
                .iter()
                .flat_map(|t| pieces.iter().map(move |p| format!("{t}{p}")))
                .collect();
            texts.extend(longer);
        }
        for text in &texts {
            assert_eq!(is_repository(text), other.is_match(text), "{text:?}");
        }
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

    /// A user action is read by the contract (`UserAction`'s schema): every way it can be
    /// wrong gets its one message, the first rule broken (in the order of the fields, whatever
    /// the order of the keys) is the one reported, and what is stored is the same for a
    /// message whatever else its args carry.
    #[test]
    fn user_actions_are_read_by_the_contract() {
        let name_rule =
            format!("`action` must be 1-{EVENT_NAME_MAX_LEN} characters of a-z, 0-9 or _");
        let cases = [
            (json!([]), "an action must be a JSON object"),
            (json!("message"), "an action must be a JSON object"),
            (json!({}), "the action needs an `action` name"),
            (
                json!({"action": null, "args": {}}),
                "the action needs an `action` name",
            ),
            (
                json!({"args": 5, "action": 7}),
                "the action needs an `action` name",
            ),
            (json!({"action": "Not A Name"}), &name_rule),
            (json!({"args": 5, "action": ""}), &name_rule),
            (
                json!({"action": "a".repeat(EVENT_NAME_MAX_LEN + 1)}),
                &name_rule,
            ),
            (
                json!({"action": "run", "args": [1]}),
                "`args` must be an object",
            ),
            (
                json!({"action": "message", "args": "x"}),
                "`args` must be an object",
            ),
            (
                json!({"action": "message"}),
                "a message needs a string `args.content`",
            ),
            (
                json!({"action": "message", "args": null}),
                "a message needs a string `args.content`",
            ),
            (
                json!({"action": "message", "args": {"image_urls": 1, "content": 1}}),
                "a message needs a string `args.content`",
            ),
            (
                json!({"action": "message", "args": {"file_urls": [1], "image_urls": "x", "content": ""}}),
                "`args.image_urls` must be a list of strings",
            ),
            (
                json!({"action": "message", "args": {"content": "x", "file_urls": ["a", null]}}),
                "`args.file_urls` must be a list of strings",
            ),
        ];
        for (action, message) in cases {
            assert_eq!(
                parse_user_action(&action),
                Err(message.to_string()),
                "{action}"
            );
        }

        let message = parse_user_action(&json!({"id": 9, "source": "agent", "message": "m",
            "args": {"wait_for_response": true, "file_urls": ["f"], "content": "hi", "x": 1,
            "image_urls": null}, "action": "message"}))
        .unwrap();
        assert_eq!(
            &*message.stamp(1, "t").json,
            r#"{"id":1,"timestamp":"t","source":"user","message":"hi","action":"message","args":{"content":"hi","file_urls":["f"],"image_urls":[],"wait_for_response":false}}"#
        );
        let other = parse_user_action(&json!({"timestamp": "x", "message": "paused",
            "action": "change_agent_state", "args": {"b": [1], "agent_state": "paused"}, "zz": 1}))
        .unwrap();
        assert_eq!(
            &*other.stamp(2, "t").json,
            r#"{"id":2,"timestamp":"t","source":"user","message":"paused","action":"change_agent_state","args":{"b":[1],"agent_state":"paused"}}"#
        );
        let bare =
            parse_user_action(&json!({"action": "run", "args": null, "message": 3})).unwrap();
        assert_eq!(
            &*bare.stamp(3, "t").json,
            r#"{"id":3,"timestamp":"t","source":"user","message":"","action":"run","args":{}}"#
        );
    }
}
