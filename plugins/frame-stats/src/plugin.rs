//! The component glue: one [`FrameStats`] per job, fed the frames the host sends.

use framehost_guest::{Frame, ImageFormat, JobInfo, LogLevel, Output, Processor, log};

use crate::{FrameStats, FrameStatsConfig, ImageKind, Region, Summary};

struct Component {
    stats: FrameStats,
}

impl Processor for Component {
    type Config = FrameStatsConfig;
    type Summary = Summary;

    fn init(_job: &JobInfo, config: FrameStatsConfig) -> Result<Self, String> {
        config.validate().map_err(|e| e.to_string())?;
        log(
            LogLevel::Info,
            &format!(
                "frame-stats ready: max_decode_bytes={}",
                config.max_decode_bytes
            ),
        );
        Ok(Component {
            stats: FrameStats::new(config),
        })
    }

    fn process(&mut self, frame: Frame, out: &mut Output) -> Result<(), String> {
        let regions: Vec<Region> = frame
            .detections
            .into_iter()
            .map(|d| Region {
                label: d.label,
                left: d.bbox.left,
                top: d.bbox.top,
                width: d.bbox.width,
                height: d.bbox.height,
            })
            .collect();
        let image = frame.image.as_ref().map(|img| {
            let kind = match img.format {
                ImageFormat::Jpeg => ImageKind::Jpeg,
                ImageFormat::Png => ImageKind::Png,
                ImageFormat::Other => ImageKind::Other,
            };
            (kind, img.data.as_slice())
        });

        let result = self.stats.process(frame.index, image, &regions)?;
        out.emit_json(&result)?;
        Ok(())
    }

    fn finish(self, _out: &mut Output) -> Result<Summary, String> {
        Ok(self.stats.summary())
    }
}

framehost_guest::export_processor!(Component);
