//! `GET /docs`: an interactive view of `/openapi.json` with Swagger UI.
//!
//! Swagger UI's two files are vendored under `vendor/swagger-ui/` (its licence and version
//! there) and compiled into the binary: nothing is fetched at build or run time, and the page
//! turns off Swagger UI's one outside call (the `validator.swagger.io` badge). The page is an
//! HTML page like the others, so with a session key a browser logs in first
//! ([`crate::http::auth`]) and "Try it out" requests carry the login cookie. The files are
//! gzip-compressed when the client accepts it.

use actix_web::http::header;
use actix_web::middleware::Compress;
use actix_web::{web, HttpResponse};

use super::resource;

const BUNDLE_JS: &[u8] = include_bytes!("../../vendor/swagger-ui/swagger-ui-bundle.js");
const CSS: &[u8] = include_bytes!("../../vendor/swagger-ui/swagger-ui.css");
/// `Cache-Control` of the vendored files (they change only with the binary).
const ASSET_CACHE: &str = "public, max-age=86400";

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>switchboard: API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
});
</script>
</body>
</html>
"##;

async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(PAGE)
}

fn asset(content_type: &'static str, body: &'static [u8]) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, ASSET_CACHE))
        .body(body)
}

/// Registers `/docs` and its two files.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/docs")
            .wrap(Compress::default())
            .service(resource("", "GET").route(web::get().to(page)))
            .service(resource("/swagger-ui-bundle.js", "GET").route(
                web::get().to(|| async { asset("text/javascript; charset=utf-8", BUNDLE_JS) }),
            ))
            .service(
                resource("/swagger-ui.css", "GET")
                    .route(web::get().to(|| async { asset("text/css; charset=utf-8", CSS) })),
            ),
    );
}
