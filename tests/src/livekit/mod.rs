//! A LiveKit server double that speaks the real protocol, so the host's real client can join
//! it: the v0 dual peer connection path (`/rtc`), a server-side str0m peer per subscriber,
//! and publishers simulated in-process. Test support only.
//!
//! What it does, as a LiveKit server does it (docs/livekit-participant.md, sections 3, 5, 8):
//!
//! - **Signal.** One TCP listener on 127.0.0.1. `GET /rtc/validate` gets a plain HTTP answer
//!   (200 `success`, or 401 with the reason); everything else is a WebSocket on `/rtc`
//!   carrying binary protobuf (`SignalRequest` in, `SignalResponse` out). The token comes from
//!   `Authorization: Bearer` or the `access_token` query parameter and is verified with the
//!   double's key and secret; it must grant `roomJoin` for a room, which the client joins.
//! - **Join.** `join` (subscriber primary, `ping_interval`/`ping_timeout` from the options,
//!   the room's publishers as `other_participants`), then the subscriber `offer` with
//!   `_reliable` and `_lossy`, then one `trickle` (the host candidate, `final`).
//! - **Keepalive.** Every `ping_req` gets a `pong_resp`, every legacy `ping` a `pong`.
//! - **Participants.** A publisher joining is sent to every subscriber as `update` `JOINED`
//!   then `ACTIVE`; leaving, as `DISCONNECTED` with a higher version.
//! - **Resume.** `reconnect=1&sid=…` for a known subscriber gets `reconnect`, `update`,
//!   `room_update` and a new offer with new ICE credentials on the same peer connection;
//!   an unknown sid gets `leave` with action `RECONNECT`. A subscriber whose signal is lost
//!   stays for [`DoubleOptions::departure_timeout`].
//! - **Data.** [`Publisher::send`] stamps the sender's identity, sid and next sequence on a
//!   `DataPacket` and writes it to every subscriber whose `_reliable` channel is open. Each
//!   subscriber has a bounded queue ([`QUEUE_PACKETS`], [`QUEUE_BYTES`]); when it is full the
//!   sender waits, so a benchmark measures the host rather than the double. Packets are
//!   dropped only by [`Publisher::try_send`] (a chosen fault) or when a subscriber's path is
//!   down; both are counted.
//!
//! What it does not do: media, the publisher peer connection, TURN, `/rtc/v1`, more than
//! one node, token refresh, listing other subscribers to a subscriber.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use framehost_tests::livekit::{DoubleOptions, LiveKitDouble};
//! use framehost_tests::livekit::generator::{StreamGenerator, StreamOptions};
//!
//! let double = LiveKitDouble::start(DoubleOptions::default()).await?;
//! let token = double.subscriber_token("room-1", "framehost-job-1");
//! // ... start a host job with double.url() and token ...
//! double.wait_subscribers("room-1", 1, std::time::Duration::from_secs(10)).await;
//! let generator = StreamGenerator::new(StreamOptions { frames: Some(50), ..Default::default() })
//!     .expect("frames render");
//! let report = generator.run(&double.publisher("room-1", "vision-service")).await;
//! assert_eq!(report.frames, 50);
//! # Ok(()) }
//! ```

pub mod generator;
mod peer;
mod signal;
mod state;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use framehost::livekit::token::{self, ApiKey, Secret};
use livekit_api::access_token::VideoGrants;
use livekit_protocol as proto;
use prost::Message as _;
use tokio::net::TcpListener;

pub use self::peer::{QUEUE_BYTES, QUEUE_PACKETS};
pub use livekit_protocol::DisconnectReason;
pub use livekit_protocol::leave_request::Action as LeaveAction;

use self::peer::Counters;
use self::state::{Outbound, Shared};

/// How the double is set up.
#[derive(Debug, Clone)]
pub struct DoubleOptions {
    /// The API key tokens must be signed for. Defaults to `devkey`, as `livekit-server --dev`.
    pub api_key: String,
    /// The API secret tokens must be signed with. Defaults to `secret`.
    pub api_secret: String,
    /// `JoinResponse.ping_interval`, in seconds. Defaults to 1. Must be at least 1: the
    /// client crate panics on 0.
    pub ping_interval_secs: u32,
    /// `JoinResponse.ping_timeout`, in seconds. Defaults to 3. Must exceed the interval.
    pub ping_timeout_secs: u32,
    /// Run the peers as ICE-lite, as LiveKit deployments do. Defaults to off.
    pub ice_lite: bool,
    /// How long a subscriber whose signal connection was lost stays resumable. Defaults to
    /// 10 s.
    pub departure_timeout: Duration,
    /// The signal port on 127.0.0.1. Defaults to 0: a free one.
    pub port: u16,
}

impl Default for DoubleOptions {
    fn default() -> Self {
        Self {
            api_key: "devkey".into(),
            api_secret: "secret".into(),
            ping_interval_secs: 1,
            ping_timeout_secs: 3,
            ice_lite: false,
            departure_timeout: Duration::from_secs(10),
            port: 0,
        }
    }
}

/// Whether a signal connection joined, resumed, or was refused a resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    Join,
    Resume,
    /// A resume for an unknown sid, or while [`LiveKitDouble::refuse_resume`] is on: the
    /// client got `leave` with action `RECONNECT`.
    ResumeRefused,
}

/// One signal connection the double accepted, for assertions.
#[derive(Debug, Clone)]
pub struct JoinInfo {
    pub kind: JoinKind,
    pub room: String,
    pub identity: String,
    /// The token's video grants (`hidden`, `can_subscribe`, `can_publish`, …).
    pub grants: VideoGrants,
    /// The URL's query parameters: `protocol`, `client_protocol`, `capabilities`,
    /// `auto_subscribe`, `reconnect`, `sid`, `reconnect_reason`, `sdk`, …
    pub query: BTreeMap<String, String>,
}

impl JoinInfo {
    /// One query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }
}

/// What the double saw in one room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomStats {
    /// Subscribers whose `_reliable` channel is open and whose path is up.
    pub subscribers: usize,
    /// `ping_req` and `ping` received.
    pub pings: u64,
    /// `leave` requests received from clients.
    pub leaves_received: u64,
    /// Resumes accepted.
    pub resumes: u64,
    /// `sync_state` requests received.
    pub sync_states: usize,
    /// Packets written to subscribers' `_reliable` channels, and their bytes.
    pub packets_forwarded: u64,
    pub bytes_forwarded: u64,
    /// Packets lost: a full queue under [`Publisher::try_send`], or a subscriber whose path
    /// went down with packets queued.
    pub packets_dropped: u64,
}

/// A running double. Clones share it; it stops when the last clone is dropped or on
/// [`shutdown`](Self::shutdown).
#[derive(Clone)]
pub struct LiveKitDouble {
    inner: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    url: String,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

impl LiveKitDouble {
    /// Listens on a free port of 127.0.0.1.
    pub async fn start(options: DoubleOptions) -> std::io::Result<Self> {
        if options.ping_interval_secs == 0
            || options.ping_timeout_secs <= options.ping_interval_secs
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "ping_interval_secs must be at least 1 and below ping_timeout_secs",
            ));
        }
        let listener = TcpListener::bind(("127.0.0.1", options.port)).await?;
        let url = format!("ws://{}", listener.local_addr()?);
        let shared = Arc::new(Shared::new(options));
        tokio::spawn(signal::serve(listener, shared.clone()));
        Ok(Self {
            inner: Arc::new(Handle { shared, url }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// `ws://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.inner.url.clone()
    }

    /// The API key tokens must be signed for.
    pub fn api_key(&self) -> &str {
        &self.shared().options.api_key
    }

    /// The API secret tokens must be signed with.
    pub fn api_secret(&self) -> &str {
        &self.shared().options.api_secret
    }

    /// A token for a hidden, subscribe-only participant, signed with the double's key and
    /// secret: the one the host would mint itself (`framehost::livekit::token::mint`).
    pub fn subscriber_token(&self, room: &str, identity: &str) -> String {
        let api = ApiKey {
            key: self.api_key().to_owned(),
            secret: Secret::new(self.api_secret()),
        };
        token::mint(&api, room, identity, Duration::from_secs(600))
            .expect("a token with a key, a secret and an identity encodes")
            .expose()
            .to_owned()
    }

    /// Joins a simulated publisher to `room` (made on first use). The room's subscribers get
    /// `update` `JOINED`, then `ACTIVE`. A publisher with the same identity is replaced.
    pub fn publisher(&self, room: &str, identity: &str) -> Publisher {
        let (sid, counters) = self.shared().add_publisher(room, identity);
        Publisher {
            double: self.clone(),
            room: room.to_owned(),
            identity: identity.to_owned(),
            sid,
            next_sequence: AtomicU32::new(1),
            counters,
        }
    }

    // ---- faults ----

    /// Closes the room's subscribers' signal connections with code 1011; their clients
    /// should resume.
    pub fn close_signal(&self, room: &str) {
        self.shared().to_subscribers(room, || Outbound::Close(1011));
    }

    /// Drops the room's subscribers' signal connections without a close frame.
    pub fn drop_signal(&self, room: &str) {
        self.shared().to_subscribers(room, || Outbound::Drop);
    }

    /// Stops (or restarts) answering pings in `room`, so that clients time out and resume.
    pub fn stop_pongs(&self, room: &str, stop: bool) {
        self.shared().with_room(room, |room| room.stop_pongs = stop);
    }

    /// Sends `leave{action, reason}` to the room's subscribers and closes their signal.
    /// After `DISCONNECT` or `RECONNECT` they are forgotten, so resuming is refused.
    pub fn send_leave(&self, room: &str, action: LeaveAction, reason: DisconnectReason) {
        self.shared().send_leave(room, action, reason);
    }

    /// Refuses (or accepts again) every resume with `leave{action: RECONNECT}`.
    pub fn refuse_resume(&self, refuse: bool) {
        self.shared().set_refuse_resume(refuse);
    }

    /// Stops the listener, every session and every peer.
    pub fn shutdown(&self) {
        self.shared().cancel.cancel();
    }

    // ---- observations ----

    /// Waits until `room` has at least `n` subscribers taking data. Panics after `timeout`.
    pub async fn wait_subscribers(&self, room: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.subscribers(room);
            if now >= n {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "room {room}: {now} subscribers with _reliable open after {timeout:?}, \
                     expected {n}; joins so far: {:?}",
                    self.joins()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Subscribers of `room` taking data now.
    pub fn subscribers(&self, room: &str) -> usize {
        self.shared().ready_subscribers(room)
    }

    /// Every signal connection accepted so far, in order.
    pub fn joins(&self) -> Vec<JoinInfo> {
        self.shared().joins()
    }

    /// Why each refused signal connection was refused, in order.
    pub fn refusals(&self) -> Vec<String> {
        self.shared().refusals()
    }

    pub fn pings(&self, room: &str) -> u64 {
        self.stats(room).pings
    }

    pub fn leaves_received(&self, room: &str) -> u64 {
        self.stats(room).leaves_received
    }

    pub fn resumes(&self, room: &str) -> u64 {
        self.stats(room).resumes
    }

    /// The `sync_state` requests received in `room`.
    pub fn sync_states(&self, room: &str) -> Vec<proto::SyncState> {
        self.shared()
            .with_room(room, |room| room.sync_states.clone())
    }

    pub fn stats(&self, room: &str) -> RoomStats {
        let subscribers = self.subscribers(room);
        self.shared().with_room(room, |room| RoomStats {
            subscribers,
            pings: room.pings,
            leaves_received: room.leaves,
            resumes: room.resumes,
            sync_states: room.sync_states.len(),
            packets_forwarded: room.counters.forwarded.load(Ordering::Relaxed),
            bytes_forwarded: room.counters.forwarded_bytes.load(Ordering::Relaxed),
            packets_dropped: room.counters.dropped.load(Ordering::Relaxed),
        })
    }
}

/// A participant simulated inside the double that publishes data to one room.
pub struct Publisher {
    double: LiveKitDouble,
    room: String,
    identity: String,
    sid: String,
    next_sequence: AtomicU32,
    counters: Arc<Counters>,
}

impl Publisher {
    pub fn room(&self) -> &str {
        &self.room
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// Forwards `packet` to every subscriber taking data (only those named in its
    /// `destination_identities`, if any), as the server would: with this
    /// publisher's identity and sid, the next sequence (from 1) and kind `RELIABLE`. Waits
    /// while a subscriber's queue is full. Returns how many subscribers it was queued for.
    pub async fn send(&self, packet: proto::DataPacket) -> usize {
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        self.send_with_sequence(packet, sequence).await
    }

    /// [`send`](Self::send) with a chosen sequence, which leaves the publisher's own counter
    /// alone: to replay a packet (a duplicate) or reorder packets after numbering them.
    pub async fn send_with_sequence(&self, packet: proto::DataPacket, sequence: u32) -> usize {
        let peers = self
            .double
            .shared()
            .ready_peers(&self.room, &packet.destination_identities);
        let bytes = self.stamp(packet, sequence);
        let sent = futures::future::join_all(peers.iter().map(|peer| peer.send(bytes.clone())));
        sent.await.into_iter().filter(|queued| *queued).count()
    }

    /// [`send`](Self::send) that drops the packet for any subscriber whose queue is full,
    /// counting it, instead of waiting.
    pub fn try_send(&self, packet: proto::DataPacket) -> usize {
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let peers = self
            .double
            .shared()
            .ready_peers(&self.room, &packet.destination_identities);
        let bytes = self.stamp(packet, sequence);
        peers
            .iter()
            .filter(|peer| peer.try_send(bytes.clone()))
            .count()
    }

    /// Leaves the room: subscribers get `update` `DISCONNECTED` (`CLIENT_INITIATED`). A
    /// publisher dropped without leaving stays in the room, silent.
    pub fn leave(&self) {
        self.double.shared().remove_publisher(
            &self.room,
            &self.sid,
            DisconnectReason::ClientInitiated,
        );
    }

    /// Packets this publisher's room forwarded so far (to all subscribers).
    pub fn forwarded(&self) -> u64 {
        self.counters.forwarded.load(Ordering::Relaxed)
    }

    #[allow(deprecated)] // `kind` is deprecated on the wire type but servers still set it.
    fn stamp(&self, mut packet: proto::DataPacket, sequence: u32) -> Arc<Vec<u8>> {
        packet.participant_identity = self.identity.clone();
        packet.participant_sid = self.sid.clone();
        packet.sequence = sequence;
        packet.kind = proto::data_packet::Kind::Reliable as i32;
        if let Some(proto::data_packet::Value::User(user)) = &mut packet.value {
            user.participant_identity = self.identity.clone();
            user.participant_sid = self.sid.clone();
        }
        Arc::new(packet.encode_to_vec())
    }
}
