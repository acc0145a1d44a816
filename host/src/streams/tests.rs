use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::DeflateEncoder;
use livekit_protocol::DataPacket;
use livekit_protocol::data_packet::Value;
use livekit_protocol::data_stream::{
    ByteHeader, Chunk, CompressionType, Header, TextHeader, Trailer, header::ContentHeader,
};

use super::*;

const TOPIC: &str = "agentChat";

fn limits() -> StreamLimits {
    StreamLimits::default()
}

fn text_header(id: &str) -> Header {
    Header {
        stream_id: id.to_owned(),
        topic: TOPIC.to_owned(),
        mime_type: "text/plain".to_owned(),
        content_header: Some(ContentHeader::TextHeader(TextHeader::default())),
        ..Default::default()
    }
}

fn packet(sender: &str, value: Value) -> DataPacket {
    DataPacket {
        participant_identity: sender.to_owned(),
        value: Some(value),
        ..Default::default()
    }
}

fn header(sender: &str, header: Header) -> DataPacket {
    packet(sender, Value::StreamHeader(header))
}

fn chunk(sender: &str, id: &str, index: u64, content: &[u8]) -> DataPacket {
    let chunk = Chunk {
        stream_id: id.to_owned(),
        chunk_index: index,
        content: content.to_vec(),
        ..Default::default()
    };
    packet(sender, Value::StreamChunk(chunk))
}

fn trailer(sender: &str, id: &str) -> DataPacket {
    let trailer = Trailer {
        stream_id: id.to_owned(),
        ..Default::default()
    };
    packet(sender, Value::StreamTrailer(trailer))
}

fn feed(streams: &mut DataStreams, packets: Vec<DataPacket>, now: Instant) -> Vec<StreamEvent> {
    let mut out = Vec::new();
    for packet in packets {
        streams.push(packet, now, &mut out);
    }
    out
}

fn texts(events: &[StreamEvent]) -> Vec<(&str, &str, &str)> {
    events
        .iter()
        .filter_map(|event| match event {
            StreamEvent::Text(text) => Some((
                text.sender.as_str(),
                text.stream_id.as_str(),
                text.text.as_str(),
            )),
            StreamEvent::Rejected(_) => None,
        })
        .collect()
}

fn rejections(events: &[StreamEvent]) -> Vec<(&str, &str, &StreamRejection)> {
    events
        .iter()
        .filter_map(|event| match event {
            StreamEvent::Rejected(rejected) => Some((
                rejected.sender.as_str(),
                rejected.stream_id.as_str(),
                &rejected.reason,
            )),
            StreamEvent::Text(_) => None,
        })
        .collect()
}

fn deflate(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Raw deflate of `len` zero bytes, built from a small zero buffer so that the test never
/// holds the uncompressed bytes.
fn deflate_zeros(len: usize) -> Vec<u8> {
    let zeros = vec![0u8; 1 << 20];
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::fast());
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len());
        encoder.write_all(&zeros[..n]).unwrap();
        left -= n;
    }
    encoder.finish().unwrap()
}

/// Text that deflate cannot shrink much, with multi-byte characters throughout.
fn noisy_text(len: usize) -> String {
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyzé€😀ß0123456789 "
        .chars()
        .collect();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut text = String::with_capacity(len + 4);
    while text.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.push(alphabet[(state % alphabet.len() as u64) as usize]);
    }
    text
}

#[test]
fn inline_text_completes_at_its_header() {
    let mut streams = DataStreams::new(limits());
    let mut h = text_header("s1");
    h.inline_content = Some(b"{\"frame\":1}".to_vec());
    h.total_length = Some(11);
    h.attributes = HashMap::from([("frame_meta".to_owned(), "{}".to_owned())]);

    let events = feed(&mut streams, vec![header("agent", h)], Instant::now());

    assert_eq!(
        events,
        [StreamEvent::Text(TextStream {
            stream_id: "s1".into(),
            sender: "agent".into(),
            topic: TOPIC.into(),
            attributes: HashMap::from([("frame_meta".to_owned(), "{}".to_owned())]),
            text: "{\"frame\":1}".into(),
        })]
    );
    assert_eq!(streams.open_streams(), 0);
    assert_eq!(streams.bytes_held(), 0);
}

#[test]
fn chunked_text_completes_at_its_trailer_with_trailer_attributes_merged_over() {
    let mut streams = DataStreams::new(limits());
    let now = Instant::now();
    let mut h = text_header("s1");
    h.total_length = Some(11);
    h.attributes = HashMap::from([
        ("a".to_owned(), "header".to_owned()),
        ("b".to_owned(), "header".to_owned()),
    ]);

    let events = feed(
        &mut streams,
        vec![
            header("agent", h),
            chunk("agent", "s1", 0, b"hello "),
            chunk("agent", "s1", 1, b"world"),
        ],
        now,
    );
    assert!(events.is_empty());
    assert_eq!(streams.open_streams(), 1);
    assert!(streams.bytes_held() >= 11);

    let mut end = Trailer {
        stream_id: "s1".into(),
        ..Default::default()
    };
    end.attributes = HashMap::from([("b".to_owned(), "trailer".to_owned())]);
    let events = feed(
        &mut streams,
        vec![packet("agent", Value::StreamTrailer(end))],
        now,
    );

    let [StreamEvent::Text(text)] = events.as_slice() else {
        panic!("expected one text, got {events:?}");
    };
    assert_eq!(text.text, "hello world");
    assert_eq!(text.attributes["a"], "header");
    assert_eq!(text.attributes["b"], "trailer");
    assert_eq!(text.text.capacity(), text.text.len());
    assert_eq!(streams.open_streams(), 0);
    assert_eq!(streams.bytes_held(), 0);
}

#[test]
fn other_topics_are_not_read_at_all() {
    let mut streams = DataStreams::new(limits());
    let mut h = text_header("s1");
    h.topic = "lk.transcription".into();
    let mut inline = text_header("s2");
    inline.topic = "other".into();
    inline.inline_content = Some(b"x".to_vec());

    let events = feed(
        &mut streams,
        vec![
            header("agent", h),
            chunk("agent", "s1", 0, b"hello"),
            trailer("agent", "s1"),
            header("agent", inline),
        ],
        Instant::now(),
    );

    assert!(events.is_empty());
    assert_eq!(streams.open_streams(), 0);
    assert_eq!(streams.ignored().other_topic, 2);
    assert_eq!(streams.ignored().unknown_stream, 2);
}

#[test]
fn byte_streams_and_other_packets_are_ignored() {
    let mut streams = DataStreams::new(limits());
    let mut bytes = text_header("b1");
    bytes.content_header = Some(ContentHeader::ByteHeader(ByteHeader {
        name: "image.jpg".into(),
    }));
    let mut bare = text_header("b2");
    bare.content_header = None;
    let user = DataPacket {
        participant_identity: "agent".into(),
        value: Some(Value::User(Default::default())),
        ..Default::default()
    };

    let events = feed(
        &mut streams,
        vec![
            header("agent", bytes),
            chunk("agent", "b1", 0, &[0xff, 0xd8]),
            trailer("agent", "b1"),
            header("agent", bare),
            user,
        ],
        Instant::now(),
    );

    assert!(events.is_empty());
    assert_eq!(streams.open_streams(), 0);
    let ignored = streams.ignored();
    assert_eq!(ignored.byte_stream, 2);
    assert_eq!(ignored.unknown_stream, 2);
    assert_eq!(ignored.not_stream, 1);
}

#[test]
fn two_senders_with_the_same_stream_id_are_kept_apart() {
    let mut streams = DataStreams::new(limits());
    let events = feed(
        &mut streams,
        vec![
            header("alice", text_header("same")),
            header("bob", text_header("same")),
            chunk("alice", "same", 0, b"from "),
            chunk("bob", "same", 0, b"bob "),
            chunk("alice", "same", 1, b"alice"),
            trailer("bob", "same"),
            trailer("alice", "same"),
        ],
        Instant::now(),
    );

    assert_eq!(
        texts(&events),
        [("bob", "same", "bob "), ("alice", "same", "from alice")]
    );
    assert_eq!(streams.ignored().duplicate_header, 0);
}

#[test]
fn a_duplicate_chunk_is_ignored() {
    let mut streams = DataStreams::new(limits());
    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header("s1")),
            chunk("agent", "s1", 0, b"ab"),
            chunk("agent", "s1", 0, b"ab"),
            chunk("agent", "s1", 1, b"cd"),
            chunk("agent", "s1", 0, b"ab"),
            trailer("agent", "s1"),
        ],
        Instant::now(),
    );

    assert_eq!(texts(&events), [("agent", "s1", "abcd")]);
    assert_eq!(streams.ignored().duplicate_chunk, 2);
}

#[test]
fn a_duplicate_header_keeps_the_open_stream() {
    let mut streams = DataStreams::new(limits());
    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header("s1")),
            chunk("agent", "s1", 0, b"ab"),
            header("agent", text_header("s1")),
            chunk("agent", "s1", 1, b"cd"),
            trailer("agent", "s1"),
        ],
        Instant::now(),
    );

    assert_eq!(texts(&events), [("agent", "s1", "abcd")]);
    assert_eq!(streams.ignored().duplicate_header, 1);
}

#[test]
fn a_chunk_gap_rejects_the_stream_and_never_stitches_around_it() {
    let mut streams = DataStreams::new(limits());
    let now = Instant::now();
    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header("s1")),
            chunk("agent", "s1", 0, b"ab"),
            chunk("agent", "s1", 2, b"ef"),
        ],
        now,
    );

    assert_eq!(
        rejections(&events),
        [(
            "agent",
            "s1",
            &StreamRejection::ChunkGap {
                expected: 1,
                received: 2
            }
        )]
    );
    assert_eq!(rejections(&events)[0].2.reason(), "chunk_gap");
    assert_eq!(streams.open_streams(), 0);
    assert_eq!(streams.bytes_held(), 0);

    // The late chunk and the trailer find nothing to complete.
    let events = feed(
        &mut streams,
        vec![chunk("agent", "s1", 1, b"cd"), trailer("agent", "s1")],
        now,
    );
    assert!(events.is_empty());
    assert_eq!(streams.ignored().unknown_stream, 2);
}

#[test]
fn a_first_chunk_that_is_not_chunk_zero_is_a_gap() {
    let mut streams = DataStreams::new(limits());
    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header("s1")),
            chunk("agent", "s1", 1, b"cd"),
        ],
        Instant::now(),
    );
    assert_eq!(
        rejections(&events),
        [(
            "agent",
            "s1",
            &StreamRejection::ChunkGap {
                expected: 0,
                received: 1
            }
        )]
    );
}

#[test]
fn a_stream_without_a_trailer_expires_after_its_idle_timeout() {
    let mut streams = DataStreams::new(limits());
    let t0 = Instant::now();
    assert_eq!(streams.next_deadline(), None);

    feed(&mut streams, vec![header("agent", text_header("s1"))], t0);
    feed(
        &mut streams,
        vec![chunk("agent", "s1", 0, b"hello")],
        t0 + Duration::from_secs(4),
    );
    feed(
        &mut streams,
        vec![header("agent", text_header("s2"))],
        t0 + Duration::from_secs(6),
    );
    assert_eq!(streams.next_deadline(), Some(t0 + Duration::from_secs(14)));

    let mut out = Vec::new();
    streams.expire(t0 + Duration::from_millis(13_999), &mut out);
    assert!(out.is_empty());
    assert_eq!(streams.open_streams(), 2);

    streams.expire(t0 + Duration::from_secs(14), &mut out);
    assert_eq!(
        rejections(&out),
        [(
            "agent",
            "s1",
            &StreamRejection::IdleTimeout {
                idle: Duration::from_secs(10),
                received_bytes: 5
            }
        )]
    );
    assert_eq!(rejections(&out)[0].2.reason(), "idle_timeout");
    assert_eq!(streams.open_streams(), 1);
    assert_eq!(streams.next_deadline(), Some(t0 + Duration::from_secs(16)));

    // Expiry is reported once; the second stream follows at its own deadline.
    out.clear();
    streams.expire(t0 + Duration::from_secs(30), &mut out);
    assert_eq!(rejections(&out).len(), 1);
    assert_eq!(rejections(&out)[0].1, "s2");
    assert_eq!(streams.open_streams(), 0);
    assert_eq!(streams.bytes_held(), 0);
    assert_eq!(streams.next_deadline(), None);
}

#[test]
fn duplicate_chunks_do_not_keep_a_stream_alive() {
    let mut streams = DataStreams::new(limits());
    let t0 = Instant::now();
    feed(
        &mut streams,
        vec![
            header("agent", text_header("s1")),
            chunk("agent", "s1", 0, b"a"),
        ],
        t0,
    );
    feed(
        &mut streams,
        vec![chunk("agent", "s1", 0, b"a")],
        t0 + Duration::from_secs(9),
    );
    assert_eq!(streams.next_deadline(), Some(t0 + Duration::from_secs(10)));

    let mut out = Vec::new();
    streams.expire(t0 + Duration::from_secs(10), &mut out);
    assert_eq!(rejections(&out).len(), 1);
    assert_eq!(rejections(&out)[0].2.reason(), "idle_timeout");
}

#[test]
fn expired_streams_are_reported_in_the_order_they_opened() {
    let mut streams = DataStreams::new(limits());
    let t0 = Instant::now();
    let ids: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    for id in &ids {
        feed(&mut streams, vec![header("agent", text_header(id))], t0);
    }

    let mut out = Vec::new();
    streams.expire(t0 + Duration::from_secs(10), &mut out);

    let expired: Vec<&str> = rejections(&out).iter().map(|(_, id, _)| *id).collect();
    assert_eq!(expired, ids.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn a_header_claiming_5_gb_is_rejected_without_opening_anything() {
    let mut streams = DataStreams::new(limits());
    let mut h = text_header("huge");
    h.total_length = Some(5_000_000_000);

    let events = feed(
        &mut streams,
        vec![header("agent", h), chunk("agent", "huge", 0, b"x")],
        Instant::now(),
    );

    assert_eq!(
        rejections(&events),
        [(
            "agent",
            "huge",
            &StreamRejection::DeclaredTooLarge {
                declared: 5_000_000_000,
                limit: 16 * 1024 * 1024
            }
        )]
    );
    assert_eq!(rejections(&events)[0].2.reason(), "declared_too_large");
    assert_eq!(streams.open_streams(), 0);
    assert_eq!(streams.bytes_held(), 0);
    assert_eq!(streams.ignored().unknown_stream, 1);
}

#[test]
fn a_stream_growing_past_its_cap_is_rejected_and_freed() {
    let mut streams = DataStreams::new(StreamLimits {
        max_stream_bytes: 100,
        ..limits()
    });
    let now = Instant::now();
    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header("s1")),
            chunk("agent", "s1", 0, &[b'a'; 60]),
        ],
        now,
    );
    assert!(events.is_empty());
    assert!(streams.bytes_held() >= 60 && streams.bytes_held() <= 100);

    let events = feed(
        &mut streams,
        vec![chunk("agent", "s1", 1, &[b'b'; 41]), trailer("agent", "s1")],
        now,
    );
    assert_eq!(
        rejections(&events),
        [("agent", "s1", &StreamRejection::TooLarge { limit: 100 })]
    );
    assert_eq!(rejections(&events)[0].2.reason(), "stream_too_large");
    assert_eq!(streams.bytes_held(), 0);
    assert_eq!(streams.open_streams(), 0);
}

#[test]
fn a_stream_exactly_at_its_cap_is_accepted() {
    let mut streams = DataStreams::new(StreamLimits {
        max_stream_bytes: 100,
        ..limits()
    });
    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header("s1")),
            chunk("agent", "s1", 0, &[b'a'; 60]),
            chunk("agent", "s1", 1, &[b'b'; 40]),
            trailer("agent", "s1"),
        ],
        Instant::now(),
    );
    let expected = format!("{}{}", "a".repeat(60), "b".repeat(40));
    assert_eq!(texts(&events), [("agent", "s1", expected.as_str())]);
}

#[test]
fn streams_together_cannot_pass_the_buffered_bytes_cap() {
    let mut streams = DataStreams::new(StreamLimits {
        max_stream_bytes: 40_000,
        max_buffered_bytes: 50_000,
        ..limits()
    });
    let now = Instant::now();
    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header("s1")),
            header("agent", text_header("s2")),
            chunk("agent", "s1", 0, &[b'a'; 30_000]),
            chunk("agent", "s2", 0, &[b'b'; 30_000]),
        ],
        now,
    );

    assert_eq!(
        rejections(&events),
        [(
            "agent",
            "s2",
            &StreamRejection::BuffersFull { limit: 50_000 }
        )]
    );
    assert_eq!(rejections(&events)[0].2.reason(), "buffers_full");
    assert!(streams.bytes_held() <= 50_000);

    let events = feed(&mut streams, vec![trailer("agent", "s1")], now);
    assert_eq!(texts(&events).len(), 1);
    assert_eq!(streams.bytes_held(), 0);
}

#[test]
fn a_new_stream_past_the_open_cap_is_refused_and_the_open_ones_kept() {
    let mut streams = DataStreams::new(StreamLimits {
        max_open_streams: 2,
        ..limits()
    });
    let mut inline = text_header("inline");
    inline.inline_content = Some(b"small".to_vec());

    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header("s1")),
            header("agent", text_header("s2")),
            header("agent", text_header("s3")),
            header("agent", inline),
            chunk("agent", "s3", 0, b"lost"),
            chunk("agent", "s1", 0, b"one"),
            chunk("agent", "s2", 0, b"two"),
            trailer("agent", "s1"),
            trailer("agent", "s2"),
        ],
        Instant::now(),
    );

    assert_eq!(
        rejections(&events),
        [(
            "agent",
            "s3",
            &StreamRejection::TooManyOpenStreams { limit: 2 }
        )]
    );
    assert_eq!(rejections(&events)[0].2.reason(), "too_many_open_streams");
    // Inline streams take no slot, so they pass even when the cap is reached.
    assert_eq!(
        texts(&events),
        [
            ("agent", "inline", "small"),
            ("agent", "s1", "one"),
            ("agent", "s2", "two")
        ]
    );
}

#[test]
fn total_length_must_match_the_bytes_received() {
    let mut streams = DataStreams::new(limits());
    let mut h = text_header("s1");
    h.total_length = Some(10);
    let events = feed(
        &mut streams,
        vec![
            header("agent", h),
            chunk("agent", "s1", 0, b"hello"),
            trailer("agent", "s1"),
        ],
        Instant::now(),
    );
    assert_eq!(
        rejections(&events),
        [(
            "agent",
            "s1",
            &StreamRejection::LengthMismatch {
                declared: 10,
                received: 5
            }
        )]
    );
    assert_eq!(rejections(&events)[0].2.reason(), "length_mismatch");
}

#[test]
fn invalid_utf8_is_rejected_but_a_character_split_across_chunks_is_not() {
    let mut streams = DataStreams::new(limits());
    let e_acute = "é".as_bytes();
    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header("bad")),
            chunk("agent", "bad", 0, b"ok"),
            chunk("agent", "bad", 1, &[0xff, 0xfe]),
            trailer("agent", "bad"),
            header("agent", text_header("split")),
            chunk("agent", "split", 0, &e_acute[..1]),
            chunk("agent", "split", 1, &e_acute[1..]),
            trailer("agent", "split"),
        ],
        Instant::now(),
    );

    assert_eq!(
        rejections(&events),
        [(
            "agent",
            "bad",
            &StreamRejection::InvalidUtf8 { valid_up_to: 2 }
        )]
    );
    assert_eq!(rejections(&events)[0].2.reason(), "invalid_utf8");
    assert_eq!(texts(&events), [("agent", "split", "é")]);
}

#[test]
fn a_trailer_with_a_reason_aborts_the_stream() {
    let mut streams = DataStreams::new(limits());
    let end = Trailer {
        stream_id: "s1".into(),
        reason: "cancelled".into(),
        ..Default::default()
    };
    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header("s1")),
            chunk("agent", "s1", 0, b"partial"),
            packet("agent", Value::StreamTrailer(end)),
        ],
        Instant::now(),
    );
    assert_eq!(
        rejections(&events),
        [(
            "agent",
            "s1",
            &StreamRejection::Aborted {
                reason: "cancelled".into()
            }
        )]
    );
    assert_eq!(rejections(&events)[0].2.reason(), "aborted");
    assert_eq!(streams.bytes_held(), 0);
}

#[test]
fn an_unknown_compression_is_rejected() {
    let mut streams = DataStreams::new(limits());
    let mut h = text_header("s1");
    h.compression = 7;
    let events = feed(&mut streams, vec![header("agent", h)], Instant::now());
    assert_eq!(
        rejections(&events),
        [("agent", "s1", &StreamRejection::UnknownCompression(7))]
    );
    assert_eq!(rejections(&events)[0].2.reason(), "unknown_compression");
    assert_eq!(streams.open_streams(), 0);
}

#[test]
fn compressed_chunks_are_inflated_across_arbitrary_splits() {
    let text = format!(
        "{}{}",
        "{\"label\":\"person\",\"confidence\":0.9},".repeat(3_000),
        noisy_text(50_000)
    );
    let compressed = deflate(text.as_bytes());
    let mut streams = DataStreams::new(limits());
    let mut h = text_header("s1");
    h.compression = CompressionType::DeflateRaw as i32;
    h.total_length = Some(text.len() as u64);

    let mut packets = vec![header("agent", h)];
    // Odd chunk sizes, including tiny ones, so block and symbol boundaries fall anywhere.
    let mut rest = compressed.as_slice();
    let sizes = [1usize, 2, 3, 7, 1000].into_iter().cycle();
    for (index, size) in (0u64..).zip(sizes) {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        packets.push(chunk("agent", "s1", index, piece));
        rest = tail;
    }
    packets.push(trailer("agent", "s1"));

    let events = feed(&mut streams, packets, Instant::now());
    assert_eq!(texts(&events), [("agent", "s1", text.as_str())]);
    assert_eq!(streams.bytes_held(), 0);
}

#[test]
fn compressed_inline_content_exactly_at_the_cap_is_accepted() {
    let limit = 100_000;
    let text = "z".repeat(limit);
    let mut streams = DataStreams::new(StreamLimits {
        max_stream_bytes: limit,
        ..limits()
    });
    let mut h = text_header("s1");
    h.compression = CompressionType::DeflateRaw as i32;
    h.inline_content = Some(deflate(text.as_bytes()));

    let events = feed(&mut streams, vec![header("agent", h)], Instant::now());
    assert_eq!(texts(&events), [("agent", "s1", text.as_str())]);

    let mut h = text_header("s2");
    h.compression = CompressionType::DeflateRaw as i32;
    h.inline_content = Some(deflate(format!("{text}z").as_bytes()));
    let events = feed(&mut streams, vec![header("agent", h)], Instant::now());
    assert_eq!(
        rejections(&events),
        [("agent", "s2", &StreamRejection::TooLarge { limit })]
    );
}

#[test]
fn a_deflate_bomb_in_inline_content_stops_at_the_cap() {
    // 1 GiB of zeros, about 1 MiB compressed.
    let bomb = deflate_zeros(1 << 30);
    assert!(bomb.len() < 8 << 20, "bomb is {} bytes", bomb.len());
    let mut streams = DataStreams::new(limits());
    let mut h = text_header("bomb");
    h.compression = CompressionType::DeflateRaw as i32;
    h.inline_content = Some(bomb);

    let events = feed(&mut streams, vec![header("agent", h)], Instant::now());

    assert_eq!(
        rejections(&events),
        [(
            "agent",
            "bomb",
            &StreamRejection::TooLarge {
                limit: 16 * 1024 * 1024
            }
        )]
    );
    assert_eq!(streams.bytes_held(), 0);
}

#[test]
fn a_deflate_bomb_in_chunks_stops_at_the_cap_and_frees_the_buffer() {
    let limit = 1 << 20;
    let bomb = deflate_zeros(64 << 20);
    let mut streams = DataStreams::new(StreamLimits {
        max_stream_bytes: limit,
        ..limits()
    });
    let mut h = text_header("bomb");
    h.compression = CompressionType::DeflateRaw as i32;
    let now = Instant::now();
    let mut out = Vec::new();
    streams.push(header("agent", h), now, &mut out);

    let mut sent = 0;
    for (index, piece) in bomb.chunks(15_000).enumerate() {
        streams.push(chunk("agent", "bomb", index as u64, piece), now, &mut out);
        sent += 1;
        assert!(streams.bytes_held() <= limit);
        if !out.is_empty() {
            break;
        }
    }

    assert_eq!(
        rejections(&out),
        [("agent", "bomb", &StreamRejection::TooLarge { limit })]
    );
    // 1 MiB of zeros is about 1 KiB compressed, so the first chunk already trips the cap.
    assert_eq!(sent, 1);
    assert_eq!(streams.bytes_held(), 0);
    assert_eq!(streams.open_streams(), 0);
}

#[test]
fn truncated_or_corrupt_deflate_is_rejected() {
    let compressed = deflate(noisy_text(20_000).as_bytes());
    let mut streams = DataStreams::new(limits());
    let mut truncated = text_header("truncated");
    truncated.compression = CompressionType::DeflateRaw as i32;
    let mut corrupt = text_header("corrupt");
    corrupt.compression = CompressionType::DeflateRaw as i32;
    // 0b111: the last block, of the reserved block type 3.
    corrupt.inline_content = Some(vec![0xff, 0xff, 0xff]);
    let mut trailing = text_header("trailing");
    trailing.compression = CompressionType::DeflateRaw as i32;
    let mut with_garbage = deflate(b"fine");
    with_garbage.extend_from_slice(b"garbage");
    trailing.inline_content = Some(with_garbage);

    let events = feed(
        &mut streams,
        vec![
            header("agent", truncated),
            chunk("agent", "truncated", 0, &compressed[..compressed.len() / 2]),
            trailer("agent", "truncated"),
            header("agent", corrupt),
            header("agent", trailing),
        ],
        Instant::now(),
    );

    let reasons: Vec<(&str, &str)> = rejections(&events)
        .iter()
        .map(|(_, id, reason)| (*id, reason.reason()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("truncated", "decompress_failed"),
            ("corrupt", "decompress_failed"),
            ("trailing", "decompress_failed")
        ]
    );
    assert_eq!(streams.bytes_held(), 0);
}

mod round_trip {
    use super::*;
    use crate::streams::send::{Receiver, SendTextOptions, text_stream_packets};

    fn round_trip(text: &str, receiver: Receiver) -> (usize, Vec<StreamEvent>) {
        let attributes = HashMap::from([(
            "frame_meta".to_owned(),
            r#"{"message_id":"m1","frame_index":0,"total_frames":1}"#.to_owned(),
        )]);
        let options = SendTextOptions {
            receiver,
            ..Default::default()
        };
        let packets = text_stream_packets(text, TOPIC, attributes, "agent", &options).unwrap();
        let count = packets.len();
        let mut streams = DataStreams::new(limits());
        let events = feed(&mut streams, packets, Instant::now());
        assert_eq!(streams.open_streams(), 0);
        assert_eq!(streams.bytes_held(), 0);
        (count, events)
    }

    fn only_text(events: &[StreamEvent]) -> &TextStream {
        match events {
            [StreamEvent::Text(text)] => text,
            other => panic!("expected one text, got {other:?}"),
        }
    }

    #[test]
    fn a_small_text_goes_inline_and_comes_back() {
        let (packets, events) = round_trip("{\"frame\": 7}", Receiver::V2Deflate);
        assert_eq!(packets, 1);
        let text = only_text(&events);
        assert_eq!(text.text, "{\"frame\": 7}");
        assert_eq!(text.sender, "agent");
        assert!(text.attributes["frame_meta"].contains("\"m1\""));
    }

    #[test]
    fn an_empty_text_comes_back_for_every_receiver() {
        for receiver in [Receiver::Legacy, Receiver::V2, Receiver::V2Deflate] {
            let (packets, events) = round_trip("", receiver);
            let expected = if receiver == Receiver::Legacy { 2 } else { 1 };
            assert_eq!(packets, expected, "{receiver:?}");
            assert_eq!(only_text(&events).text, "", "{receiver:?}");
        }
    }

    #[test]
    fn a_large_text_goes_in_chunks_with_characters_across_boundaries() {
        // Multi-byte characters sit right at each 15,000-byte line.
        let mut text = String::new();
        while text.len() < 60_000 {
            text.push_str(&"a".repeat(14_999 - text.len() % 15_000));
            text.push_str("😀é€");
        }
        for receiver in [Receiver::Legacy, Receiver::V2] {
            let (packets, events) = round_trip(&text, receiver);
            assert!(packets >= 6, "{receiver:?}: {packets} packets");
            assert_eq!(only_text(&events).text, text, "{receiver:?}");
        }
    }

    #[test]
    fn a_large_incompressible_text_to_a_deflate_receiver_comes_back() {
        let text = noisy_text(200_000);
        let (packets, events) = round_trip(&text, Receiver::V2Deflate);
        assert!(packets > 3, "{packets} packets");
        assert_eq!(only_text(&events).text, text);
    }

    #[test]
    fn a_compressible_text_comes_back_whether_inline_or_chunked() {
        // Inline: highly compressible JSON shrinks under 15,000 bytes.
        let json = "{\"label\":\"car\",\"box\":[0.1,0.2,0.3,0.4]},".repeat(20_000);
        let (packets, events) = round_trip(&json, Receiver::V2Deflate);
        assert_eq!(packets, 1);
        assert_eq!(only_text(&events).text, json);

        // Chunked and compressed: half noise, half repetition, too big to inline.
        let mixed = format!("{}{}", noisy_text(100_000), json);
        let options = SendTextOptions::default();
        let sent = text_stream_packets(&mixed, TOPIC, HashMap::new(), "agent", &options).unwrap();
        let Some(Value::StreamHeader(first)) = &sent[0].value else {
            panic!("expected a header first");
        };
        assert_eq!(first.compression, CompressionType::DeflateRaw as i32);
        assert!(first.inline_content.is_none());
        let (packets, events) = round_trip(&mixed, Receiver::V2Deflate);
        assert_eq!(packets, sent.len());
        assert!(packets > 3, "{packets} packets");
        assert_eq!(only_text(&events).text, mixed);
    }
}

#[test]
fn long_ids_and_oversized_attributes_open_nothing() {
    let mut streams = DataStreams::new(limits());
    let long_id = "s".repeat(MAX_ID_BYTES + 1);
    let mut big = text_header("attrs");
    big.attributes = (0..2_000)
        .map(|n| (format!("k{n}"), "v".repeat(8)))
        .collect();

    let events = feed(
        &mut streams,
        vec![
            header("agent", text_header(&long_id)),
            header(&"a".repeat(MAX_ID_BYTES + 1), text_header("ok-id")),
            header("agent", big),
        ],
        Instant::now(),
    );

    let reasons: Vec<_> = rejections(&events)
        .iter()
        .map(|(_, _, r)| r.reason())
        .collect();
    assert_eq!(
        reasons,
        ["id_too_long", "id_too_long", "attributes_too_large"]
    );
    // The rejection names an over-long stream by a short prefix only.
    assert!(rejections(&events)[0].1.len() < 100);
    assert_eq!(streams.open_streams(), 0);
    assert_eq!(streams.bytes_held(), 0);
}
