//! The session key: one check for every `/api` route and both socket routes, and the cookie
//! login that lets a browser carry the key.
//!
//! A request may present the key in the `X-Session-API-Key` header, as `Authorization: Bearer`
//! (metrics scrapers), in the `session_api_key` query parameter, or in this server's login
//! cookie; a Socket.IO CONNECT may add it in its auth payload.
//! [`SessionAuth::allows`] is the one place that decides, comparing in constant time.
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
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use subtle::ConstantTimeEq;

use crate::api::{read_body, resource, ApiError, AppState};

/// The header that carries the key.
pub const KEY_HEADER: &str = "X-Session-API-Key";
/// The query parameter that carries the key.
pub const KEY_QUERY: &str = "session_api_key";
/// The login form's path.
pub const LOGIN_PATH: &str = "/login";

/// The key this server requires, if any, and the name of its login cookie.
#[derive(Debug, Clone)]
pub struct SessionAuth {
    key: Option<String>,
    cookie_name: String,
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
    /// `key` is the effective key (`None` or empty: no authentication); `port` the bound port.
    pub fn new(key: Option<String>, port: u16) -> SessionAuth {
        SessionAuth {
            key: key.filter(|k| !k.is_empty()),
            cookie_name: format!("switchboard-session-{port}"),
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

    /// THE check: whether these credentials may pass (always, when no key is set).
    pub fn allows(&self, presented: &Presented) -> bool {
        match &self.key {
            None => true,
            Some(expected) => presented.0.iter().any(|p| key_matches(expected, p)),
        }
    }

    /// [`SessionAuth::allows`] for a request's own credentials.
    pub fn allows_request(&self, req: &HttpRequest) -> bool {
        self.key.is_none() || self.allows(&self.presented(req))
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

/// Middleware for `/api`: 401 unless the request presents the key.
pub async fn require_key(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let allowed = state_of(req.request()).is_none_or(|s| s.auth.allows_request(req.request()));
    if !allowed {
        let response = ApiError::Unauthorized.error_response();
        return Ok(req.into_response(response).map_into_right_body());
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
    let Some(auth) = state.as_ref().map(|s| &s.auth).filter(|a| a.key.is_some()) else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    if !page {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    if let Some(key) = query_value(req.query_string(), KEY_QUERY) {
        let response = if auth.allows(&Presented::default().with(Some(&key))) {
            let mut response = see_other(&without_key(req.request()));
            if let Ok(cookie) = header::HeaderValue::from_str(&auth.login_cookie(&key)) {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            response
        } else {
            login_form(&without_key(req.request()), true)
        };
        return Ok(req.into_response(response).map_into_right_body());
    }
    if !auth.allows_request(req.request()) {
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
<p>This server needs its session key. It was printed when the server started, or is the
<code>session_api_key</code> it was configured with.</p>{message}
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
        Some(state) if !state.auth.allows_request(&req) => login_form(next, false),
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
    let Some(_) = auth.key() else {
        return Ok(see_other(next));
    };
    if !auth.allows(&Presented::default().with(Some(&form.session_api_key))) {
        return Ok(login_form(next, true));
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

    #[test]
    fn the_one_check() {
        let auth = SessionAuth::new(Some("s3cret".into()), 3000);
        assert!(!auth.allows(&Presented::default()));
        assert!(!auth.allows(&Presented::default().with(Some("s3cre"))));
        assert!(!auth.allows(&Presented::default().with(Some("s3cret2"))));
        assert!(auth.allows(&Presented::default().with(Some("x")).with(Some("s3cret"))));
        let open = SessionAuth::new(Some(String::new()), 3000);
        assert!(open.key().is_none());
        assert!(open.allows(&Presented::default()));
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
        let auth = SessionAuth::new(Some("a b;c".into()), 3000);
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
