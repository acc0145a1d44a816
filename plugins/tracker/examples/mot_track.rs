//! Runs the tracker over a MOTChallenge detection or ground-truth file, for evaluation.
//!
//! Reads `frame,id,left,top,width,height,conf,...` lines (pixels, frames from 1), throws
//! the ids away, normalizes the boxes by the frame size as the host would, feeds every
//! frame from 1 to the last (empty ones too) through the same [`Tracker`] the plugin
//! uses, and writes the confirmed tracks back in MOT format, in pixels.
//!
//! ```text
//! cargo run --release -p tracker --example mot_track -- \
//!     gt.txt out.txt --width 640 --height 480 [--config '{"min_hits": 3}'] [--label person]
//! ```
//!
//! Then score `out.txt` with `scripts/mot_eval.py gt.txt out.txt`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use tracker::{BBox, Detection, Tracker, TrackerConfig};

struct Args {
    input: String,
    output: String,
    width: f64,
    height: f64,
    config: String,
    label: String,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let (mut width, mut height) = (None, None);
    let mut config = "{}".to_string();
    let mut label = "person".to_string();

    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--width" => width = Some(parse_size(&value("--width")?)?),
            "--height" => height = Some(parse_size(&value("--height")?)?),
            "--config" => config = value("--config")?,
            "--label" => label = value("--label")?,
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            _ => positional.push(arg),
        }
    }

    let [input, output]: [String; 2] = positional
        .try_into()
        .map_err(|_| "expected INPUT and OUTPUT files".to_string())?;
    Ok(Args {
        input,
        output,
        width: width.ok_or("--width is required")?,
        height: height.ok_or("--height is required")?,
        config,
        label,
    })
}

fn parse_size(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 => Ok(v),
        _ => Err(format!("not a frame size: {text}")),
    }
}

/// Reads the file into detections per frame, in pixels, with the ids dropped.
fn read_mot(text: &str, label: &str) -> Result<BTreeMap<u64, Vec<Detection>>, String> {
    let mut frames: BTreeMap<u64, Vec<Detection>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let bad = || {
            format!(
                "line {}: expected frame,id,left,top,width,height,conf",
                n + 1
            )
        };
        if fields.len() < 7 {
            return Err(bad());
        }
        let num = |i: usize| fields[i].parse::<f64>().map_err(|_| bad());

        let frame = num(0)? as u64;
        let bbox = BBox::new(num(2)?, num(3)?, num(4)?, num(5)?);
        frames.entry(frame).or_default().push(Detection {
            label: label.to_string(),
            confidence: num(6)?.clamp(0.0, 1.0) as f32,
            bbox,
        });
    }
    Ok(frames)
}

fn run(args: &Args) -> Result<(), String> {
    let config = TrackerConfig::from_json(&args.config).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(&args.input)
        .map_err(|e| format!("cannot read {}: {e}", args.input))?;
    let frames = read_mot(&text, &args.label)?;
    let last = frames.keys().next_back().copied().unwrap_or(0);

    let (w, h) = (args.width, args.height);
    let mut tracker = Tracker::new(config);
    let mut out = String::new();
    for frame in 1..=last {
        let detections: Vec<Detection> = frames
            .get(&frame)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|d| {
                let b = d.bbox;
                Detection {
                    bbox: BBox::new(b.left / w, b.top / h, b.width / w, b.height / h),
                    ..d.clone()
                }
            })
            .collect();

        // The host numbers frames from 0.
        for t in tracker.update(frame - 1, &detections) {
            let [l, tp, bw, bh] = t.bbox.map(f64::from);
            let _ = writeln!(
                out,
                "{frame},{},{:.2},{:.2},{:.2},{:.2},{:.3},-1,-1,-1",
                t.id,
                l * w,
                tp * h,
                bw * w,
                bh * h,
                t.confidence
            );
        }
    }

    std::fs::write(&args.output, out).map_err(|e| format!("cannot write {}: {e}", args.output))?;
    let summary = serde_json::to_string(&tracker.summary()).map_err(|e| e.to_string())?;
    eprintln!("{summary}");
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| run(&args));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mot_track: {e}");
            ExitCode::FAILURE
        }
    }
}
