//! Image decoding and per-region colour statistics.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};

/// Settings from the job's config JSON. Every field is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrameStatsConfig {
    /// Most bytes the decoder may allocate for one image. An image that needs more is
    /// rejected as a frame error instead of running the plugin out of memory (its linear
    /// memory is capped by the host, 64 MiB by default). Defaults to 32 MiB, enough for
    /// a 4K RGB frame.
    pub max_decode_bytes: u64,
}

impl Default for FrameStatsConfig {
    fn default() -> Self {
        Self {
            max_decode_bytes: 32 << 20,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl FrameStatsConfig {
    /// Parses the job's config JSON; `{}`, `null` or nothing give the defaults.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: Self = framehost_guest::config_from_json(text).map_err(ConfigError)?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses values no job can run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_decode_bytes == 0 {
            return Err(ConfigError("max_decode_bytes must be positive".into()));
        }
        Ok(())
    }
}

/// The image container format, as the host sniffed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
    Other,
}

impl ImageKind {
    fn name(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "jpeg",
            ImageKind::Png => "png",
            ImageKind::Other => "other",
        }
    }
}

/// A detection's label and normalized box, as the WIT contract gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    pub label: String,
    pub left: f32,
    pub top: f32,
    pub width: f32,
    pub height: f32,
}

/// Colour statistics of the pixels inside one detection's box.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectStats {
    pub label: String,
    /// Mean red, green and blue, 0 to 255; `null` when the box covers no pixel (empty, or
    /// wholly outside the image).
    pub mean_rgb: Option<[f64; 3]>,
    /// Mean luma (ITU-R BT.601 weights), 0 to 255; `null` like `mean_rgb`.
    pub mean_luma: Option<f64>,
    /// Pixels whose centre lies inside the box, after clipping it to the image.
    pub pixels: u64,
}

/// The result published for one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameResult {
    pub frame: u64,
    /// The decoded image's size, which may differ from what the message claimed.
    pub width: u32,
    pub height: u32,
    pub format: &'static str,
    pub objects: Vec<ObjectStats>,
}

/// Counters over a job, returned by `finish`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub frames: u64,
    pub frames_decoded: u64,
    /// Frames without an image.
    pub missing_images: u64,
    /// Frames whose image was of an unknown format, corrupt, or over `max_decode_bytes`.
    pub decode_failures: u64,
    pub objects: u64,
    /// Pixels of all decoded images.
    pub image_pixels: u64,
    /// Pixels inside detection boxes, summed over objects.
    pub object_pixels: u64,
}

/// Decodes frames and measures their detections, keeping the job's counters.
#[derive(Debug)]
pub struct FrameStats {
    config: FrameStatsConfig,
    summary: Summary,
}

impl FrameStats {
    pub fn new(config: FrameStatsConfig) -> Self {
        Self {
            config,
            summary: Summary::default(),
        }
    }

    /// Measures one frame. `image` is the sniffed format and the bytes as sent, `None` when
    /// the message carried no image. An error is the reason to reject the frame.
    pub fn process(
        &mut self,
        index: u64,
        image: Option<(ImageKind, &[u8])>,
        regions: &[Region],
    ) -> Result<FrameResult, String> {
        self.summary.frames += 1;
        let Some((kind, data)) = image else {
            self.summary.missing_images += 1;
            return Err(format!("frame {index}: no image to decode"));
        };

        let decoded = decode(kind, data, self.config.max_decode_bytes).inspect_err(|_| {
            self.summary.decode_failures += 1;
        });
        let rgb = decoded.map_err(|e| format!("frame {index}: {e}"))?;
        self.summary.frames_decoded += 1;
        self.summary.image_pixels += u64::from(rgb.width()) * u64::from(rgb.height());

        let objects: Vec<ObjectStats> = regions.iter().map(|r| region_stats(&rgb, r)).collect();
        self.summary.objects += objects.len() as u64;
        self.summary.object_pixels += objects.iter().map(|o| o.pixels).sum::<u64>();

        Ok(FrameResult {
            frame: index,
            width: rgb.width(),
            height: rgb.height(),
            format: kind.name(),
            objects,
        })
    }

    pub fn summary(&self) -> Summary {
        self.summary.clone()
    }
}

/// Decodes JPEG or PNG bytes to 8-bit RGB, allocating at most `max_bytes` while decoding.
pub fn decode(kind: ImageKind, data: &[u8], max_bytes: u64) -> Result<RgbImage, String> {
    let format = match kind {
        ImageKind::Jpeg => ImageFormat::Jpeg,
        ImageKind::Png => ImageFormat::Png,
        ImageKind::Other => return Err("image is neither JPEG nor PNG".into()),
    };
    if data.is_empty() {
        return Err(format!("{} image is empty", kind.name()));
    }

    let mut limits = Limits::default();
    limits.max_alloc = Some(max_bytes);
    let mut reader = ImageReader::with_format(Cursor::new(data), format);
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| format!("{} decode failed: {e}", kind.name()))?;

    // Converting grey or RGBA to RGB copies the image once more; that copy is three
    // bytes a pixel, within what the decoder was already allowed.
    Ok(image.into_rgb8())
}

/// Mean colour of the pixels whose centre lies inside the region's box.
pub fn region_stats(image: &RgbImage, region: &Region) -> ObjectStats {
    let (xs, ys) = (
        pixel_span(region.left, region.width, image.width()),
        pixel_span(region.top, region.height, image.height()),
    );

    let mut sums = [0u64; 3];
    for y in ys.clone() {
        for x in xs.clone() {
            let p = image.get_pixel(x, y).0;
            for (sum, v) in sums.iter_mut().zip(p) {
                *sum += u64::from(v);
            }
        }
    }
    let pixels = u64::from(xs.end - xs.start) * u64::from(ys.end - ys.start);

    let mean_rgb = (pixels > 0).then(|| sums.map(|s| round3(s as f64 / pixels as f64)));
    let mean_luma = mean_rgb.map(|[r, g, b]| round3(0.299 * r + 0.587 * g + 0.114 * b));
    ObjectStats {
        label: region.label.clone(),
        mean_rgb,
        mean_luma,
        pixels,
    }
}

/// Pixel indexes along one axis whose centres (`i + 0.5`) fall in `[start, start + len)`
/// of the normalized box, clipped to the image. Counting by centres neither grows nor
/// shrinks boxes systematically.
fn pixel_span(start: f32, len: f32, size: u32) -> std::ops::Range<u32> {
    if !(start.is_finite() && len.is_finite()) || len <= 0.0 {
        return 0..0;
    }
    let size_f = f64::from(size);
    let from = (f64::from(start) * size_f - 0.5).ceil().clamp(0.0, size_f);
    let to = ((f64::from(start) + f64::from(len)) * size_f - 0.5)
        .ceil()
        .clamp(from, size_f);
    from as u32..to as u32
}

/// Three decimals are finer than any 8-bit mean needs and keep the JSON short.
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::png::PngEncoder;
    use image::{ExtendedColorType, ImageEncoder, Rgb};

    use super::*;

    const RED: [u8; 3] = [200, 10, 10];
    const BLUE: [u8; 3] = [10, 20, 200];

    /// 40x20: the left half red, the right half blue.
    fn two_tone() -> RgbImage {
        RgbImage::from_fn(40, 20, |x, _| Rgb(if x < 20 { RED } else { BLUE }))
    }

    fn png(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(img, img.width(), img.height(), ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    fn jpeg(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 95)
            .write_image(img, img.width(), img.height(), ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    fn region(left: f32, top: f32, width: f32, height: f32) -> Region {
        Region {
            label: "thing".into(),
            left,
            top,
            width,
            height,
        }
    }

    #[test]
    fn png_regions_have_exact_means() {
        let mut stats = FrameStats::new(FrameStatsConfig::default());
        let data = png(&two_tone());
        let regions = [
            region(0.0, 0.0, 0.5, 1.0),
            region(0.5, 0.0, 0.5, 1.0),
            region(0.25, 0.0, 0.5, 0.5),
        ];
        let out = stats
            .process(4, Some((ImageKind::Png, &data)), &regions)
            .unwrap();

        assert_eq!(
            (out.frame, out.width, out.height, out.format),
            (4, 40, 20, "png")
        );
        assert_eq!(out.objects[0].mean_rgb, Some(RED.map(f64::from)));
        assert_eq!(out.objects[0].pixels, 400);
        assert_eq!(out.objects[1].mean_rgb, Some(BLUE.map(f64::from)));
        // Straddling the edge: 10 red and 10 blue columns, 10 rows.
        assert_eq!(out.objects[2].mean_rgb, Some([105.0, 15.0, 105.0]));
        assert_eq!(out.objects[2].pixels, 200);
        let luma = 0.299 * 200.0 + 0.587 * 10.0 + 0.114 * 10.0;
        assert!((out.objects[0].mean_luma.unwrap() - luma).abs() < 1e-3);
    }

    #[test]
    fn jpeg_regions_are_close() {
        let mut stats = FrameStats::new(FrameStatsConfig::default());
        let data = jpeg(&two_tone());
        // Stay off the colour edge, where JPEG rings.
        let out = stats
            .process(
                0,
                Some((ImageKind::Jpeg, &data)),
                &[region(0.1, 0.1, 0.25, 0.8)],
            )
            .unwrap();
        assert_eq!(out.format, "jpeg");
        let [r, g, b] = out.objects[0].mean_rgb.unwrap();
        assert!(
            (r - 200.0).abs() < 8.0 && g < 25.0 && b < 25.0,
            "{r} {g} {b}"
        );
    }

    #[test]
    fn boxes_are_clipped_to_the_image() {
        let img = two_tone();
        assert_eq!(
            region_stats(&img, &region(-0.5, -0.5, 1.0, 1.0)).pixels,
            200
        );
        let outside = region_stats(&img, &region(1.2, 0.0, 0.3, 0.3));
        assert_eq!((outside.pixels, outside.mean_rgb), (0, None));
        assert_eq!(region_stats(&img, &region(0.1, 0.1, 0.0, 0.5)).pixels, 0);
        assert_eq!(
            region_stats(&img, &region(f32::NAN, 0.1, 0.2, 0.5)).pixels,
            0
        );
    }

    #[test]
    fn missing_unknown_and_corrupt_images_reject_the_frame() {
        let mut stats = FrameStats::new(FrameStatsConfig::default());
        let missing = stats.process(0, None, &[]).unwrap_err();
        assert!(missing.contains("no image"), "{missing}");

        let other = stats.process(1, Some((ImageKind::Other, b"GIF89a")), &[]);
        assert!(other.unwrap_err().contains("neither JPEG nor PNG"));

        let mut data = jpeg(&two_tone());
        data.truncate(data.len() / 3);
        let truncated = stats.process(2, Some((ImageKind::Jpeg, &data)), &[]);
        assert!(truncated.unwrap_err().contains("jpeg decode failed"));

        let not_png = stats.process(3, Some((ImageKind::Png, b"\x89PNG garbage")), &[]);
        assert!(not_png.unwrap_err().contains("png decode failed"));

        let s = stats.summary();
        assert_eq!((s.frames, s.frames_decoded), (4, 0));
        assert_eq!((s.missing_images, s.decode_failures), (1, 3));
    }

    #[test]
    fn images_over_the_decode_bound_are_refused() {
        let big = RgbImage::from_pixel(512, 512, Rgb(RED));
        let mut stats = FrameStats::new(FrameStatsConfig {
            max_decode_bytes: 64 << 10,
        });
        let err = stats
            .process(0, Some((ImageKind::Png, &png(&big))), &[])
            .unwrap_err();
        assert!(err.contains("png decode failed"), "{err}");
        assert_eq!(stats.summary().decode_failures, 1);
    }

    #[test]
    fn summary_counts_pixels() {
        let mut stats = FrameStats::new(FrameStatsConfig::default());
        let data = png(&two_tone());
        for i in 0..3 {
            stats
                .process(
                    i,
                    Some((ImageKind::Png, &data)),
                    &[region(0.0, 0.0, 0.5, 0.5)],
                )
                .unwrap();
        }
        let s = stats.summary();
        assert_eq!((s.frames_decoded, s.objects), (3, 3));
        assert_eq!((s.image_pixels, s.object_pixels), (3 * 800, 3 * 200));
    }

    #[test]
    fn config_parsing() {
        assert_eq!(
            FrameStatsConfig::from_json("{}").unwrap(),
            FrameStatsConfig::default()
        );
        let c = FrameStatsConfig::from_json(r#"{"max_decode_bytes": 1000}"#).unwrap();
        assert_eq!(c.max_decode_bytes, 1000);
        assert!(FrameStatsConfig::from_json(r#"{"max_decode_byte": 1}"#).is_err());
        assert!(FrameStatsConfig::from_json(r#"{"max_decode_bytes": 0}"#).is_err());
        assert!(FrameStatsConfig::from_json("3").is_err());
    }

    #[test]
    fn result_has_the_published_shape() {
        let mut stats = FrameStats::new(FrameStatsConfig::default());
        let data = png(&two_tone());
        let out = stats
            .process(
                1,
                Some((ImageKind::Png, &data)),
                &[region(0.0, 0.0, 0.5, 1.0)],
            )
            .unwrap();
        assert_eq!(
            serde_json::to_value(&out).unwrap(),
            serde_json::json!({"frame": 1, "width": 40, "height": 20, "format": "png",
                "objects": [{"label": "thing", "mean_rgb": [200.0, 10.0, 10.0],
                    "mean_luma": 66.81, "pixels": 400}]})
        );
    }
}
