//! A LiveKit room as a job's source: the host joins as a hidden, data-only participant and
//! passes on the reliable `DataPacket`s the room carries.
//!
//! Built from LiveKit's own pure-Rust crates — `livekit-signaling` (the signal client, with
//! its ping/pong, resume and held-message queue), `livekit-protocol` (wire types) and
//! `livekit-api` (access tokens) — and [str0m] for the one subscriber peer connection. The
//! official `livekit` client crate is not used: its build downloads a prebuilt libwebrtc, and
//! it brings audio and video machinery a data-only participant never touches.
//!
//! Why str0m rather than webrtc-rs: str0m is sans-IO — a state machine fed with datagrams
//! and the time, that owns no socket, spawns no task and keeps no timer of its own. That is
//! the shape of every stateful stage of this host, so one loop in [`session`] drives the
//! signal client, the peer and the job's stop together, and a job's whole WebRTC state is a
//! value that is dropped with the job. webrtc-rs would bring its own tasks and timers per
//! peer connection and callbacks to bridge them; it remains the fallback if str0m ever fails
//! to interoperate with a real SFU. See `docs/livekit-participant.md` for the protocol
//! details and the risks (no TURN or ICE-TCP client in str0m: the host needs UDP to the
//! SFU).
//!
//! Bounds: packets wait for the job in a [`PacketQueue`] bounded by count and bytes (a full
//! queue drops the packet and counts `livekit_queue_full`; the data-stream stage then sees
//! the gap); the de-duplication map holds at most `max_senders` senders; a single packet is
//! at most 256 KiB (str0m's largest data-channel message).

pub mod dedup;
pub mod peer;
pub mod session;
pub mod token;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use livekit_protocol::DataPacket;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use session::{Credentials, RetryPolicy, SessionConfig, SessionEnd, SessionError};
pub use token::{ApiKey, Secret};

/// A LiveKit room, as a job names it:
/// `{"livekit": {"room": "...", "source_identity": "...", ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveKitSource {
    /// The room to join.
    pub room: String,
    /// The server; defaults to the host's `livekit.url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A token to join with. Without one the host mints its own from `livekit.api_key` and
    /// `livekit.api_secret`. Never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// The participant that publishes the frames. When it leaves (and does not return
    /// within `livekit.source_grace_ms`) the job ends. Without it, the job ends when the
    /// last other participant has left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    /// Longest the job may run; defaults to the host's `livekit.max_duration_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_secs: Option<u64>,
    /// The job ends after this long without a frame; defaults to the host's
    /// `livekit.idle_timeout_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
}

impl LiveKitSource {
    /// Checks what the job itself got wrong (not what the host lacks).
    pub fn validate(&self) -> Result<(), String> {
        if self.room.is_empty() {
            return Err("the LiveKit room is empty".into());
        }
        if self.token.as_ref().is_some_and(Secret::is_empty) {
            return Err("the LiveKit token is empty".into());
        }
        if self.max_duration_secs == Some(0) || self.idle_timeout_secs == Some(0) {
            return Err("max_duration_secs and idle_timeout_secs must be at least 1".into());
        }
        Ok(())
    }
}

/// What a session counts; shared with the job, which copies it into its report.
#[derive(Debug, Default)]
pub struct LiveKitStats {
    /// `DataPacket`s received on `_reliable`.
    pub packets: AtomicU64,
    /// Dropped as already seen (sequence not above the sender's last).
    pub duplicates: AtomicU64,
    /// Messages on other data channels (`_lossy`, ...), not used.
    pub other_channels: AtomicU64,
    /// Messages on `_reliable` that are not a `DataPacket`.
    pub undecodable: AtomicU64,
    /// End-to-end encrypted packets, which this host cannot read.
    pub encrypted: AtomicU64,
    /// Dropped because the job's packet queue was full.
    pub queue_full: AtomicU64,
    /// Signal connections resumed.
    pub resumes: AtomicU64,
    /// Full rejoins after a connection could not be resumed.
    pub rejoins: AtomicU64,
    /// Senders forgotten by de-duplication because `max_senders` were remembered.
    pub senders_evicted: AtomicU64,
    /// ICE candidates from the server past the per-offer bound.
    pub candidates_dropped: AtomicU64,
    /// Participants not tracked because the roster bound was reached.
    pub roster_full: AtomicU64,
}

impl LiveKitStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn report(&self) -> LiveKitReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LiveKitReport {
            packets: get(&self.packets),
            duplicates: get(&self.duplicates),
            other_channels: get(&self.other_channels),
            undecodable: get(&self.undecodable),
            encrypted: get(&self.encrypted),
            queue_full: get(&self.queue_full),
            resumes: get(&self.resumes),
            rejoins: get(&self.rejoins),
            senders_evicted: get(&self.senders_evicted),
            candidates_dropped: get(&self.candidates_dropped),
            roster_full: get(&self.roster_full),
        }
    }
}

/// [`LiveKitStats`] as a job report shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveKitReport {
    pub packets: u64,
    pub duplicates: u64,
    pub other_channels: u64,
    pub undecodable: u64,
    pub encrypted: u64,
    pub queue_full: u64,
    pub resumes: u64,
    pub rejoins: u64,
    pub senders_evicted: u64,
    pub candidates_dropped: u64,
    pub roster_full: u64,
}

/// A packet as it arrived.
#[derive(Debug)]
pub struct Arrived {
    pub packet: DataPacket,
    pub at: Instant,
    bytes: usize,
}

/// Packets on their way from a session to its job, bounded by count and by encoded bytes.
///
/// The session never waits on it: a full queue refuses the packet ([`PacketQueue::try_push`]
/// returns `false`) and the session counts the drop, so a slow job never stalls the peer
/// connection's keepalives.
#[derive(Debug)]
pub struct PacketQueue {
    tx: mpsc::Sender<Arrived>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The job's end of a [`PacketQueue`]. It ends when the session has ended and every packet
/// was taken.
#[derive(Debug)]
pub struct PacketReceiver {
    rx: mpsc::Receiver<Arrived>,
    bytes: Arc<AtomicUsize>,
}

impl PacketQueue {
    pub fn new(max_packets: usize, max_bytes: usize) -> (Self, PacketReceiver) {
        let (tx, rx) = mpsc::channel(max_packets.max(1));
        let bytes = Arc::new(AtomicUsize::new(0));
        (
            Self {
                tx,
                bytes: bytes.clone(),
                max_bytes,
            },
            PacketReceiver { rx, bytes },
        )
    }

    /// Queues a packet whose encoded size was `bytes`; `false` if the queue is full.
    pub fn try_push(&self, packet: DataPacket, at: Instant, bytes: usize) -> bool {
        let held = self.bytes.load(Ordering::Relaxed);
        if held.saturating_add(bytes) > self.max_bytes {
            return false;
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let arrived = Arrived { packet, at, bytes };
        if self.tx.try_send(arrived).is_err() {
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }
}

impl PacketReceiver {
    pub async fn recv(&mut self) -> Option<Arrived> {
        let arrived = self.rx.recv().await?;
        self.bytes.fetch_sub(arrived.bytes, Ordering::Relaxed);
        Some(arrived)
    }

    /// A packet if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Result<Arrived, mpsc::error::TryRecvError> {
        let arrived = self.rx.try_recv()?;
        self.bytes.fetch_sub(arrived.bytes, Ordering::Relaxed);
        Ok(arrived)
    }
}

/// Longest a job waits for its session to leave the room once the job has ended. Leaving
/// takes two bounded requests; a session that is still there after this is dropped.
pub const SESSION_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(6);

/// Makes str0m's pure-Rust crypto the process default; later calls do nothing.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| str0m::crypto::from_feature_flags().install_process_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_queue_is_bounded_by_count_and_bytes() {
        let t = Instant::now();
        let (queue, mut rx) = PacketQueue::new(2, 100);
        assert!(queue.try_push(DataPacket::default(), t, 60));
        assert!(
            !queue.try_push(DataPacket::default(), t, 60),
            "over the byte bound"
        );
        assert!(queue.try_push(DataPacket::default(), t, 30));
        assert!(
            !queue.try_push(DataPacket::default(), t, 1),
            "over the count bound"
        );
        assert_eq!(rx.recv().await.unwrap().bytes, 60);
        assert!(queue.try_push(DataPacket::default(), t, 60), "room again");
        drop(queue);
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_none(), "ends when the session is gone");
    }
}
