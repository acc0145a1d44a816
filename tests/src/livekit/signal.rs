//! The signal endpoint: one TCP listener that answers `GET /rtc/validate` over plain HTTP
//! and runs the `/rtc` WebSocket sessions (binary protobuf: `SignalRequest` in,
//! `SignalResponse` out).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use livekit_api::access_token::TokenVerifier;
use livekit_protocol as proto;
use prost::Message as _;
use proto::signal_request::Message as Request;
use proto::signal_response::Message as Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as HttpRequest, Response as HttpResponse,
};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{WebSocketStream, accept_hdr_async};

use super::peer::{self, PeerHandle};
use super::state::{Admission, Outbound, Shared, trickle, unix_ms};
use super::{JoinInfo, JoinKind};

/// The most bytes of a request head the endpoint reads.
const MAX_HEAD: usize = 16 * 1024;

/// Accepts connections until the double shuts down.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let cancel = shared.cancel.clone();
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = connection(stream, shared) => {}
            }
        });
    }
}

async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    let Some(line) = request_line(&stream).await else {
        return;
    };
    if line.starts_with("GET /rtc/validate") {
        validate(stream, &shared).await;
    } else {
        websocket(stream, shared).await;
    }
}

/// The request line, peeked so the WebSocket handshake still reads the whole request.
async fn request_line(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    for _ in 0..50 {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = buf[..n].windows(2).position(|w| w == b"\r\n") {
            return Some(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
        if n == buf.len() {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    None
}

/// `GET /rtc/validate`: 200 `success`, or 401 with the reason the token was refused.
/// livekit-signaling asks this after a failed upgrade and reports the body.
async fn validate(mut stream: TcpStream, shared: &Shared) {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let target = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or("/");
    let authorization = lines.take_while(|line| !line.is_empty()).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_owned())
    });
    let query = query_of(target);

    let (status, body) = match admit(shared, &query, authorization.as_deref()) {
        Ok(_) => ("200 OK", "success".to_owned()),
        Err(reason) => ("401 Unauthorized", reason),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Checks the token (the `Authorization: Bearer` header, else the `access_token` query
/// parameter) the way a LiveKit server does.
fn admit(
    shared: &Shared,
    query: &BTreeMap<String, String>,
    authorization: Option<&str>,
) -> Result<Admission, String> {
    let token = authorization
        .and_then(|value| value.strip_prefix("Bearer "))
        .or_else(|| query.get("access_token").map(String::as_str))
        .ok_or_else(|| "no authorization token".to_owned())?;
    let options = &shared.options;
    let claims = TokenVerifier::with_api_key(&options.api_key, &options.api_secret)
        .verify(token)
        .map_err(|error| format!("invalid token: {error}"))?;
    if !claims.video.room_join || claims.video.room.is_empty() {
        return Err("permissions denied: the token does not grant joining a room".into());
    }
    if claims.sub.is_empty() {
        return Err("the token has no identity".into());
    }
    Ok(Admission {
        room: claims.video.room.clone(),
        identity: claims.sub,
        grants: claims.video,
        query: query.clone(),
    })
}

fn query_of(target: &str) -> BTreeMap<String, String> {
    let Some((_, query)) = target.split_once('?') else {
        return BTreeMap::new();
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |i: usize| (bytes.get(i).copied()? as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// The callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
async fn websocket(stream: TcpStream, shared: Arc<Shared>) {
    let mut admitted = None;
    let callback = |request: &HttpRequest, response: HttpResponse| {
        let path = request.uri().path();
        if path != "/rtc" {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!("no such path: {path}"),
            ));
        }
        let query = query_of(&request.uri().to_string());
        let authorization = request
            .headers()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        match admit(&shared, &query, authorization) {
            Ok(admission) => {
                admitted = Some(admission);
                Ok(response)
            }
            Err(reason) => {
                shared.record_refusal(reason.clone());
                Err(refuse(StatusCode::UNAUTHORIZED, reason))
            }
        }
    };
    let Ok(ws) = accept_hdr_async(stream, callback).await else {
        return;
    };
    let Some(admission) = admitted else {
        return;
    };
    Session::run(ws, admission, shared).await;
}

fn refuse(status: StatusCode, reason: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(reason));
    *response.status_mut() = status;
    response
}

/// One WebSocket session of one client: a first join or a resume.
struct Session {
    ws: WebSocketStream<TcpStream>,
    shared: Arc<Shared>,
    room: String,
    sid: String,
    id: u64,
    peer: PeerHandle,
    outbox: mpsc::UnboundedSender<Outbound>,
}

/// How a session ended.
enum End {
    /// The client sent `leave`.
    Left,
    /// The double closed it (a fault, a kick, a leave it sent) or the client went away.
    Closed,
}

impl Session {
    async fn run(mut ws: WebSocketStream<TcpStream>, admission: Admission, shared: Arc<Shared>) {
        let id = shared.next_id();
        let (outbox, mut outgoing) = mpsc::unbounded_channel();
        let resume_sid = (admission.query.get("reconnect").map(String::as_str) == Some("1"))
            .then(|| admission.query.get("sid").cloned().unwrap_or_default());

        let (sid, peer) = match resume_sid {
            Some(sid) => {
                let resumed = shared.resume(&admission.room, &sid, (id, outbox.clone()));
                let kind = if resumed.is_ok() {
                    JoinKind::Resume
                } else {
                    JoinKind::ResumeRefused
                };
                shared.record_join(JoinInfo::new(kind, &admission));
                match resumed {
                    Ok((peer, offer_id, candidate_init)) => {
                        // The same Rtc offers again with new ICE credentials.
                        let offer = match peer.ice_restart().await {
                            Ok(offer) => offer,
                            Err(error) => {
                                tracing::warn!(%error, "ICE restart failed");
                                return;
                            }
                        };
                        let _ = outbox.send(Outbound::message(Response::Offer(
                            proto::SessionDescription {
                                r#type: "offer".into(),
                                sdp: offer,
                                id: offer_id,
                                ..Default::default()
                            },
                        )));
                        let _ = outbox.send(Outbound::message(trickle(candidate_init)));
                        (sid, peer)
                    }
                    Err(leave) => {
                        let _ = send(&mut ws, Response::Leave(leave)).await;
                        let _ = ws.close(None).await;
                        return;
                    }
                }
            }
            None => {
                shared.record_join(JoinInfo::new(JoinKind::Join, &admission));
                let counters = shared.counters(&admission.room);
                let new_peer =
                    match peer::start(shared.options.ice_lite, counters, shared.cancel.clone())
                        .await
                    {
                        Ok(new_peer) => new_peer,
                        Err(error) => {
                            tracing::warn!(%error, "Cannot start a subscriber peer");
                            return;
                        }
                    };
                let joined = shared.join(&admission, (id, outbox.clone()), new_peer);
                (joined.sid, joined.peer)
            }
        };

        let mut session = Session {
            ws,
            shared,
            room: admission.room,
            sid,
            id,
            peer,
            outbox,
        };
        let end = session.serve(&mut outgoing).await;
        match end {
            End::Left => {}
            End::Closed => session
                .shared
                .signal_lost(&session.room, &session.sid, session.id),
        }
    }

    async fn serve(&mut self, outgoing: &mut mpsc::UnboundedReceiver<Outbound>) -> End {
        loop {
            tokio::select! {
                frame = self.ws.next() => match frame {
                    Some(Ok(Message::Binary(bytes))) => {
                        let Ok(request) = proto::SignalRequest::decode(bytes.as_ref()) else {
                            tracing::warn!("Undecodable SignalRequest");
                            continue;
                        };
                        if let Some(message) = request.message
                            && let Some(end) = self.request(message).await
                        {
                            return end;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return End::Closed,
                    Some(Ok(_)) => {}
                },
                outbound = outgoing.recv() => match outbound {
                    Some(Outbound::Message(message)) => {
                        if send(&mut self.ws, *message).await.is_err() {
                            return End::Closed;
                        }
                    }
                    Some(Outbound::Close(code)) => {
                        let frame = CloseFrame { code: CloseCode::from(code), reason: "".into() };
                        let _ = self.ws.close(Some(frame)).await;
                        return End::Closed;
                    }
                    Some(Outbound::Drop) | None => return End::Closed,
                },
            }
        }
    }

    /// Handles one client request; `Some` ends the session.
    async fn request(&mut self, message: Request) -> Option<End> {
        match message {
            Request::Answer(answer) => self.peer.answer(answer.sdp),
            Request::Trickle(trickle) => {
                if trickle.target == proto::SignalTarget::Subscriber as i32
                    && let Some(candidate) = candidate_of(&trickle.candidate_init)
                {
                    self.peer.remote_candidate(candidate);
                }
            }
            Request::PingReq(ping) => self.pong(Response::PongResp(proto::Pong {
                last_ping_timestamp: ping.timestamp,
                timestamp: unix_ms(),
            })),
            Request::Ping(_) => self.pong(Response::Pong(unix_ms())),
            Request::Leave(_) => {
                self.shared.client_left(&self.room, &self.sid);
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                };
                let _ = self.ws.close(Some(frame)).await;
                return Some(End::Left);
            }
            Request::SyncState(sync) => {
                self.shared
                    .with_room(&self.room, |room| room.sync_states.push(sync));
            }
            _ => {}
        }
        None
    }

    /// Counts a ping and answers it with `pong`, unless pongs are stopped in the room.
    fn pong(&self, pong: Response) {
        let answer = self.shared.with_room(&self.room, |room| {
            room.pings += 1;
            !room.stop_pongs
        });
        if answer {
            let _ = self.outbox.send(Outbound::message(pong));
        }
    }
}

async fn send(
    ws: &mut WebSocketStream<TcpStream>,
    message: Response,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let bytes = proto::SignalResponse {
        message: Some(message),
    }
    .encode_to_vec();
    ws.send(Message::Binary(Bytes::from(bytes))).await
}

/// The `candidate:` attribute out of a trickled `candidate_init` JSON string.
fn candidate_of(candidate_init: &str) -> Option<String> {
    let init: serde_json::Value = serde_json::from_str(candidate_init).ok()?;
    let candidate = init.get("candidate")?.as_str()?;
    (!candidate.is_empty()).then(|| candidate.to_owned())
}
