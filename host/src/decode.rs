//! Decode: one assembled message (JSON text) into a typed [`Frame`].
//!
//! The upstream vision service sends one JSON object per frame. Detections come under
//! `videoStreamObjects`, or under `detectedObjects` and `detectedFaces` (older senders), each
//! with `name`, `confidence`, an optional `objectId` and `boundingPolygon.normalizedVertices`.
//! The frame size is under `videoStreamMetadata` (`frameWidth`, `frameHeight`), the image is
//! base64 under `imageData`, and `timestamp` is kept as sent. Every other key is passed to the
//! plugin untouched as `extra_json`.
//!
//! The message is parsed once, borrowing the base64 text from the input instead of copying it,
//! and the image is decoded straight into its final buffer. A frame that fails any check is
//! rejected with a [`DecodeError`] whose [`DecodeError::reason`] labels the rejection counter;
//! nothing here can fail a job.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Bounds on what one message may carry.
#[derive(Debug, Clone)]
pub struct DecodeLimits {
    /// Most detections accepted in one frame; a frame with more is rejected
    /// (`too_many_detections`). Defaults to 1,000.
    pub max_detections: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_detections: 1_000,
        }
    }
}

/// One decoded frame, ready for a plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Position in the job, from 0, in decode order.
    pub index: u64,
    /// The sender's timestamp, as sent.
    pub timestamp: Option<String>,
    /// Milliseconds since the job started when the frame was assembled.
    pub received_ms: u64,
    /// Source frame size in pixels; 0 when the message does not say.
    pub width: u32,
    pub height: u32,
    pub detections: Vec<Detection>,
    pub image: Option<Image>,
    /// The message's keys that are not modelled above, as a JSON object.
    pub extra_json: String,
}

impl Frame {
    /// Bytes of image data this frame carries.
    pub fn image_bytes(&self) -> usize {
        self.image.as_ref().map_or(0, |image| image.data.len())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub label: String,
    pub confidence: f32,
    pub bbox: BBox,
    pub object_id: Option<String>,
}

/// An axis-aligned box in normalized coordinates (0.0..=1.0 of the frame's width and height).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BBox {
    pub left: f32,
    pub top: f32,
    pub width: f32,
    pub height: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub format: ImageFormat,
    pub data: Vec<u8>,
}

/// Image container, sniffed from magic bytes, never from what the sender claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Other,
}

impl ImageFormat {
    pub fn sniff(bytes: &[u8]) -> Self {
        const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Self::Jpeg
        } else if bytes.starts_with(PNG) {
            Self::Png
        } else {
            Self::Other
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jpeg => "jpeg",
            Self::Png => "png",
            Self::Other => "other",
        }
    }
}

/// Why a message was not turned into a frame.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "message is a Python dict repr (single-quoted keys), not JSON; the sender must use json.dumps"
    )]
    PythonRepr,
    #[error("message is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("imageData is not valid base64 ({len} characters)")]
    Base64 { len: usize },
    #[error("frame has {count} detections, more than the limit of {limit}")]
    TooManyDetections { count: usize, limit: usize },
    #[error("detection {index} has no usable boundingPolygon.normalizedVertices")]
    BadPolygon { index: usize },
}

impl DecodeError {
    /// Short label for the rejection counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PythonRepr => "python_repr",
            Self::Json(_) => "bad_json",
            Self::Base64 { .. } => "bad_base64",
            Self::TooManyDetections { .. } => "too_many_detections",
            Self::BadPolygon { .. } => "bad_polygon",
        }
    }
}

/// Decodes one message into the frame at `index`.
pub fn decode(
    text: &str,
    index: u64,
    received_ms: u64,
    limits: &DecodeLimits,
) -> Result<Frame, DecodeError> {
    if looks_like_python_repr(text) {
        return Err(DecodeError::PythonRepr);
    }
    // The image is nearly all of the message. When its base64 has no escapes (always, in
    // practice) it is found with a SIMD scan and cut out, and serde parses only the rest:
    // serde's string loop over the image was a third of the path's time.
    let spliced;
    let (message, image_text): (Message<'_>, Option<&str>) = match find_image_data(text) {
        Some((start, end)) => {
            spliced = [&text[..start - 1], "null", &text[end + 1..]].concat();
            let message: Message<'_> = serde_json::from_str(&spliced).map_err(DecodeError::Json)?;
            (message, Some(&text[start..end]))
        }
        None => (serde_json::from_str(text).map_err(DecodeError::Json)?, None),
    };

    let count = message.objects.len();
    if count > limits.max_detections {
        return Err(DecodeError::TooManyDetections {
            count,
            limit: limits.max_detections,
        });
    }
    let detections = message
        .objects
        .into_iter()
        .enumerate()
        .map(|(index, object)| object.into_detection(index))
        .collect::<Result<Vec<_>, _>>()?;

    // A later duplicate key wins, as it does for every other key.
    let encoded = message.image_data.as_deref().or(image_text);
    let image = match encoded {
        Some(encoded) => {
            let data = decode_base64(encoded)?;
            Some(Image {
                format: ImageFormat::sniff(&data),
                data,
            })
        }
        None => None,
    };

    Ok(Frame {
        index,
        timestamp: message.timestamp,
        received_ms,
        width: message.width,
        height: message.height,
        detections,
        image,
        extra_json: message.extra,
    })
}

/// Finds the top-level `"imageData"` string value, returning the byte range of its content
/// (quotes excluded). `None` when there is none, when it contains an escape, or when the text
/// is not a well-formed object as far as the scan goes: serde then parses the whole text and
/// reports any error.
fn find_image_data(text: &str) -> Option<(usize, usize)> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(b, i);
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(b, i + 1)?;
        let key = &b[i + 1..key_end];
        i = skip_ws(b, key_end + 1);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        if key == b"imageData" && b.get(i) == Some(&b'"') {
            let start = i + 1;
            let len = memchr::memchr2(b'"', b'\\', &b[start..])?;
            return (b[start + len] == b'"').then_some((start, start + len));
        }
        i = skip_ws(b, value_end(b, i)?);
        match b.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Index of the quote closing the string whose content starts at `i`.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[i] == b'"' {
            return Some(i);
        }
        i += 2; // an escape and the character it escapes
    }
}

/// Index just past the JSON value starting at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => Some(string_end(b, i + 1)? + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => j = string_end(b, j + 1)?,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let len = b[i..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))?;
            Some(i + len)
        }
    }
}

/// Senders that format a Python dict with `str()` produce `{'key': ...}`. It is a common
/// enough mistake upstream to deserve its own reason instead of a column number.
fn looks_like_python_repr(text: &str) -> bool {
    let mut chars = text.trim_start().chars();
    chars.next() == Some('{') && chars.find(|c| !c.is_whitespace()) == Some('\'')
}

/// Standard alphabet, padding optional; a `data:image/...;base64,` prefix is accepted.
fn decode_base64(encoded: &str) -> Result<Vec<u8>, DecodeError> {
    let mut payload = encoded.trim_ascii();
    if payload.starts_with("data:") {
        // The media type is short: look for the separator near the start only, never
        // across the whole image.
        let head = &payload.as_bytes()[..payload.len().min(256)];
        if let Some(at) = head.windows(8).position(|w| w == b";base64,") {
            payload = &payload[at + 8..];
        }
    }
    let engine = if payload.len().is_multiple_of(4) {
        &base64_simd::STANDARD
    } else {
        &base64_simd::STANDARD_NO_PAD
    };
    engine
        .decode_to_vec(payload.as_bytes())
        .map_err(|_| DecodeError::Base64 { len: payload.len() })
}

/// The parsed top level of one message. Unknown keys are re-serialized into `extra`.
struct Message<'a> {
    timestamp: Option<String>,
    width: u32,
    height: u32,
    objects: Vec<RawObject>,
    image_data: Option<Cow<'a, str>>,
    extra: String,
}

impl<'de: 'a, 'a> Deserialize<'de> for Message<'a> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MessageVisitor(std::marker::PhantomData))
    }
}

struct MessageVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for MessageVisitor<'a> {
    type Value = Message<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object describing one frame")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut message = Message {
            timestamp: None,
            width: 0,
            height: 0,
            objects: Vec::new(),
            image_data: None,
            extra: String::from("{"),
        };

        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "timestamp" => {
                    let raw: &RawValue = map.next_value()?;
                    // Keep strings as sent; numbers and others as their JSON text.
                    message.timestamp = Some(match serde_json::from_str::<String>(raw.get()) {
                        Ok(text) => text,
                        Err(_) => raw.get().to_owned(),
                    });
                }
                "imageData" => {
                    let data: Option<CowStr<'de>> = map.next_value()?;
                    message.image_data = data.map(|CowStr(data)| data);
                }
                "videoStreamObjects" | "detectedObjects" | "detectedFaces" => {
                    let default_label = if key == "detectedFaces" {
                        "face"
                    } else {
                        "object"
                    };
                    let objects: Option<Vec<RawObject>> = map.next_value()?;
                    message
                        .objects
                        .extend(objects.unwrap_or_default().into_iter().map(|mut o| {
                            if o.name.is_none() {
                                o.name = Some(default_label.to_owned());
                            }
                            o
                        }));
                }
                "videoStreamMetadata" => {
                    let raw: &RawValue = map.next_value()?;
                    if let Ok(meta) = serde_json::from_str::<StreamMetadata>(raw.get()) {
                        message.width = meta.frame_width.unwrap_or(0);
                        message.height = meta.frame_height.unwrap_or(0);
                    }
                    // The metadata may carry more than the size (frame rate, stream id):
                    // the plugin sees it whole.
                    push_extra(&mut message.extra, &key, raw.get());
                }
                _ => {
                    let raw: &RawValue = map.next_value()?;
                    push_extra(&mut message.extra, &key, raw.get());
                }
            }
        }
        message.extra.push('}');
        Ok(message)
    }
}

fn push_extra(extra: &mut String, key: &str, raw_value: &str) {
    if extra.len() > 1 {
        extra.push(',');
    }
    // A key re-encoded by serde_json is always valid JSON, escapes included.
    extra.push_str(&serde_json::to_string(key).expect("a string always serializes"));
    extra.push(':');
    extra.push_str(raw_value);
}

/// A string that borrows from the input unless it contains escapes.
struct CowStr<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for CowStr<'a> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a base64 string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
        }
        deserializer.deserialize_str(V).map(CowStr)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StreamMetadata {
    frame_width: Option<u32>,
    frame_height: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawObject {
    name: Option<String>,
    #[serde(default)]
    confidence: f32,
    #[serde(default)]
    object_id: Option<ObjectId>,
    bounding_polygon: Option<Polygon>,
    // Other per-object fields (attributes, landmarks) are not modelled yet.
    #[serde(flatten)]
    _rest: std::collections::HashMap<String, IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ObjectId {
    Number(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Polygon {
    normalized_vertices: Vec<Vertex>,
}

#[derive(Deserialize)]
struct Vertex {
    x: f32,
    y: f32,
}

impl RawObject {
    fn into_detection(self, index: usize) -> Result<Detection, DecodeError> {
        let vertices = self
            .bounding_polygon
            .map(|p| p.normalized_vertices)
            .filter(|v| !v.is_empty())
            .ok_or(DecodeError::BadPolygon { index })?;
        if vertices
            .iter()
            .any(|v| !v.x.is_finite() || !v.y.is_finite())
        {
            return Err(DecodeError::BadPolygon { index });
        }

        let clamp = |v: f32| v.clamp(0.0, 1.0);
        let (mut left, mut top, mut right, mut bottom) = (1.0f32, 1.0f32, 0.0f32, 0.0f32);
        for v in &vertices {
            left = left.min(clamp(v.x));
            right = right.max(clamp(v.x));
            top = top.min(clamp(v.y));
            bottom = bottom.max(clamp(v.y));
        }

        Ok(Detection {
            label: self.name.unwrap_or_default(),
            confidence: if self.confidence.is_finite() {
                self.confidence
            } else {
                0.0
            },
            bbox: BBox {
                left,
                top,
                width: right - left,
                height: bottom - top,
            },
            object_id: self.object_id.map(|id| match id {
                ObjectId::Number(n) => n.to_string(),
                ObjectId::Text(s) => s,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    const JPEG_START: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 0, 16, b'J', b'F', b'I', b'F'];
    const PNG_START: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    fn polygon(l: f32, t: f32, r: f32, b: f32) -> serde_json::Value {
        serde_json::json!({"normalizedVertices": [
            {"x": l, "y": t}, {"x": r, "y": t}, {"x": r, "y": b}, {"x": l, "y": b}]})
    }

    fn decode_ok(value: serde_json::Value) -> Frame {
        decode(&value.to_string(), 3, 40, &DecodeLimits::default()).expect("decodes")
    }

    #[test]
    fn video_stream_objects_shape() {
        let frame = decode_ok(serde_json::json!({
            "timestamp": "2026-01-01T00:00:01.500Z",
            "videoStreamMetadata": {"frameRate": 2.0, "frameWidth": 1920, "frameHeight": 1080},
            "videoStreamObjects": [
                {"name": "person", "confidence": 0.9, "objectId": 7,
                 "boundingPolygon": polygon(0.1, 0.2, 0.3, 0.6)},
            ],
            "imageData": STANDARD.encode(JPEG_START),
            "streamId": "cam-1",
        }));
        assert_eq!(frame.index, 3);
        assert_eq!(frame.received_ms, 40);
        assert_eq!(frame.timestamp.as_deref(), Some("2026-01-01T00:00:01.500Z"));
        assert_eq!((frame.width, frame.height), (1920, 1080));
        assert_eq!(frame.detections.len(), 1);
        let d = &frame.detections[0];
        assert_eq!(d.label, "person");
        assert_eq!(d.object_id.as_deref(), Some("7"));
        assert!((d.bbox.left - 0.1).abs() < 1e-6 && (d.bbox.top - 0.2).abs() < 1e-6);
        assert!((d.bbox.width - 0.2).abs() < 1e-6 && (d.bbox.height - 0.4).abs() < 1e-6);
        let image = frame.image.expect("image");
        assert_eq!(image.format, ImageFormat::Jpeg);
        assert_eq!(image.data, JPEG_START);
        let extra: serde_json::Value = serde_json::from_str(&frame.extra_json).unwrap();
        assert_eq!(extra["streamId"], "cam-1");
        assert_eq!(extra["videoStreamMetadata"]["frameRate"], 2.0);
        assert!(extra.get("imageData").is_none() && extra.get("videoStreamObjects").is_none());
    }

    #[test]
    fn detected_objects_and_faces_shape() {
        let frame = decode_ok(serde_json::json!({
            "detectedObjects": [
                {"name": "car", "confidence": 0.5, "objectId": "a1",
                 "boundingPolygon": polygon(0.0, 0.0, 0.5, 0.5)},
            ],
            "detectedFaces": [
                {"confidence": 0.8, "boundingPolygon": polygon(0.6, 0.1, 0.7, 0.2),
                 "landmarks": [{"type": "LEFT_EYE", "x": 0.62, "y": 0.13}]},
            ],
            "imageData": STANDARD.encode(PNG_START),
        }));
        // Detections keep the message's key order (json! sorts keys: faces come first).
        let labels: Vec<_> = frame.detections.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(labels, ["face", "car"]);
        assert_eq!(frame.detections[0].object_id, None);
        assert_eq!(frame.detections[1].object_id.as_deref(), Some("a1"));
        assert_eq!(frame.image.unwrap().format, ImageFormat::Png);
        assert_eq!((frame.width, frame.height), (0, 0));
        assert_eq!(frame.extra_json, "{}");
    }

    #[test]
    fn python_repr_is_rejected_with_its_own_reason() {
        let err = decode("{'videoStreamObjects': []}", 0, 0, &DecodeLimits::default())
            .expect_err("rejected");
        assert_eq!(err.reason(), "python_repr");
        assert!(err.to_string().contains("single-quoted"), "{err}");
    }

    #[test]
    fn invalid_json_and_base64_are_rejected() {
        let err = decode("{\"imageData\": ", 0, 0, &DecodeLimits::default()).unwrap_err();
        assert_eq!(err.reason(), "bad_json");
        let err = decode(
            r#"{"imageData": "not*base64!"}"#,
            0,
            0,
            &DecodeLimits::default(),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "bad_base64");
    }

    #[test]
    fn base64_with_escapes_data_uri_and_no_padding() {
        let encoded = STANDARD.encode([0xFFu8, 0xD8, 0xFF, 0x01, 0xFE]);
        // A JSON encoder may escape '/' as "\/"; the string is then owned, not borrowed.
        assert!(
            encoded.contains('/'),
            "the sample must exercise the escape: {encoded}"
        );
        let escaped = encoded.replace('/', "\\/");
        let text = format!(r#"{{"imageData": "{escaped}"}}"#);
        let frame = decode(&text, 0, 0, &DecodeLimits::default()).unwrap();
        assert_eq!(frame.image.unwrap().data, [0xFF, 0xD8, 0xFF, 0x01, 0xFE]);

        let unpadded = encoded.trim_end_matches('=');
        let frame = decode_ok(
            serde_json::json!({"imageData": format!("data:image/jpeg;base64,{unpadded}")}),
        );
        assert_eq!(frame.image.unwrap().data, [0xFF, 0xD8, 0xFF, 0x01, 0xFE]);
    }

    #[test]
    fn the_image_scan_agrees_with_serde() {
        let encoded = STANDARD.encode(JPEG_START);
        let cases = [
            // Plain, with nested values before the image, spaces, and a key that only
            // contains "imageData" inside another string.
            format!(
                r#"{{"a": {{"imageData": [1, "x\"y"]}}, "b": "imageData", "imageData": "{encoded}", "c": 1}}"#
            ),
            format!(r#"  {{ "imageData" : "{encoded}" }}"#),
            // An escape inside the image: the scan declines, serde does the work.
            format!(r#"{{"imageData": "{}"}}"#, encoded.replace('/', "\\/")),
            // A later duplicate wins, as for every key.
            format!(r#"{{"imageData": "AAAA", "imageData": "{encoded}"}}"#),
            // null: no image.
            r#"{"imageData": null, "x": true}"#.to_owned(),
        ];
        for text in &cases {
            let frame = decode(text, 0, 0, &DecodeLimits::default())
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            let expected = if text.contains("null") {
                None
            } else {
                Some(JPEG_START.to_vec())
            };
            assert_eq!(frame.image.map(|i| i.data), expected, "{text}");
        }
        assert_eq!(
            find_image_data(&cases[0]).map(|(s, e)| &cases[0][s..e]),
            Some(encoded.as_str())
        );
        assert_eq!(find_image_data(&cases[2]), None);
        // Malformed text is left to serde, which names the error.
        for bad in [
            r#"{"imageData": "abc"#,
            r#"{"a": [1, 2, "imageData": "x"}"#,
            "[]",
            "",
        ] {
            let err = decode(bad, 0, 0, &DecodeLimits::default()).unwrap_err();
            assert_eq!(err.reason(), "bad_json", "{bad}");
        }
    }

    #[test]
    fn sniffing_ignores_what_the_sender_claims() {
        assert_eq!(ImageFormat::sniff(JPEG_START), ImageFormat::Jpeg);
        assert_eq!(ImageFormat::sniff(PNG_START), ImageFormat::Png);
        assert_eq!(ImageFormat::sniff(b"GIF89a"), ImageFormat::Other);
        assert_eq!(ImageFormat::sniff(b""), ImageFormat::Other);
        let frame = decode_ok(serde_json::json!({
            "imageData": format!("data:image/jpeg;base64,{}", STANDARD.encode(PNG_START)),
        }));
        assert_eq!(frame.image.unwrap().format, ImageFormat::Png);
    }

    #[test]
    fn too_many_detections_and_bad_polygons() {
        let object = serde_json::json!({"name": "p", "boundingPolygon": polygon(0., 0., 1., 1.)});
        let many = serde_json::json!({"videoStreamObjects": vec![object; 5]}).to_string();
        let err = decode(&many, 0, 0, &DecodeLimits { max_detections: 4 }).unwrap_err();
        assert_eq!(err.reason(), "too_many_detections");

        let bad = serde_json::json!({"videoStreamObjects": [{"name": "p"}]}).to_string();
        let err = decode(&bad, 0, 0, &DecodeLimits::default()).unwrap_err();
        assert_eq!(err.reason(), "bad_polygon");
    }

    #[test]
    fn boxes_are_clamped_to_the_frame() {
        let frame = decode_ok(serde_json::json!({"videoStreamObjects": [
            {"name": "p", "boundingPolygon": polygon(-0.2, 0.5, 0.4, 1.3)}]}));
        let b = frame.detections[0].bbox;
        assert_eq!((b.left, b.top), (0.0, 0.5));
        assert!((b.width - 0.4).abs() < 1e-6 && (b.height - 0.5).abs() < 1e-6);
    }
}
