//! The sending side of a text stream, for synthetic captures and test generators.
//!
//! [`text_stream_packets`] returns the DataPackets a LiveKit sender puts on the wire for one
//! `send_text` call (livekit-data-stream 0.2.0, `outgoing::Manager::send_text`), in order:
//!
//! - if the receiver speaks data streams v2 and the header packet fits the 15,000-byte budget,
//!   one header packet carrying the whole text as `inline_content`;
//! - otherwise a header, the content in chunks of at most 15,000 bytes (text split on UTF-8
//!   character boundaries; compressed content split anywhere), and an empty trailer.
//!
//! The content is raw-deflate compressed when compression is asked for, the receiver
//! advertises it, and the compressed form is smaller than the text; `total_length` is always
//! the uncompressed length.
//!
//! This builds the packets itself rather than calling the official outgoing manager, which
//! is asynchronous, answers through a transport channel and stamps headers with the clock:
//! synthetic captures and test generators want a plain call with a chosen stream id and
//! timestamp. `host/tests/official_sender.rs` checks the output against the official
//! manager's, packet for packet and byte for byte.

use std::collections::HashMap;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use flate2::Compression;
use flate2::write::DeflateEncoder;
use livekit_protocol::DataPacket;
use livekit_protocol::data_packet::{Kind, Value};
use livekit_protocol::data_stream::{
    Chunk, CompressionType, Header, TextHeader, Trailer, header::ContentHeader,
};
use prost::Message as _;

/// The most bytes in one chunk's content, and the most bytes of an encoded header packet.
pub const CHUNK_BYTES: usize = 15_000;

const TEXT_MIME_TYPE: &str = "text/plain";

/// What the receivers of a stream advertise; LiveKit senders pick inline content and
/// compression from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Receiver {
    /// A client before data streams v2: no inline content, no compression.
    Legacy,
    /// Data streams v2 (inline content) without the raw-deflate capability.
    V2,
    /// Data streams v2 with the raw-deflate capability, like framehost. The default.
    #[default]
    V2Deflate,
}

/// Options of [`text_stream_packets`] beyond the text, topic, attributes and sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendTextOptions {
    /// What the receivers support. Defaults to [`Receiver::V2Deflate`].
    pub receiver: Receiver,
    /// Whether the sender compresses when the receiver supports it. Defaults to `true`.
    pub compress: bool,
    /// The stream id; a new UUID v4 when `None` (the default).
    pub stream_id: Option<String>,
    /// The header's timestamp in Unix milliseconds; the current time when `None` (the
    /// default). Set it for reproducible output.
    pub timestamp_ms: Option<i64>,
    /// The identities the packets are addressed to; empty (the default) addresses the room.
    pub destination_identities: Vec<String>,
}

impl Default for SendTextOptions {
    fn default() -> Self {
        Self {
            receiver: Receiver::default(),
            compress: true,
            stream_id: None,
            timestamp_ms: None,
            destination_identities: Vec::new(),
        }
    }
}

/// Why [`text_stream_packets`] produced nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendTextError {
    /// The header packet (mostly the attributes) does not fit the 15,000-byte budget; a
    /// LiveKit sender refuses such a stream with `HeaderTooLarge`.
    #[error("header packet is {encoded_len} bytes, more than {CHUNK_BYTES}")]
    HeaderTooLarge { encoded_len: usize },
}

/// The DataPackets of one `send_text(text)` by `sender_identity` on `topic`, in wire order.
///
/// Every packet carries `sender_identity` as its `participant_identity`, as the room
/// delivers it to receivers.
pub fn text_stream_packets(
    text: &str,
    topic: &str,
    attributes: HashMap<String, String>,
    sender_identity: &str,
    options: &SendTextOptions,
) -> Result<Vec<DataPacket>, SendTextError> {
    let inline_allowed = options.receiver != Receiver::Legacy;
    let compression_allowed = options.compress && options.receiver == Receiver::V2Deflate;

    let compressed = compression_allowed
        .then(|| deflate_raw(text.as_bytes()))
        .filter(|compressed| compressed.len() < text.len());

    let stream_id = options
        .stream_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let timestamp = options.timestamp_ms.unwrap_or_else(now_unix_ms);
    let destinations = &options.destination_identities;

    let mut header = Header {
        stream_id: stream_id.clone(),
        timestamp,
        topic: topic.to_owned(),
        mime_type: TEXT_MIME_TYPE.to_owned(),
        total_length: Some(text.len() as u64),
        attributes,
        inline_content: None,
        compression: if compressed.is_some() {
            CompressionType::DeflateRaw
        } else {
            CompressionType::None
        } as i32,
        content_header: Some(ContentHeader::TextHeader(TextHeader::default())),
        ..Default::default()
    };

    // The sender measures the header packet before it stamps the sender identity on it.
    if inline_allowed {
        header.inline_content = Some(
            compressed
                .clone()
                .unwrap_or_else(|| text.as_bytes().to_vec()),
        );
        let packet = packet(Value::StreamHeader(header.clone()), "", destinations);
        if packet.encoded_len() <= CHUNK_BYTES {
            return Ok(vec![with_sender(packet, sender_identity)]);
        }
        header.inline_content = None;
    }

    let header_packet = packet(Value::StreamHeader(header), "", destinations);
    let encoded_len = header_packet.encoded_len();
    if encoded_len > CHUNK_BYTES {
        return Err(SendTextError::HeaderTooLarge { encoded_len });
    }

    let chunks: Vec<&[u8]> = match &compressed {
        Some(compressed) => compressed.chunks(CHUNK_BYTES).collect(),
        None => utf8_chunks(text, CHUNK_BYTES).map(str::as_bytes).collect(),
    };

    let mut packets = Vec::with_capacity(chunks.len() + 2);
    packets.push(with_sender(header_packet, sender_identity));
    for (index, content) in chunks.into_iter().enumerate() {
        let chunk = Chunk {
            stream_id: stream_id.clone(),
            chunk_index: index as u64,
            content: content.to_vec(),
            ..Default::default()
        };
        packets.push(packet(
            Value::StreamChunk(chunk),
            sender_identity,
            destinations,
        ));
    }
    let trailer = Trailer {
        stream_id,
        reason: String::new(),
        attributes: HashMap::new(),
    };
    packets.push(packet(
        Value::StreamTrailer(trailer),
        sender_identity,
        destinations,
    ));
    Ok(packets)
}

/// Splits `text` into pieces of at most `max_bytes` bytes, each ending on a character
/// boundary (LiveKit's rule for text chunks). `max_bytes` must be at least 4.
pub fn utf8_chunks(text: &str, max_bytes: usize) -> impl Iterator<Item = &str> {
    assert!(max_bytes >= 4, "a chunk must hold any one character");
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(max_bytes);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// Raw deflate at the default level, as the LiveKit sender compresses.
fn deflate_raw(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
    encoder
        .write_all(bytes)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

#[allow(deprecated)] // `kind` is deprecated on the wire type but LiveKit senders still set it.
fn packet(value: Value, sender_identity: &str, destinations: &[String]) -> DataPacket {
    DataPacket {
        kind: Kind::Reliable as i32,
        participant_identity: sender_identity.to_owned(),
        destination_identities: destinations.to_vec(),
        value: Some(value),
        ..Default::default()
    }
}

fn with_sender(mut packet: DataPacket, sender_identity: &str) -> DataPacket {
    packet.participant_identity = sender_identity.to_owned();
    packet
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_chunks_back_off_to_a_character_boundary() {
        // 14,999 one-byte characters put the 4-byte emoji across the 15,000-byte line.
        let text = format!("{}😀{}", "a".repeat(14_999), "b".repeat(10));
        let pieces: Vec<&str> = utf8_chunks(&text, CHUNK_BYTES).collect();
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].len(), 14_999);
        assert_eq!(pieces[1], format!("😀{}", "b".repeat(10)));
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn utf8_chunks_of_empty_text_is_empty() {
        assert_eq!(utf8_chunks("", CHUNK_BYTES).count(), 0);
        assert_eq!(utf8_chunks("abcd", 4).collect::<Vec<_>>(), ["abcd"]);
        assert_eq!(utf8_chunks("ééé", 4).collect::<Vec<_>>(), ["éé", "é"]);
    }

    fn options(receiver: Receiver) -> SendTextOptions {
        SendTextOptions {
            receiver,
            stream_id: Some("s1".into()),
            timestamp_ms: Some(1_700_000_000_000),
            ..Default::default()
        }
    }

    fn header(packet: &DataPacket) -> &Header {
        match &packet.value {
            Some(Value::StreamHeader(header)) => header,
            other => panic!("expected a header, got {other:?}"),
        }
    }

    #[test]
    fn short_text_to_v2_receiver_is_one_inline_packet() {
        let packets = text_stream_packets(
            "hello",
            "agentChat",
            HashMap::new(),
            "agent",
            &options(Receiver::V2Deflate),
        )
        .unwrap();

        assert_eq!(packets.len(), 1);
        let header = header(&packets[0]);
        // "hello" does not shrink under deflate, so it goes raw.
        assert_eq!(header.inline_content.as_deref(), Some(&b"hello"[..]));
        assert_eq!(header.compression, CompressionType::None as i32);
        assert_eq!(header.total_length, Some(5));
        assert_eq!(header.stream_id, "s1");
        assert_eq!(header.timestamp, 1_700_000_000_000);
        assert_eq!(packets[0].participant_identity, "agent");
    }

    #[test]
    fn compressible_text_is_inlined_compressed() {
        let text = "detections ".repeat(2_000);
        let packets = text_stream_packets(
            &text,
            "t",
            HashMap::new(),
            "agent",
            &options(Receiver::V2Deflate),
        )
        .unwrap();

        assert_eq!(packets.len(), 1);
        let header = header(&packets[0]);
        assert_eq!(header.compression, CompressionType::DeflateRaw as i32);
        assert_eq!(header.total_length, Some(text.len() as u64));
        assert!(header.inline_content.as_ref().unwrap().len() < 1_000);
    }

    #[test]
    fn legacy_receiver_gets_chunks_and_a_trailer() {
        let text = "x".repeat(40_000);
        let packets = text_stream_packets(
            &text,
            "t",
            HashMap::new(),
            "agent",
            &options(Receiver::Legacy),
        )
        .unwrap();

        // Header, 15k + 15k + 10k, trailer; never inline, never compressed.
        assert_eq!(packets.len(), 5);
        assert!(header(&packets[0]).inline_content.is_none());
        assert_eq!(
            header(&packets[0]).compression,
            CompressionType::None as i32
        );
        let sizes: Vec<usize> = packets[1..4]
            .iter()
            .map(|packet| match &packet.value {
                Some(Value::StreamChunk(chunk)) => chunk.content.len(),
                other => panic!("expected a chunk, got {other:?}"),
            })
            .collect();
        assert_eq!(sizes, [15_000, 15_000, 10_000]);
        assert!(matches!(packets[4].value, Some(Value::StreamTrailer(_))));
        assert!(
            packets
                .iter()
                .all(|packet| packet.participant_identity == "agent")
        );
    }

    #[test]
    fn oversized_attributes_are_refused() {
        let attributes = HashMap::from([("big".to_owned(), "x".repeat(20_000))]);
        let result = text_stream_packets(
            "hi",
            "t",
            attributes,
            "agent",
            &options(Receiver::V2Deflate),
        );
        assert!(matches!(
            result,
            Err(SendTextError::HeaderTooLarge { encoded_len }) if encoded_len > CHUNK_BYTES
        ));
    }
}
