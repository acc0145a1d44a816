//! The upstream vision service, played live through the double: the message shapes and
//! chunking of `framehost capture synth` (OCI-Vision-shaped JSON with a base64 JPEG, split
//! into app-level parts that carry `frame_meta`, each part one LiveKit text stream), sent at
//! a frame rate by a [`Publisher`].
//!
//! Per-frame work is small: a pool of frame messages is rendered once (and cached for the
//! process); each frame copies one, stamps the current time into its `timestamp`, splits it
//! and chunks it. Message ids and stream ids carry a run id unique in the process, so an
//! unbounded run never repeats one.
//!
//! Pacing uses a tokio interval with [`MissedTickBehavior::Delay`]: a frame that is late
//! (the host pushed back, or the machine stalled) is sent at once and the next one a full
//! period after it. The run never bursts to catch up and never skips a frame; it takes
//! longer instead, which [`StreamReport::late_frames`] and [`StreamReport::elapsed`] show.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use framehost::capture::synth::{
    RenderedFrames, SynthError, SynthOptions, chrono_like, render_messages, split_parts,
};
use framehost::streams::send::{Receiver, SendTextOptions, text_stream_packets};
use livekit_protocol::DataPacket;
use livekit_protocol::data_packet::Value;
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Publisher;

/// What to send, how fast, and what to break.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Frames per second. Defaults to 10.
    pub fps: f64,
    /// Approximate size of each JPEG, in KiB (its base64 is a third larger). Defaults to 60.
    pub image_kib: u32,
    /// App-level parts each frame message is split into. Defaults to 4.
    pub parts: u32,
    /// Frames to send; `None` sends until stopped. Defaults to 100.
    pub frames: Option<u64>,
    /// The data-stream topic. Defaults to `agentChat`.
    pub topic: String,
    /// Distinct frames rendered ahead and sent in turn. Defaults to 8.
    pub pool: u32,
    /// What the sender believes the receivers support, which decides inline content and
    /// compression. Defaults to [`Receiver::V2Deflate`] as `capture synth`; a part that
    /// fits 15,000 bytes is then one inline header packet with no chunks.
    pub receiver: Receiver,
    /// Compress with raw deflate when the receiver allows. Defaults to off, as `capture synth`.
    pub compress: bool,
    /// Packet-level faults, each on one frame.
    pub faults: Vec<Fault>,
    /// Have the publisher leave after the last frame (subscribers see it `DISCONNECTED`),
    /// which ends a host job. Defaults to true.
    pub leave_at_end: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            fps: 10.0,
            image_kib: 60,
            parts: 4,
            frames: Some(100),
            topic: "agentChat".into(),
            pool: 8,
            receiver: Receiver::V2Deflate,
            compress: false,
            faults: Vec::new(),
            leave_at_end: true,
        }
    }
}

/// A fault on the packets of one frame (frames count from 0). Faults act before the
/// publisher numbers the packets, so the receiver sees a gap or disorder in the streams, not
/// in the sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Withhold the frame's first chunk packet (its first packet if no part has chunks).
    DropChunk(u64),
    /// Withhold every trailer of the frame, so its streams never end.
    NoTrailer(u64),
    /// Swap the frame's first chunk packet with the packet after it (the next chunk or the
    /// trailer of the same stream); with no chunks, its first two packets.
    Reorder(u64),
}

/// What a run sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamReport {
    pub frames: u64,
    /// Packets handed to the publisher, and their encoded bytes.
    pub packets: u64,
    pub bytes: u64,
    /// Packets withheld by faults.
    pub withheld: u64,
    /// Frames sent more than one period after their time.
    pub late_frames: u64,
    pub elapsed: Duration,
}

/// Sends frames through publishers; clones share the rendered frames.
#[derive(Clone)]
pub struct StreamGenerator {
    options: StreamOptions,
    pool: Arc<Pool>,
}

/// A run started with [`StreamGenerator::spawn`].
pub struct RunningStream {
    stop: CancellationToken,
    task: JoinHandle<StreamReport>,
}

struct Pool {
    frames: RenderedFrames,
    /// Byte offset of each message's `timestamp` text.
    timestamp_at: Vec<usize>,
}

/// The length of `chrono_like`'s text, `2026-01-01T00:00:00.000Z`.
const TIMESTAMP_LEN: usize = 24;

impl StreamGenerator {
    /// Renders the frame pool (or takes it from the process's cache). This is CPU work of
    /// a second or so in a debug build; call it before the clock matters.
    pub fn new(options: StreamOptions) -> Result<Self, SynthError> {
        if options.parts == 0 || options.pool == 0 {
            return Err(SynthError::Invalid(
                "parts and pool must be positive".into(),
            ));
        }
        let pool = pool(&options)?;
        Ok(Self { options, pool })
    }

    pub fn options(&self) -> &StreamOptions {
        &self.options
    }

    /// The frames' size in pixels.
    pub fn frame_size(&self) -> (u32, u32) {
        (self.pool.frames.width, self.pool.frames.height)
    }

    /// Sends the frames through `publisher`, paced at the frame rate.
    pub async fn run(&self, publisher: &Publisher) -> StreamReport {
        self.run_until(publisher, CancellationToken::new()).await
    }

    /// [`run`](Self::run), stopping before the next frame once `stop` is cancelled.
    pub async fn run_until(&self, publisher: &Publisher, stop: CancellationToken) -> StreamReport {
        let run_id = run_id();
        let period = Duration::from_secs_f64(1.0 / self.options.fps);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let started = Instant::now();
        let mut report = StreamReport::default();

        let mut index = 0u64;
        while self.options.frames.is_none_or(|frames| index < frames) {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            if Instant::now() > started + period.mul_f64(index as f64 + 1.0) {
                report.late_frames += 1;
            }

            let mut packets = self.frame_packets(&run_id, index, unix_ms());
            for fault in &self.options.faults {
                report.withheld += apply(*fault, index, &mut packets);
            }
            for packet in packets {
                report.packets += 1;
                report.bytes += packet.encoded_len() as u64;
                publisher.send(packet).await;
            }
            report.frames += 1;
            index += 1;
        }

        if self.options.leave_at_end {
            publisher.leave();
        }
        report.elapsed = started.elapsed();
        report
    }

    /// Runs in a task of its own, owning `publisher`: one per room for many rooms at once.
    pub fn spawn(&self, publisher: Publisher) -> RunningStream {
        let stop = CancellationToken::new();
        let generator = self.clone();
        let token = stop.clone();
        let task = tokio::spawn(async move { generator.run_until(&publisher, token).await });
        RunningStream { stop, task }
    }

    /// The packets of frame `index`, stamped `now_ms`, in wire order.
    fn frame_packets(&self, run_id: &str, index: u64, now_ms: i64) -> Vec<DataPacket> {
        let options = &self.options;
        let slot = (index % self.pool.frames.messages.len() as u64) as usize;
        let mut message = self.pool.frames.messages[slot].clone();
        let at = self.pool.timestamp_at[slot];
        message.replace_range(at..at + TIMESTAMP_LEN, &chrono_like(now_ms));

        let message_id = format!("{run_id}-{index}");
        let mut packets = Vec::new();
        for (part_index, part) in split_parts(&message, options.parts as usize).enumerate() {
            let frame_meta = serde_json::json!({
                "message_id": message_id,
                "frame_index": part_index,
                "total_frames": options.parts,
            });
            let attributes = HashMap::from([("frame_meta".to_owned(), frame_meta.to_string())]);
            let send = SendTextOptions {
                receiver: options.receiver,
                compress: options.compress,
                stream_id: Some(format!("{message_id}-{part_index}")),
                timestamp_ms: Some(now_ms),
                destination_identities: Vec::new(),
            };
            // The publisher stamps its own identity when it forwards.
            let part_packets = text_stream_packets(part, &options.topic, attributes, "", &send)
                .expect("frame_meta is far below the header budget");
            packets.extend(part_packets);
        }
        packets
    }
}

impl RunningStream {
    /// Stops before the next frame.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits for the run to end (stop it first if it is unbounded) and returns its report.
    pub async fn finish(self) -> StreamReport {
        self.task.await.expect("the stream generator panicked")
    }
}

/// Applies `fault` if it is for frame `index`; returns the packets it withheld.
fn apply(fault: Fault, index: u64, packets: &mut Vec<DataPacket>) -> u64 {
    let is_chunk = |p: &DataPacket| matches!(p.value, Some(Value::StreamChunk(_)));
    let first_chunk = packets.iter().position(is_chunk);
    match fault {
        Fault::DropChunk(k) if k == index && !packets.is_empty() => {
            packets.remove(first_chunk.unwrap_or(0));
            1
        }
        Fault::NoTrailer(k) if k == index => {
            let before = packets.len();
            packets.retain(|p| !matches!(p.value, Some(Value::StreamTrailer(_))));
            (before - packets.len()) as u64
        }
        Fault::Reorder(k) if k == index => {
            let i = first_chunk.unwrap_or(0);
            if i + 1 < packets.len() {
                packets.swap(i, i + 1);
            }
            0
        }
        _ => 0,
    }
}

/// The frame pool for `options`, rendered once per process for each image size, pool size
/// and frame rate.
fn pool(options: &StreamOptions) -> Result<Arc<Pool>, SynthError> {
    type Key = (u32, u32, u64);
    static POOLS: OnceLock<Mutex<HashMap<Key, Arc<Pool>>>> = OnceLock::new();
    let key = (options.image_kib, options.pool, options.fps.to_bits());
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(pool) = pools.get(&key) {
        return Ok(pool.clone());
    }

    let synth = SynthOptions {
        image_kib: options.image_kib,
        fps: options.fps,
        ..Default::default()
    };
    let frames = render_messages(&synth, options.pool)?;
    let timestamp_at = frames
        .messages
        .iter()
        .map(|message| {
            let key = "\"timestamp\":\"";
            let at = message.find(key).expect("frame messages carry a timestamp") + key.len();
            assert_eq!(
                message.as_bytes().get(at + TIMESTAMP_LEN),
                Some(&b'"'),
                "a frame timestamp is {TIMESTAMP_LEN} characters"
            );
            at
        })
        .collect();
    let pool = Arc::new(Pool {
        frames,
        timestamp_at,
    });
    pools.insert(key, pool.clone());
    Ok(pool)
}

/// A run id unique in the process and, with the start time in it, across processes.
fn run_id() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static EPOCH: OnceLock<u64> = OnceLock::new();
    let epoch = EPOCH.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        nanos ^ u64::from(std::process::id()) << 40
    });
    format!("{epoch:x}-{}", RUNS.fetch_add(1, Ordering::Relaxed))
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u64) -> DataPacket {
        DataPacket {
            value: Some(Value::StreamChunk(livekit_protocol::data_stream::Chunk {
                chunk_index: i,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn header() -> DataPacket {
        DataPacket {
            value: Some(Value::StreamHeader(Default::default())),
            ..Default::default()
        }
    }

    fn trailer() -> DataPacket {
        DataPacket {
            value: Some(Value::StreamTrailer(Default::default())),
            ..Default::default()
        }
    }

    #[test]
    fn faults_act_on_their_frame_only() {
        let frame = || vec![header(), chunk(0), chunk(1), trailer()];

        let mut packets = frame();
        assert_eq!(apply(Fault::DropChunk(3), 2, &mut packets), 0);
        assert_eq!(packets, frame());

        assert_eq!(apply(Fault::DropChunk(2), 2, &mut packets), 1);
        assert_eq!(packets, vec![header(), chunk(1), trailer()]);

        let mut packets = frame();
        assert_eq!(apply(Fault::Reorder(2), 2, &mut packets), 0);
        assert_eq!(packets, vec![header(), chunk(1), chunk(0), trailer()]);

        let mut packets = frame();
        assert_eq!(apply(Fault::NoTrailer(2), 2, &mut packets), 1);
        assert_eq!(packets, vec![header(), chunk(0), chunk(1)]);
    }

    #[test]
    fn run_ids_differ() {
        assert_ne!(run_id(), run_id());
    }
}
