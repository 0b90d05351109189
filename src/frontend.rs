//! Serving a built OpenHands web app (`frontend.dir`, `--frontend DIR`) at `/`, the way
//! OpenHands serves its own build: with it, switchboard is a complete OpenHands-compatible
//! server on one origin.
//!
//! Promises:
//! - Files come from `frontend.dir` only (actix-files; hidden files, `..` and symlinks leading
//!   out of the directory are never served — see [`crate::workspace::confine`]).
//! - Every `GET`/`HEAD` that asks for HTML (`Accept: text/html`) and names no file gets
//!   `index.html`, so the app's own routes (`/conversations/<id>`, `/settings`) load on a
//!   reload. Anything else unknown is the API's JSON 404.
//! - `assets/` (content-hashed names) is cached for a year as immutable; everything else,
//!   `index.html` first, is `no-cache` (revalidated through its ETag).
//! - Responses are gzip-compressed when the client accepts it (actix-web's `Compress` with
//!   only its `compress-gzip` feature: pure-Rust flate2, no C build). The API and the sockets
//!   are registered before this service and are not compressed.

use std::path::{Path, PathBuf};

use actix_files::{Files, NamedFile};
use actix_web::body::MessageBody;
use actix_web::dev::{fn_service, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::middleware::{from_fn, Compress, Next};
use actix_web::{web, Error, HttpRequest};

use crate::workspace::{canonical_root, confine};

/// `Cache-Control` of the content-hashed files under `assets/`.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// `Cache-Control` of everything else, `index.html` first.
const REVALIDATE: &str = "no-cache";

/// Whether the client asks for an HTML page (a browser navigating).
fn accepts_html(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

/// `index.html` for a page the app routes itself; the JSON 404 for anything else.
async fn fallback(req: ServiceRequest, index: PathBuf) -> Result<ServiceResponse, Error> {
    let (req, _) = req.into_parts();
    let page = matches!(*req.method(), Method::GET | Method::HEAD) && accepts_html(&req);
    let mut response = if page {
        NamedFile::open_async(&index).await?.into_response(&req)
    } else {
        crate::http::not_found().await
    };
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static(REVALIDATE));
    Ok(ServiceResponse::new(req, response))
}

/// Sets `Cache-Control` on what the files service answers (unless the answer set its own).
async fn cache_headers(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let asset = req.path().starts_with("/assets/");
    let mut response = next.call(req).await?;
    let status = response.status();
    if (status.is_success() || status == actix_web::http::StatusCode::NOT_MODIFIED)
        && !response.headers().contains_key(header::CACHE_CONTROL)
    {
        let value = if asset { IMMUTABLE } else { REVALIDATE };
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static(value));
    }
    Ok(response)
}

/// Registers the web app in `dir` at `/`; register it after every other route.
pub fn configure(cfg: &mut web::ServiceConfig, dir: &Path) {
    let root = canonical_root(dir);
    let index = root.join("index.html");
    let filter_root = root.clone();
    let files = Files::new("", &root)
        .index_file("index.html")
        .disable_content_disposition()
        .path_filter(move |path, _| confine(&filter_root, path).is_ok())
        .default_handler(fn_service(move |req: ServiceRequest| {
            fallback(req, index.clone())
        }));
    cfg.service(
        web::scope("")
            .wrap(from_fn(cache_headers))
            .wrap(Compress::default())
            .service(files),
    );
}
