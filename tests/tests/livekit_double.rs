//! The LiveKit double, joined by LiveKit's own signal client (`livekit-signaling`) and, for
//! the data path, by a small str0m subscriber written here.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use framehost_tests::livekit::generator::{Fault, StreamGenerator, StreamOptions};
use framehost_tests::livekit::{
    DisconnectReason, DoubleOptions, JoinKind, LeaveAction, LiveKitDouble,
};
use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_protocol as proto;
use livekit_signaling::{SignalClient, SignalError, SignalEvent, SignalEvents, SignalOptions};
use prost::Message as _;
use proto::signal_request::Message as Request;
use proto::signal_response::Message as Response;
use str0m::change::SdpOffer;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

const ROOM: &str = "room-1";
const HOST: &str = "framehost-job-1";
const WAIT: Duration = Duration::from_secs(5);

/// livekit-signaling obeys proxy variables and ignores NO_PROXY: clear them once.
fn no_proxy() {
    static CLEARED: Once = Once::new();
    CLEARED.call_once(|| {
        for name in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            // SAFETY: runs once, before any test of this binary starts a client thread
            // that reads the environment.
            unsafe { std::env::remove_var(name) };
        }
    });
}

/// The options docs/livekit-participant.md section 3 gives the host.
fn signal_options() -> SignalOptions {
    let mut options = SignalOptions::default();
    options.auto_subscribe = false;
    options.region_failover = false;
    options.protocol_version = 16;
    options.client_protocol = 2;
    options.client_capabilities = vec![proto::client_info::Capability::CapCompressionDeflateRaw];
    options
}

async fn connect(double: &LiveKitDouble) -> (SignalClient, proto::JoinResponse, SignalEvents) {
    no_proxy();
    let token = double.subscriber_token(ROOM, HOST);
    SignalClient::connect(&double.url(), &token, signal_options(), None)
        .await
        .expect("the double lets a good token in")
}

async fn next_message(events: &mut SignalEvents) -> Response {
    match timeout(WAIT, events.recv()).await {
        Ok(Some(SignalEvent::Message(message))) => *message,
        Ok(Some(SignalEvent::Close(reason))) => panic!("signal closed: {reason}"),
        Ok(None) => panic!("signal events ended"),
        Err(_) => panic!("no signal message within {WAIT:?}"),
    }
}

/// The next participant update, skipping other messages.
async fn next_update(events: &mut SignalEvents) -> proto::ParticipantInfo {
    loop {
        if let Response::Update(update) = next_message(events).await {
            assert_eq!(update.participants.len(), 1, "{update:?}");
            return update.participants.into_iter().next().unwrap();
        }
    }
}

#[tokio::test]
async fn a_good_token_joins_and_gets_the_subscriber_offer() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let source = double.publisher(ROOM, "vision-service");

    let (_client, join, mut events) = connect(&double).await;

    assert!(join.subscriber_primary);
    assert_eq!(join.ping_interval, 1);
    assert_eq!(join.ping_timeout, 3);
    assert_eq!(join.server_info.as_ref().unwrap().protocol, 16);
    assert_eq!(join.room.as_ref().unwrap().name, ROOM);
    assert!(join.room.as_ref().unwrap().sid.starts_with("RM_"));
    let me = join.participant.as_ref().unwrap();
    assert_eq!(me.identity, HOST);
    assert!(me.sid.starts_with("PA_"));
    assert!(me.permission.as_ref().unwrap().hidden);
    assert_eq!(me.client_protocol, 2);
    let others: Vec<_> = join
        .other_participants
        .iter()
        .map(|p| (p.identity.as_str(), p.sid.as_str(), p.state))
        .collect();
    assert_eq!(
        others,
        [(
            "vision-service",
            source.sid(),
            proto::participant_info::State::Active as i32
        )]
    );

    let Response::Offer(offer) = next_message(&mut events).await else {
        panic!("the offer must follow the join");
    };
    assert_eq!(offer.r#type, "offer");
    assert!(offer.sdp.contains("m=application"), "{}", offer.sdp);
    assert!(offer.sdp.contains("webrtc-datachannel"), "{}", offer.sdp);
    let Response::Trickle(trickle) = next_message(&mut events).await else {
        panic!("a trickle must follow the offer");
    };
    assert_eq!(trickle.target, proto::SignalTarget::Subscriber as i32);
    assert!(trickle.r#final);
    let init: serde_json::Value = serde_json::from_str(&trickle.candidate_init).unwrap();
    let candidate = init["candidate"].as_str().unwrap();
    assert!(candidate.starts_with("candidate:") && candidate.contains("127.0.0.1"));
    Candidate::from_sdp_string(candidate).expect("the candidate parses");

    let joins = double.joins();
    assert_eq!(joins.len(), 1);
    let join = &joins[0];
    assert_eq!(join.kind, JoinKind::Join);
    assert_eq!((join.room.as_str(), join.identity.as_str()), (ROOM, HOST));
    assert!(join.grants.hidden && join.grants.can_subscribe());
    assert!(!join.grants.can_publish() && !join.grants.can_publish_data());
    assert_eq!(join.param("protocol"), Some("16"));
    assert_eq!(join.param("client_protocol"), Some("2"));
    assert_eq!(
        join.param("capabilities"),
        Some("CAP_COMPRESSION_DEFLATE_RAW")
    );
    assert_eq!(join.param("auto_subscribe"), Some("0"));
    assert_eq!(join.param("reconnect"), None);
}

#[tokio::test]
async fn an_ice_lite_double_says_so_in_its_offer() {
    for ice_lite in [false, true] {
        let double = LiveKitDouble::start(DoubleOptions {
            ice_lite,
            ..Default::default()
        })
        .await
        .unwrap();
        let (_client, _join, mut events) = connect(&double).await;
        let Response::Offer(offer) = next_message(&mut events).await else {
            panic!("the offer must follow the join");
        };
        assert_eq!(offer.sdp.contains("a=ice-lite"), ice_lite, "{}", offer.sdp);
    }
}

#[tokio::test]
async fn a_token_signed_with_another_secret_is_refused_with_the_reason() {
    no_proxy();
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let token = AccessToken::with_api_key("devkey", "not-the-secret")
        .with_identity(HOST)
        .with_grants(VideoGrants {
            room_join: true,
            room: ROOM.into(),
            ..Default::default()
        })
        .to_jwt()
        .unwrap();

    let error = SignalClient::connect(&double.url(), &token, signal_options(), None)
        .await
        .expect_err("a token signed with another secret must be refused");

    match error {
        SignalError::Client(status, body) => {
            assert_eq!(status.as_u16(), 401);
            assert!(body.contains("invalid token"), "{body}");
        }
        other => panic!("expected the validate endpoint's 401, got {other:?}"),
    }
    assert_eq!(double.refusals().len(), 1, "{:?}", double.refusals());
    assert!(double.joins().is_empty());
}

#[tokio::test]
async fn pings_are_answered_until_pongs_stop() {
    let double = LiveKitDouble::start(DoubleOptions {
        ping_interval_secs: 1,
        ping_timeout_secs: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let (_client, _join, mut events) = connect(&double).await;

    // Past the ping timeout, the client is still connected.
    let until = tokio::time::Instant::now() + Duration::from_millis(2_600);
    while let Ok(event) = tokio::time::timeout_at(until, events.recv()).await {
        match event {
            Some(SignalEvent::Close(reason)) => panic!("closed while pongs flow: {reason}"),
            Some(SignalEvent::Message(_)) => {}
            None => panic!("signal events ended"),
        }
    }
    assert!(double.pings(ROOM) >= 2, "pings: {}", double.pings(ROOM));

    double.stop_pongs(ROOM, true);
    let closed = timeout(Duration::from_secs(4), async {
        loop {
            match events.recv().await {
                Some(SignalEvent::Close(reason)) => return reason,
                Some(SignalEvent::Message(_)) => {}
                None => panic!("signal events ended"),
            }
        }
    })
    .await
    .expect("without pongs the client's ping timeout fires");
    assert_eq!(closed, "ping timeout");
}

#[tokio::test]
async fn a_publisher_joining_and_leaving_is_announced() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let (_client, join, mut events) = connect(&double).await;
    assert!(join.other_participants.is_empty());

    let source = double.publisher(ROOM, "vision-service");
    let joined = next_update(&mut events).await;
    let active = next_update(&mut events).await;
    assert_eq!(
        (joined.identity.as_str(), joined.sid.as_str()),
        ("vision-service", source.sid())
    );
    assert_eq!(joined.state, proto::participant_info::State::Joined as i32);
    assert_eq!(active.state, proto::participant_info::State::Active as i32);
    assert!(active.version > joined.version);

    source.leave();
    let gone = next_update(&mut events).await;
    assert_eq!(
        (gone.identity.as_str(), gone.sid.as_str()),
        ("vision-service", source.sid())
    );
    assert_eq!(
        gone.state,
        proto::participant_info::State::Disconnected as i32
    );
    assert_eq!(
        gone.disconnect_reason,
        proto::DisconnectReason::ClientInitiated as i32
    );
    assert!(gone.version > active.version);
}

#[tokio::test]
async fn a_lost_signal_resumes_with_an_ice_restart_offer() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let (client, join, mut events) = connect(&double).await;
    let Response::Offer(first) = next_message(&mut events).await else {
        panic!("expected the offer");
    };
    let _source = double.publisher(ROOM, "vision-service");

    double.close_signal(ROOM);
    let closed = timeout(WAIT, async {
        loop {
            if let Some(SignalEvent::Close(reason)) = events.recv().await {
                return reason;
            }
        }
    })
    .await
    .expect("the client sees its signal close");
    assert!(!closed.is_empty());

    client
        .restart(proto::ReconnectReason::RrSignalDisconnected)
        .await
        .expect("the double accepts the resume");
    let Response::Update(update) = next_message(&mut events).await else {
        panic!("an update with everyone follows the reconnect response");
    };
    let identities: HashSet<_> = update
        .participants
        .iter()
        .map(|p| p.identity.as_str())
        .collect();
    assert_eq!(identities, HashSet::from(["vision-service", HOST]));
    assert!(matches!(
        next_message(&mut events).await,
        Response::RoomUpdate(_)
    ));
    let Response::Offer(second) = next_message(&mut events).await else {
        panic!("a new offer follows the room update");
    };
    assert!(second.id > first.id);
    assert_ne!(
        ice_ufrag(&first.sdp),
        ice_ufrag(&second.sdp),
        "an ICE restart has new credentials"
    );

    client
        .send(Request::SyncState(proto::SyncState::default()))
        .await;
    client.set_reconnected().await;

    let sid = &join.participant.as_ref().unwrap().sid;
    let resume = double.joins().pop().unwrap();
    assert_eq!(resume.kind, JoinKind::Resume);
    assert_eq!(resume.param("reconnect"), Some("1"));
    assert_eq!(resume.param("sid"), Some(sid.as_str()));
    assert_eq!(resume.param("reconnect_reason"), Some("1"));
    assert_eq!(double.resumes(ROOM), 1);
    within(
        || double.sync_states(ROOM).len() == 1,
        "the sync_state is recorded",
    )
    .await;

    // Refused resumes get leave{RECONNECT}, which the client reports as such.
    double.refuse_resume(true);
    double.close_signal(ROOM);
    let refused = timeout(WAIT, async {
        loop {
            if let Some(SignalEvent::Close(_)) = events.recv().await {
                return client
                    .restart(proto::ReconnectReason::RrSignalDisconnected)
                    .await;
            }
        }
    })
    .await
    .expect("the client sees its signal close again");
    match refused {
        Err(SignalError::LeaveRequest { action, .. }) => {
            assert_eq!(action, proto::leave_request::Action::Reconnect)
        }
        other => panic!("expected leave{{RECONNECT}}, got {other:?}"),
    }
    assert_eq!(double.joins().pop().unwrap().kind, JoinKind::ResumeRefused);
}

#[tokio::test]
async fn a_client_leave_is_recorded_and_a_server_leave_reaches_the_client() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let (client, _join, _events) = connect(&double).await;
    client
        .send(Request::Leave(proto::LeaveRequest {
            action: proto::leave_request::Action::Disconnect as i32,
            reason: proto::DisconnectReason::ClientInitiated as i32,
            ..Default::default()
        }))
        .await;
    within(
        || double.leaves_received(ROOM) == 1,
        "the leave is recorded",
    )
    .await;

    let (_client, _join, mut events) = connect(&double).await;
    let _ = next_message(&mut events).await; // the offer
    double.send_leave(ROOM, LeaveAction::Disconnect, DisconnectReason::RoomDeleted);
    loop {
        if let Response::Leave(leave) = next_message(&mut events).await {
            assert_eq!(
                leave.action,
                proto::leave_request::Action::Disconnect as i32
            );
            assert_eq!(leave.reason, proto::DisconnectReason::RoomDeleted as i32);
            break;
        }
    }
}

/// Polls `condition` for a few seconds.
async fn within(condition: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ice_ufrag(sdp: &str) -> Option<&str> {
    sdp.lines()
        .find_map(|line| line.strip_prefix("a=ice-ufrag:"))
}

// ---- the data path, with a str0m subscriber ----

#[tokio::test]
async fn frames_reach_a_subscriber_on_reliable() {
    data_path(false).await;
}

#[tokio::test]
async fn frames_reach_a_subscriber_of_an_ice_lite_double() {
    data_path(true).await;
}

async fn data_path(ice_lite: bool) {
    let double = LiveKitDouble::start(DoubleOptions {
        ice_lite,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut subscriber = Subscriber::join(&double).await;
    double.wait_subscribers(ROOM, 1, WAIT).await;

    let generator = StreamGenerator::new(StreamOptions {
        fps: 100.0,
        image_kib: 30,
        parts: 2,
        frames: Some(6),
        pool: 2,
        receiver: framehost::streams::Receiver::Legacy,
        faults: vec![Fault::DropChunk(4)],
        ..Default::default()
    })
    .unwrap();
    let source = double.publisher(ROOM, "vision-service");
    let report = generator.run(&source).await;
    assert_eq!(report.frames, 6);
    assert_eq!(report.withheld, 1);

    let packets = subscriber.receive(report.packets as usize).await;
    let sequences: Vec<u32> = packets.iter().map(|p| p.sequence).collect();
    assert_eq!(sequences, (1..=report.packets as u32).collect::<Vec<_>>());
    assert!(
        packets.iter().all(
            |p| p.participant_identity == "vision-service" && p.participant_sid == source.sid()
        )
    );
    let bytes: usize = packets.iter().map(|p| p.encoded_len()).sum();
    assert!(bytes as u64 >= report.bytes, "{bytes} < {}", report.bytes);

    let headers: Vec<&proto::data_stream::Header> = packets
        .iter()
        .filter_map(|p| match &p.value {
            Some(proto::data_packet::Value::StreamHeader(header)) => Some(header),
            _ => None,
        })
        .collect();
    assert_eq!(headers.len(), 12, "two streams a frame");
    let stream_ids: HashSet<_> = headers.iter().map(|h| h.stream_id.as_str()).collect();
    assert_eq!(stream_ids.len(), 12, "stream ids are unique");
    assert!(headers.iter().all(|h| h.topic == "agentChat"));

    let stats = double.stats(ROOM);
    assert_eq!(stats.subscribers, 1);
    assert_eq!(stats.packets_forwarded, report.packets);
    assert_eq!(stats.packets_dropped, 0);
    drop(subscriber);
}

#[tokio::test]
async fn data_keeps_flowing_over_a_resume() {
    let double = LiveKitDouble::start(DoubleOptions::default())
        .await
        .unwrap();
    let mut subscriber = Subscriber::join(&double).await;
    double.wait_subscribers(ROOM, 1, WAIT).await;
    let source = double.publisher(ROOM, "vision-service");
    let packet = |n: u8| proto::DataPacket {
        value: Some(proto::data_packet::Value::User(proto::UserPacket {
            payload: vec![n; 100],
            ..Default::default()
        })),
        ..Default::default()
    };

    source.send(packet(1)).await;
    let before = subscriber.receive(1).await;
    let Some(proto::data_packet::Value::User(user)) = &before[0].value else {
        panic!("expected a user packet");
    };
    #[allow(deprecated)] // the server still fills the identity in user packets
    let identity = &user.participant_identity;
    assert_eq!(identity, "vision-service");

    // Addressed to someone else: not forwarded here, though it takes a sequence.
    let elsewhere = proto::DataPacket {
        destination_identities: vec!["someone-else".into()],
        ..packet(9)
    };
    assert_eq!(source.send(elsewhere).await, 0);

    double.close_signal(ROOM);
    subscriber.resume().await;
    assert_eq!(source.send(packet(2)).await, 1);
    let after = subscriber.receive(1).await;
    assert_eq!(after[0].sequence, 3);
    assert_eq!(double.resumes(ROOM), 1);
}

/// A data-only subscriber: LiveKit's signal client and a str0m peer that answers the
/// double's offers and hands over what arrives on `_reliable`.
struct Subscriber {
    client: Arc<SignalClient>,
    data: mpsc::UnboundedReceiver<Vec<u8>>,
    closed: mpsc::UnboundedReceiver<String>,
}

enum PeerCommand {
    Offer(String, oneshot::Sender<String>),
    Candidate(String),
}

impl Subscriber {
    async fn join(double: &LiveKitDouble) -> Self {
        let (client, _join, events) = connect(double).await;
        let client = Arc::new(client);
        let (data_tx, data) = mpsc::unbounded_channel();
        let (closed_tx, closed) = mpsc::unbounded_channel();

        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        let candidate = Candidate::host(local, "udp").unwrap();
        let candidate_init = serde_json::json!({
            "candidate": candidate.to_sdp_string(), "sdpMid": "0", "sdpMLineIndex": 0,
        })
        .to_string();
        let (commands, command_rx) = mpsc::unbounded_channel();
        tokio::spawn(run_peer(socket, local, candidate, command_rx, data_tx));
        tokio::spawn(run_signal(
            client.clone(),
            events,
            commands,
            candidate_init,
            closed_tx,
        ));
        Self {
            client,
            data,
            closed,
        }
    }

    /// Waits for the signal to close, then resumes.
    async fn resume(&mut self) {
        timeout(WAIT, self.closed.recv())
            .await
            .expect("the signal closes")
            .expect("the signal task runs");
        self.client
            .restart(proto::ReconnectReason::RrSignalDisconnected)
            .await
            .expect("the double accepts the resume");
        self.client.set_reconnected().await;
    }

    async fn receive(&mut self, n: usize) -> Vec<proto::DataPacket> {
        let mut packets = Vec::with_capacity(n);
        while packets.len() < n {
            let bytes = timeout(WAIT, self.data.recv())
                .await
                .unwrap_or_else(|_| panic!("{} of {n} packets arrived", packets.len()))
                .expect("the peer runs");
            packets.push(proto::DataPacket::decode(bytes.as_slice()).unwrap());
        }
        packets
    }
}

/// Answers offers, passes trickles on and reports closes. Resumes are the test's to make.
async fn run_signal(
    client: Arc<SignalClient>,
    mut events: SignalEvents,
    peer: mpsc::UnboundedSender<PeerCommand>,
    candidate_init: String,
    closed: mpsc::UnboundedSender<String>,
) {
    while let Some(event) = events.recv().await {
        match event {
            SignalEvent::Message(message) => match *message {
                Response::Offer(offer) => {
                    let (reply, answer) = oneshot::channel();
                    let _ = peer.send(PeerCommand::Offer(offer.sdp, reply));
                    let Ok(answer) = answer.await else { return };
                    client
                        .send(Request::Answer(proto::SessionDescription {
                            r#type: "answer".into(),
                            sdp: answer,
                            id: offer.id,
                            ..Default::default()
                        }))
                        .await;
                    client
                        .send(Request::Trickle(proto::TrickleRequest {
                            candidate_init: candidate_init.clone(),
                            target: proto::SignalTarget::Subscriber as i32,
                            r#final: true,
                        }))
                        .await;
                }
                Response::Trickle(trickle) => {
                    let init: serde_json::Value =
                        serde_json::from_str(&trickle.candidate_init).unwrap();
                    let candidate = init["candidate"].as_str().unwrap().to_owned();
                    let _ = peer.send(PeerCommand::Candidate(candidate));
                }
                _ => {}
            },
            SignalEvent::Close(reason) => {
                let _ = closed.send(reason.into_owned());
            }
        }
    }
}

async fn run_peer(
    socket: UdpSocket,
    local: SocketAddr,
    candidate: Candidate,
    mut commands: mpsc::UnboundedReceiver<PeerCommand>,
    data: mpsc::UnboundedSender<Vec<u8>>,
) {
    str0m::crypto::from_feature_flags().install_process_default();
    let mut rtc = Rtc::builder().build(Instant::now());
    rtc.add_local_candidate(candidate);
    let mut reliable = None;
    let mut buf = vec![0u8; 2048];
    loop {
        let deadline = loop {
            match rtc.poll_output().expect("the client peer runs") {
                Output::Timeout(deadline) => break deadline,
                Output::Transmit(transmit) => {
                    let _ = socket.try_send_to(&transmit.contents, transmit.destination);
                }
                Output::Event(Event::ChannelOpen(id, label)) if label == "_reliable" => {
                    reliable = Some(id)
                }
                Output::Event(Event::ChannelData(message)) if Some(message.id) == reliable => {
                    let _ = data.send(message.data);
                }
                Output::Event(_) => {}
            }
        };
        let input = tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let Ok((n, source)) = received else { continue };
                let Ok(receive) = Receive::new(Protocol::Udp, source, local, &buf[..n]) else {
                    continue;
                };
                rtc.handle_input(Input::Receive(Instant::now(), receive))
            }
            _ = tokio::time::sleep_until(deadline.into()) => rtc.handle_input(Input::Timeout(Instant::now())),
            command = commands.recv() => match command {
                Some(PeerCommand::Offer(sdp, reply)) => {
                    let offer = SdpOffer::from_sdp_string(&sdp).expect("the offer parses");
                    let answer = rtc.sdp_api().accept_offer(offer).expect("the offer is accepted");
                    let _ = reply.send(answer.to_sdp_string());
                    Ok(())
                }
                Some(PeerCommand::Candidate(candidate)) => {
                    rtc.add_remote_candidate(Candidate::from_sdp_string(&candidate).unwrap());
                    Ok(())
                }
                None => return,
            },
        };
        input.expect("the client peer takes its input");
    }
}
