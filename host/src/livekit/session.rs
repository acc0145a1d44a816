//! One job's presence in a room: join, receive, resume, rejoin, leave.
//!
//! [`run`] owns the signal client and the subscriber peer and drives both from one loop, so
//! nothing here needs a lock. Each reliable `DataPacket` that survives de-duplication goes
//! to the job through a [`PacketQueue`]; everything else the room does (participants coming
//! and going, the server asking us to leave, the signal dropping) is handled here and ends in
//! a [`SessionEnd`] or a [`SessionError`].

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use livekit_protocol as proto;
use livekit_signaling::{SignalClient, SignalError, SignalEvent, SignalEvents, SignalOptions};
use prost::Message as _;
use proto::signal_request::Message as Request;
use proto::signal_response::Message as Response;
use str0m::IceConnectionState;
use tokio_util::sync::CancellationToken;

use super::dedup::{Dedup, Verdict};
use super::peer::{Peer, PeerEvent};
use super::token::{self, ApiKey, Secret};
use super::{LiveKitStats, PacketQueue};
use crate::telemetry::JobCounters;

/// Longest a request to the server may take to go out, and a close to finish. The signal
/// crate's sends wait as long as the socket is full, and a server that stops reading keeps
/// it full: past this the connection is treated as lost.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Participants watched at once (see [`Source`]); past it, newcomers are not tracked and
/// `livekit_roster_full` is counted.
const MAX_WATCHED: usize = 1024;

/// Remote ICE candidates taken per offer; a server has a handful. More are dropped and
/// counted (`livekit_candidates_dropped`).
const MAX_REMOTE_CANDIDATES: usize = 32;

/// Ping settings a JoinResponse may carry, in seconds. Zero or negative values would panic
/// the signal crate's keepalive task; an hour is longer than any server uses.
const PING_SECS: std::ops::RangeInclusive<i32> = 1..=3600;

/// How a session gets its token.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// A token the job brought. A rejoin uses the latest one the server refreshed.
    Token(Secret),
    /// Mint one per join from the host's API key.
    Mint {
        api: ApiKey,
        identity: String,
        ttl: Duration,
    },
}

/// Retries of a lost connection: resumes and rejoins share this budget.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Failed attempts in a row before the job fails as transient. Default 10.
    pub attempts: u32,
    /// First delay between attempts, doubled each time, with full jitter. Default 300 ms.
    pub initial_delay: Duration,
    /// Longest delay between attempts. Default 7 s.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The delay before attempt `n` (1-based): a random point below the capped exponential.
    fn delay(&self, n: u32) -> Duration {
        let exp = self
            .initial_delay
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max_delay);
        let jitter = uuid::Uuid::new_v4().as_u128() as u64 % 1000;
        exp.mul_f64(0.5 + jitter as f64 / 2000.0)
    }
}

/// Everything one session needs besides its output.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub job_id: String,
    /// `ws(s)://` or `http(s)://` URL of the LiveKit server.
    pub url: String,
    pub room: String,
    pub credentials: Credentials,
    /// The participant whose leaving ends the session. Without one, the session ends when
    /// the last other participant has left.
    pub source_identity: Option<String>,
    /// How long a departed source may take to come back (with a new sid) before the session
    /// ends: publishers reconnect too.
    pub source_grace: Duration,
    pub retry: RetryPolicy,
    /// For the WebSocket upgrade and the JoinResponse (each), and for a resume.
    pub connect_timeout: Duration,
    /// From the server's offer to ICE connected and `_reliable` open.
    pub ice_timeout: Duration,
    /// Senders whose sequence numbers are remembered (see [`Dedup`]).
    pub max_senders: usize,
}

/// Why a session ended normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The source participant left (and did not come back within the grace window).
    SourceLeft(String),
    /// The server asked us to leave: the room closed or was deleted, we were removed, or
    /// another session took our identity. The text is LiveKit's reason name.
    ServerLeave(String),
    /// The room moved to another server; this session does not follow it.
    RoomMoved,
    /// The job's stop token was cancelled.
    Stopped,
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SourceLeft(identity) => write!(f, "the source {identity:?} left"),
            Self::ServerLeave(reason) => write!(f, "the server asked us to leave ({reason})"),
            Self::RoomMoved => f.write_str("the room moved to another server"),
            Self::Stopped => f.write_str("stopped"),
        }
    }
}

impl SessionEnd {
    /// Short label for reports: `source_left`, `room_closed`, `room_moved`, `stopped`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::SourceLeft(_) => "source_left",
            Self::ServerLeave(_) => "server_leave",
            Self::RoomMoved => "room_moved",
            Self::Stopped => "stopped",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The server refused the token (HTTP 401/403 from `/rtc/validate`). Permanent.
    #[error("LiveKit refused the token: {0}")]
    TokenRefused(String),
    /// The job's parameters cannot work (bad URL, a token that cannot be minted). Permanent.
    #[error("{0}")]
    Invalid(String),
    /// The retry budget ran out. Transient: another attempt later may work.
    #[error("{} after {attempts} attempts: {last}", if *.joined { "lost the room" } else { "could not join the room" })]
    Unreachable {
        attempts: u32,
        last: String,
        /// Whether the session was ever in the room.
        joined: bool,
    },
}

/// Joins the room and stays until something ends the session; then leaves cleanly.
pub async fn run(
    config: &SessionConfig,
    out: &PacketQueue,
    stats: &LiveKitStats,
    counters: &JobCounters,
    stop: &CancellationToken,
) -> Result<SessionEnd, SessionError> {
    let server = server_ip(&config.url).await?;
    let mut state = SessionState {
        config,
        out,
        stats,
        counters,
        dedup: Dedup::new(config.max_senders),
        source: Source::new(config.source_identity.clone(), config.source_grace),
        refreshed_token: None,
        joined: false,
        warned_source_absent: false,
    };
    let mut failures = 0u32;
    let mut last_error = String::new();

    loop {
        if failures > 0 {
            if failures > config.retry.attempts {
                return Err(SessionError::Unreachable {
                    attempts: failures,
                    last: last_error,
                    joined: state.joined,
                });
            }
            let delay = config.retry.delay(failures);
            tracing::info!(job_id = %config.job_id, attempt = failures, ?delay, "Joining the room again after a delay");
            tokio::select! {
                _ = stop.cancelled() => return Ok(SessionEnd::Stopped),
                _ = tokio::time::sleep(delay) => {}
            }
        }

        let rejoining = state.joined;
        // A join can take a few seconds against a slow server; a stop must not wait for it.
        let joined = tokio::select! {
            _ = stop.cancelled() => return Ok(SessionEnd::Stopped),
            joined = state.join(server) => joined,
        };
        let mut connection = match joined {
            Ok(connection) => connection,
            Err(JoinError::Refused(body)) => return Err(SessionError::TokenRefused(body)),
            Err(JoinError::Invalid(message)) => return Err(SessionError::Invalid(message)),
            Err(JoinError::Failed(message)) => {
                tracing::warn!(job_id = %config.job_id, error = %message, "Could not join the room");
                failures += 1;
                last_error = message;
                continue;
            }
        };
        if rejoining {
            LiveKitStats::bump(&stats.rejoins);
        }

        let outcome = connection.serve(&mut state, stop, &mut failures).await;
        let refreshed = connection.client.token();
        if is_header_safe(&refreshed) {
            state.refreshed_token = Some(Secret::new(refreshed));
        } else {
            // The server's refresh is unusable; the job's own token may still be valid.
            tracing::warn!(job_id = %config.job_id, "Ignoring a refreshed token the server sent with characters a header cannot carry");
        }
        match outcome {
            Served::Ended(end) => {
                connection.leave(&end).await;
                return Ok(end);
            }
            Served::Lost(message) => {
                if failures < config.retry.attempts {
                    tracing::warn!(job_id = %config.job_id, error = %message, "Lost the room; joining again");
                }
                close(&connection.client).await;
                failures += 1;
                last_error = message;
            }
        }
    }
}

/// What a session keeps across connections.
struct SessionState<'a> {
    config: &'a SessionConfig,
    out: &'a PacketQueue,
    stats: &'a LiveKitStats,
    counters: &'a JobCounters,
    dedup: Dedup,
    source: Source,
    /// The token the server last refreshed, for rejoining with a job's own token.
    refreshed_token: Option<Secret>,
    /// Whether any join succeeded.
    joined: bool,
    /// Whether we said that data comes from others while the source never showed up.
    warned_source_absent: bool,
}

enum JoinError {
    Refused(String),
    Invalid(String),
    Failed(String),
}

impl SessionState<'_> {
    fn token(&self) -> Result<Secret, JoinError> {
        match &self.config.credentials {
            Credentials::Token(token) => Ok(self.refreshed_token.clone().unwrap_or(token.clone())),
            Credentials::Mint { api, identity, ttl } => {
                token::mint(api, &self.config.room, identity, *ttl)
                    .map_err(|e| JoinError::Invalid(e.to_string()))
            }
        }
    }

    async fn join(&mut self, server: IpAddr) -> Result<Connection, JoinError> {
        let config = self.config;
        let token = self.token()?;
        let connect =
            SignalClient::connect(&config.url, token.expose(), signal_options(config), None);
        // The crate times the upgrade and the JoinResponse separately; this bounds both.
        let (client, join, events) =
            match tokio::time::timeout(config.connect_timeout * 2, connect).await {
                Err(_) => return Err(JoinError::Failed("timed out joining".into())),
                Ok(Err(SignalError::Client(status, body)))
                    if status.as_u16() == 401 || status.as_u16() == 403 =>
                {
                    return Err(JoinError::Refused(format!(
                        "HTTP {}: {}",
                        status.as_u16(),
                        body.trim()
                    )));
                }
                Ok(Err(SignalError::UrlParse(e))) => {
                    return Err(JoinError::Invalid(format!("bad LiveKit URL: {e}")));
                }
                Ok(Err(SignalError::TokenFormat)) => {
                    return Err(JoinError::Invalid(
                        "the token has characters a header cannot carry".into(),
                    ));
                }
                Ok(Err(error)) => return Err(JoinError::Failed(error.to_string())),
                Ok(Ok(joined)) => joined,
            };

        let Some(participant) = join.participant.as_ref() else {
            close(&client).await;
            return Err(JoinError::Failed(
                "the JoinResponse names no participant".into(),
            ));
        };
        let joined_room = join.room.as_ref().map(|r| r.name.as_str()).unwrap_or("");
        if !joined_room.is_empty() && joined_room != config.room {
            // The token decides the room; a job that names another one was given the wrong
            // token, and would wait for frames that never come.
            close(&client).await;
            return Err(JoinError::Invalid(format!(
                "the token is for room {joined_room:?}, not {:?}",
                config.room
            )));
        }
        if !PING_SECS.contains(&join.ping_interval) || !PING_SECS.contains(&join.ping_timeout) {
            // livekit-signaling's keepalive task cannot run with a zero interval (it panics
            // in its own task and the connection goes unwatched). No LiveKit server sends
            // one; refuse to run on a connection whose loss we could not notice.
            close(&client).await;
            return Err(JoinError::Failed(format!(
                "the server's JoinResponse has a ping interval of {} s and timeout of {} s; \
                     both must be 1 to 3600",
                join.ping_interval, join.ping_timeout
            )));
        }
        if !join.subscriber_primary {
            close(&client).await;
            return Err(JoinError::Invalid(
                "the server did not make the subscriber connection primary; does the token allow subscribing?".into(),
            ));
        }
        tracing::info!(
            job_id = %config.job_id,
            room = %config.room,
            identity = %participant.identity,
            sid = %participant.sid,
            server_protocol = join.server_info.as_ref().map(|s| s.protocol).unwrap_or_default(),
            "Joined the room"
        );
        // The roster as it is now: a source that left while we were away is gone.
        self.source.reconcile(&join.other_participants);
        self.joined = true;

        let peer = match Peer::bind(server).await {
            Ok(peer) => peer,
            Err(error) => {
                close(&client).await;
                return Err(JoinError::Failed(format!("subscriber peer: {error}")));
            }
        };
        Ok(Connection {
            client,
            events,
            peer,
            held: VecDeque::new(),
            pending_candidates: Vec::new(),
            offered: false,
            last_offer: None,
            last_answer: None,
            ready_by: Some(Instant::now() + config.ice_timeout),
            ice_connected: false,
            server_left: false,
            last_signal: Instant::now(),
            // Twice the server's own ping timeout: the signal crate's keepalive notices a
            // dead connection first, unless its task itself is gone.
            signal_watchdog: Duration::from_secs(2 * join.ping_timeout as u64),
            remote_candidates: 0,
        })
    }

    /// One packet off `_reliable`.
    fn reliable(&mut self, bytes: &[u8]) {
        let now = Instant::now();
        let job_id = &self.config.job_id;
        let packet = match proto::DataPacket::decode(bytes) {
            Ok(packet) => packet,
            Err(error) => {
                LiveKitStats::bump(&self.stats.undecodable);
                self.counters.warn(
                    job_id,
                    "livekit_undecodable",
                    &format_args!("Dropped a data packet that is not a DataPacket: {error}"),
                );
                return;
            }
        };
        LiveKitStats::bump(&self.stats.packets);
        if matches!(
            packet.value,
            Some(proto::data_packet::Value::EncryptedPacket(_))
        ) {
            LiveKitStats::bump(&self.stats.encrypted);
            self.counters.warn(
                job_id,
                "livekit_encrypted",
                &"Dropped an end-to-end encrypted data packet: encryption is not supported",
            );
            return;
        }
        if let Some(source) = &self.config.source_identity
            && !self.warned_source_absent
            && !self.source.seen_any
            && !packet.participant_identity.is_empty()
            && packet.participant_identity != *source
        {
            self.warned_source_absent = true;
            tracing::warn!(
                job_id = %job_id,
                source_identity = %source,
                sender = %packet.participant_identity,
                "Data arrives from another participant while the source has not joined: is \
                 the job's source_identity right? The job ends when the source leaves, or \
                 at the idle timeout"
            );
        }
        let evicted = self.dedup.evicted();
        let verdict = self
            .dedup
            .check(&packet.participant_sid, packet.sequence, now);
        if self.dedup.evicted() > evicted {
            LiveKitStats::bump(&self.stats.senders_evicted);
            self.counters.warn(
                job_id,
                "livekit_senders_evicted",
                &format_args!(
                    "Forgot the longest-silent sender: {} senders are remembered for \
                     de-duplication (livekit.max_senders)",
                    self.config.max_senders
                ),
            );
        }
        if verdict == Verdict::Duplicate {
            LiveKitStats::bump(&self.stats.duplicates);
            return;
        }
        let len = bytes.len();
        if !self.out.try_push(packet, now, len) {
            LiveKitStats::bump(&self.stats.queue_full);
            self.counters.warn(
                job_id,
                "livekit_queue_full",
                &"Dropped a data packet: the job is behind and its packet queue is full",
            );
        }
    }
}

fn signal_options(config: &SessionConfig) -> SignalOptions {
    let mut options = SignalOptions::default();
    // Data reaches every participant whatever it subscribes to: no media, no m-lines for it.
    options.auto_subscribe = false;
    options.adaptive_stream = false;
    // Our own retry budget governs; LiveKit Cloud's region failover would stack a second
    // loop on it, and would start on a refused token too.
    options.region_failover = false;
    // Nothing above 16 is of use to a dual-PC, data-only client.
    options.protocol_version = 16;
    options.connect_timeout = config.connect_timeout;
    // What the data-stream stage really handles: inline single-packet streams (v2) and raw
    // deflate. Not packet trailers: they belong to video frames.
    options.client_protocol = livekit_common::CLIENT_PROTOCOL_DATA_STREAM_V2;
    options.client_capabilities = vec![proto::client_info::Capability::CapCompressionDeflateRaw];
    options.sdk_options.sdk_version = Some(format!("framehost-{}", env!("CARGO_PKG_VERSION")));
    options
}

/// The server's address, for choosing the interface the peer binds to.
async fn server_ip(url: &str) -> Result<IpAddr, SessionError> {
    let parsed = url::Url::parse(url).map_err(|e| {
        SessionError::Invalid(format!(
            "bad LiveKit URL {url:?}: {e} (expected ws://, wss://, http:// or https://HOST[:PORT])"
        ))
    })?;
    let host = parsed
        .host_str()
        .ok_or_else(|| SessionError::Invalid(format!("LiveKit URL {url:?} has no host")))?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut addrs =
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| SessionError::Unreachable {
                joined: false,
                attempts: 1,
                last: format!("cannot resolve {host}: {e}"),
            })?;
    addrs
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| SessionError::Unreachable {
            joined: false,
            attempts: 1,
            last: format!("{host} has no address"),
        })
}

/// One signal connection (and its resumes) with its subscriber peer.
struct Connection {
    client: SignalClient,
    events: SignalEvents,
    peer: Peer,
    /// Messages read while draining events after a resume, still to handle.
    held: VecDeque<Response>,
    /// Candidates that came before the offer they belong to.
    pending_candidates: Vec<String>,
    offered: bool,
    last_offer: Option<proto::SessionDescription>,
    last_answer: Option<proto::SessionDescription>,
    /// Until when the peer may take to come up (ICE connected, `_reliable` open).
    ready_by: Option<Instant>,
    ice_connected: bool,
    /// The server sent a leave: we do not send one back.
    server_left: bool,
    /// When the server last said anything (pongs included).
    last_signal: Instant,
    /// Silence from the server past which the connection is taken for lost.
    signal_watchdog: Duration,
    /// Remote candidates added since the last offer.
    remote_candidates: usize,
}

enum Served {
    Ended(SessionEnd),
    /// The connection is beyond resuming; a full rejoin may work.
    Lost(String),
}

enum Step {
    Continue,
    Resume(proto::ReconnectReason),
    Rejoin(String),
    End(SessionEnd),
}

impl Connection {
    async fn serve(
        &mut self,
        state: &mut SessionState<'_>,
        stop: &CancellationToken,
        failures: &mut u32,
    ) -> Served {
        loop {
            let step = match self.held.pop_front() {
                Some(message) => self.message(state, message).await,
                None => self.next(state, stop).await,
            };
            let reason = match step {
                Step::Continue => {
                    if self.peer.reliable_open() && self.ice_connected && *failures > 0 {
                        // Data flows again: the budget is for failures in a row.
                        *failures = 0;
                    }
                    continue;
                }
                Step::End(end) => return Served::Ended(end),
                Step::Rejoin(message) => return Served::Lost(message),
                Step::Resume(reason) => reason,
            };

            *failures += 1;
            if *failures > state.config.retry.attempts {
                return Served::Lost(format!("resume budget spent ({})", reason.as_str_name()));
            }
            if *failures > 1 {
                // Resumes in a row back off as rejoins do: a server that drops every new
                // connection must not spend the budget in a blink.
                let delay = state.config.retry.delay(*failures - 1);
                tokio::select! {
                    _ = stop.cancelled() => return Served::Ended(SessionEnd::Stopped),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            match self.resume(state, reason, stop).await {
                Ok(()) => LiveKitStats::bump(&state.stats.resumes),
                Err(Step::End(end)) => return Served::Ended(end),
                Err(Step::Rejoin(message)) => return Served::Lost(message),
                Err(_) => return Served::Lost("resume failed".into()),
            }
        }
    }

    /// Waits for the next thing to happen and handles it.
    async fn next(&mut self, state: &mut SessionState<'_>, stop: &CancellationToken) -> Step {
        let grace = state.source.deadline();
        let ready_by = self.ready_by;
        let silent_until = self.last_signal + self.signal_watchdog;
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            biased;
            _ = stop.cancelled() => Step::End(SessionEnd::Stopped),
            event = self.events.recv() => match event {
                Some(SignalEvent::Message(message)) => {
                    self.last_signal = Instant::now();
                    self.message(state, *message).await
                }
                Some(SignalEvent::Close(reason)) => {
                    tracing::warn!(job_id = %state.config.job_id, %reason, "Signal connection lost; resuming");
                    Step::Resume(proto::ReconnectReason::RrSignalDisconnected)
                }
                None => Step::Resume(proto::ReconnectReason::RrSignalDisconnected),
            },
            io = self.peer.io() => match io {
                Ok(()) => self.peer_events(state),
                Err(error) => Step::Rejoin(format!("subscriber peer failed: {error}")),
            },
            _ = tokio::time::sleep_until(grace.unwrap_or(far).into()), if grace.is_some() => {
                Step::End(SessionEnd::SourceLeft(state.source.departed_name()))
            }
            _ = tokio::time::sleep_until(silent_until.into()) => {
                tracing::warn!(job_id = %state.config.job_id, silence = ?self.signal_watchdog, "The server has said nothing, not even a pong; resuming");
                Step::Resume(proto::ReconnectReason::RrSignalDisconnected)
            }
            _ = tokio::time::sleep_until(ready_by.unwrap_or(far).into()), if ready_by.is_some() => {
                Step::Rejoin(format!(
                    "the subscriber connection did not come up within {:?} (offer received: {}, ICE connected: {})",
                    state.config.ice_timeout, self.offered, self.ice_connected
                ))
            }
        }
    }

    fn peer_events(&mut self, state: &mut SessionState<'_>) -> Step {
        peer_events(
            &mut self.peer,
            &mut self.ice_connected,
            &mut self.ready_by,
            state,
        )
    }

    async fn message(&mut self, state: &mut SessionState<'_>, message: Response) -> Step {
        let job_id = &state.config.job_id;
        match message {
            Response::Offer(offer) => {
                let answer = match self.peer.accept_offer(&offer.sdp) {
                    Ok(answer) => answer,
                    Err(error) => {
                        return Step::Rejoin(format!("cannot answer the server's offer: {error}"));
                    }
                };
                let mid = application_mid(&offer.sdp);
                let answer = proto::SessionDescription {
                    r#type: "answer".into(),
                    sdp: answer,
                    id: offer.id,
                    ..Default::default()
                };
                if let Err(step) = self.send(Request::Answer(answer.clone())).await {
                    return step;
                }
                self.remote_candidates = 0;
                self.last_offer = Some(offer);
                self.last_answer = Some(answer);
                self.offered = true;
                if !self.ice_connected {
                    self.ready_by = Some(Instant::now() + state.config.ice_timeout);
                }
                for candidate in std::mem::take(&mut self.pending_candidates) {
                    self.add_candidate(state, &candidate);
                }
                let init = serde_json::json!({
                    "candidate": self.peer.local_candidate(),
                    "sdpMid": mid,
                    "sdpMLineIndex": 0,
                });
                let trickle = Request::Trickle(proto::TrickleRequest {
                    candidate_init: init.to_string(),
                    target: proto::SignalTarget::Subscriber as i32,
                    r#final: false,
                });
                match self.send(trickle).await {
                    Ok(()) => Step::Continue,
                    Err(step) => step,
                }
            }
            Response::Trickle(trickle) => {
                if trickle.target != proto::SignalTarget::Subscriber as i32 {
                    return Step::Continue;
                }
                let Some(candidate) = candidate_line(&trickle.candidate_init) else {
                    state.counters.warn(
                        job_id,
                        "livekit_bad_candidate",
                        &"Ignoring a trickle without a candidate",
                    );
                    return Step::Continue;
                };
                if !self.offered {
                    if self.pending_candidates.len() < MAX_REMOTE_CANDIDATES {
                        self.pending_candidates.push(candidate);
                    } else {
                        LiveKitStats::bump(&state.stats.candidates_dropped);
                        state.counters.warn(job_id, "livekit_candidates_dropped", &format_args!("Dropped an ICE candidate: more than {MAX_REMOTE_CANDIDATES} before the offer"));
                    }
                } else {
                    self.add_candidate(state, &candidate);
                }
                Step::Continue
            }
            Response::Update(update) => {
                for participant in &update.participants {
                    if !state.source.update(participant) {
                        LiveKitStats::bump(&state.stats.roster_full);
                        state.counters.warn(
                            job_id,
                            "livekit_roster_full",
                            &format_args!(
                                "Not tracking a participant: {MAX_WATCHED} are tracked already"
                            ),
                        );
                    }
                }
                Step::Continue
            }
            Response::Leave(leave) => self.server_leave(state, &leave),
            Response::RoomMoved(_) => {
                tracing::info!(%job_id, "The room moved to another server; leaving");
                Step::End(SessionEnd::RoomMoved)
            }
            _ => Step::Continue,
        }
    }

    fn server_leave(&mut self, state: &SessionState<'_>, leave: &proto::LeaveRequest) -> Step {
        use proto::leave_request::Action;
        let reason = proto::DisconnectReason::try_from(leave.reason)
            .map(|r| r.as_str_name())
            .unwrap_or("UNKNOWN_REASON");
        let action = Action::try_from(leave.action).unwrap_or(Action::Disconnect);
        tracing::info!(job_id = %state.config.job_id, reason, action = action.as_str_name(), "The server asked us to leave");
        match action {
            Action::Resume => Step::Resume(proto::ReconnectReason::RrUnknown),
            Action::Reconnect => Step::Rejoin(format!("the server asked for a rejoin ({reason})")),
            Action::Disconnect => {
                self.server_left = true;
                Step::End(SessionEnd::ServerLeave(reason.to_owned()))
            }
        }
    }

    /// Resumes the session on a new signal connection, driving the peer meanwhile. The
    /// server follows with a fresh offer (an ICE restart), handled by the main loop.
    async fn resume(
        &mut self,
        state: &mut SessionState<'_>,
        reason: proto::ReconnectReason,
        stop: &CancellationToken,
    ) -> Result<(), Step> {
        let job_id = state.config.job_id.clone();
        let result = {
            let restart = tokio::time::timeout(
                state.config.connect_timeout * 2,
                self.client.restart(reason),
            );
            tokio::pin!(restart);
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Err(Step::End(SessionEnd::Stopped)),
                    result = &mut restart => break result,
                    io = self.peer.io() => {
                        if let Err(error) = io {
                            return Err(Step::Rejoin(format!("subscriber peer failed: {error}")));
                        }
                        // Data keeps arriving while the signal is down.
                        let _ = peer_events(&mut self.peer, &mut self.ice_connected, &mut self.ready_by, state);
                    }
                }
            }
        };
        match result {
            Err(_) => return Err(Step::Rejoin("resume timed out".into())),
            Ok(Err(SignalError::LeaveRequest { reason, action })) => {
                let leave = proto::LeaveRequest {
                    reason: reason as i32,
                    action: action as i32,
                    ..Default::default()
                };
                return Err(match self.server_leave(state, &leave) {
                    Step::Resume(_) => Step::Rejoin("the server refused the resume".into()),
                    other => other,
                });
            }
            Ok(Err(error)) => return Err(Step::Rejoin(format!("resume failed: {error}"))),
            Ok(Ok(_)) => {}
        }

        // Close events the old transport queued before it was replaced are stale.
        while let Ok(event) = self.events.try_recv() {
            if let SignalEvent::Message(message) = event {
                self.held.push_back(*message);
            }
        }

        let now = Instant::now();
        let sync = proto::SyncState {
            answer: self.last_answer.clone(),
            offer: self.last_offer.clone(),
            subscription: Some(proto::UpdateSubscription {
                subscribe: false,
                ..Default::default()
            }),
            datachannel_receive_states: state
                .dedup
                .receive_states(now)
                .into_iter()
                .map(|(publisher_sid, last_seq)| proto::DataChannelReceiveState {
                    publisher_sid,
                    last_seq,
                })
                .collect(),
            ..Default::default()
        };
        self.send(Request::SyncState(sync)).await?;
        // Pings are held while the client is "reconnecting": release them now, or the ping
        // timeout would end the resumed connection.
        if tokio::time::timeout(SEND_TIMEOUT, self.client.set_reconnected())
            .await
            .is_err()
        {
            return Err(Step::Rejoin(
                "the resumed connection takes no requests".into(),
            ));
        }
        self.last_signal = Instant::now();
        self.ready_by = Some(now + state.config.ice_timeout).filter(|_| !self.ice_connected);
        tracing::info!(%job_id, reason = reason.as_str_name(), "Resumed the signal connection");
        Ok(())
    }

    /// Leaves the room: tells the server (unless it sent us away), then closes.
    async fn leave(&mut self, end: &SessionEnd) {
        if !self.server_left {
            let leave = proto::LeaveRequest {
                can_reconnect: false,
                reason: proto::DisconnectReason::ClientInitiated as i32,
                action: proto::leave_request::Action::Disconnect as i32,
                ..Default::default()
            };
            // Best effort: a server that takes no requests does not get to hold the job.
            let _ = self.send(Request::Leave(leave)).await;
        }
        tracing::debug!(ended_by = end.label(), "Leaving the room");
        close(&self.client).await;
    }

    /// Sends a request, or says the connection is lost if it cannot go out in time.
    async fn send(&self, request: Request) -> Result<(), Step> {
        tokio::time::timeout(SEND_TIMEOUT, self.client.send(request))
            .await
            .map_err(|_| {
                Step::Rejoin(format!(
                    "the server took no request for {SEND_TIMEOUT:?} (it stopped reading)"
                ))
            })
    }

    fn add_candidate(&mut self, state: &SessionState<'_>, candidate: &str) {
        let job_id = &state.config.job_id;
        if self.remote_candidates >= MAX_REMOTE_CANDIDATES {
            LiveKitStats::bump(&state.stats.candidates_dropped);
            state.counters.warn(
                job_id,
                "livekit_candidates_dropped",
                &format_args!(
                    "Dropped an ICE candidate: more than {MAX_REMOTE_CANDIDATES} for this offer"
                ),
            );
            return;
        }
        self.remote_candidates += 1;
        if let Err(error) = self.peer.add_remote_candidate(candidate) {
            state.counters.warn(
                job_id,
                "livekit_bad_candidate",
                &format_args!("Ignoring a bad ICE candidate from the server: {error}"),
            );
        }
    }
}

/// Closes the signal connection, giving up after [`SEND_TIMEOUT`].
async fn close(client: &SignalClient) {
    let _ = tokio::time::timeout(SEND_TIMEOUT, client.close()).await;
}

/// Whether a token can go in an `Authorization` header.
fn is_header_safe(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Handles what the peer reported: data to the job, ICE state to the connection.
fn peer_events(
    peer: &mut Peer,
    ice_connected: &mut bool,
    ready_by: &mut Option<Instant>,
    state: &mut SessionState<'_>,
) -> Step {
    let mut step = Step::Continue;
    // Drained in place: this runs for every datagram batch.
    for event in peer.take_events() {
        match event {
            PeerEvent::Reliable(bytes) => state.reliable(&bytes),
            PeerEvent::Ignored => LiveKitStats::bump(&state.stats.other_channels),
            PeerEvent::ReliableOpen => {
                tracing::debug!(job_id = %state.config.job_id, "Reliable data channel open");
            }
            PeerEvent::Ice(ice) => {
                tracing::debug!(job_id = %state.config.job_id, ?ice, "ICE state");
                match ice {
                    IceConnectionState::Connected | IceConnectionState::Completed => {
                        *ice_connected = true;
                    }
                    IceConnectionState::Disconnected => {
                        *ice_connected = false;
                        step = Step::Resume(proto::ReconnectReason::RrSubscriberFailed);
                    }
                    _ => {}
                }
            }
        }
    }
    if *ice_connected && peer.reliable_open() {
        *ready_by = None;
    }
    step
}

/// The `a=mid:` of the offer's application section, which our trickles name.
fn application_mid(sdp: &str) -> String {
    let mut in_application = false;
    for line in sdp.lines() {
        if let Some(media) = line.strip_prefix("m=") {
            in_application = media.starts_with("application");
        } else if in_application && let Some(mid) = line.strip_prefix("a=mid:") {
            return mid.trim().to_owned();
        }
    }
    "0".to_owned()
}

/// The `candidate:` line in a trickle's browser-shaped JSON (`{"candidate": ...}`).
fn candidate_line(init: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(init).ok()?;
    let line = value.get("candidate")?.as_str()?;
    (!line.is_empty()).then(|| line.to_owned())
}

/// Who the source is, and whether it has left.
#[derive(Debug)]
struct Source {
    identity: Option<String>,
    /// Sids of the participants we watch that are present: the source's current sid, or
    /// (without a source identity) every visible participant's.
    present: HashMap<String, String>,
    seen_any: bool,
    /// When the departed source is given up on.
    deadline: Option<Instant>,
    grace: Duration,
    departed: String,
}

impl Source {
    fn new(identity: Option<String>, grace: Duration) -> Self {
        Self {
            identity,
            present: HashMap::new(),
            seen_any: false,
            deadline: None,
            grace,
            departed: String::new(),
        }
    }

    /// Takes one participant's state. Returns `false` if it could not be tracked because
    /// [`MAX_WATCHED`] participants are tracked already.
    fn update(&mut self, participant: &proto::ParticipantInfo) -> bool {
        use proto::participant_info::State;
        if self
            .identity
            .as_ref()
            .is_some_and(|identity| *identity != participant.identity)
        {
            return true;
        }
        let gone = participant.state == State::Disconnected as i32;
        if gone {
            // A stale notice about an older sid of the same identity changes nothing.
            if self.present.contains_key(&participant.sid) {
                self.present.remove(&participant.sid);
                if self.present.is_empty() {
                    self.departed = participant.identity.clone();
                    self.deadline = Some(Instant::now() + self.grace);
                }
            }
        } else {
            if self.identity.is_some() {
                // A source that rejoined has a new sid; the old one is gone.
                self.present.clear();
            }
            if self.present.len() >= MAX_WATCHED && !self.present.contains_key(&participant.sid) {
                return false;
            }
            self.present
                .insert(participant.sid.clone(), participant.identity.clone());
            self.seen_any = true;
            self.deadline = None;
        }
        true
    }

    /// Takes a full roster (a JoinResponse's other participants): whoever we watched that is
    /// not in it has left.
    fn reconcile(&mut self, roster: &[proto::ParticipantInfo]) {
        let watched: Vec<(String, String)> = self
            .present
            .iter()
            .map(|(sid, identity)| (sid.clone(), identity.clone()))
            .collect();
        for participant in roster {
            let _ = self.update(participant);
        }
        for (sid, identity) in watched {
            if !roster.iter().any(|p| p.sid == sid) {
                let _ = self.update(&proto::ParticipantInfo {
                    sid,
                    identity,
                    state: proto::participant_info::State::Disconnected as i32,
                    ..Default::default()
                });
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline.filter(|_| self.seen_any)
    }

    fn departed_name(&self) -> String {
        self.departed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::participant_info::State;

    fn info(identity: &str, sid: &str, state: State) -> proto::ParticipantInfo {
        proto::ParticipantInfo {
            identity: identity.into(),
            sid: sid.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn the_source_leaving_starts_the_grace_and_a_rejoin_cancels_it() {
        let mut source = Source::new(Some("vision".into()), Duration::from_secs(5));
        source.update(&info("someone", "PA_x", State::Active));
        source.update(&info("vision", "PA_1", State::Active));
        assert!(source.deadline().is_none());
        // Another participant leaving is not the source leaving.
        source.update(&info("someone", "PA_x", State::Disconnected));
        assert!(source.deadline().is_none());
        source.update(&info("vision", "PA_1", State::Disconnected));
        assert!(source.deadline().is_some());
        source.update(&info("vision", "PA_2", State::Joined));
        assert!(source.deadline().is_none());
        // The old sid's late notice does not end the new one.
        source.update(&info("vision", "PA_1", State::Disconnected));
        assert!(source.deadline().is_none());
    }

    #[test]
    fn without_a_source_identity_the_last_participant_leaving_ends_it() {
        let mut source = Source::new(None, Duration::ZERO);
        source.update(&info("a", "PA_a", State::Active));
        source.update(&info("b", "PA_b", State::Active));
        source.update(&info("a", "PA_a", State::Disconnected));
        assert!(source.deadline().is_none());
        source.update(&info("b", "PA_b", State::Disconnected));
        assert!(source.deadline().is_some());
    }

    #[test]
    fn a_rejoin_roster_without_the_source_means_it_left() {
        let mut source = Source::new(Some("vision".into()), Duration::ZERO);
        source.reconcile(&[info("vision", "PA_1", State::Active)]);
        assert!(source.deadline().is_none());
        source.reconcile(&[info("vision", "PA_1", State::Active)]);
        assert!(source.deadline().is_none(), "still there");
        source.reconcile(&[info("vision", "PA_2", State::Active)]);
        assert!(source.deadline().is_none(), "back with a new sid");
        source.reconcile(&[info("someone", "PA_x", State::Active)]);
        assert!(source.deadline().is_some(), "gone while we were away");
    }

    #[test]
    fn the_watched_roster_is_bounded() {
        let mut source = Source::new(None, Duration::ZERO);
        for i in 0..MAX_WATCHED {
            assert!(source.update(&info(&format!("p{i}"), &format!("PA_{i}"), State::Active)));
        }
        assert!(!source.update(&info("one-more", "PA_more", State::Active)));
        // Known participants still come and go.
        assert!(source.update(&info("p0", "PA_0", State::Disconnected)));
        assert!(source.update(&info("one-more", "PA_more", State::Active)));
    }

    #[test]
    fn refreshed_tokens_must_fit_a_header() {
        assert!(is_header_safe("eyJhbGciOiJIUzI1NiJ9.e30.sig"));
        assert!(!is_header_safe("evil\r\nX-Injected: 1"));
        assert!(!is_header_safe(""));
        assert!(!is_header_safe("with space"));
    }

    #[test]
    fn nobody_seen_means_nobody_left() {
        let mut source = Source::new(Some("vision".into()), Duration::ZERO);
        source.update(&info("vision", "PA_1", State::Disconnected));
        assert!(source.deadline().is_none());
    }

    #[test]
    fn trickle_json_and_mids() {
        let init = r#"{"candidate":"candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}"#;
        assert_eq!(
            candidate_line(init).as_deref(),
            Some("candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host")
        );
        assert_eq!(candidate_line("{}"), None);
        assert_eq!(candidate_line("not json"), None);
        let sdp = "v=0\r\nm=audio 9 UDP 0\r\na=mid:a\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:data\r\n";
        assert_eq!(application_mid(sdp), "data");
    }

    #[test]
    fn retry_delays_grow_and_stay_capped() {
        let policy = RetryPolicy {
            attempts: 10,
            initial_delay: Duration::from_millis(300),
            max_delay: Duration::from_secs(7),
        };
        assert!(policy.delay(1) <= Duration::from_millis(300));
        assert!(policy.delay(30) <= Duration::from_secs(7));
        assert!(policy.delay(30) >= Duration::from_millis(3500));
    }
}
