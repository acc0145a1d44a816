//! Data-stream reassembly: LiveKit stream header / chunk / trailer packets in, one whole text
//! per stream out.
//!
//! [`DataStreams`] is a sans-IO state machine. The caller feeds it every [`DataPacket`] the
//! room delivers together with the current time, and calls [`DataStreams::expire`] whenever
//! [`DataStreams::next_deadline`] passes. It reads no clock, spawns nothing and owns no
//! channel; everything it emits goes into the caller's `Vec<StreamEvent>`.
//!
//! We do not use the incoming side of `livekit-data-stream`: its readers sit behind unbounded
//! channels and a stream whose trailer never comes stays open forever. The wire format is the
//! same (see [`send`] for the sending side, used by capture and test generators).

mod inflate;
pub mod send;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use livekit_protocol::DataPacket;
use livekit_protocol::data_packet::Value;
use livekit_protocol::data_stream::{
    Chunk, CompressionType, Header, Trailer, header::ContentHeader,
};

use self::inflate::{BoundedInflater, Budget};

pub use self::send::{Receiver, SendTextError, SendTextOptions, text_stream_packets};

/// The bounds of [`DataStreams`]. Every one trips as a [`StreamRejection`] whose
/// [`reason`](StreamRejection::reason) label names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// The only topic read at all. Headers on other topics open nothing and are counted in
    /// [`IgnoredPackets::other_topic`]. Defaults to `"agentChat"`.
    pub topic: String,

    /// The most bytes one stream may carry, counted after decompression. A header declaring
    /// more (`total_length`) is rejected at once as `declared_too_large`; a stream that grows
    /// past it is rejected as `stream_too_large` and its buffer freed. A deflate stream is
    /// inflated into a buffer of at most this size, so a deflate bomb stops here. Defaults to
    /// 16 MiB.
    pub max_stream_bytes: usize,

    /// The most bytes all open streams may hold together (buffer capacity). A stream whose
    /// growth would pass it is rejected as `buffers_full`. Defaults to 64 MiB, which is also
    /// the stage's worst case: without it the bound would be
    /// `max_open_streams × max_stream_bytes` (1 GiB with the defaults).
    pub max_buffered_bytes: usize,

    /// The most streams open (header seen, trailer not yet) at once. A header that would open
    /// one more is rejected as `too_many_open_streams`: the newcomer is refused and the open
    /// streams are kept, so a burst of new streams cannot push out streams that are halfway
    /// through. Inline streams complete at their header and never count. Defaults to 64.
    pub max_open_streams: usize,

    /// How long an open stream may go without a packet before it is dropped as
    /// `idle_timeout` (a trailer that never comes). Measured from the stream's last packet.
    /// Defaults to 10 seconds.
    pub idle_timeout: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            topic: "agentChat".to_owned(),
            max_stream_bytes: 16 * 1024 * 1024,
            max_buffered_bytes: 64 * 1024 * 1024,
            max_open_streams: 64,
            idle_timeout: Duration::from_secs(10),
        }
    }
}

/// One completed text stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextStream {
    /// The sender's stream id.
    pub stream_id: String,
    /// The sending participant's identity (`DataPacket::participant_identity`).
    pub sender: String,
    /// The stream's topic (always [`StreamLimits::topic`]).
    pub topic: String,
    /// The header's attributes, with the trailer's attributes merged over them.
    pub attributes: HashMap<String, String>,
    /// The stream's whole text, decompressed and checked to be UTF-8. Its capacity is its
    /// length: nothing past the text stays allocated.
    pub text: String,
}

/// What [`DataStreams`] emits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// A stream completed.
    Text(TextStream),
    /// A stream was dropped; everything it held is freed.
    Rejected(StreamRejected),
}

/// A stream that was dropped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamRejected {
    pub stream_id: String,
    pub sender: String,
    pub reason: StreamRejection,
}

/// Why a stream was dropped. [`reason`](Self::reason) gives a short label for metrics.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamRejection {
    /// The sender's identity or the stream id is longer than [`MAX_ID_BYTES`]; both are
    /// kept for the stream's life, so they are bounded like its content.
    #[error("sender identity or stream id longer than {limit} bytes")]
    IdTooLong { limit: usize },

    /// The header's attributes take more than [`MAX_ATTRIBUTE_BYTES`] (keys and values).
    #[error("header attributes take {bytes} bytes, more than the limit of {limit}")]
    AttributesTooLarge { bytes: usize, limit: usize },

    /// The header declared more bytes than [`StreamLimits::max_stream_bytes`].
    #[error("header declares {declared} bytes, more than the limit of {limit}")]
    DeclaredTooLarge { declared: u64, limit: usize },

    /// The stream grew past [`StreamLimits::max_stream_bytes`] (after decompression).
    #[error("stream grew past the limit of {limit} bytes")]
    TooLarge { limit: usize },

    /// The stream's growth would have passed [`StreamLimits::max_buffered_bytes`].
    #[error("all open streams together would hold more than {limit} bytes")]
    BuffersFull { limit: usize },

    /// [`StreamLimits::max_open_streams`] streams were already open.
    #[error("{limit} streams are already open")]
    TooManyOpenStreams { limit: usize },

    /// No packet for [`StreamLimits::idle_timeout`].
    #[error("no packet for {idle:?}; {received_bytes} bytes received")]
    IdleTimeout {
        idle: Duration,
        received_bytes: usize,
    },

    /// A chunk arrived past a missing one; the stream is never stitched around a hole.
    #[error("expected chunk {expected}, received chunk {received}")]
    ChunkGap { expected: u64, received: u64 },

    /// The header's `total_length` does not match the bytes the stream carried.
    #[error("header declares {declared} bytes, stream carried {received}")]
    LengthMismatch { declared: u64, received: u64 },

    /// The completed stream is not UTF-8.
    #[error("text is not UTF-8 (valid up to byte {valid_up_to})")]
    InvalidUtf8 { valid_up_to: usize },

    /// The raw-deflate content is corrupt, truncated, or followed by trailing bytes.
    #[error("raw deflate content is corrupt or truncated")]
    DecompressFailed,

    /// The header names a compression this host does not know.
    #[error("unknown compression type {0}")]
    UnknownCompression(i32),

    /// The sender ended the stream early with a reason in its trailer.
    #[error("sender aborted the stream: {reason}")]
    Aborted { reason: String },
}

impl StreamRejection {
    /// A short snake_case label, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::IdTooLong { .. } => "id_too_long",
            Self::AttributesTooLarge { .. } => "attributes_too_large",
            Self::DeclaredTooLarge { .. } => "declared_too_large",
            Self::TooLarge { .. } => "stream_too_large",
            Self::BuffersFull { .. } => "buffers_full",
            Self::TooManyOpenStreams { .. } => "too_many_open_streams",
            Self::IdleTimeout { .. } => "idle_timeout",
            Self::ChunkGap { .. } => "chunk_gap",
            Self::LengthMismatch { .. } => "length_mismatch",
            Self::InvalidUtf8 { .. } => "invalid_utf8",
            Self::DecompressFailed => "decompress_failed",
            Self::UnknownCompression(_) => "unknown_compression",
            Self::Aborted { .. } => "aborted",
        }
    }
}

/// Packets that were dropped without an event, by cause. They are normal traffic (other
/// topics, other kinds of packets, retransmissions), so they are counted, not reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IgnoredPackets {
    /// Packets that are not data-stream packets (user packets, transcriptions, RPC, …).
    pub not_stream: u64,
    /// Headers on a topic other than [`StreamLimits::topic`].
    pub other_topic: u64,
    /// Headers of byte streams (or with no content header) on our topic.
    pub byte_stream: u64,
    /// Chunks and trailers of streams that are not open: other topics, byte streams, streams
    /// already completed or rejected.
    pub unknown_stream: u64,
    /// Chunks whose index was already received.
    pub duplicate_chunk: u64,
    /// Headers for a stream that is already open (the open stream is kept).
    pub duplicate_header: u64,
}

/// Reassembles the text streams of one topic from DataPackets.
///
/// # Bounds
///
/// | bound | default | past it | label |
/// | --- | --- | --- | --- |
/// | bytes of one stream, after decompression | 16 MiB | stream dropped, buffer freed | `stream_too_large` (`declared_too_large` if its header said so) |
/// | bytes of all open streams | 64 MiB | the growing stream is dropped | `buffers_full` |
/// | open streams | 64 | the new stream is refused | `too_many_open_streams` |
/// | time since a stream's last packet | 10 s | stream dropped by [`expire`](Self::expire) | `idle_timeout` |
///
/// Buffers grow with the bytes that actually arrive, by doubling capped at the limits above;
/// a header's `total_length` is checked but never used to reserve memory. On top of its text
/// buffer, an open compressed stream holds the inflater's state (a 32 KiB window and its
/// tables, about 50 KiB), which [`bytes_held`](Self::bytes_held) does not count.
///
/// Streams are keyed by (sender identity, stream id), so two senders cannot collide.
///
/// Chunks must arrive in index order from 0, as the reliable data channel delivers them: a
/// chunk past a missing one drops the stream as `chunk_gap` (it is never stitched around the
/// hole), and a chunk whose index was already received is ignored as a retransmission. A
/// duplicate chunk does not count as activity for the idle timeout.
#[derive(Debug)]
pub struct DataStreams {
    limits: StreamLimits,
    open: HashMap<StreamKey, OpenStream>,
    /// Sum of the capacities of the open streams' buffers.
    held: usize,
    /// Streams opened so far; orders expiry reports.
    opened: u64,
    ignored: IgnoredPackets,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StreamKey {
    sender: String,
    stream_id: String,
}

#[derive(Debug)]
struct OpenStream {
    attributes: HashMap<String, String>,
    declared_length: Option<u64>,
    next_chunk: u64,
    /// The text so far (decompressed); its capacity is bounded by the limits.
    buffer: Vec<u8>,
    inflater: Option<BoundedInflater>,
    last_packet_at: Instant,
    /// Order of opening, so expiry reports streams in a stable order.
    opened_seq: u64,
}

/// Smallest buffer a growing stream reserves, so tiny chunks don't reallocate every time.
const MIN_BUFFER_BYTES: usize = 16 * 1024;

impl DataStreams {
    pub fn new(limits: StreamLimits) -> Self {
        Self {
            limits,
            open: HashMap::new(),
            held: 0,
            opened: 0,
            ignored: IgnoredPackets::default(),
        }
    }

    pub fn limits(&self) -> &StreamLimits {
        &self.limits
    }

    /// Feeds one packet received at `now`; completed and rejected streams go into `out`.
    pub fn push(&mut self, packet: DataPacket, now: Instant, out: &mut Vec<StreamEvent>) {
        let sender = packet.participant_identity;
        match packet.value {
            Some(Value::StreamHeader(header)) => self.on_header(sender, header, now, out),
            Some(Value::StreamChunk(chunk)) => self.on_chunk(sender, chunk, now, out),
            Some(Value::StreamTrailer(trailer)) => self.on_trailer(sender, trailer, out),
            _ => self.ignored.not_stream += 1,
        }
    }

    /// Drops every stream idle for [`StreamLimits::idle_timeout`] at `now`, reporting each
    /// once as `idle_timeout`, in the order the streams were opened.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<StreamEvent>) {
        let idle_timeout = self.limits.idle_timeout;
        let mut expired: Vec<(u64, StreamKey)> = self
            .open
            .iter()
            .filter(|(_, stream)| now >= stream.last_packet_at + idle_timeout)
            .map(|(key, stream)| (stream.opened_seq, key.clone()))
            .collect();
        expired.sort_unstable_by_key(|(seq, _)| *seq);

        for (_, key) in expired {
            let stream = self.remove(&key);
            let reason = StreamRejection::IdleTimeout {
                idle: now.duration_since(stream.last_packet_at),
                received_bytes: stream.buffer.len(),
            };
            out.push(rejected(key, reason));
        }
    }

    /// When [`expire`](Self::expire) next has something to do, if any stream is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open
            .values()
            .map(|stream| stream.last_packet_at + self.limits.idle_timeout)
            .min()
    }

    /// Bytes allocated for the open streams' text (buffer capacity, not counting inflater
    /// state). Zero when no stream is open.
    pub fn bytes_held(&self) -> usize {
        self.held
    }

    pub fn open_streams(&self) -> usize {
        self.open.len()
    }

    /// Counts of packets dropped without an event, since this was created.
    pub fn ignored(&self) -> IgnoredPackets {
        self.ignored
    }

    fn on_header(
        &mut self,
        sender: String,
        mut header: Header,
        now: Instant,
        out: &mut Vec<StreamEvent>,
    ) {
        if header.topic != self.limits.topic {
            self.ignored.other_topic += 1;
            return;
        }
        if !matches!(header.content_header, Some(ContentHeader::TextHeader(_))) {
            self.ignored.byte_stream += 1;
            return;
        }

        if sender.len() > MAX_ID_BYTES || header.stream_id.len() > MAX_ID_BYTES {
            // The rejection names the stream by a short prefix: the ids go into logs.
            let key = StreamKey {
                sender: truncated(&sender),
                stream_id: truncated(&header.stream_id),
            };
            out.push(rejected(
                key,
                StreamRejection::IdTooLong {
                    limit: MAX_ID_BYTES,
                },
            ));
            return;
        }
        let key = StreamKey {
            sender,
            stream_id: std::mem::take(&mut header.stream_id),
        };
        let attribute_bytes: usize = header
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if attribute_bytes > MAX_ATTRIBUTE_BYTES {
            let reason = StreamRejection::AttributesTooLarge {
                bytes: attribute_bytes,
                limit: MAX_ATTRIBUTE_BYTES,
            };
            out.push(rejected(key, reason));
            return;
        }
        if self.open.contains_key(&key) {
            self.ignored.duplicate_header += 1;
            return;
        }

        if let Some(declared) = header.total_length
            && declared > self.limits.max_stream_bytes as u64
        {
            let limit = self.limits.max_stream_bytes;
            out.push(rejected(
                key,
                StreamRejection::DeclaredTooLarge { declared, limit },
            ));
            return;
        }

        let compressed = match CompressionType::try_from(header.compression) {
            Ok(CompressionType::None) => false,
            Ok(CompressionType::DeflateRaw) => true,
            Err(_) => {
                let reason = StreamRejection::UnknownCompression(header.compression);
                out.push(rejected(key, reason));
                return;
            }
        };

        let mut stream = OpenStream {
            attributes: std::mem::take(&mut header.attributes),
            declared_length: header.total_length,
            next_chunk: 0,
            buffer: Vec::new(),
            inflater: compressed.then(BoundedInflater::new),
            last_packet_at: now,
            opened_seq: 0,
        };

        // Inline content is the whole stream: no chunk or trailer follows, so it completes
        // here and never takes an open-stream slot.
        if let Some(content) = header.inline_content.take() {
            let result = match stream.inflater {
                None if content.len() > self.limits.max_stream_bytes => {
                    Err(StreamRejection::TooLarge {
                        limit: self.limits.max_stream_bytes,
                    })
                }
                None => {
                    stream.buffer = content;
                    Ok(())
                }
                Some(ref mut inflater) => {
                    let budget = self.budget(0);
                    inflater.feed(&content, &mut stream.buffer, &budget)
                }
            };
            let event = match result.and_then(|()| stream.finish(key.clone(), header.topic)) {
                Ok(text) => StreamEvent::Text(text),
                Err(reason) => rejected(key, reason),
            };
            out.push(event);
            return;
        }

        if self.open.len() >= self.limits.max_open_streams {
            let limit = self.limits.max_open_streams;
            out.push(rejected(key, StreamRejection::TooManyOpenStreams { limit }));
            return;
        }

        stream.opened_seq = self.opened;
        self.opened += 1;
        self.open.insert(key, stream);
    }

    fn on_chunk(&mut self, sender: String, chunk: Chunk, now: Instant, out: &mut Vec<StreamEvent>) {
        let key = StreamKey {
            sender,
            stream_id: chunk.stream_id,
        };
        let Some(stream) = self.open.get(&key) else {
            self.ignored.unknown_stream += 1;
            return;
        };

        if chunk.chunk_index < stream.next_chunk {
            self.ignored.duplicate_chunk += 1;
            return;
        }
        if chunk.chunk_index > stream.next_chunk {
            let reason = StreamRejection::ChunkGap {
                expected: stream.next_chunk,
                received: chunk.chunk_index,
            };
            self.remove(&key);
            out.push(rejected(key, reason));
            return;
        }

        let budget = self.budget(stream.buffer.capacity());
        let stream = self.open.get_mut(&key).expect("looked up above");
        let before = stream.buffer.capacity();
        let result = match stream.inflater {
            Some(ref mut inflater) => inflater.feed(&chunk.content, &mut stream.buffer, &budget),
            None if stream.buffer.capacity() == 0 => {
                // The first chunk's own allocation becomes the buffer: no copy.
                budget
                    .admit(chunk.content.capacity())
                    .map(|()| stream.buffer = chunk.content)
            }
            None => {
                let needed = stream.buffer.len() + chunk.content.len();
                budget
                    .reserve(&mut stream.buffer, needed)
                    .map(|()| stream.buffer.extend_from_slice(&chunk.content))
            }
        };
        stream.next_chunk += 1;
        stream.last_packet_at = now;
        self.held = self.held - before + stream.buffer.capacity();

        if let Err(reason) = result {
            self.remove(&key);
            out.push(rejected(key, reason));
        }
    }

    fn on_trailer(&mut self, sender: String, trailer: Trailer, out: &mut Vec<StreamEvent>) {
        let key = StreamKey {
            sender,
            stream_id: trailer.stream_id,
        };
        if !self.open.contains_key(&key) {
            self.ignored.unknown_stream += 1;
            return;
        }
        let mut stream = self.remove(&key);

        if !trailer.reason.is_empty() {
            let reason = StreamRejection::Aborted {
                reason: trailer.reason,
            };
            out.push(rejected(key, reason));
            return;
        }

        stream.attributes.extend(trailer.attributes);
        let event = match stream.finish(key.clone(), self.limits.topic.clone()) {
            Ok(text) => StreamEvent::Text(text),
            Err(reason) => rejected(key, reason),
        };
        out.push(event);
    }

    /// The room a buffer of capacity `capacity` has to grow in.
    fn budget(&self, capacity: usize) -> Budget {
        let others = self.held - capacity;
        Budget {
            stream_limit: self.limits.max_stream_bytes,
            total_limit: self.limits.max_buffered_bytes,
            total_room: self.limits.max_buffered_bytes.saturating_sub(others),
            min_buffer: MIN_BUFFER_BYTES,
        }
    }

    fn remove(&mut self, key: &StreamKey) -> OpenStream {
        let stream = self
            .open
            .remove(key)
            .expect("caller checked the stream is open");
        self.held -= stream.buffer.capacity();
        stream
    }
}

impl OpenStream {
    /// Checks the complete stream and turns it into its text.
    fn finish(mut self, key: StreamKey, topic: String) -> Result<TextStream, StreamRejection> {
        if self
            .inflater
            .as_ref()
            .is_some_and(|inflater| !inflater.is_finished())
        {
            return Err(StreamRejection::DecompressFailed);
        }

        let received = self.buffer.len() as u64;
        if let Some(declared) = self.declared_length
            && declared != received
        {
            return Err(StreamRejection::LengthMismatch { declared, received });
        }

        self.buffer.shrink_to_fit();
        let text =
            String::from_utf8(self.buffer).map_err(|error| StreamRejection::InvalidUtf8 {
                valid_up_to: error.utf8_error().valid_up_to(),
            })?;

        Ok(TextStream {
            stream_id: key.stream_id,
            sender: key.sender,
            topic,
            attributes: self.attributes,
            text,
        })
    }
}

/// Longest sender identity or stream id accepted. LiveKit's are far shorter.
pub const MAX_ID_BYTES: usize = 256;

/// Most bytes of header attributes (keys and values together) accepted. A LiveKit sender
/// must fit the whole header packet in 15,000 bytes, so an honest header is always below it.
pub const MAX_ATTRIBUTE_BYTES: usize = 15_000;

/// The first 64 bytes of an over-long id, for naming it in a rejection.
fn truncated(id: &str) -> String {
    let mut end = id.len().min(64);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &id[..end])
}

fn rejected(key: StreamKey, reason: StreamRejection) -> StreamEvent {
    tracing::debug!(
        stream_id = %key.stream_id,
        sender = %key.sender,
        reason = reason.reason(),
        error = %reason,
        "Data stream rejected",
    );
    StreamEvent::Rejected(StreamRejected {
        stream_id: key.stream_id,
        sender: key.sender,
        reason,
    })
}
