//! The training log (`train_log.jsonl`, one record per logged step) and its loss-curve plot.

use std::io::Write;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const LOG_FILE: &str = "train_log.jsonl";
pub const PLOT_FILE: &str = "loss.png";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    pub step: usize,
    /// Means over the steps since the previous record.
    pub loss: f64,
    pub mse: f64,
    pub prior: f64,
    pub rounding: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub steps_per_s: f64,
    /// Wall-clock seconds of training so far, across resumes.
    pub elapsed_s: f64,
}

pub fn append(path: &Path, record: &LogRecord) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(record).expect("record serializes");
    writeln!(file, "{line}").map_err(|e| Error::io(path, e))
}

pub fn read(path: &Path) -> Result<Vec<LogRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Keeps only the records written before `step` (a resumed run rewrites what came after its checkpoint).
pub fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let kept: Vec<LogRecord> = read(path)?.into_iter().filter(|r| r.step <= step).collect();
    let mut text = String::new();
    for r in &kept {
        text.push_str(&serde_json::to_string(r).expect("record serializes"));
        text.push('\n');
    }
    // Atomic: a kill here must not lose the log of the steps before the checkpoint.
    crate::model::diffusion_lm::replace_file(path, |tmp| {
        std::fs::write(tmp, text).map_err(|e| Error::io(path, e))
    })
}

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws the loss terms against steps (log scale) as a PNG.
pub fn plot(records: &[LogRecord], path: &Path) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    register_font();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_step = records.last().map(|r| r.step).unwrap_or(1).max(1);
        type Series = (&'static str, fn(&LogRecord) -> f64, RGBColor);
        let series: [Series; 4] = [
            ("total", |r| r.loss, BLACK),
            ("x0 mse", |r| r.mse, BLUE),
            ("rounding", |r| r.rounding, RED),
            ("prior", |r| r.prior, GREEN),
        ];
        let values = records
            .iter()
            .flat_map(|r| series.iter().map(move |(_, f, _)| f(r)))
            .filter(|v| v.is_finite() && *v > 0.0);
        let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let mut chart = ChartBuilder::on(&root)
            .caption("Diffusion-LM training loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0..max_step, (lo * 0.8..hi * 1.25).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (log scale)")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style(("sans-serif", 14))
            .draw()?;
        for (name, f, color) in series {
            chart
                .draw_series(LineSeries::new(
                    records.iter().map(|r| (r.step, f(r).max(lo))),
                    color.stroke_width(2),
                ))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::format(path, format!("plot failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_round_trip_truncate_and_plot() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(LOG_FILE);
        for step in [10, 20, 30] {
            let r = LogRecord {
                step,
                loss: 10.0 / step as f64,
                mse: 1.0 / step as f64,
                prior: 0.01,
                rounding: 5.0 / step as f64,
                grad_norm: 1.0,
                lr: 1e-3,
                steps_per_s: 2.0,
                elapsed_s: step as f64,
            };
            append(&log, &r).unwrap();
        }
        assert_eq!(read(&log).unwrap().len(), 3);
        truncate_after(&log, 20).unwrap();
        let records = read(&log).unwrap();
        assert_eq!(
            records.iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![10, 20]
        );
        let png = dir.path().join(PLOT_FILE);
        plot(&records, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
