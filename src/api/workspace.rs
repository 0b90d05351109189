//! The per-conversation routes the web app calls beside the conversation itself, with
//! OpenHands' shapes: `config`, `vscode-url`, `web-hosts`, `git/changes`, `list-files`,
//! `select-file`, `upload-files`, `microagents` and `trajectory`.
//!
//! The files routes work on the conversation's working directory
//! ([`crate::workspace::working_dir`]); every client-given path goes through
//! [`crate::workspace::confine`], so nothing outside it is read, listed or written. Reads and
//! uploads are bounded by `[workspace]` settings. An unknown conversation is a 404; each bad
//! input a 4xx with OpenHands' `{"error": …}` body (validation errors in the pydantic shape).

use std::path::{Path, PathBuf};
use std::time::Duration;

use actix_multipart::Multipart;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::conversations::{query_get, query_pairs, require_conversation};
use super::schema::{
    render_event_list, ConversationIdPath, ErrorDetail, ErrorMessageOnly, FileContent, GitChange,
    HttpValidationError, ListFilesQuery, Microagents, RuntimeConfig, SelectFileQuery, StoreFailed,
    Trajectory, Unauthorized, UploadedFiles, VscodeUrl, WebHosts,
};
use crate::http::auth::Caller;
use crate::http::error::FieldError;
use crate::http::path_id;
use crate::http::ApiError;
use crate::http::AppState;
use crate::store::EventQuery;
use crate::workspace::{canonical_root, confine, working_dir};

/// How long `git status` may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest microagent file read.
const MICROAGENT_MAX_BYTES: u64 = 256 * 1024;

/// `{"error": message}` with `status`.
fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError::Exact(status, json!({ "error": message.into() }))
}

/// The conversation's working directory, resolved, when it exists.
fn existing_root(state: &AppState, id: &str) -> Option<PathBuf> {
    let dir = working_dir(&state.settings, id);
    dir.is_dir().then(|| canonical_root(&dir))
}

/// `GET /api/conversations/{id}/config`.
#[utoipa::path(
    get,
    path = "/api/conversations/{conversation_id}/config",
    tag = "workspace",
    operation_id = "get_remote_runtime_config",
    summary = "The conversation's runtime ids",
    params(ConversationIdPath),
    responses(
        (status = 200, description = "No remote runtime: `runtime_id` is null", body = RuntimeConfig),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ErrorDetail),
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn config(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    require_conversation(&state, &caller, &id).await?;
    Ok(HttpResponse::Ok().json(RuntimeConfig {
        runtime_id: None,
        session_id: id.to_string(),
    }))
}

/// `GET /api/conversations/{id}/vscode-url`.
#[utoipa::path(
    get,
    path = "/api/conversations/{conversation_id}/vscode-url",
    tag = "workspace",
    operation_id = "get_vscode_url",
    summary = "The conversation's VS Code URL (none: switchboard runs no editor)",
    params(ConversationIdPath),
    responses(
        (status = 200, description = "`vscode_url` is null", body = VscodeUrl),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ErrorDetail),
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn vscode_url(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    require_conversation(&state, &caller, &id).await?;
    Ok(HttpResponse::Ok().json(VscodeUrl { vscode_url: None }))
}

/// `GET /api/conversations/{id}/web-hosts`.
#[utoipa::path(
    get,
    path = "/api/conversations/{conversation_id}/web-hosts",
    tag = "workspace",
    operation_id = "get_hosts",
    summary = "Web servers the conversation's runtime exposes (none)",
    params(ConversationIdPath),
    responses(
        (status = 200, description = "A map URL → port; empty", body = WebHosts),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ErrorDetail),
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn web_hosts(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    require_conversation(&state, &caller, &id).await?;
    Ok(HttpResponse::Ok().json(WebHosts {
        hosts: Default::default(),
    }))
}

/// OpenHands' one-letter status of a `git status --porcelain` entry.
fn change_status(xy: &str) -> &'static str {
    if xy == "??" {
        return "A";
    }
    let mut letters = xy.chars().filter(|c| *c != ' ');
    match letters.next() {
        Some('A' | 'C') => "A",
        Some('D') => "D",
        Some('R') => "R",
        Some('U') => "U",
        _ => "M",
    }
}

/// Parses `git status --porcelain=v1 -z` output.
fn parse_porcelain(output: &[u8]) -> Vec<GitChange> {
    let mut changes = Vec::new();
    let mut entries = output.split(|b| *b == 0).filter(|e| !e.is_empty());
    while let Some(entry) = entries.next() {
        let text = String::from_utf8_lossy(entry);
        let (Some(xy), Some(path)) = (text.get(..2), text.get(3..)) else {
            continue;
        };
        if xy.contains('R') || xy.contains('C') {
            // The source path follows as its own entry.
            entries.next();
        }
        changes.push(GitChange {
            status: change_status(xy).to_string(),
            path: path.to_string(),
        });
    }
    changes
}

/// `GET /api/conversations/{id}/git/changes`.
#[utoipa::path(
    get,
    path = "/api/conversations/{conversation_id}/git/changes",
    tag = "workspace",
    operation_id = "git_changes",
    summary = "`git status` of the conversation's working directory",
    params(ConversationIdPath),
    responses(
        (status = 200, description = "Changed files (`M`, `A` — untracked files too —, `D`, `R`, `U`)", body = Vec<GitChange>),
        Unauthorized,
        (status = 404, description = "Unknown conversation (`detail`), or its working directory is not a git repository (`error`)", body = ErrorMessageOnly, example = json!({"error": "Not a git repository"})),
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        (status = 500, description = "`git` could not be run", body = ErrorMessageOnly),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn git_changes(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    require_conversation(&state, &caller, &id).await?;
    let not_a_repo = || error(StatusCode::NOT_FOUND, "Not a git repository");
    let Some(root) = existing_root(&state, &id) else {
        return Err(not_a_repo());
    };
    // Only the working directory itself: git must not find a repository above it.
    let ceiling = root.parent().unwrap_or(&root).to_path_buf();
    let mut command = tokio::process::Command::new("git");
    command
        .args([
            "status",
            "--porcelain=v1",
            "-z",
            "--untracked-files=all",
            "--no-renames",
        ])
        .current_dir(&root)
        .env("GIT_CEILING_DIRECTORIES", &ceiling)
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(GIT_TIMEOUT, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Error getting changes: cannot run git: {e}"),
            ))
        }
        Err(_) => {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Error getting changes: git status took too long",
            ))
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.to_ascii_lowercase().contains("not a git repository") {
            return Err(not_a_repo());
        }
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Error getting changes: {}", stderr.trim()),
        ));
    }
    Ok(HttpResponse::Ok().json(parse_porcelain(&output.stdout)))
}

/// A path refusal as a 400.
fn refused_path(refusal: crate::workspace::PathRefusal) -> ApiError {
    error(StatusCode::BAD_REQUEST, refusal.to_string())
}

/// `GET /api/conversations/{id}/list-files?path=`.
#[utoipa::path(
    get,
    path = "/api/conversations/{conversation_id}/list-files",
    tag = "workspace",
    operation_id = "list_files",
    summary = "The entries of a directory of the working directory",
    params(ConversationIdPath, ListFilesQuery),
    responses(
        (status = 200, description = "Paths relative to the working directory, directories first and ending in `/` (`.git` left out; at most `workspace.max_list_files`)", body = Vec<String>, example = json!(["src/", "README.md"])),
        (status = 400, description = "`path` is absolute, has `..`, leads out of the working directory, or is not a directory", body = ErrorMessageOnly),
        Unauthorized,
        (status = 404, description = "Unknown conversation, or no such directory", body = ErrorDetail),
        (status = 422, description = "Invalid `conversation_id` or query string", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn list_files(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    let pairs = query_pairs(&req)?;
    require_conversation(&state, &caller, &id).await?;
    let sub = query_get(&pairs, "path").unwrap_or("").to_string();
    let Some(root) = existing_root(&state, &id) else {
        return Ok(HttpResponse::Ok().json(Vec::<String>::new()));
    };
    let dir = confine(&root, Path::new(&sub)).map_err(refused_path)?;
    let limit = state.settings.workspace.max_list_files;
    let listed = web::block(move || list_dir(&dir, &sub, limit))
        .await
        .map_err(|e| ApiError::Internal(e.into()))??;
    Ok(HttpResponse::Ok().json(listed))
}

fn list_dir(dir: &Path, prefix: &str, limit: usize) -> Result<Vec<String>, ApiError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("No such directory: {prefix}"),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("Not a directory: {prefix}"),
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Error listing files: {e}"),
            ))
        }
    };
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for entry in entries.flatten().take(limit.saturating_add(1)) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == ".git" {
            continue;
        }
        let shown = if prefix.is_empty() {
            name
        } else {
            format!("{}/{name}", prefix.trim_end_matches('/'))
        };
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.push(format!("{shown}/"));
        } else {
            files.push(shown);
        }
    }
    dirs.sort();
    files.sort();
    dirs.extend(files);
    dirs.truncate(limit);
    Ok(dirs)
}

/// `GET /api/conversations/{id}/select-file?file=`.
#[utoipa::path(
    get,
    path = "/api/conversations/{conversation_id}/select-file",
    tag = "workspace",
    operation_id = "select_file",
    summary = "A text file of the working directory",
    params(ConversationIdPath, SelectFileQuery),
    responses(
        (status = 200, description = "The file's text", body = FileContent),
        (status = 400, description = "`file` is absolute, has `..`, leads out of the working directory, or is a directory", body = ErrorMessageOnly),
        Unauthorized,
        (status = 404, description = "Unknown conversation, or no such file", body = ErrorMessageOnly),
        (status = 413, description = "The file is larger than `workspace.max_read_file_bytes`", body = ErrorMessageOnly),
        (status = 415, description = "Not a text (UTF-8) file", body = ErrorMessageOnly),
        (status = 422, description = "Missing `file`, or invalid `conversation_id`", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn select_file(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    let pairs = query_pairs(&req)?;
    let Some(file) = query_get(&pairs, "file").map(str::to_string) else {
        return Err(ApiError::one(FieldError::new(
            "missing",
            vec![json!("query"), json!("file")],
            "Field required",
            Value::Null,
        )));
    };
    require_conversation(&state, &caller, &id).await?;
    let not_found = || error(StatusCode::NOT_FOUND, format!("File not found: {file}"));
    let Some(root) = existing_root(&state, &id) else {
        return Err(not_found());
    };
    let target = confine(&root, Path::new(&file)).map_err(refused_path)?;
    if target == root {
        return Err(error(StatusCode::BAD_REQUEST, "`file` names no file"));
    }
    let max = state.settings.workspace.max_read_file_bytes;
    let read = web::block(
        move || -> Result<Result<Vec<u8>, FileProblem>, std::io::Error> {
            let meta = std::fs::metadata(&target)?;
            if meta.is_dir() {
                return Ok(Err(FileProblem::Directory));
            }
            if meta.len() > max {
                return Ok(Err(FileProblem::TooLarge));
            }
            std::fs::read(&target).map(Ok)
        },
    )
    .await
    .map_err(|e| ApiError::Internal(e.into()))?;
    let bytes = match read {
        Err(_) => return Err(not_found()),
        Ok(Err(FileProblem::Directory)) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("{file} is a directory"),
            ))
        }
        Ok(Err(FileProblem::TooLarge)) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{file} is larger than {max} bytes"),
            ))
        }
        Ok(Ok(bytes)) => bytes,
    };
    match String::from_utf8(bytes) {
        Ok(code) => Ok(HttpResponse::Ok().json(FileContent { code })),
        Err(_) => Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Unable to open binary file: {file}"),
        )),
    }
}

/// Why `select-file` cannot return a file's text.
enum FileProblem {
    Directory,
    TooLarge,
}

/// `POST /api/conversations/{id}/upload-files` (multipart, files in `files`).
#[utoipa::path(
    post,
    path = "/api/conversations/{conversation_id}/upload-files",
    tag = "workspace",
    operation_id = "upload_files",
    summary = "Write files into the working directory",
    params(ConversationIdPath),
    request_body(content_type = "multipart/form-data", description = "Parts named `files`, each with a file name (a path relative to the working directory); at most `workspace.max_upload_files` files and `workspace.max_upload_bytes` bytes in all"),
    responses(
        (status = 200, description = "What was written, and what was refused and why (a path out of the working directory)", body = UploadedFiles),
        (status = 400, description = "Not a readable multipart body", body = ErrorMessageOnly),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ErrorDetail),
        (status = 413, description = "Too many files or bytes; nothing of the request was written", body = ErrorMessageOnly),
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn upload_files(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    require_conversation(&state, &caller, &id).await?;
    let limits = &state.settings.workspace;
    // Read every part first (bounded), so that a refused request writes nothing.
    let mut multipart = Multipart::new(req.headers(), payload);
    let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
    let mut total = 0usize;
    let bad = |e: actix_multipart::MultipartError| {
        error(
            StatusCode::BAD_REQUEST,
            format!("Not a readable multipart body: {e}"),
        )
    };
    while let Some(field) = multipart.next().await {
        let mut field = field.map_err(bad)?;
        let filename = field
            .content_disposition()
            .and_then(|d| d.get_filename())
            .map(str::to_string);
        let is_file = field.name() == Some("files") && filename.is_some();
        if is_file && parts.len() == limits.max_upload_files {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("At most {} files per upload", limits.max_upload_files),
            ));
        }
        let mut data = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(bad)?;
            total += chunk.len();
            if total > limits.max_upload_bytes {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("At most {} bytes per upload", limits.max_upload_bytes),
                ));
            }
            if is_file {
                data.extend_from_slice(&chunk);
            }
        }
        if let (true, Some(name)) = (is_file, filename) {
            parts.push((name, data));
        }
    }
    let dir = working_dir(&state.settings, &id);
    let (uploaded, skipped) = web::block(move || write_uploads(&dir, parts))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(|e| ApiError::internal("cannot create the working directory", e))?;
    tracing::info!(conversation_id = %id, uploaded = uploaded.len(), skipped = skipped.len(), "files uploaded");
    Ok(HttpResponse::Ok().json(UploadedFiles {
        uploaded_files: uploaded,
        skipped_files: skipped,
    }))
}

/// Writes uploaded files into `dir` (created if needed), each confined to it: the names written
/// and `{"name", "reason"}` for each refused.
fn write_uploads(
    dir: &Path,
    parts: Vec<(String, Vec<u8>)>,
) -> std::io::Result<(Vec<String>, Vec<Value>)> {
    std::fs::create_dir_all(dir)?;
    let root = canonical_root(dir);
    let mut uploaded = Vec::new();
    let mut skipped = Vec::new();
    for (name, data) in parts {
        let target = match confine(&root, Path::new(&name)) {
            Ok(target) if target != root => target,
            Ok(_) => {
                skipped.push(json!({"name": name, "reason": "the file name is empty"}));
                continue;
            }
            Err(why) => {
                skipped.push(json!({"name": name, "reason": why.to_string()}));
                continue;
            }
        };
        let written = target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&target, &data));
        match written {
            Ok(()) => uploaded.push(name),
            Err(e) => skipped.push(json!({"name": name, "reason": e.to_string()})),
        }
    }
    Ok((uploaded, skipped))
}

/// `GET /api/conversations/{id}/microagents`.
#[utoipa::path(
    get,
    path = "/api/conversations/{conversation_id}/microagents",
    tag = "workspace",
    operation_id = "get_microagents",
    summary = "The microagents in the working directory (`.openhands/microagents/*.md`)",
    params(ConversationIdPath),
    responses(
        (status = 200, description = "Each as a repository microagent with its text", body = Microagents),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ErrorDetail),
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn microagents(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    require_conversation(&state, &caller, &id).await?;
    let found = match existing_root(&state, &id) {
        Some(root) => web::block(move || read_microagents(&root))
            .await
            .map_err(|e| ApiError::Internal(e.into()))?,
        None => Vec::new(),
    };
    Ok(HttpResponse::Ok().json(Microagents { microagents: found }))
}

fn read_microagents(root: &Path) -> Vec<Value> {
    let Ok(dir) = confine(root, Path::new(".openhands/microagents")) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<Value> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".md")?.to_string();
            // Confined again: the entry itself may be a symlink out.
            let path = confine(root, &Path::new(".openhands/microagents").join(&name)).ok()?;
            let meta = std::fs::metadata(&path).ok()?;
            if !meta.is_file() || meta.len() > MICROAGENT_MAX_BYTES {
                return None;
            }
            let content = std::fs::read_to_string(&path).ok()?;
            Some(json!({"name": stem, "type": "repo", "content": content,
                        "triggers": [], "inputs": [], "tools": []}))
        })
        .collect();
    found.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    found
}

/// `GET /api/conversations/{id}/trajectory`.
#[utoipa::path(
    get,
    path = "/api/conversations/{conversation_id}/trajectory",
    tag = "workspace",
    operation_id = "get_trajectory",
    summary = "Every stored event of the conversation, oldest first",
    params(ConversationIdPath),
    responses(
        (status = 200, description = "The stored events", body = Trajectory),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ErrorDetail),
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn trajectory(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    require_conversation(&state, &caller, &id).await?;
    let events = state
        .store
        .events(&id, EventQuery::after(None, usize::MAX))
        .await?;
    let mut body = render_event_list("{\"trajectory\":", &events);
    body.push('}');
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn porcelain_entries_become_openhands_changes() {
        let out = b" M src/a.rs\0?? new.txt\0D  gone.md\0A  added.rs\0UU both.rs\0";
        let changes: Vec<(String, String)> = parse_porcelain(out)
            .into_iter()
            .map(|c| (c.status, c.path))
            .collect();
        assert_eq!(
            changes,
            [
                ("M", "src/a.rs"),
                ("A", "new.txt"),
                ("D", "gone.md"),
                ("A", "added.rs"),
                ("U", "both.rs")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }
}
