//! The sweep: run a scenario over a grid of link loss and round-trip times and chart the mean
//! mirror lag and the RPO (acknowledged records lost) against them, as an SVG (plotters, SVG
//! backend only).
//!
//! Owns: the grid, the averaging over seeds and the chart. Does not own: running one seed
//! ([`super::world`]).

use std::path::Path;

use plotters::prelude::*;

use super::{run, Overrides, Scenario, SimError};

/// Link loss values (probability) on the x axis.
pub const LOSSES: &[f64] = &[0.0, 0.01, 0.02, 0.05, 0.1, 0.15];
/// Round-trip times (ms), one line each.
pub const RTTS: &[u64] = &[10, 50, 100, 200];

/// One point of the grid, averaged over seeds.
#[derive(Debug, Clone)]
pub struct Point {
    pub loss: f64,
    pub rtt: u64,
    pub mean_lag: f64,
    pub max_lag: f64,
    pub rpo: f64,
    pub failures: u32,
}

/// Run `seeds` seeds at every grid point.
pub fn sweep(sc: &Scenario, seeds: std::ops::Range<u64>) -> Result<Vec<Point>, SimError> {
    let mut out = Vec::new();
    for &rtt in RTTS {
        for &loss in LOSSES {
            let ov = Overrides {
                loss: Some(loss),
                rtt: Some(rtt),
            };
            let (mut lag, mut max, mut rpo, mut failures) = (0.0, 0.0, 0.0, 0);
            let n = (seeds.end - seeds.start).max(1) as f64;
            for seed in seeds.clone() {
                let o = run(sc, seed, &ov)?;
                lag += o.mean_lag;
                max += o.max_lag as f64;
                rpo += o.rpo_records as f64;
                failures += o.failure.is_some() as u32;
            }
            out.push(Point {
                loss,
                rtt,
                mean_lag: lag / n,
                max_lag: max / n,
                rpo: rpo / n,
                failures,
            });
        }
    }
    Ok(out)
}

/// Write the chart: mean mirror lag (left) and RPO (right) against link loss, a line per RTT.
pub fn chart(name: &str, points: &[Point], path: &Path) -> Result<(), SimError> {
    let err = |e: String| SimError::Chart {
        path: path.display().to_string(),
        message: e,
    };
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(550);
    let max_loss = LOSSES.iter().copied().fold(0.0, f64::max) * 100.0;
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &BLACK];
    for (area, title, get) in [
        (
            &left,
            format!("{name}: mean mirror lag (records)"),
            (|p: &Point| p.mean_lag) as fn(&Point) -> f64,
        ),
        (
            &right,
            format!("{name}: RPO (acknowledged records lost)"),
            |p: &Point| p.rpo,
        ),
    ] {
        let top = points.iter().map(get).fold(1.0, f64::max) * 1.1;
        let mut c = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..max_loss, 0.0..top)
            .map_err(|e| err(e.to_string()))?;
        c.configure_mesh()
            .x_desc("link loss (%)")
            .y_desc("records")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, &rtt) in RTTS.iter().enumerate() {
            let color = colors[i % colors.len()];
            let series: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.rtt == rtt)
                .map(|p| (p.loss * 100.0, get(p)))
                .collect();
            c.draw_series(LineSeries::new(series, color))
                .map_err(|e| err(e.to_string()))?
                .label(format!("RTT {rtt} ms"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
