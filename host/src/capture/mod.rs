//! Capture files: the DataPackets a participant received, with their arrival times.
//!
//! A capture lets a plugin author develop against a real (or synthetic) session offline, and
//! lets an operator replay a misbehaving room. It is read by the same path as a live room.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! magic      8 bytes   "FHCAP\0\x01\n"  (format version 1)
//! meta_len   u32       length of the JSON metadata that follows (at most 64 KiB)
//! meta       JSON      {"source": ..., "created_unix_ms": ..., ...}
//! records    repeated until end of file:
//!   at_us    u64       arrival time, microseconds from the start of the capture
//!   len      u32       length of the packet (at most 4 MiB)
//!   packet   bytes     a `livekit_protocol::DataPacket`, protobuf-encoded, with the
//!                      sender's identity in `participant_identity`
//! ```
//!
//! The record bound is far above what a LiveKit data channel carries (about 15 KB a
//! packet) and keeps a corrupt length from allocating gigabytes.

pub mod synth;

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::Duration;

use livekit_protocol::DataPacket;
use prost::Message as _;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"FHCAP\0\x01\n";
const MAX_META_BYTES: u32 = 64 << 10;
/// Largest packet a capture may hold.
pub const MAX_PACKET_BYTES: u32 = 4 << 20;

/// What a capture says about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaptureMeta {
    /// Where the packets came from: `synth`, or a room name for a recording.
    pub source: String,
    /// Wall-clock time the capture started, Unix milliseconds.
    pub created_unix_ms: u64,
    /// The data-stream topic the frames were sent on.
    #[serde(default)]
    pub topic: String,
    /// Free-form description (how it was made).
    #[serde(default)]
    pub note: String,
}

/// One received packet.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Arrival time from the start of the capture.
    pub at: Duration,
    pub packet: DataPacket,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("not a framehost capture file (bad magic); captures start with \"FHCAP\"")]
    BadMagic,
    #[error("not a regular file")]
    NotAFile,
    #[error("capture metadata is {0} bytes, more than the 64 KiB allowed")]
    MetaTooLarge(u32),
    #[error("capture metadata is not valid JSON: {0}")]
    BadMeta(serde_json::Error),
    #[error("record {index} is {len} bytes, more than the {MAX_PACKET_BYTES} allowed")]
    RecordTooLarge { index: u64, len: u32 },
    #[error("record {index} is cut short: the file ends inside it")]
    Truncated { index: u64 },
    #[error("record {index} is not a DataPacket: {error}")]
    BadPacket {
        index: u64,
        error: prost::DecodeError,
    },
    #[error("I/O error on capture: {0}")]
    Io(io::Error),
}

// By hand rather than `#[from]`: the message already carries the cause, and a `source` would
// print it twice in a cause chain.
impl From<io::Error> for CaptureError {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

/// Writes a capture, record by record.
pub struct CaptureWriter<W: Write> {
    out: W,
    buffer: Vec<u8>,
    records: u64,
}

impl CaptureWriter<BufWriter<File>> {
    pub fn create(path: &Path, meta: &CaptureMeta) -> Result<Self, CaptureError> {
        Self::new(BufWriter::new(File::create(path)?), meta)
    }
}

impl<W: Write> CaptureWriter<W> {
    pub fn new(mut out: W, meta: &CaptureMeta) -> Result<Self, CaptureError> {
        let meta = serde_json::to_vec(meta).expect("metadata serializes");
        let meta_len = u32::try_from(meta.len()).unwrap_or(u32::MAX);
        if meta_len > MAX_META_BYTES {
            return Err(CaptureError::MetaTooLarge(meta_len));
        }
        out.write_all(MAGIC)?;
        out.write_all(&meta_len.to_le_bytes())?;
        out.write_all(&meta)?;
        Ok(Self {
            out,
            buffer: Vec::new(),
            records: 0,
        })
    }

    pub fn write(&mut self, at: Duration, packet: &DataPacket) -> Result<(), CaptureError> {
        self.buffer.clear();
        packet
            .encode(&mut self.buffer)
            .expect("a Vec grows as needed");
        let len = u32::try_from(self.buffer.len()).unwrap_or(u32::MAX);
        if len > MAX_PACKET_BYTES {
            return Err(CaptureError::RecordTooLarge {
                index: self.records,
                len,
            });
        }
        let at_us = u64::try_from(at.as_micros()).unwrap_or(u64::MAX);
        self.out.write_all(&at_us.to_le_bytes())?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&self.buffer)?;
        self.records += 1;
        Ok(())
    }

    /// Pushes buffered records to the file, so a recording cut short keeps what it had.
    pub fn flush(&mut self) -> Result<(), CaptureError> {
        self.out.flush()?;
        Ok(())
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// Flushes and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, CaptureError> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a capture, one record at a time; holds one packet's bytes at most.
pub struct CaptureReader<R: BufRead> {
    input: R,
    meta: CaptureMeta,
    buffer: Vec<u8>,
    index: u64,
}

impl CaptureReader<BufReader<File>> {
    /// Opens a regular file. Anything else (a FIFO, a device, a directory) is refused before
    /// it is opened: opening or reading one can block a job forever.
    pub fn open(path: &Path) -> Result<Self, CaptureError> {
        if !std::fs::metadata(path)?.is_file() {
            return Err(CaptureError::NotAFile);
        }
        Self::new(BufReader::with_capacity(256 << 10, File::open(path)?))
    }
}

impl<R: BufRead> CaptureReader<R> {
    pub fn new(mut input: R) -> Result<Self, CaptureError> {
        let mut magic = [0u8; 8];
        input
            .read_exact(&mut magic)
            .map_err(|_| CaptureError::BadMagic)?;
        if &magic != MAGIC {
            return Err(CaptureError::BadMagic);
        }
        let meta_len = read_u32(&mut input)?.ok_or(CaptureError::BadMagic)?;
        if meta_len > MAX_META_BYTES {
            return Err(CaptureError::MetaTooLarge(meta_len));
        }
        let mut meta = vec![0u8; meta_len as usize];
        input.read_exact(&mut meta)?;
        let meta = serde_json::from_slice(&meta).map_err(CaptureError::BadMeta)?;
        Ok(Self {
            input,
            meta,
            buffer: Vec::new(),
            index: 0,
        })
    }

    pub fn meta(&self) -> &CaptureMeta {
        &self.meta
    }

    /// The next record, `None` at a clean end of file.
    pub fn next_record(&mut self) -> Result<Option<Record>, CaptureError> {
        let index = self.index;

        // Most records lie whole in the reader's buffer: decode them in place rather than
        // copying them out first.
        let buffered = self.input.fill_buf()?;
        if buffered.len() >= 12 {
            let len = u32::from_le_bytes(buffered[8..12].try_into().expect("4 bytes"));
            if len > MAX_PACKET_BYTES {
                return Err(CaptureError::RecordTooLarge { index, len });
            }
            let end = 12 + len as usize;
            if buffered.len() >= end {
                let at = u64::from_le_bytes(buffered[..8].try_into().expect("8 bytes"));
                let packet = DataPacket::decode(&buffered[12..end])
                    .map_err(|error| CaptureError::BadPacket { index, error })?;
                self.input.consume(end);
                self.index += 1;
                return Ok(Some(Record {
                    at: Duration::from_micros(at),
                    packet,
                }));
            }
        }

        let mut at = [0u8; 8];
        match read_full(&mut self.input, &mut at)? {
            0 => return Ok(None),
            8 => {}
            _ => return Err(CaptureError::Truncated { index }),
        }
        let len = read_u32(&mut self.input)?.ok_or(CaptureError::Truncated { index })?;
        if len > MAX_PACKET_BYTES {
            return Err(CaptureError::RecordTooLarge { index, len });
        }
        self.buffer.resize(len as usize, 0);
        if read_full(&mut self.input, &mut self.buffer)? != len as usize {
            return Err(CaptureError::Truncated { index });
        }
        let packet = DataPacket::decode(self.buffer.as_slice())
            .map_err(|error| CaptureError::BadPacket { index, error })?;
        self.index += 1;
        Ok(Some(Record {
            at: Duration::from_micros(u64::from_le_bytes(at)),
            packet,
        }))
    }
}

impl<R: BufRead> Iterator for CaptureReader<R> {
    type Item = Result<Record, CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

fn read_u32(input: &mut impl Read) -> Result<Option<u32>, CaptureError> {
    let mut bytes = [0u8; 4];
    Ok((read_full(input, &mut bytes)? == 4).then(|| u32::from_le_bytes(bytes)))
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_protocol::data_packet::Value;

    fn packet(n: u32) -> DataPacket {
        DataPacket {
            participant_identity: format!("sender-{n}"),
            sequence: n,
            value: Some(Value::StreamChunk(livekit_protocol::data_stream::Chunk {
                stream_id: "s".into(),
                chunk_index: n as u64,
                content: vec![n as u8; 100],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn capture_bytes(records: &[(Duration, DataPacket)]) -> Vec<u8> {
        let meta = CaptureMeta {
            source: "test".into(),
            ..Default::default()
        };
        let mut writer = CaptureWriter::new(Vec::new(), &meta).unwrap();
        for (at, p) in records {
            writer.write(*at, p).unwrap();
        }
        writer.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let records: Vec<_> = (0..5)
            .map(|n| (Duration::from_micros(1_000 * n as u64 + 7), packet(n)))
            .collect();
        let bytes = capture_bytes(&records);
        let mut reader = CaptureReader::new(bytes.as_slice()).unwrap();
        assert_eq!(reader.meta().source, "test");
        let read: Vec<_> = reader.by_ref().map(|r| r.unwrap()).collect();
        assert_eq!(read.len(), 5);
        for (record, (at, p)) in read.iter().zip(&records) {
            assert_eq!(record.at, *at);
            assert_eq!(&record.packet, p);
        }
    }

    #[test]
    fn corrupt_files_give_clear_errors() {
        let bytes = capture_bytes(&[(Duration::ZERO, packet(1)), (Duration::ZERO, packet(2))]);

        let err = CaptureReader::new(&b"PNG\0\0\0\0\0\0\0\0\0"[..])
            .err()
            .unwrap();
        assert!(matches!(err, CaptureError::BadMagic));

        let cut = &bytes[..bytes.len() - 3];
        let results: Vec<_> = CaptureReader::new(cut).unwrap().collect();
        assert!(results[0].is_ok());
        assert!(
            matches!(results[1], Err(CaptureError::Truncated { index: 1 })),
            "{results:?}"
        );

        // A length field claiming 4 GiB is refused before anything is allocated.
        let mut huge = capture_bytes(&[]);
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = CaptureReader::new(huge.as_slice())
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, CaptureError::RecordTooLarge { index: 0, .. }),
            "{err}"
        );
    }
}
