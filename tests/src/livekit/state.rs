//! What the double knows: rooms, their publishers and subscribers, and what it observed.
//!
//! One `std::sync::Mutex` guards it all and is never held across an `.await`. Messages a
//! subscriber must see in order (its `join` before any `update`) are queued on its signal
//! outbox while the lock is held.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use livekit_api::access_token::VideoGrants;
use livekit_protocol as proto;
use proto::signal_response::Message as Response;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::peer::{Counters, NewPeer, PeerHandle};
use super::{DoubleOptions, JoinInfo, JoinKind};

/// What a signal session's writer is told to do.
#[derive(Debug)]
pub enum Outbound {
    Message(Box<Response>),
    /// Send a close frame with this code, then end the session.
    Close(u16),
    /// End the session without a close frame, as a lost TCP connection would.
    Drop,
}

impl Outbound {
    pub fn message(message: Response) -> Self {
        Self::Message(Box::new(message))
    }
}

pub type Outbox = mpsc::UnboundedSender<Outbound>;

/// State shared by the listener, the signal sessions, the peers and the handles.
pub struct Shared {
    pub options: DoubleOptions,
    pub cancel: CancellationToken,
    state: Mutex<State>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    rooms: HashMap<String, Room>,
    joins: Vec<JoinInfo>,
    refusals: Vec<String>,
    refuse_resume: bool,
}

pub struct Room {
    pub sid: String,
    pub created_ms: i64,
    /// Simulated publishers, in join order.
    publishers: Vec<proto::ParticipantInfo>,
    subscribers: HashMap<String, Subscriber>,
    pub counters: Arc<Counters>,
    pub stop_pongs: bool,
    pub pings: u64,
    pub leaves: u64,
    pub resumes: u64,
    pub sync_states: Vec<proto::SyncState>,
}

/// A participant that joined over the signal protocol (the host).
struct Subscriber {
    info: proto::ParticipantInfo,
    peer: PeerHandle,
    /// The current signal session: its id and outbox. `None` while the client is away.
    signal: Option<(u64, Outbox)>,
    next_offer_id: u32,
    /// The peer's host candidate, trickled again after each offer.
    candidate_init: String,
}

/// A client the signal endpoint let in: who it is and what it asked for.
#[derive(Debug, Clone)]
pub struct Admission {
    pub room: String,
    pub identity: String,
    pub grants: VideoGrants,
    /// The WebSocket URL's query parameters.
    pub query: BTreeMap<String, String>,
}

/// A newly joined subscriber, as its signal session needs it.
pub struct Joined {
    pub sid: String,
    pub peer: PeerHandle,
}

impl Shared {
    pub fn new(options: DoubleOptions) -> Self {
        Self {
            options,
            cancel: CancellationToken::new(),
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn sid(&self, prefix: &str) -> String {
        format!("{prefix}_{:010x}", self.next_id())
    }

    pub fn record_join(&self, join: JoinInfo) {
        self.state().joins.push(join);
    }

    pub fn record_refusal(&self, reason: String) {
        self.state().refusals.push(reason);
    }

    pub fn joins(&self) -> Vec<JoinInfo> {
        self.state().joins.clone()
    }

    pub fn refusals(&self) -> Vec<String> {
        self.state().refusals.clone()
    }

    pub fn set_refuse_resume(&self, refuse: bool) {
        self.state().refuse_resume = refuse;
    }

    /// Runs `f` on `room`, made on first use.
    pub fn with_room<T>(&self, room: &str, f: impl FnOnce(&mut Room) -> T) -> T {
        let mut state = self.state();
        let room = self.room(&mut state, room);
        f(room)
    }

    fn room<'a>(&self, state: &'a mut State, name: &str) -> &'a mut Room {
        state.rooms.entry(name.to_owned()).or_insert_with(|| Room {
            sid: self.sid("RM"),
            created_ms: unix_ms(),
            publishers: Vec::new(),
            subscribers: HashMap::new(),
            counters: Arc::default(),
            stop_pongs: false,
            pings: 0,
            leaves: 0,
            resumes: 0,
            sync_states: Vec::new(),
        })
    }

    /// The room's counters, for a new peer.
    pub fn counters(&self, room: &str) -> Arc<Counters> {
        self.with_room(room, |room| room.counters.clone())
    }

    /// Adds a subscriber and queues its `join`, `offer` and first `trickle`. A subscriber
    /// already in the room with the same identity is told to leave (`DUPLICATE_IDENTITY`).
    pub fn join(&self, admission: &Admission, signal: (u64, Outbox), peer: NewPeer) -> Joined {
        let Admission {
            room: room_name,
            identity,
            grants,
            query,
        } = admission;
        let NewPeer {
            handle: peer,
            offer,
            candidate_init,
        } = peer;
        let sid = self.sid("PA");
        let options = &self.options;
        let mut state = self.state();
        let room = self.room(&mut state, room_name);

        let duplicate: Vec<String> = room
            .subscribers
            .iter()
            .filter(|(_, s)| s.info.identity == *identity)
            .map(|(sid, _)| sid.clone())
            .collect();
        for old in duplicate {
            let old = room.subscribers.remove(&old).expect("listed above");
            if let Some((_, outbox)) = old.signal {
                let _ = outbox.send(Outbound::message(Response::Leave(proto::LeaveRequest {
                    can_reconnect: false,
                    reason: proto::DisconnectReason::DuplicateIdentity as i32,
                    action: proto::leave_request::Action::Disconnect as i32,
                    ..Default::default()
                })));
                let _ = outbox.send(Outbound::Close(1000));
            }
        }

        let info = proto::ParticipantInfo {
            sid: sid.clone(),
            identity: identity.clone(),
            name: identity.clone(),
            state: proto::participant_info::State::Joined as i32,
            joined_at: unix_ms() / 1000,
            joined_at_ms: unix_ms(),
            version: 1,
            permission: Some(proto::ParticipantPermission {
                can_subscribe: grants.can_subscribe(),
                can_publish: grants.can_publish(),
                can_publish_data: grants.can_publish_data(),
                hidden: grants.hidden,
                ..Default::default()
            }),
            client_protocol: query
                .get("client_protocol")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0),
            capabilities: query
                .get("capabilities")
                .map(|caps| {
                    caps.split(',')
                        .filter_map(proto::client_info::Capability::from_str_name)
                        .map(|c| c as i32)
                        .collect()
                })
                .unwrap_or_default(),
            ..Default::default()
        };
        let join = proto::JoinResponse {
            room: Some(room_info(room_name, room)),
            participant: Some(info.clone()),
            other_participants: room.publishers.clone(),
            server_version: SERVER_VERSION.into(),
            subscriber_primary: true,
            ping_interval: options.ping_interval_secs as i32,
            ping_timeout: options.ping_timeout_secs as i32,
            server_info: Some(server_info()),
            ..Default::default()
        };

        let outbox = &signal.1;
        let _ = outbox.send(Outbound::message(Response::Join(join)));
        let _ = outbox.send(Outbound::message(Response::Offer(
            proto::SessionDescription {
                r#type: "offer".into(),
                sdp: offer,
                id: 1,
                ..Default::default()
            },
        )));
        let _ = outbox.send(Outbound::message(trickle(candidate_init.clone())));

        room.subscribers.insert(
            sid.clone(),
            Subscriber {
                info,
                peer: peer.clone(),
                signal: Some(signal),
                next_offer_id: 2,
                candidate_init,
            },
        );
        Joined { sid, peer }
    }

    /// Attaches a resuming client to its subscriber and queues `reconnect`, `update` and
    /// `room_update`. Returns the peer, the id for the ICE-restart offer and the candidate to
    /// trickle after it, or the leave to refuse with.
    pub fn resume(
        &self,
        room_name: &str,
        sid: &str,
        signal: (u64, Outbox),
    ) -> Result<(PeerHandle, u32, String), proto::LeaveRequest> {
        let mut state = self.state();
        let refuse = state.refuse_resume;
        let room = self.room(&mut state, room_name);
        let refusal = proto::LeaveRequest {
            can_reconnect: true,
            reason: proto::DisconnectReason::StateMismatch as i32,
            action: proto::leave_request::Action::Reconnect as i32,
            ..Default::default()
        };
        if refuse {
            return Err(refusal);
        }
        let room_info = room_info(room_name, room);
        let everyone = room.publishers.clone();
        let Some(subscriber) = room.subscribers.get_mut(sid) else {
            return Err(refusal);
        };

        if let Some((_, old)) = subscriber.signal.take() {
            let _ = old.send(Outbound::Drop);
        }
        let outbox = &signal.1;
        let _ = outbox.send(Outbound::message(Response::Reconnect(
            proto::ReconnectResponse {
                server_info: Some(server_info()),
                last_message_seq: 0,
                ..Default::default()
            },
        )));
        let mut participants = everyone;
        participants.push(subscriber.info.clone());
        let _ = outbox.send(Outbound::message(Response::Update(
            proto::ParticipantUpdate { participants },
        )));
        let _ = outbox.send(Outbound::message(Response::RoomUpdate(proto::RoomUpdate {
            room: Some(room_info),
        })));
        subscriber.signal = Some(signal);
        let offer_id = subscriber.next_offer_id;
        subscriber.next_offer_id += 1;
        let peer = subscriber.peer.clone();
        let candidate_init = subscriber.candidate_init.clone();
        room.resumes += 1;
        Ok((peer, offer_id, candidate_init))
    }

    /// The client left on its own: forget it and stop its peer.
    pub fn client_left(&self, room: &str, sid: &str) {
        self.with_room(room, |room| {
            room.leaves += 1;
            room.subscribers.remove(sid);
        });
    }

    /// The signal session `session` ended without a leave. The subscriber stays for
    /// `departure_timeout`, so the client can resume; then it is removed.
    pub fn signal_lost(self: &Arc<Self>, room: &str, sid: &str, session: u64) {
        let lost = self.with_room(room, |room| match room.subscribers.get_mut(sid) {
            Some(subscriber) if matches!(subscriber.signal, Some((id, _)) if id == session) => {
                subscriber.signal = None;
                true
            }
            _ => false,
        });
        if !lost {
            return;
        }
        let shared = self.clone();
        let (room, sid) = (room.to_owned(), sid.to_owned());
        tokio::spawn(async move {
            tokio::select! {
                _ = shared.cancel.cancelled() => {}
                _ = tokio::time::sleep(shared.options.departure_timeout) => {
                    shared.with_room(&room, |room| {
                        if room.subscribers.get(&sid).is_some_and(|s| s.signal.is_none()) {
                            room.subscribers.remove(&sid);
                        }
                    });
                }
            }
        });
    }

    /// Sends `outbound` to every subscriber of `room` with a signal session.
    pub fn to_subscribers(&self, room: &str, outbound: impl Fn() -> Outbound) {
        self.with_room(room, |room| {
            for subscriber in room.subscribers.values() {
                if let Some((_, outbox)) = &subscriber.signal {
                    let _ = outbox.send(outbound());
                }
            }
        });
    }

    /// The server's leave to every subscriber of `room`, then a close. After `DISCONNECT`
    /// or `RECONNECT` the subscribers are forgotten, so a resume is refused.
    pub fn send_leave(
        &self,
        room: &str,
        action: proto::leave_request::Action,
        reason: proto::DisconnectReason,
    ) {
        self.with_room(room, |room| {
            for subscriber in room.subscribers.values_mut() {
                if let Some((_, outbox)) = &subscriber.signal {
                    let leave = proto::LeaveRequest {
                        can_reconnect: action != proto::leave_request::Action::Disconnect,
                        reason: reason as i32,
                        action: action as i32,
                        ..Default::default()
                    };
                    let _ = outbox.send(Outbound::message(Response::Leave(leave)));
                    let _ = outbox.send(Outbound::Close(1000));
                }
            }
            if action != proto::leave_request::Action::Resume {
                room.subscribers.clear();
            }
        });
    }

    /// Adds a simulated publisher and tells the subscribers: `JOINED`, then `ACTIVE`. A
    /// publisher with the same identity is replaced (its subscribers see it disconnect with
    /// `DUPLICATE_IDENTITY`).
    pub fn add_publisher(&self, room_name: &str, identity: &str) -> (String, Arc<Counters>) {
        let sid = self.sid("PA");
        let now = unix_ms();
        self.with_room(room_name, |room| {
            if let Some(index) = room.publishers.iter().position(|p| p.identity == identity) {
                let old = room.publishers.remove(index);
                room.announce(disconnected(
                    old,
                    proto::DisconnectReason::DuplicateIdentity,
                ));
            }
            let mut info = proto::ParticipantInfo {
                sid: sid.clone(),
                identity: identity.to_owned(),
                name: identity.to_owned(),
                state: proto::participant_info::State::Joined as i32,
                joined_at: now / 1000,
                joined_at_ms: now,
                version: 1,
                is_publisher: true,
                permission: Some(proto::ParticipantPermission {
                    can_subscribe: true,
                    can_publish: true,
                    can_publish_data: true,
                    ..Default::default()
                }),
                client_protocol: 1,
                ..Default::default()
            };
            room.announce(info.clone());
            info.state = proto::participant_info::State::Active as i32;
            info.version += 1;
            room.announce(info.clone());
            room.publishers.push(info);
            (sid.clone(), room.counters.clone())
        })
    }

    /// Removes a simulated publisher and tells the subscribers it disconnected.
    pub fn remove_publisher(&self, room: &str, sid: &str, reason: proto::DisconnectReason) {
        self.with_room(room, |room| {
            if let Some(index) = room.publishers.iter().position(|p| p.sid == sid) {
                let old = room.publishers.remove(index);
                room.announce(disconnected(old, reason));
            }
        });
    }

    /// The peers of the subscribers that take data now: all of them, or those whose
    /// identity is in `destinations` if it is not empty.
    pub fn ready_peers(&self, room: &str, destinations: &[String]) -> Vec<PeerHandle> {
        self.with_room(room, |room| {
            room.subscribers
                .values()
                .filter(|s| s.peer.is_ready())
                .filter(|s| destinations.is_empty() || destinations.contains(&s.info.identity))
                .map(|s| s.peer.clone())
                .collect()
        })
    }

    /// Subscribers of `room` that take data now.
    pub fn ready_subscribers(&self, room: &str) -> usize {
        self.with_room(room, |room| {
            room.subscribers
                .values()
                .filter(|s| s.peer.is_ready())
                .count()
        })
    }
}

impl Room {
    /// Tells every subscriber with a signal session about `participant`.
    fn announce(&self, participant: proto::ParticipantInfo) {
        for subscriber in self.subscribers.values() {
            if let Some((_, outbox)) = &subscriber.signal {
                let _ = outbox.send(Outbound::message(Response::Update(
                    proto::ParticipantUpdate {
                        participants: vec![participant.clone()],
                    },
                )));
            }
        }
    }
}

/// What the server says about itself.
const SERVER_VERSION: &str = "1.9.0";

fn server_info() -> proto::ServerInfo {
    proto::ServerInfo {
        edition: proto::server_info::Edition::Standard as i32,
        version: SERVER_VERSION.into(),
        protocol: 16,
        node_id: "ND_framehost_double".into(),
        ..Default::default()
    }
}

fn room_info(name: &str, room: &Room) -> proto::Room {
    proto::Room {
        sid: room.sid.clone(),
        name: name.to_owned(),
        creation_time: room.created_ms / 1000,
        creation_time_ms: room.created_ms,
        num_participants: (room.publishers.len() + room.subscribers.len()) as u32,
        num_publishers: room.publishers.len() as u32,
        ..Default::default()
    }
}

fn disconnected(
    mut info: proto::ParticipantInfo,
    reason: proto::DisconnectReason,
) -> proto::ParticipantInfo {
    info.state = proto::participant_info::State::Disconnected as i32;
    info.version += 1;
    info.disconnect_reason = reason as i32;
    info
}

/// A subscriber-side trickle of `candidate_init`. The double has one candidate, so it is
/// also the final one.
pub fn trickle(candidate_init: String) -> Response {
    Response::Trickle(proto::TrickleRequest {
        candidate_init,
        target: proto::SignalTarget::Subscriber as i32,
        r#final: true,
    })
}

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

impl JoinInfo {
    pub(super) fn new(kind: JoinKind, admission: &Admission) -> Self {
        Self {
            kind,
            room: admission.room.clone(),
            identity: admission.identity.clone(),
            grants: admission.grants.clone(),
            query: admission.query.clone(),
        }
    }
}
