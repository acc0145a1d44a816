//! Sources: where a job's DataPackets come from.
//!
//! A capture file ([`crate::capture`]) or a LiveKit room ([`crate::livekit`]). A source knows
//! nothing of what the packets carry.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use livekit_protocol::DataPacket;
use serde::{Deserialize, Serialize};

use crate::capture::{CaptureError, CaptureReader};
use crate::livekit::LiveKitSource;

/// Where a job's packets come from, as a job names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceSpec {
    /// A capture file on the host's filesystem.
    Capture {
        path: PathBuf,
        /// Replay at the recorded pace, dropping frames the plugin cannot keep up with, as
        /// a live room would. By default the capture is read as fast as the plugin takes
        /// frames, and nothing is dropped.
        #[serde(default)]
        realtime: bool,
    },
    /// A LiveKit room, joined as a hidden, data-only participant.
    #[serde(rename = "livekit")]
    LiveKit(LiveKitSource),
}

impl SourceSpec {
    /// A short name for the source, shown to the plugin as the job's room.
    pub fn room(&self) -> String {
        match self {
            Self::Capture { path, .. } => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Self::LiveKit(room) => room.room.clone(),
        }
    }
}

/// What a source feeds. `now` is the packet's arrival time on the job's clock.
pub trait PacketSink {
    /// Takes one packet. Returns `false` when the job wants no more packets.
    fn packet(&mut self, packet: DataPacket, now: Instant) -> bool;

    /// Whether the job wants no more packets, asked while the source waits.
    fn stopped(&self) -> bool {
        false
    }
}

/// Longest a paced source sleeps before asking its sink whether the job was stopped.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// How a capture is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// As fast as the sink takes packets; arrival times are still the recorded ones.
    AsFastAsPossible,
    /// Wait until each packet's recorded arrival time.
    Realtime,
}

/// Reads a capture into `sink` on the calling (blocking) thread. Packets arrive on a clock
/// that starts at `start` and advances by the recorded arrival times, so time-based bounds
/// (idle timeouts, age limits) behave as they did when the capture was recorded, whatever the
/// pace. Returns the job clock's time at the end of the capture.
pub fn read_capture<R: std::io::BufRead>(
    reader: &mut CaptureReader<R>,
    start: Instant,
    pacing: Pacing,
    sink: &mut dyn PacketSink,
) -> Result<Instant, CaptureError> {
    let mut last = Duration::ZERO;
    for record in reader {
        let record = record?;
        // Recorded times only move forward, whatever a corrupt file says.
        last = last.max(record.at);
        let now = start + last;
        if pacing == Pacing::Realtime {
            // In short steps: a recorded gap of an hour must not outlast a stop request.
            while let Some(wait) = now.checked_duration_since(Instant::now()) {
                if sink.stopped() {
                    return Ok(now);
                }
                std::thread::sleep(wait.min(STOP_CHECK));
            }
        }
        if !sink.packet(record.packet, now) {
            break;
        }
    }
    Ok(start + last)
}
