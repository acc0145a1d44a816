//! The server side of one subscriber's peer connection: a str0m `Rtc` on its own UDP socket
//! on 127.0.0.1, driven by one tokio task.
//!
//! The double is the offerer, as a LiveKit server is on the v0 path: it offers one
//! `m=application` line with the in-band channels `_reliable` (ordered, reliable) and `_lossy`
//! (unordered, no retransmits), and forwards data on `_reliable` once its open is acked.
//!
//! Packets reach the task through a bounded queue ([`QUEUE_PACKETS`] packets and
//! [`QUEUE_BYTES`] bytes). The task takes the next packet only while SCTP accepts writes, so
//! a slow receiver fills the queue and [`PeerHandle::send`] waits: the publisher feels the
//! backpressure and the double never drops on its own. The task never blocks on a sender.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId, Reliability};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The most packets queued for one subscriber before senders wait.
pub const QUEUE_PACKETS: usize = 4096;
/// The most bytes queued for one subscriber before senders wait: 64 MiB.
pub const QUEUE_BYTES: usize = 64 << 20;

/// SCTP buffer level below which str0m reports `ChannelBufferedAmountLow`.
const BUFFERED_LOW: usize = 64 * 1024;
/// Writes per turn of the loop before the task goes back to transmitting and reading.
const WRITE_BATCH: usize = 64;

/// Packet counters shared by a room's peers.
#[derive(Debug, Default)]
pub struct Counters {
    pub forwarded: AtomicU64,
    pub forwarded_bytes: AtomicU64,
    pub dropped: AtomicU64,
}

/// What the signal session sends to a peer task.
enum Command {
    /// The client's answer to the last offer.
    Answer(String),
    /// A candidate the client trickled (the `candidate:` attribute string).
    RemoteCandidate(String),
    /// Make a new offer with new ICE credentials; replies with its SDP.
    IceRestart(oneshot::Sender<Result<String, String>>),
}

struct Outgoing {
    bytes: Arc<Vec<u8>>,
    _permit: OwnedSemaphorePermit,
}

/// The handle the room keeps for a subscriber's peer. Dropping every handle ends the task.
#[derive(Clone)]
pub struct PeerHandle {
    commands: mpsc::UnboundedSender<Command>,
    data: mpsc::Sender<Outgoing>,
    bytes: Arc<Semaphore>,
    ready: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

/// A started peer and what the signal session must tell the client about it.
pub struct NewPeer {
    pub handle: PeerHandle,
    /// The subscriber offer.
    pub offer: String,
    /// The host candidate as a trickle `candidate_init` JSON string.
    pub candidate_init: String,
}

/// Installs str0m's crypto backend once per process.
fn install_crypto() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| str0m::crypto::from_feature_flags().install_process_default());
}

/// Binds a UDP socket, makes the subscriber offer and starts the task that drives the peer.
pub async fn start(
    ice_lite: bool,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) -> std::io::Result<NewPeer> {
    install_crypto();
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let local = socket.local_addr()?;

    let mut rtc = RtcConfig::new()
        .set_ice_lite(ice_lite)
        .build(Instant::now());
    let candidate = Candidate::host(local, "udp")
        .map_err(|e| std::io::Error::other(format!("host candidate: {e}")))?;
    rtc.add_local_candidate(candidate.clone());

    let mut sdp = rtc.sdp_api();
    sdp.add_channel_with_config(ChannelConfig {
        label: "_reliable".into(),
        ordered: true,
        reliability: Reliability::Reliable,
        ..Default::default()
    });
    sdp.add_channel_with_config(ChannelConfig {
        label: "_lossy".into(),
        ordered: false,
        reliability: Reliability::MaxRetransmits { retransmits: 0 },
        ..Default::default()
    });
    let (offer, pending) = sdp
        .apply()
        .expect("adding channels always needs a negotiation");
    let offer = offer.to_sdp_string();
    let candidate_init = candidate_init(&candidate, &offer);

    let (commands, command_rx) = mpsc::unbounded_channel();
    let (data, data_rx) = mpsc::channel(QUEUE_PACKETS);
    let handle = PeerHandle {
        commands,
        data,
        bytes: Arc::new(Semaphore::new(QUEUE_BYTES)),
        ready: Arc::new(AtomicBool::new(false)),
        counters,
    };
    let peer = Peer {
        rtc,
        socket,
        local,
        pending: Some(pending),
        reliable: None,
        ice_connected: false,
        ready: handle.ready.clone(),
        bytes: handle.bytes.clone(),
        counters: handle.counters.clone(),
        next: None,
    };
    tokio::spawn(peer.run(command_rx, data_rx, cancel));
    Ok(NewPeer {
        handle,
        offer,
        candidate_init,
    })
}

impl PeerHandle {
    /// Whether `_reliable` is open and ICE is connected: only then are packets forwarded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn answer(&self, sdp: String) {
        let _ = self.commands.send(Command::Answer(sdp));
    }

    pub fn remote_candidate(&self, candidate: String) {
        let _ = self.commands.send(Command::RemoteCandidate(candidate));
    }

    /// A new offer with new ICE credentials on the same `Rtc`: DTLS, SCTP and the channels
    /// survive it.
    pub async fn ice_restart(&self) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::IceRestart(reply))
            .map_err(|_| "the peer has ended".to_owned())?;
        answer.await.map_err(|_| "the peer has ended".to_owned())?
    }

    /// Queues `bytes` for `_reliable`, waiting while the subscriber's queue is full. Returns
    /// false, and counts a drop, if the peer ended before taking it.
    pub async fn send(&self, bytes: Arc<Vec<u8>>) -> bool {
        let cost = bytes.len().clamp(1, QUEUE_BYTES) as u32;
        let Ok(permit) = self.bytes.clone().acquire_many_owned(cost).await else {
            return self.dropped();
        };
        let outgoing = Outgoing {
            bytes,
            _permit: permit,
        };
        if self.data.send(outgoing).await.is_err() {
            return self.dropped();
        }
        true
    }

    /// Queues `bytes` unless the subscriber's queue is full, in which case the packet is
    /// dropped and counted.
    pub fn try_send(&self, bytes: Arc<Vec<u8>>) -> bool {
        let cost = bytes.len().clamp(1, QUEUE_BYTES) as u32;
        let Ok(permit) = self.bytes.clone().try_acquire_many_owned(cost) else {
            return self.dropped();
        };
        let outgoing = Outgoing {
            bytes,
            _permit: permit,
        };
        if self.data.try_send(outgoing).is_err() {
            return self.dropped();
        }
        true
    }

    fn dropped(&self) -> bool {
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// The state the peer task owns.
struct Peer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    /// The offer waiting for its answer.
    pending: Option<SdpPendingOffer>,
    reliable: Option<ChannelId>,
    ice_connected: bool,
    ready: Arc<AtomicBool>,
    bytes: Arc<Semaphore>,
    counters: Arc<Counters>,
    /// A packet taken from the queue that SCTP has not accepted yet.
    next: Option<Outgoing>,
}

impl Peer {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut data: mpsc::Receiver<Outgoing>,
        cancel: CancellationToken,
    ) {
        let mut buf = vec![0u8; 2048];
        loop {
            self.write_queued(&mut data);
            let deadline = match self.drive() {
                Ok(deadline) => deadline,
                Err(error) => {
                    tracing::debug!(%error, "Subscriber peer failed");
                    break;
                }
            };
            let ready = self.is_ready();
            let take = self.next.is_none();

            tokio::select! {
                _ = cancel.cancelled() => break,
                received = self.socket.recv_from(&mut buf) => {
                    let Ok((n, source)) = received else { continue };
                    let Ok(receive) = Receive::new(Protocol::Udp, source, self.local, &buf[..n])
                    else {
                        continue;
                    };
                    if let Err(error) = self.rtc.handle_input(Input::Receive(Instant::now(), receive)) {
                        tracing::debug!(%error, "Subscriber peer refused a datagram");
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if let Err(error) = self.rtc.handle_input(Input::Timeout(Instant::now())) {
                        tracing::debug!(%error, "Subscriber peer timeout failed");
                        break;
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                outgoing = data.recv(), if take => match outgoing {
                    // Packets queued while the path is down are lost, as on a real SFU
                    // whose subscriber has gone: a dead subscriber must not stall senders.
                    Some(outgoing) if !ready => self.drop_packet(outgoing),
                    Some(outgoing) => self.next = Some(outgoing),
                    None => break,
                },
            }
        }

        self.ready.store(false, Ordering::Release);
        self.bytes.close();
        data.close();
        while let Ok(outgoing) = data.try_recv() {
            self.drop_packet(outgoing);
        }
        if let Some(outgoing) = self.next.take() {
            self.drop_packet(outgoing);
        }
    }

    fn is_ready(&self) -> bool {
        self.reliable.is_some() && self.ice_connected
    }

    /// Polls str0m until it wants time to pass: sends what it transmits, handles its events.
    fn drive(&mut self) -> Result<Instant, str0m::RtcError> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(deadline) => return Ok(deadline),
                Output::Transmit(transmit) => {
                    // Loopback UDP does not block; a datagram lost to a full socket buffer is
                    // recovered by SCTP like any loss.
                    let _ = self
                        .socket
                        .try_send_to(&transmit.contents, transmit.destination);
                }
                Output::Event(event) => self.event(event),
            }
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::ChannelOpen(id, label) if label == "_reliable" => {
                if let Some(mut channel) = self.rtc.channel(id) {
                    channel.set_buffered_amount_low_threshold(BUFFERED_LOW);
                }
                self.reliable = Some(id);
                self.ice_connected = true;
            }
            Event::ChannelClose(id) if Some(id) == self.reliable => self.reliable = None,
            Event::IceConnectionStateChange(state) => {
                self.ice_connected = match state {
                    IceConnectionState::Connected | IceConnectionState::Completed => true,
                    IceConnectionState::Disconnected => false,
                    // Checking during an ICE restart keeps the old pair working.
                    IceConnectionState::New | IceConnectionState::Checking => self.ice_connected,
                };
            }
            // The queue is retried on every turn of the loop; this event only wakes it.
            Event::ChannelBufferedAmountLow(_) => {}
            _ => {}
        }
        self.ready.store(self.is_ready(), Ordering::Release);
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Answer(sdp) => {
                let Some(pending) = self.pending.take() else {
                    tracing::warn!("Subscriber answered with no offer pending");
                    return;
                };
                let result = SdpAnswer::from_sdp_string(&sdp)
                    .map_err(|e| e.to_string())
                    .and_then(|answer| {
                        self.rtc
                            .sdp_api()
                            .accept_answer(pending, answer)
                            .map_err(|e| e.to_string())
                    });
                if let Err(error) = result {
                    tracing::warn!(%error, "Subscriber answer refused");
                }
            }
            Command::RemoteCandidate(candidate) => match Candidate::from_sdp_string(&candidate) {
                Ok(candidate) => self.rtc.add_remote_candidate(candidate),
                Err(error) => tracing::warn!(%error, candidate, "Bad trickled candidate"),
            },
            Command::IceRestart(reply) => {
                let mut sdp = self.rtc.sdp_api();
                sdp.ice_restart(true);
                let result = match sdp.apply() {
                    Some((offer, pending)) => {
                        self.pending = Some(pending);
                        Ok(offer.to_sdp_string())
                    }
                    None => Err("an ICE restart made no offer".to_owned()),
                };
                let _ = reply.send(result);
            }
        }
    }

    /// Writes queued packets to `_reliable` while SCTP accepts them, a batch at a time.
    fn write_queued(&mut self, data: &mut mpsc::Receiver<Outgoing>) {
        let Some(id) = self.reliable.filter(|_| self.ice_connected) else {
            return;
        };
        for _ in 0..WRITE_BATCH {
            let Some(outgoing) = self.next.take().or_else(|| data.try_recv().ok()) else {
                return;
            };
            let Some(mut channel) = self.rtc.channel(id) else {
                self.next = Some(outgoing);
                return;
            };
            match channel.write(true, &outgoing.bytes) {
                Ok(true) => {
                    self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .forwarded_bytes
                        .fetch_add(outgoing.bytes.len() as u64, Ordering::Relaxed);
                }
                Ok(false) => {
                    self.next = Some(outgoing);
                    return;
                }
                Err(error) => {
                    tracing::debug!(%error, "Write to _reliable failed");
                    self.drop_packet(outgoing);
                }
            }
        }
    }

    fn drop_packet(&self, _outgoing: Outgoing) {
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// The trickle `candidate_init` for `candidate`, in the browser's JSON shape, naming the
/// offer's first media section as pion does.
fn candidate_init(candidate: &Candidate, offer: &str) -> String {
    let mid = offer
        .lines()
        .find_map(|line| line.strip_prefix("a=mid:"))
        .unwrap_or("0")
        .trim();
    let init = HashMap::from([
        (
            "candidate",
            serde_json::Value::from(candidate.to_sdp_string()),
        ),
        ("sdpMid", mid.into()),
        ("sdpMLineIndex", 0.into()),
    ]);
    serde_json::to_string(&init).expect("a map of strings and numbers serializes")
}
