//! `streams::text_stream_packets` against LiveKit's own sender (livekit-data-stream's
//! outgoing `Manager::send_text`): the same packets, byte for byte, for inline, chunked,
//! compressed and multi-byte texts and every kind of receiver.
//!
//! framehost builds its packets itself because synthetic captures need a synchronous call
//! with a chosen stream id and timestamp; this test keeps that copy honest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use framehost::streams::{Receiver, SendTextOptions, text_stream_packets};
use livekit_common::{
    CLIENT_PROTOCOL_DATA_STREAM_V2, ClientCapability, ParticipantIdentity,
    RemoteParticipantRegistry,
};
use livekit_data_stream::api::SendTextOptions as OfficialOptions;
use livekit_data_stream::backend::outgoing::Manager;
use livekit_protocol::DataPacket;
use livekit_protocol::data_packet::Value;
use prost::Message as _;

/// A room with one receiver that advertises what `Receiver` says.
struct Room {
    protocol: i32,
    capabilities: Vec<ClientCapability>,
}

impl RemoteParticipantRegistry for Room {
    fn remote_client_protocol(&self, _: &ParticipantIdentity) -> i32 {
        self.protocol
    }
    fn remote_capabilities(&self, _: &ParticipantIdentity) -> Vec<ClientCapability> {
        self.capabilities.clone()
    }
    fn remote_identities(&self) -> Vec<ParticipantIdentity> {
        vec![ParticipantIdentity("framehost".into())]
    }
}

const TIMESTAMP_MS: i64 = 42;

fn official(
    text: &str,
    attributes: &HashMap<String, String>,
    receiver: Receiver,
    compress: bool,
) -> Vec<DataPacket> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (manager, mut requests) = Manager::new();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let transport = {
            let sent = sent.clone();
            tokio::spawn(async move {
                while let Ok((packets, responder)) = requests.recv().await {
                    sent.lock().unwrap().extend(packets);
                    let _ = responder.respond(Ok(()));
                }
            })
        };
        let room = match receiver {
            Receiver::Legacy => Room {
                protocol: 0,
                capabilities: vec![],
            },
            Receiver::V2 => Room {
                protocol: CLIENT_PROTOCOL_DATA_STREAM_V2,
                capabilities: vec![],
            },
            Receiver::V2Deflate => Room {
                protocol: CLIENT_PROTOCOL_DATA_STREAM_V2,
                capabilities: vec![ClientCapability::CompressionDeflateRaw],
            },
        };
        let options = OfficialOptions::new_with_topic("agentChat")
            .with_attributes(attributes.clone())
            .with_id("stream-1")
            .with_sender_identity("vision-service")
            .with_compress(compress);
        manager
            .send_text(text, options, &room)
            .await
            .expect("official send_text");
        drop(manager);
        transport.await.unwrap();

        let mut packets = sent.lock().unwrap().clone();
        // The official sender stamps the header with the clock; ours takes a chosen time.
        for packet in &mut packets {
            if let Some(Value::StreamHeader(header)) = &mut packet.value {
                header.timestamp = TIMESTAMP_MS;
            }
        }
        packets
    })
}

#[test]
fn packets_match_livekits_own_sender() {
    let attributes = HashMap::from([(
        "frame_meta".to_owned(),
        r#"{"message_id":"m","frame_index":0,"total_frames":1}"#.to_owned(),
    )]);
    let mut mixed = String::new();
    let mut n = 1u64;
    while mixed.len() < 100_000 {
        mixed.push_str(&format!("{n}é€😀 "));
        n = n
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407)
            >> 7;
    }
    let texts = [
        String::new(),
        "hello".to_owned(),
        "ab".repeat(10_000),
        mixed,
        // A four-byte character straddling the 15,000-byte chunk boundary.
        format!("{}😀{}", "a".repeat(14_999), "b".repeat(40_000)),
        r#"{"k": 1}"#.repeat(50_000),
    ];

    let mut compared = 0;
    for text in &texts {
        for receiver in [Receiver::Legacy, Receiver::V2, Receiver::V2Deflate] {
            for compress in [true, false] {
                let case = format!("{} bytes, {receiver:?}, compress {compress}", text.len());
                let expected = official(text, &attributes, receiver, compress);
                let options = SendTextOptions {
                    receiver,
                    compress,
                    stream_id: Some("stream-1".into()),
                    timestamp_ms: Some(TIMESTAMP_MS),
                    ..Default::default()
                };
                let ours = text_stream_packets(
                    text,
                    "agentChat",
                    attributes.clone(),
                    "vision-service",
                    &options,
                )
                .expect("our packets");
                assert_eq!(ours.len(), expected.len(), "{case}");
                for (ours, expected) in ours.iter().zip(&expected) {
                    assert_eq!(ours, expected, "{case}");
                    assert_eq!(ours.encode_to_vec(), expected.encode_to_vec(), "{case}");
                }
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 36);
}
