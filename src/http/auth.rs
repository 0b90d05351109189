//! Keys: one check for every `/api` route, both socket routes, `/metrics` and the pages, and
//! the cookie login that lets a browser carry a key.
//!
//! A request may present a key in the `X-Session-API-Key` header, as `Authorization: Bearer`
//! (metrics scrapers), in the `session_api_key` query parameter, or in this server's login
//! cookie; a Socket.IO CONNECT may add it in its auth payload.
//! [`SessionAuth::resolve`] is the one place that decides who the caller is ([`Caller`]):
//! - the configured session key (compared in constant time) is an admin, as in OpenHands;
//! - a user key (`sbk_…`, see [`crate::keys`]) is looked up by its hash in the store at every
//!   request, so a key added or revoked by `switchboard keys` counts from the next request on:
//!   its user, or an admin when it was added with `--admin`;
//! - with no session key configured and no user key in the store, everyone is let in
//!   ([`Caller::Open`]: authentication is off, as before user keys existed) — except with a
//!   user key that is not in the store (a revoked one is refused from its next request on);
//! - anything else is refused (401). In particular, once a user key exists a key is required
//!   even without a session key, or a user's isolation would mean nothing.
//!
//! The caller found for a request is kept in its extensions (handlers take
//! `web::ReqData<Caller>`), and the access log names it ([`Caller::log_name`]).
//!
//! The cookie login: an HTML `GET` (the page `/`, or any request that accepts `text/html`) with
//! `?session_api_key=K` and the right key gets an `HttpOnly`, `SameSite=Strict` cookie and a
//! redirect to the same URL without the key, so the key leaves the address bar and the history.
//! `GET /login` is a small form doing the same; with a key set, any other HTML page asked for
//! without credentials redirects to it. The cookie is named after the server's port, so two
//! servers on one machine keep separate logins. The key is never written to a log line.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use std::net::IpAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq;

use crate::actors::ClientId;
use crate::http::{read_body, resource, ApiError, AppState};
use crate::store::{Store, StoreError};

/// The header that carries the key.
pub const KEY_HEADER: &str = "X-Session-API-Key";
/// The query parameter that carries the key.
pub const KEY_QUERY: &str = "session_api_key";
/// The login form's path.
pub const LOGIN_PATH: &str = "/login";

/// The session key this server requires, if any, the store holding the user keys, and the
/// name of the login cookie.
#[derive(Clone)]
pub struct SessionAuth {
    key: Option<String>,
    cookie_name: String,
    store: Arc<dyn Store>,
}

/// The outcome of a login attempt.
enum Login {
    SetCookie,
    NotNeeded,
    Refused,
}

/// Who a request or a socket is, once its key was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No session key is configured and no user key exists: authentication is off, and
    /// everyone sees everything.
    Open,
    /// The configured (or generated) session key: an admin.
    SessionKey,
    /// A user key: its name, and whether it is an admin key.
    User { name: Arc<str>, admin: bool },
}

impl Caller {
    /// Whether it sees and touches every conversation.
    pub fn sees_all(&self) -> bool {
        match self {
            Caller::Open | Caller::SessionKey => true,
            Caller::User { admin, .. } => *admin,
        }
    }

    /// The user's name (the `owner` of what it creates, the key of its settings).
    pub fn name(&self) -> Option<&Arc<str>> {
        match self {
            Caller::User { name, .. } => Some(name),
            Caller::Open | Caller::SessionKey => None,
        }
    }

    /// THE isolation rule: whether it may see (and touch) a conversation owned by `owner`.
    /// Admins see every conversation; a user sees exactly its own.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.sees_all() || (self.name().is_some_and(|name| Some(&**name) == owner))
    }

    /// Who it is in the access log: the user's name, `key` for the session key, `anonymous`.
    pub fn log_name(&self) -> &str {
        match self {
            Caller::Open => "anonymous",
            Caller::SessionKey => "key",
            Caller::User { name, .. } => name,
        }
    }

    /// The identity its creations count against ([`ClientId`]): its user, the session key, or
    /// without a key the peer's address.
    pub fn client_id(&self, peer: Option<IpAddr>) -> ClientId {
        match self {
            Caller::User { name, .. } => ClientId::User(name.clone()),
            Caller::SessionKey => ClientId::SessionKey,
            Caller::Open => {
                ClientId::peer(peer.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)))
            }
        }
    }

    /// 403 unless it is an admin (the operators' routes: `/metrics`, `/api/status`).
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.sees_all() {
            return Ok(());
        }
        Err(ApiError::Exact(
            StatusCode::FORBIDDEN,
            serde_json::json!({"detail": "Forbidden: this needs an admin key"}),
        ))
    }
}

/// The credentials one request (or socket) presented.
#[derive(Debug, Clone, Default)]
pub struct Presented(Vec<String>);

impl Presented {
    /// Adds one more presented key (a Socket.IO CONNECT's auth payload).
    pub fn with(mut self, key: Option<&str>) -> Presented {
        if let Some(key) = key {
            self.0.push(key.to_string());
        }
        self
    }
}

/// Whether `presented` is `expected`, compared in constant time.
fn key_matches(expected: &str, presented: &str) -> bool {
    bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

/// The value of the last `name` parameter of a query string.
fn query_value(query: &str, name: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

impl SessionAuth {
    /// `key` is the effective session key (`None` or empty: none); `port` the bound port;
    /// `store` holds the user keys.
    pub fn new(key: Option<String>, port: u16, store: Arc<dyn Store>) -> SessionAuth {
        SessionAuth {
            key: key.filter(|k| !k.is_empty()),
            cookie_name: format!("switchboard-session-{port}"),
            store,
        }
    }

    /// The key required, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The name of this server's login cookie.
    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// Every key the request carries: header, bearer token, cookie, query parameter.
    pub fn presented(&self, req: &HttpRequest) -> Presented {
        let mut keys = Vec::new();
        keys.extend(
            req.headers()
                .get_all(KEY_HEADER)
                .filter_map(|v| v.to_str().ok())
                .map(str::to_string),
        );
        keys.extend(
            req.headers()
                .get_all(header::AUTHORIZATION)
                .filter_map(|v| v.to_str().ok()?.strip_prefix("Bearer "))
                .map(str::to_string),
        );
        if let Some(cookie) = req.cookie(&self.cookie_name) {
            keys.push(cookie.value().to_string());
        }
        keys.extend(query_value(req.query_string(), KEY_QUERY));
        Presented(keys)
    }

    /// THE check: who these credentials are, or `None` when they may not pass (see the module
    /// docs). Reads the store only when a user key is presented, or when no session key is
    /// configured (to learn whether any user key exists: [`Store::any_key`], cheap).
    pub async fn resolve(&self, presented: &Presented) -> Result<Option<Caller>, StoreError> {
        if let Some(expected) = &self.key {
            if presented.0.iter().any(|p| key_matches(expected, p)) {
                return Ok(Some(Caller::SessionKey));
            }
        }
        let user_key = presented
            .0
            .iter()
            .find(|p| p.starts_with(crate::keys::KEY_PREFIX));
        let Some(user_key) = user_key else {
            if self.key.is_some() || self.store.any_key().await? {
                return Ok(None);
            }
            return Ok(Some(Caller::Open));
        };
        let hash = crate::keys::hash(user_key);
        // A user key that is not (or no longer) in the store never passes, not even on an
        // open server.
        let found = self.store.lookup_key(Some(&hash)).await?;
        Ok(found.key.map(|key| Caller::User {
            name: Arc::from(key.name),
            admin: key.admin,
        }))
    }

    /// [`SessionAuth::resolve`] for a request's own credentials.
    pub async fn resolve_request(&self, req: &HttpRequest) -> Result<Option<Caller>, StoreError> {
        self.resolve(&self.presented(req)).await
    }

    /// [`SessionAuth::resolve_request`], keeping the caller in the request's extensions (for
    /// handlers and the access log): the caller, 401 when refused, 503 when the store failed.
    pub async fn authenticate(&self, req: &HttpRequest) -> Result<Caller, ApiError> {
        match self.resolve_request(req).await {
            Ok(Some(caller)) => {
                req.extensions_mut().insert(caller.clone());
                Ok(caller)
            }
            Ok(None) => Err(ApiError::Unauthorized),
            Err(e) => Err(ApiError::Storage(e)),
        }
    }

    /// Whether a page request may pass: a caller was found (kept for the access log; a store
    /// failure counts as no, the login form then says so no more than a wrong key would).
    async fn lets_in(&self, req: &HttpRequest) -> bool {
        self.authenticate(req).await.is_ok()
    }

    /// What logging a browser in with `key` does: set the cookie (a session or user key),
    /// nothing (an open server needs no login), or refuse (a wrong key).
    async fn login_with(&self, key: &str) -> Login {
        match self.resolve(&Presented::default().with(Some(key))).await {
            Ok(Some(Caller::SessionKey | Caller::User { .. })) => Login::SetCookie,
            Ok(Some(Caller::Open)) => Login::NotNeeded,
            Ok(None) | Err(_) => Login::Refused,
        }
    }

    /// The `Set-Cookie` value that logs a browser in.
    fn login_cookie(&self, key: &str) -> String {
        Cookie::build(self.cookie_name.clone(), key.to_string())
            .path("/")
            .http_only(true)
            .same_site(SameSite::Strict)
            .finish()
            .encoded()
            .to_string()
    }
}

fn state_of(req: &HttpRequest) -> Option<web::Data<AppState>> {
    req.app_data::<web::Data<AppState>>().cloned()
}

/// Middleware for `/api`: finds the caller (kept in the request's extensions for the
/// handlers), or answers 401 (503 when the store cannot say).
pub async fn require_key(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    if let Some(state) = state_of(req.request()) {
        if let Err(refused) = state.auth.authenticate(req.request()).await {
            return Ok(req
                .into_response(refused.error_response())
                .map_into_right_body());
        }
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// Paths the login never touches: the API and the sockets check the key themselves.
fn is_machine_path(path: &str) -> bool {
    ["/api", "/socket.io", "/ws/"]
        .iter()
        .any(|p| path == p.trim_end_matches('/') || path.starts_with(p))
        || ["/alive", "/health", "/openapi.json", LOGIN_PATH].contains(&path)
}

fn accepts_html(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// A local path to go back to after logging in; anything else becomes `/`.
fn safe_next(next: &str) -> &str {
    let local = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.chars().any(char::is_control);
    if local {
        next
    } else {
        "/"
    }
}

fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish()
}

/// The path and query of `req` without any `session_api_key` parameter.
fn without_key(req: &HttpRequest) -> String {
    let rest: Vec<(String, String)> =
        serde_urlencoded::from_str::<Vec<(String, String)>>(req.query_string())
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k != KEY_QUERY)
            .collect();
    let query = serde_urlencoded::to_string(&rest).unwrap_or_default();
    if query.is_empty() {
        req.path().to_string()
    } else {
        format!("{}?{query}", req.path())
    }
}

/// Middleware for the pages: the `?session_api_key=K` login, and a redirect to the login form
/// for HTML pages asked for without credentials while a key is set.
pub async fn login(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let page = matches!(*req.method(), Method::GET | Method::HEAD)
        && !is_machine_path(req.path())
        && (req.path() == "/" || accepts_html(req.request()));
    let state = state_of(req.request());
    let Some(auth) = state.as_ref().map(|s| &s.auth).filter(|_| page) else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    if let Some(key) = query_value(req.query_string(), KEY_QUERY) {
        let response = match auth.login_with(&key).await {
            Login::SetCookie => {
                let mut response = see_other(&without_key(req.request()));
                if let Ok(cookie) = header::HeaderValue::from_str(&auth.login_cookie(&key)) {
                    response.headers_mut().append(header::SET_COOKIE, cookie);
                }
                response
            }
            Login::NotNeeded => return Ok(next.call(req).await?.map_into_left_body()),
            Login::Refused => login_form(&without_key(req.request()), true),
        };
        return Ok(req.into_response(response).map_into_right_body());
    }
    if !auth.lets_in(req.request()).await {
        let next_url = without_key(req.request());
        let location = format!(
            "{LOGIN_PATH}?{}",
            serde_urlencoded::to_string([("next", next_url.as_str())]).unwrap_or_default()
        );
        return Ok(req
            .into_response(see_other(&location))
            .map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// Escapes text for HTML content and attribute values.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The login page; `wrong` says the last key given was not the right one (401).
fn login_form(next: &str, wrong: bool) -> HttpResponse {
    let message = if wrong {
        r#"<p class="error">That key is not the right one.</p>"#
    } else {
        ""
    };
    let html = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>switchboard: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}}
input{{font:inherit;padding:.4rem;width:100%;box-sizing:border-box;margin:.5rem 0}}
.error{{color:#b00020}}</style></head>
<body><h1>switchboard</h1>
<p>This server needs a key: your user key (from <code>switchboard keys add</code>), or its
session key, printed when the server started or the <code>session_api_key</code> it was
configured with.</p>{message}
<form method="post" action="{LOGIN_PATH}">
<input type="hidden" name="next" value="{next}">
<label for="key">Session key</label>
<input id="key" name="session_api_key" type="password" autocomplete="current-password" autofocus required>
<input type="submit" value="Log in">
</form></body></html>
"#,
        next = escape_html(safe_next(next)),
    );
    let status = if wrong {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(html)
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// `GET /login`: the form, or straight back when no key is needed or the browser has it.
async fn login_page(req: HttpRequest, query: web::Query<LoginQuery>) -> HttpResponse {
    let next = safe_next(query.next.as_deref().unwrap_or("/"));
    match state_of(&req) {
        Some(state) if !state.auth.lets_in(&req).await => login_form(next, false),
        _ => see_other(next),
    }
}

#[derive(serde::Deserialize)]
struct LoginForm {
    session_api_key: String,
    next: Option<String>,
}

/// `POST /login`: the form's answer; the right key sets the cookie and goes back.
async fn login_submit(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.settings.limits.max_body_bytes).await?;
    let form: LoginForm = serde_urlencoded::from_bytes(&body)
        .map_err(|e| ApiError::BadRequest(format!("Invalid login form: {e}")))?;
    let next = safe_next(form.next.as_deref().unwrap_or("/"));
    let auth = &state.auth;
    match auth.login_with(&form.session_api_key).await {
        Login::SetCookie => {}
        Login::NotNeeded => return Ok(see_other(next)),
        Login::Refused => return Ok(login_form(next, true)),
    }
    let mut response = see_other(next);
    if let Ok(cookie) = header::HeaderValue::from_str(&auth.login_cookie(&form.session_api_key)) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    Ok(response)
}

/// Registers `/login`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource(LOGIN_PATH, "GET, POST")
            .route(web::get().to(login_page))
            .route(web::post().to(login_submit)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(key: Option<&str>, store: &crate::store::MemoryStore) -> SessionAuth {
        SessionAuth::new(key.map(str::to_string), 3000, Arc::new(store.clone()))
    }

    async fn who(auth: &SessionAuth, keys: &[&str]) -> Option<Caller> {
        let presented = keys
            .iter()
            .fold(Presented::default(), |p, k| p.with(Some(k)));
        auth.resolve(&presented).await.expect("resolve")
    }

    fn user(name: &str, admin: bool) -> Caller {
        Caller::User {
            name: Arc::from(name),
            admin,
        }
    }

    #[tokio::test]
    async fn the_one_check() {
        let store = crate::store::MemoryStore::new();
        let keyed = auth(Some("s3cret"), &store);
        assert_eq!(who(&keyed, &[]).await, None);
        assert_eq!(who(&keyed, &["s3cre"]).await, None);
        assert_eq!(who(&keyed, &["s3cret2"]).await, None);
        assert_eq!(
            who(&keyed, &["x", "s3cret"]).await,
            Some(Caller::SessionKey)
        );
        let open = auth(Some(""), &store);
        assert!(open.key().is_none());
        assert_eq!(who(&open, &[]).await, Some(Caller::Open));
        assert_eq!(who(&open, &["anything"]).await, Some(Caller::Open));

        // User keys: found by hash; once one exists, a key is needed even without a
        // session key.
        let alice = crate::keys::generate().expect("key");
        let root = crate::keys::generate().expect("key");
        for (name, key, admin) in [("alice", &alice, false), ("root", &root, true)] {
            let record = crate::store::ApiKey {
                name: name.into(),
                admin,
                created_at: "2024-01-01T00:00:00.000000Z".into(),
            };
            store
                .add_key(record, crate::keys::hash(key))
                .await
                .expect("add");
        }
        assert_eq!(who(&open, &[]).await, None);
        assert_eq!(who(&open, &["anything"]).await, None);
        assert_eq!(who(&open, &[&alice]).await, Some(user("alice", false)));
        assert_eq!(who(&open, &[&root]).await, Some(user("root", true)));
        assert_eq!(who(&keyed, &[&alice]).await, Some(user("alice", false)));
        assert_eq!(who(&keyed, &["s3cret"]).await, Some(Caller::SessionKey));
        let wrong = crate::keys::generate().expect("key");
        assert_eq!(who(&keyed, &[&wrong]).await, None);
        // Revoked: refused at once, also once no key is left and the server is open again.
        store.revoke_key("alice").await.expect("revoke");
        assert_eq!(who(&keyed, &[&alice]).await, None);
        assert_eq!(who(&open, &[&alice]).await, None);
        store.revoke_key("root").await.expect("revoke");
        assert_eq!(who(&open, &[&alice]).await, None);
        assert_eq!(who(&open, &[]).await, Some(Caller::Open));
    }

    #[test]
    fn the_isolation_rule() {
        let alice = user("alice", false);
        assert!(alice.may_see(Some("alice")));
        assert!(!alice.may_see(Some("bob")));
        assert!(!alice.may_see(Some("alic")));
        assert!(!alice.may_see(None));
        for admin in [Caller::Open, Caller::SessionKey, user("root", true)] {
            assert!(
                admin.may_see(Some("alice")) && admin.may_see(None),
                "{admin:?}"
            );
        }
        assert_eq!(alice.log_name(), "alice");
        assert_eq!(Caller::SessionKey.log_name(), "key");
        assert_eq!(Caller::Open.log_name(), "anonymous");
        assert!(alice.require_admin().is_err());
        assert!(user("root", true).require_admin().is_ok());
    }

    #[test]
    fn only_local_paths_are_gone_back_to() {
        assert_eq!(safe_next("/conversations/x?a=b"), "/conversations/x?a=b");
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "https://evil.example",
            "",
            "/a\nb",
        ] {
            assert_eq!(safe_next(bad), "/", "{bad:?}");
        }
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        let auth = auth(Some("a b;c"), &crate::store::MemoryStore::new());
        let cookie = auth.login_cookie("a b;c");
        assert!(
            cookie.starts_with("switchboard-session-3000=a%20b%3Bc"),
            "{cookie}"
        );
        assert!(cookie.contains("HttpOnly"), "{cookie}");
        assert!(cookie.contains("SameSite=Strict"), "{cookie}");
        assert!(cookie.contains("Path=/"), "{cookie}");
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape_html(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
