//! `capture synth`: makes a capture that looks like the upstream vision service's output.
//!
//! Each frame is a real photograph (a slowly panning crop, resized to the chosen resolution)
//! with the frame's objects drawn in, encoded as JPEG at a quality chosen so the image is close
//! to the requested size. The frame's message is OCI-Vision-shaped JSON (`videoStreamObjects`,
//! `videoStreamMetadata`, base64 `imageData`), split into app-level parts that carry
//! `frame_meta`, and each part is sent as a text stream chunked exactly as LiveKit senders
//! chunk it ([`crate::streams::send`]).
//!
//! Objects are either synthetic (boxes moving at constant velocity, bouncing off the edges,
//! with stable `objectId`s) or read from a MOTChallenge file, whose ids are dropped so that a
//! tracker has to find them itself.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use image::codecs::jpeg::JpegEncoder;
use image::{Rgb, RgbImage, imageops};

use super::{CaptureError, CaptureMeta, CaptureWriter};
use crate::streams::send::{SendTextError, SendTextOptions, text_stream_packets};

const PHOTOS: [&[u8]; 4] = [
    include_bytes!("../../assets/images/coffee.png"),
    include_bytes!("../../assets/images/chelsea.png"),
    include_bytes!("../../assets/images/astronaut.png"),
    include_bytes!("../../assets/images/rocket.jpg"),
];

/// Packets of one frame are spread this far apart, as a data channel delivers them.
const PACKET_SPACING: Duration = Duration::from_micros(20);

#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Frames to make. With `detections`, at most the file's frame count.
    pub frames: u32,
    /// Approximate size of each encoded image, in KiB.
    pub image_kib: u32,
    /// App-level parts each frame message is split into.
    pub parts: u32,
    /// Frames per second: sets arrival times and timestamps.
    pub fps: f64,
    /// A MOTChallenge file (`frame,id,left,top,width,height,conf,...`, pixels) to take the
    /// objects from, instead of synthetic moving boxes.
    pub detections: Option<PathBuf>,
    /// Frame size in pixels; by default chosen from `image_kib` (and 640x480 with
    /// `detections`, the MOTChallenge TUD sequences' size).
    pub size: Option<(u32, u32)>,
    /// Synthetic objects per frame. Defaults to 4.
    pub objects: u32,
    /// Seed for the synthetic motion.
    pub seed: u64,
    /// The data-stream topic. Defaults to `agentChat`.
    pub topic: String,
    /// The sending participant's identity. Defaults to `vision-service`.
    pub sender: String,
    /// Compress streams with raw deflate, as a LiveKit sender does for receivers that
    /// advertise it. Defaults to off.
    pub deflate: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            frames: 100,
            image_kib: 60,
            parts: 4,
            fps: 10.0,
            detections: None,
            size: None,
            objects: 4,
            seed: 7,
            topic: "agentChat".into(),
            sender: "vision-service".into(),
            deflate: false,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SynthReport {
    pub frames: u32,
    pub packets: u64,
    pub width: u32,
    pub height: u32,
    pub jpeg_quality: u8,
    pub mean_image_bytes: u64,
    pub bytes_written: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("cannot read detections {path}: {error}")]
    ReadDetections { path: String, error: std::io::Error },
    #[error("detections {path}, line {line}: {reason}")]
    BadDetections {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Send(#[from] SendTextError),
    #[error("image encoding failed: {0}")]
    Image(image::ImageError),
    #[error("cannot write {path}: {error}")]
    Create { path: String, error: CaptureError },
}

impl From<image::ImageError> for SynthError {
    fn from(error: image::ImageError) -> Self {
        Self::Image(error)
    }
}

/// One object in one frame, in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Object {
    id: Option<u32>,
    left: f32,
    top: f32,
    width: f32,
    height: f32,
    confidence: f32,
}

/// Writes a synthetic capture to `out`. `progress` is called after each frame.
pub fn synth(
    options: &SynthOptions,
    out: &Path,
    mut progress: impl FnMut(u32),
) -> Result<SynthReport, SynthError> {
    if options.parts == 0 || options.frames == 0 || options.image_kib == 0 {
        return Err(SynthError::Invalid(
            "frames, parts and image-kib must be positive".into(),
        ));
    }
    check_fps(options.fps)?;
    if options.parts > 64 {
        tracing::warn!(
            parts = options.parts,
            "More parts than a host accepts by default (assembly.max_parts = 64): raise it to replay this capture"
        );
    }
    let mot = options.detections.as_deref().map(read_mot).transpose()?;
    let frames = match &mot {
        Some(mot) => options.frames.min(mot.len() as u32),
        None => options.frames,
    };
    let (width, height) = match (options.size, &mot) {
        (Some(size), _) => size,
        (None, Some(_)) => (640, 480),
        (None, None) => size_for(options.image_kib),
    };
    check_size(width, height)?;

    let photos = load_photos()?;
    let mut scene = Scene::new(options, width, height);
    let render =
        |index: u32, objects: &[Object]| render(&photos, index, frames, width, height, objects);

    let first_objects = match &mot {
        Some(mot) => mot[0].clone(),
        None => scene.objects(),
    };
    let quality = pick_quality(
        &render(0, &first_objects),
        options.image_kib as usize * 1024,
    )?;

    let meta = CaptureMeta {
        source: "synth".into(),
        created_unix_ms: unix_ms(),
        topic: options.topic.clone(),
        note: format!(
            "{frames} frames of {width}x{height} JPEG (quality {quality}) in {} parts at {} fps",
            options.parts, options.fps
        ),
    };
    let mut writer = CaptureWriter::create(out, &meta).map_err(|error| SynthError::Create {
        path: out.display().to_string(),
        error,
    })?;
    let send_options = SendTextOptions {
        compress: options.deflate,
        ..Default::default()
    };
    let mut image_bytes_total = 0u64;
    let start_ms = START_MS;

    for index in 0..frames {
        let objects = match &mot {
            Some(mot) => mot[index as usize].clone(),
            None => scene.step(),
        };
        let jpeg = encode(&render(index, &objects), quality)?;
        image_bytes_total += jpeg.len() as u64;
        let at = Duration::from_secs_f64(index as f64 / options.fps);
        let timestamp_ms = start_ms + at.as_millis() as i64;
        let message = frame_message(&objects, &jpeg, width, height, options.fps, timestamp_ms);

        let message_id = format!("frame-{index:06}");
        let mut offset = Duration::ZERO;
        for (part_index, part) in split_parts(&message, options.parts as usize).enumerate() {
            let frame_meta = serde_json::json!({
                "message_id": message_id,
                "frame_index": part_index,
                "total_frames": options.parts,
            });
            let attributes = HashMap::from([("frame_meta".to_owned(), frame_meta.to_string())]);
            let packets = text_stream_packets(
                part,
                &options.topic,
                attributes,
                &options.sender,
                &SendTextOptions {
                    timestamp_ms: Some(timestamp_ms),
                    ..send_options.clone()
                },
            )?;
            for packet in &packets {
                writer.write(at + offset, packet)?;
                offset += PACKET_SPACING;
            }
        }
        progress(index + 1);
    }

    let packets = writer.records();
    let file = writer.finish()?;
    let bytes_written = file.get_ref().metadata().map(|m| m.len()).unwrap_or(0);
    Ok(SynthReport {
        frames,
        packets,
        width,
        height,
        jpeg_quality: quality,
        mean_image_bytes: image_bytes_total / frames as u64,
        bytes_written,
    })
}

/// Frame messages made ahead of time, for generators that send frames live and cannot
/// afford a frame's image work on each frame (the tests' LiveKit stream generator).
#[derive(Debug, Clone)]
pub struct RenderedFrames {
    pub width: u32,
    pub height: u32,
    pub jpeg_quality: u8,
    /// One message a frame, shaped as [`synth`] writes them; frame `i` is stamped `i / fps`
    /// after 2026-01-01T00:00:00Z.
    pub messages: Vec<String>,
}

/// Renders the first `count` frames of the synthetic scene as frame messages, with the
/// photographs, moving objects, frame size and JPEG quality [`synth`] would use.
/// `options.frames` and `options.detections` are not used.
pub fn render_messages(options: &SynthOptions, count: u32) -> Result<RenderedFrames, SynthError> {
    if count == 0 || options.image_kib == 0 {
        return Err(SynthError::Invalid(
            "count and image-kib must be positive".into(),
        ));
    }
    check_fps(options.fps)?;
    let (width, height) = options.size.unwrap_or_else(|| size_for(options.image_kib));
    check_size(width, height)?;

    let photos = load_photos()?;
    let mut scene = Scene::new(options, width, height);
    let quality = pick_quality(
        &render(&photos, 0, count, width, height, &scene.objects()),
        options.image_kib as usize * 1024,
    )?;

    let start_ms = START_MS;
    let mut messages = Vec::with_capacity(count as usize);
    for index in 0..count {
        let objects = scene.step();
        let jpeg = encode(
            &render(&photos, index, count, width, height, &objects),
            quality,
        )?;
        let at = Duration::from_secs_f64(index as f64 / options.fps);
        let timestamp_ms = start_ms + at.as_millis() as i64;
        messages.push(frame_message(
            &objects,
            &jpeg,
            width,
            height,
            options.fps,
            timestamp_ms,
        ));
    }
    Ok(RenderedFrames {
        width,
        height,
        jpeg_quality: quality,
        messages,
    })
}

/// When a synthetic capture's first frame was "sent": 2026-01-01T00:00:00Z, in Unix ms.
const START_MS: i64 = 1_767_225_600_000;

fn check_fps(fps: f64) -> Result<(), SynthError> {
    if !(0.001..=1000.0).contains(&fps) {
        return Err(SynthError::Invalid(
            "fps must be between 0.001 and 1000".into(),
        ));
    }
    Ok(())
}

fn check_size(width: u32, height: u32) -> Result<(), SynthError> {
    if width < 16 || height < 16 || width > 8192 || height > 8192 {
        return Err(SynthError::Invalid(format!(
            "frame size {width}x{height} is out of range"
        )));
    }
    Ok(())
}

/// The photographs frames are cropped from, decoded.
fn load_photos() -> Result<Vec<RgbImage>, SynthError> {
    Ok(PHOTOS
        .iter()
        .map(|bytes| image::load_from_memory(bytes).map(|i| i.to_rgb8()))
        .collect::<Result<_, _>>()?)
}

/// The frame's message, shaped like the upstream service's.
fn frame_message(
    objects: &[Object],
    jpeg: &[u8],
    width: u32,
    height: u32,
    fps: f64,
    timestamp_ms: i64,
) -> String {
    let (w, h) = (width as f32, height as f32);
    let objects: Vec<_> = objects
        .iter()
        .map(|o| {
            let (l, t, r, b) = (
                o.left / w,
                o.top / h,
                (o.left + o.width) / w,
                (o.top + o.height) / h,
            );
            let mut object = serde_json::json!({
                "name": "person",
                "confidence": (o.confidence * 1000.0).round() / 1000.0,
                "boundingPolygon": {"normalizedVertices": [
                    {"x": l, "y": t}, {"x": r, "y": t}, {"x": r, "y": b}, {"x": l, "y": b}]},
            });
            if let Some(id) = o.id {
                object["objectId"] = id.into();
            }
            object
        })
        .collect();
    let timestamp = chrono_like(timestamp_ms);
    serde_json::json!({
        "timestamp": timestamp,
        "videoStreamMetadata": {"frameRate": fps, "frameWidth": width, "frameHeight": height},
        "videoStreamObjects": objects,
        "imageData": base64::engine::general_purpose::STANDARD.encode(jpeg),
    })
    .to_string()
}

/// Splits a message into `parts` pieces of nearly equal length, on character boundaries.
pub fn split_parts(message: &str, parts: usize) -> impl Iterator<Item = &str> {
    let target = message.len().div_ceil(parts).max(1);
    let mut rest = message;
    (0..parts).map(move |i| {
        if i + 1 == parts {
            return std::mem::take(&mut rest);
        }
        let mut cut = target.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        let (head, tail) = rest.split_at(cut);
        rest = tail;
        head
    })
}

/// A resolution whose JPEG lands near `kib` at a middling quality (about 0.3 bytes a pixel
/// for these photographs), 16:9, in multiples of 16.
fn size_for(kib: u32) -> (u32, u32) {
    let pixels = (kib.max(4) as f64 * 1024.0 / 0.3).min(3840.0 * 2160.0);
    let width = ((pixels * 16.0 / 9.0).sqrt() / 16.0).round().max(2.0) * 16.0;
    let height = (width * 9.0 / 16.0 / 16.0).round().max(1.0) * 16.0;
    (width as u32, height as u32)
}

/// The JPEG quality whose encoding of `frame` is closest to `target` bytes.
fn pick_quality(frame: &RgbImage, target: usize) -> Result<u8, SynthError> {
    let (mut low, mut high) = (10u8, 98u8);
    let mut best = (usize::MAX, 75u8);
    while low <= high {
        let quality = (low + high) / 2;
        let size = encode(frame, quality)?.len();
        best = best.min((size.abs_diff(target), quality));
        if size < target {
            low = quality + 1;
        } else {
            high = quality - 1;
        }
    }
    Ok(best.1)
}

fn encode(frame: &RgbImage, quality: u8) -> Result<Vec<u8>, SynthError> {
    let mut out = Cursor::new(Vec::new());
    JpegEncoder::new_with_quality(&mut out, quality).encode_image(frame)?;
    Ok(out.into_inner())
}

/// A crop of one photograph that pans across it over the capture, with the objects drawn.
fn render(
    photos: &[RgbImage],
    index: u32,
    frames: u32,
    width: u32,
    height: u32,
    objects: &[Object],
) -> RgbImage {
    // Change photograph every 100 frames so long captures are not one picture.
    let photo = &photos[(index / 100) as usize % photos.len()];
    let (pw, ph) = photo.dimensions();
    let aspect = width as f32 / height as f32;
    let (cw, ch) = if pw as f32 / ph as f32 > aspect {
        ((ph as f32 * aspect * 0.9) as u32, (ph as f32 * 0.9) as u32)
    } else {
        ((pw as f32 * 0.9) as u32, (pw as f32 / aspect * 0.9) as u32)
    };
    let progress = (index % 100) as f32 / (frames.clamp(1, 100)) as f32;
    let x = ((pw - cw) as f32 * progress) as u32;
    let y = ((ph - ch) as f32 * (1.0 - progress)) as u32;
    let crop = imageops::crop_imm(photo, x, y, cw, ch).to_image();
    let mut frame = imageops::resize(&crop, width, height, imageops::FilterType::Triangle);

    for (n, object) in objects.iter().enumerate() {
        let colour = PALETTE[object.id.unwrap_or(n as u32) as usize % PALETTE.len()];
        draw_box(&mut frame, object, colour);
    }
    frame
}

const PALETTE: [Rgb<u8>; 6] = [
    Rgb([230, 60, 60]),
    Rgb([60, 200, 80]),
    Rgb([70, 110, 240]),
    Rgb([240, 200, 40]),
    Rgb([200, 70, 220]),
    Rgb([40, 210, 210]),
];

/// Tints the box's inside and draws its outline.
fn draw_box(frame: &mut RgbImage, object: &Object, colour: Rgb<u8>) {
    let (w, h) = frame.dimensions();
    let x0 = (object.left.max(0.0) as u32).min(w - 1);
    let y0 = (object.top.max(0.0) as u32).min(h - 1);
    let x1 = ((object.left + object.width).max(0.0) as u32).min(w - 1);
    let y1 = ((object.top + object.height).max(0.0) as u32).min(h - 1);
    let border = 3;
    for y in y0..=y1 {
        for x in x0..=x1 {
            let edge = x < x0 + border || x + border > x1 || y < y0 + border || y + border > y1;
            let pixel = frame.get_pixel_mut(x, y);
            for c in 0..3 {
                pixel[c] = if edge {
                    colour[c]
                } else {
                    ((pixel[c] as u16 + colour[c] as u16 * 3) / 4) as u8
                };
            }
        }
    }
}

/// Synthetic objects moving at constant velocity and bouncing off the frame's edges.
struct Scene {
    objects: Vec<(Object, f32, f32)>,
    width: f32,
    height: f32,
}

impl Scene {
    fn new(options: &SynthOptions, width: u32, height: u32) -> Self {
        let mut rng = SplitMix(options.seed);
        let (w, h) = (width as f32, height as f32);
        let objects = (0..options.objects)
            .map(|id| {
                let bw = w * (0.08 + 0.1 * rng.unit());
                let bh = h * (0.2 + 0.25 * rng.unit());
                let object = Object {
                    id: Some(id + 1),
                    left: (w - bw) * rng.unit(),
                    top: (h - bh) * rng.unit(),
                    width: bw,
                    height: bh,
                    confidence: 0.6 + 0.4 * rng.unit(),
                };
                let speed = w * 0.01;
                (
                    object,
                    speed * (rng.unit() * 2.0 - 1.0),
                    speed * 0.5 * (rng.unit() * 2.0 - 1.0),
                )
            })
            .collect();
        Self {
            objects,
            width: w,
            height: h,
        }
    }

    fn objects(&self) -> Vec<Object> {
        self.objects.iter().map(|(o, _, _)| *o).collect()
    }

    /// The objects of the next frame.
    fn step(&mut self) -> Vec<Object> {
        let current = self.objects();
        for (o, vx, vy) in &mut self.objects {
            o.left += *vx;
            o.top += *vy;
            if o.left < 0.0 || o.left + o.width > self.width {
                *vx = -*vx;
                o.left = o.left.clamp(0.0, self.width - o.width);
            }
            if o.top < 0.0 || o.top + o.height > self.height {
                *vy = -*vy;
                o.top = o.top.clamp(0.0, self.height - o.height);
            }
        }
        current
    }
}

/// A small deterministic generator; the motion only has to be repeatable, not random.
struct SplitMix(u64);

impl SplitMix {
    fn unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Reads a MOTChallenge file into per-frame objects (frames from 1, gaps kept empty),
/// dropping the ids.
fn read_mot(path: &Path) -> Result<Vec<Vec<Object>>, SynthError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| SynthError::ReadDetections {
        path: display.clone(),
        error,
    })?;
    let mut by_frame: BTreeMap<u32, Vec<Object>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: String| SynthError::BadDetections {
            path: display.clone(),
            line: n + 1,
            reason,
        };
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 6 {
            return Err(bad(format!(
                "expected at least 6 comma-separated fields, got {}",
                fields.len()
            )));
        }
        let number = |i: usize| {
            fields[i]
                .parse::<f32>()
                .map_err(|_| bad(format!("field {} is not a number", i + 1)))
        };
        let frame = number(0)?;
        if !(1.0..=1_000_000.0).contains(&frame) {
            return Err(bad(format!("frame number {frame} is out of range")));
        }
        let confidence = if fields.len() > 6 { number(6)? } else { 1.0 };
        by_frame.entry(frame as u32).or_default().push(Object {
            id: None,
            left: number(2)?,
            top: number(3)?,
            width: number(4)?,
            height: number(5)?,
            confidence: if (0.0..=1.0).contains(&confidence) {
                confidence
            } else {
                1.0
            },
        });
    }
    let last = by_frame
        .keys()
        .next_back()
        .copied()
        .ok_or_else(|| SynthError::BadDetections {
            path: display.clone(),
            line: 0,
            reason: "no detections".into(),
        })?;
    Ok((1..=last)
        .map(|f| by_frame.remove(&f).unwrap_or_default())
        .collect())
}

/// RFC 3339 in UTC with milliseconds, for the sender's `timestamp` field.
pub fn chrono_like(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since the epoch (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_message_in_order() {
        let message = "héllo wörld, this is a message";
        for parts in 1..8 {
            let pieces: Vec<_> = split_parts(message, parts).collect();
            assert_eq!(pieces.len(), parts);
            assert_eq!(pieces.concat(), message);
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(chrono_like(1_767_225_600_000), "2026-01-01T00:00:00.000Z");
        assert_eq!(chrono_like(1_767_225_661_250), "2026-01-01T00:01:01.250Z");
        assert_eq!(chrono_like(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn sizes_grow_with_the_target() {
        let (w1, h1) = size_for(30);
        let (w2, h2) = size_for(300);
        assert!(w2 * h2 > 5 * w1 * h1, "{w1}x{h1} vs {w2}x{h2}");
        assert_eq!(w2 % 16, 0);
    }

    #[test]
    fn mot_files_lose_their_ids() {
        let dir = std::env::temp_dir().join(format!("fh-mot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gt.txt");
        std::fs::write(
            &path,
            "1,1,10,20,30,40,1,-1,-1,-1\n3,2,5,5,10,10,1,-1,-1,-1\n",
        )
        .unwrap();
        let frames = read_mot(&path).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames[0][0],
            Object {
                id: None,
                left: 10.0,
                top: 20.0,
                width: 30.0,
                height: 40.0,
                confidence: 1.0
            }
        );
        assert!(frames[1].is_empty());
        std::fs::write(&path, "1,1,10,x,30,40\n").unwrap();
        let err = read_mot(&path).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("field 4"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
