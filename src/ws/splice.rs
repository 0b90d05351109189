//! Splicing a socket to the cluster node that owns its conversation.
//!
//! On the PostgreSQL store with a `[cluster] cluster_key`, a socket handshake (Socket.IO or
//! plain) for a conversation another live node owns is not served here: after this node's own
//! checks (origin, and for the plain route the caller's key and the conversation's visibility)
//! it opens a WebSocket to the same route on the owner ([`crate::store::NodeAddress::url`]),
//! with the caller's own credentials and the cluster key
//! ([`crate::http::forward::CLUSTER_KEY_HEADER`]), and only once the owner accepted that upgrade
//! does it accept the client's. From then on it relays frames both ways unchanged — text,
//! binary, fragments, ping and pong, close with its code — so everything a socket promises
//! (replay after `latest_event_id`, order, Socket.IO heartbeats, key checks, `num_connections`)
//! is kept by the owner's socket, exactly as for a client connected to the owner. Promises:
//!
//! - **The owner's refusal is the client's.** An owner that refuses the upgrade has its HTTP
//!   status passed on (401, 403, 404, 503…). An owner that cannot be reached, or does not
//!   accept within `cluster.splice_timeout_ms` (a paused or dead node whose registration has not
//!   expired yet), is a 503 — which a Socket.IO client retries, where it would take a `44` as
//!   final.
//! - **Never spliced twice.** A handshake carrying the cluster key is served where it arrives
//!   or refused: a node that does not own the conversation answers it 421 (see
//!   [`crate::http::forward`]); the splicing node then looks the owner up once more and splices
//!   there, or answers 503.
//! - **A lost owner reaches the client as a close without Socket.IO's `41`** (code 1012 when
//!   the owner's connection ended without a close frame; the owner's own close, such as a
//!   fenced node's 1012, as it sent it), so a Socket.IO client reconnects — through this node
//!   to the new owner, once there is one.
//! - **Bounded.** Frames from the client are limited to `socket.max_frame_bytes` as on the
//!   owner (a larger one closes the splice with 1009), frames from the owner to
//!   `cluster.splice_max_frame_bytes`; each direction holds at most one frame at a time and
//!   reads the next only once the other side took the last, so a client that stops reading
//!   stops the owner's socket, whose conversation then drops it as too slow — the same
//!   backpressure as on the owner.
//!
//! - **A node that shuts down tells its spliced clients to reconnect**: [`Splices::close_all`]
//!   (at the start of a graceful shutdown) closes them with 1001 and no `41`, instead of
//!   holding the shutdown until its bound and then dropping them.
//!
//! Spliced sockets are counted in `switchboard_spliced_sockets` (by transport) and logged in a
//! `splice` span with the conversation and the owner.

use actix_codec::{Decoder, Encoder, Framed};
use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Message, ProtocolError};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use awc::BoxedSocket;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;

use crate::config::StoreKind;
use crate::http::forward::{self, Attempt, CLUSTER_KEY_HEADER};
use crate::http::{ApiError, AppState};
use crate::ops::metrics::metrics;
use crate::store::NodeAddress;

/// The WebSocket to the owner.
type Upstream = Framed<BoxedSocket, Codec>;

/// One server's spliced sockets, as a group: closed together when it shuts down.
#[derive(Clone)]
pub struct Splices {
    closing: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Splices {
    fn default() -> Self {
        Splices {
            closing: std::sync::Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

impl Splices {
    /// Closes every spliced socket (with 1001, no Socket.IO `41`: its client reconnects
    /// elsewhere), and every one spliced from now on as soon as it is.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }
}

/// Whether a handshake refused here because another live node owns its conversation is spliced
/// to that node: with a cluster key configured, unless it was spliced here already.
pub(super) fn applies(req: &HttpRequest, state: &AppState) -> bool {
    state.settings.store == StoreKind::Postgres
        && !state.settings.cluster.cluster_key.is_empty()
        && !req.headers().contains_key(CLUSTER_KEY_HEADER)
}

/// Splices the client's socket for conversation `id` to `owner`'s; see the module docs.
pub(super) async fn splice(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    id: &str,
    owner: NodeAddress,
    transport: &'static str,
) -> Result<HttpResponse, ApiError> {
    // The client's handshake is checked before anything is asked of the owner.
    let mut accepted = actix_web_actors::ws::handshake(req)
        .map_err(|e| super::bad_request(&format!("WebSocket handshake failed: {e}")))?;
    let attempt = |owner: NodeAddress| async move {
        match connect(req, state, &owner).await {
            Ok(upstream) => Attempt::Answered(Ok((upstream, owner))),
            Err(awc::error::WsClientError::InvalidResponseStatus(status))
                if status == StatusCode::MISDIRECTED_REQUEST =>
            {
                Attempt::Misdirected
            }
            Err(awc::error::WsClientError::InvalidResponseStatus(status)) => {
                Attempt::Answered(Err((status, owner)))
            }
            Err(e) => Attempt::Unreachable(e.to_string()),
        }
    };
    let (upstream, owner) = match forward::to_owner(state, id, owner, attempt).await {
        Ok(Ok(spliced)) => spliced,
        Ok(Err((status, owner))) => {
            tracing::info!(conversation_id = %id, owner = %owner.node_id, %status, "the owner refused a spliced socket");
            return Err(ApiError::Exact(
                status,
                json!({ "detail": format!(
                    "Conversation {id} is served by cluster node {}, which refused the socket ({status})",
                    owner.node_id
                )}),
            ));
        }
        Err(unavailable) => return Ok(unavailable),
    };
    let span =
        tracing::info_span!("splice", conversation_id = %id, owner = %owner.node_id, transport);
    span.in_scope(|| tracing::info!("socket spliced to the conversation's owner"));
    let (to_owner, from_owner) = upstream.split();
    let client_frames = super::codec(state);
    let task = actix_web::rt::spawn(tracing::Instrument::instrument(
        client_to_owner(payload, client_frames, to_owner),
        span.clone(),
    ));
    metrics().spliced(transport, 1);
    let splice = Splice {
        task,
        transport,
        span,
        closing: state.splices.closing.subscribe(),
    };
    Ok(accepted.streaming(owner_to_client(from_owner, splice)))
}

/// Opens the WebSocket to the same route on `owner`.
async fn connect(
    req: &HttpRequest,
    state: &AppState,
    owner: &NodeAddress,
) -> Result<Upstream, awc::error::WsClientError> {
    if owner.url.is_empty() {
        return Err(awc::error::WsClientError::Protocol(
            awc::error::WsProtocolError::Io(std::io::Error::other("the owner has no address")),
        ));
    }
    let cluster = &state.settings.cluster;
    let path = req
        .uri()
        .path_and_query()
        .map_or(req.path(), |p| p.as_str());
    let client = awc::Client::builder()
        .timeout(std::time::Duration::from_millis(cluster.splice_timeout_ms))
        .finish();
    let mut out = client
        .ws(format!("{}{path}", owner.url))
        .max_frame_size(cluster.splice_max_frame_bytes)
        .set_header(CLUSTER_KEY_HEADER, cluster.cluster_key.as_str());
    for (name, value) in forward::caller_headers(req) {
        out = out.set_header(name, value);
    }
    Ok(out.connect().await?.1)
}

/// A frame as the message that sends it on unchanged; a text frame that is not UTF-8 is
/// refused (close 1007), as the socket itself refuses it.
fn message(frame: Frame) -> Result<Message, CloseReason> {
    Ok(match frame {
        Frame::Text(data) => match bytestring::ByteString::try_from(data) {
            Ok(text) => Message::Text(text),
            Err(_) => {
                return Err(CloseReason {
                    code: CloseCode::Invalid,
                    description: Some("a text message that is not UTF-8".into()),
                })
            }
        },
        Frame::Binary(data) => Message::Binary(data),
        Frame::Continuation(item) => Message::Continuation(item),
        Frame::Ping(data) => Message::Ping(data),
        Frame::Pong(data) => Message::Pong(data),
        Frame::Close(reason) => Message::Close(reason),
    })
}

/// The close a protocol error of one side is answered with.
fn protocol_close(error: &ProtocolError) -> CloseReason {
    match error {
        ProtocolError::Overflow => CloseReason {
            code: CloseCode::Size,
            description: Some("frame too large".into()),
        },
        e => CloseReason {
            code: CloseCode::Protocol,
            description: Some(format!("protocol error: {e}")),
        },
    }
}

/// The close the client gets when the owner's connection ended without one (the owner died,
/// or the network between the nodes failed): 1012 and no Socket.IO `41`, so it reconnects.
fn owner_lost() -> CloseReason {
    CloseReason {
        code: CloseCode::Restart,
        description: Some("the node serving this conversation went away; reconnect".into()),
    }
}

/// Relays the client's frames to the owner, one at a time (the next is read only once the owner
/// took the last). Ends after the client's close, a frame it may not send (the owner is told
/// why with a close), or when the client is gone (the owner is told with 1001).
async fn client_to_owner(
    mut payload: web::Payload,
    mut codec: Codec,
    mut owner: SplitSink<Upstream, Message>,
) {
    let mut buffer = web::BytesMut::new();
    loop {
        let (out, last) = match codec.decode(&mut buffer) {
            Ok(Some(frame)) => match message(frame) {
                Ok(message) => {
                    let last = matches!(message, Message::Close(_));
                    (message, last)
                }
                Err(close) => (Message::Close(Some(close)), true),
            },
            Ok(None) => match payload.next().await {
                Some(Ok(chunk)) => {
                    buffer.extend_from_slice(&chunk);
                    continue;
                }
                Some(Err(_)) | None => {
                    tracing::info!("the client of a spliced socket went away");
                    (Message::Close(Some(CloseCode::Away.into())), true)
                }
            },
            Err(e) => {
                tracing::info!(error = %e, "the client of a spliced socket broke the protocol");
                (Message::Close(Some(protocol_close(&e))), true)
            }
        };
        if let Err(e) = owner.send(out).await {
            tracing::info!(error = %e, "the owner's side of a spliced socket is closed");
            return;
        }
        if last {
            return;
        }
    }
}

/// Whatever a spliced socket holds until it ends: the client-to-owner task (ended with it),
/// its place in the metrics, its span, and the shutdown signal ([`Splices::close_all`]).
struct Splice {
    task: tokio::task::JoinHandle<()>,
    transport: &'static str,
    span: tracing::Span,
    closing: tokio::sync::watch::Receiver<bool>,
}

impl Drop for Splice {
    fn drop(&mut self) {
        self.task.abort();
        metrics().spliced(self.transport, -1);
        self.span
            .in_scope(|| tracing::info!("spliced socket closed"));
    }
}

/// The response body: the owner's frames, encoded for the client one at a time — the next is
/// read from the owner only once the client's connection took the last. Ends after a close
/// (the owner's, [`owner_lost`] when its connection ended without one, or 1001 when this node
/// shuts down).
fn owner_to_client(
    from_owner: SplitStream<Upstream>,
    splice: Splice,
) -> impl futures_util::Stream<Item = Result<web::Bytes, actix_web::Error>> {
    futures_util::stream::unfold(Some((from_owner, splice)), |state| async move {
        let (mut from_owner, mut splice) = state?;
        let next = tokio::select! {
            next = from_owner.next() => Some(next),
            _ = splice.closing.wait_for(|closing| *closing) => None,
        };
        let log = |f: &dyn Fn()| splice.span.in_scope(f);
        let out = match next {
            Some(Some(Ok(frame))) => match message(frame) {
                Ok(message) => message,
                Err(close) => Message::Close(Some(close)),
            },
            Some(Some(Err(ProtocolError::Io(e)))) => {
                log(&|| tracing::info!(error = %e, "the connection to the owner failed"));
                Message::Close(Some(owner_lost()))
            }
            Some(Some(Err(e))) => {
                log(&|| tracing::warn!(error = %e, "the owner broke the protocol"));
                Message::Close(Some(protocol_close(&e)))
            }
            Some(None) => {
                log(&|| tracing::info!("the owner's connection ended without a close"));
                Message::Close(Some(owner_lost()))
            }
            None => {
                log(&|| tracing::info!("this node shuts down; closing a spliced socket"));
                Message::Close(Some(CloseReason {
                    code: CloseCode::Away,
                    description: Some("this node is shutting down; reconnect".into()),
                }))
            }
        };
        let last = matches!(out, Message::Close(_));
        let mut bytes = web::BytesMut::new();
        if let Err(e) = Codec::new().encode(out, &mut bytes) {
            log(&|| tracing::warn!(error = %e, "cannot encode a frame for the client"));
            return None;
        }
        let next = (!last).then_some((from_owner, splice));
        Some((Ok(bytes.freeze()), next))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_http::ws::Item;

    #[test]
    fn frames_map_to_the_messages_that_send_them_on_unchanged() {
        let data = web::Bytes::from_static(b"x");
        assert!(matches!(message(Frame::Text(data.clone())), Ok(Message::Text(t)) if t == "x"));
        assert!(
            matches!(message(Frame::Binary(data.clone())), Ok(Message::Binary(b)) if b == data)
        );
        assert!(matches!(
            message(Frame::Continuation(Item::Last(data.clone()))),
            Ok(Message::Continuation(Item::Last(b))) if b == data
        ));
        assert!(matches!(
            message(Frame::Ping(data.clone())),
            Ok(Message::Ping(_))
        ));
        let close = Some(CloseReason::from(CloseCode::Restart));
        assert!(matches!(
            message(Frame::Close(close.clone())),
            Ok(Message::Close(c)) if c == close
        ));
        let invalid = web::Bytes::from_static(&[0xff, 0xfe]);
        assert!(matches!(
            message(Frame::Text(invalid)),
            Err(CloseReason {
                code: CloseCode::Invalid,
                ..
            })
        ));
    }
}
