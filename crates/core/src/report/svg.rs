//! Inline SVG line charts (loss / learning rate over steps): axes with "nice" tick labels and
//! one polyline per run of finite points, so NaN / missing values leave gaps instead of breaking
//! the chart. Long series are reduced to the min and max point per pixel column. The SVG is a
//! maud template like the page around it, so titles and labels are escaped by the engine.
use std::fmt::Write as _;

use maud::{Markup, html};

/// Space left of the plot for y tick labels.
const PAD_LEFT: f64 = 70.0;
/// Space right of the plot.
const PAD_RIGHT: f64 = 16.0;
/// Space above the plot for the title.
const PAD_TOP: f64 = 28.0;
/// Space below the plot for x tick labels and the axis label.
const PAD_BOTTOM: f64 = 42.0;
/// Roughly how many ticks each axis gets.
const TARGET_TICKS: usize = 5;
/// Relative slack when snapping range bounds to tick multiples.
const TICK_TOLERANCE: f64 = 1e-9;
/// Above this many points per pixel column pair the series is decimated (min/max per column).
const POINTS_PER_PIXEL: f64 = 2.0;

/// Chart text and size in CSS pixels.
#[derive(Debug, Clone)]
pub struct ChartSpec {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub width: u32,
    pub height: u32,
}

/// A closed value range on one axis.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Range {
    min: f64,
    max: f64,
}

/// A labelled horizontal line at `value` (e.g. a published result to compare with).
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceLine {
    pub label: String,
    pub value: f64,
}

/// Renders `points` (x, y) as a standalone `<svg>` element.
pub fn line_chart(points: &[(f64, f64)], spec: &ChartSpec) -> Markup {
    line_chart_with_references(points, &[], spec)
}

/// [`line_chart`] plus dashed labelled horizontal lines; the y axis spans them too.
pub fn line_chart_with_references(
    points: &[(f64, f64)],
    references: &[ReferenceLine],
    spec: &ChartSpec,
) -> Markup {
    let (width, height) = (f64::from(spec.width), f64::from(spec.height));
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let plot = Plot {
        left: PAD_LEFT,
        top: PAD_TOP,
        right: width - PAD_RIGHT,
        bottom: height - PAD_BOTTOM,
    };
    let content = if finite.is_empty() || plot.right <= plot.left || plot.bottom <= plot.top {
        html! { text class="no-data" x=(width / 2.0) y=(height / 2.0) { "no finite data" } }
    } else {
        plotted(points, &finite, references, plot, spec)
    };
    html! {
        svg class="chart" xmlns="http://www.w3.org/2000/svg" width=(spec.width)
            height=(spec.height) viewBox={ "0 0 " (spec.width) " " (spec.height) } role="img" {
            title { (spec.title) }
            text class="chart-title" x=(PAD_LEFT) y="18" { (spec.title) }
            (content)
        }
    }
}

/// Axes, reference lines and the series of a chart with finite data.
fn plotted(
    points: &[(f64, f64)],
    finite: &[(f64, f64)],
    references: &[ReferenceLine],
    plot: Plot,
    spec: &ChartSpec,
) -> Markup {
    let x_ticks = nice_ticks(value_range(finite.iter().map(|p| p.0)));
    let reference_values = references.iter().map(|r| r.value).filter(|v| v.is_finite());
    let y_ticks = nice_ticks(value_range(
        finite.iter().map(|p| p.1).chain(reference_values),
    ));
    let frame = Frame {
        plot,
        x: tick_range(&x_ticks),
        y: tick_range(&y_ticks),
    };
    html! {
        (frame.axes(&x_ticks, &y_ticks, spec))
        @for reference in references.iter().filter(|r| r.value.is_finite()) {
            (frame.reference(reference))
        }
        @for run in finite_runs(points) {
            (frame.run(&decimate(run, frame.plot.width())))
        }
    }
}

/// A coordinate with one decimal, as every position in the charts is written.
fn coordinate(value: f64) -> String {
    format!("{value:.1}")
}

/// The plotting rectangle in SVG coordinates.
#[derive(Debug, Clone, Copy)]
struct Plot {
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
}

impl Plot {
    fn width(&self) -> f64 {
        self.right - self.left
    }
}

/// A plot rectangle with the data ranges mapped onto it.
struct Frame {
    plot: Plot,
    x: Range,
    y: Range,
}

impl Frame {
    fn to_svg(&self, (x, y): (f64, f64)) -> (f64, f64) {
        let fx = (x - self.x.min) / (self.x.max - self.x.min);
        let fy = (y - self.y.min) / (self.y.max - self.y.min);
        (
            self.plot.left + fx * self.plot.width(),
            self.plot.bottom - fy * (self.plot.bottom - self.plot.top),
        )
    }

    /// The axis lines, grid lines with tick labels, and the axis labels.
    fn axes(&self, x_ticks: &[f64], y_ticks: &[f64], spec: &ChartSpec) -> Markup {
        let Plot {
            left,
            top,
            right,
            bottom,
        } = self.plot;
        let (x_step, y_step) = (tick_step(x_ticks), tick_step(y_ticks));
        let middle_y = coordinate((top + bottom) / 2.0);
        html! {
            path class="axis" d=(format!("M{left},{top}V{bottom}H{right}")) fill="none"
                stroke="#444" {}
            @for &tick in x_ticks {
                @let x = coordinate(self.to_svg((tick, self.y.min)).0);
                line class="grid" x1=(x) y1=(top) x2=(x) y2=(bottom) stroke="#ddd" {}
                text class="tick" x=(x) y=(bottom + 16.0) text-anchor="middle" {
                    (format_tick(tick, x_step))
                }
            }
            @for &tick in y_ticks {
                @let y = self.to_svg((self.x.min, tick)).1;
                line class="grid" x1=(left) y1=(coordinate(y)) x2=(right) y2=(coordinate(y))
                    stroke="#ddd" {}
                text class="tick" x=(left - 6.0) y=(coordinate(y + 4.0)) text-anchor="end" {
                    (format_tick(tick, y_step))
                }
            }
            text class="axis-label" x=(coordinate((left + right) / 2.0)) y=(bottom + 36.0)
                text-anchor="middle" { (spec.x_label) }
            text class="axis-label" x="12" y=(middle_y) text-anchor="middle"
                transform={ "rotate(-90 12 " (middle_y) ")" } { (spec.y_label) }
        }
    }

    /// A dashed horizontal line at the reference's value, labelled at its right end.
    fn reference(&self, reference: &ReferenceLine) -> Markup {
        let y = self.to_svg((self.x.min, reference.value)).1;
        let (left, right) = (self.plot.left, self.plot.right);
        html! {
            line class="reference" x1=(left) y1=(coordinate(y)) x2=(right) y2=(coordinate(y))
                stroke="#b35900" stroke-dasharray="5 3" {}
            text class="reference-label" x=(coordinate(right - 2.0)) y=(coordinate(y - 3.0))
                text-anchor="end" fill="#b35900" { (reference.label) }
        }
    }

    /// One run of finite points: a polyline, or a dot for a single point.
    fn run(&self, run: &[(f64, f64)]) -> Markup {
        if let [single] = run {
            let (x, y) = self.to_svg(*single);
            return html! {
                circle class="series" cx=(coordinate(x)) cy=(coordinate(y)) r="2" fill="#1f6feb" {}
            };
        }
        let mut points = String::new();
        for &point in run {
            let (x, y) = self.to_svg(point);
            let _ = write!(points, "{x:.1},{y:.1} ");
        }
        html! {
            polyline class="series" fill="none" stroke="#1f6feb" stroke-width="1.5"
                points=(points) {}
        }
    }
}

/// Min and max of the values; a single value is widened so the axis has a non-zero span.
fn value_range(values: impl Iterator<Item = f64>) -> Range {
    let (min, max) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if min < max {
        return Range { min, max };
    }
    let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
    Range {
        min: min - pad,
        max: max + pad,
    }
}

/// Ticks at 1, 2 or 5 × 10^k spacing covering `range`, about `TARGET_TICKS` of them.
fn nice_ticks(range: Range) -> Vec<f64> {
    let raw_step = (range.max - range.min) / TARGET_TICKS as f64;
    let magnitude = 10f64.powf(raw_step.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw_step)
        .unwrap_or(10.0 * magnitude);
    // The tolerance keeps a bound that is an exact multiple (up to rounding) from adding a tick.
    let first = (range.min / step + TICK_TOLERANCE).floor() as i64;
    let last = (range.max / step - TICK_TOLERANCE).ceil() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn tick_range(ticks: &[f64]) -> Range {
    Range {
        min: ticks.first().copied().unwrap_or(0.0),
        max: ticks.last().copied().unwrap_or(1.0),
    }
}

fn tick_step(ticks: &[f64]) -> f64 {
    match ticks {
        [a, b, ..] => b - a,
        _ => 1.0,
    }
}

/// A tick value printed with just enough digits for its spacing; scientific for tiny or huge
/// values (learning rates like 2e-6).
pub fn format_tick(value: f64, step: f64) -> String {
    if value.abs() < step * 1e-9 {
        return "0".to_string();
    }
    let magnitude = value.abs().max(step.abs());
    if !(1e-3..1e6).contains(&magnitude) {
        let digits =
            ((magnitude.log10().floor() - step.abs().log10().floor()).max(0.0) as usize).min(6);
        let text = format!("{value:.digits$e}");
        return trim_mantissa_zeros(&text);
    }
    let decimals = (-step.abs().log10().floor()).max(0.0) as usize;
    format!("{value:.decimals$}")
}

/// "2.50e-6" → "2.5e-6", "2.00e-6" → "2e-6".
fn trim_mantissa_zeros(text: &str) -> String {
    match text.split_once('e') {
        Some((mantissa, exponent)) if mantissa.contains('.') => {
            format!(
                "{}e{exponent}",
                mantissa.trim_end_matches('0').trim_end_matches('.')
            )
        }
        _ => text.to_string(),
    }
}

/// Maximal runs of consecutive points whose x and y are both finite.
fn finite_runs(points: &[(f64, f64)]) -> Vec<&[(f64, f64)]> {
    points
        .split(|(x, y)| !(x.is_finite() && y.is_finite()))
        .filter(|run| !run.is_empty())
        .collect()
}

/// Keeps, per pixel column, the first, lowest and highest points, in their original order, once
/// the run has more than `POINTS_PER_PIXEL` points per column.
fn decimate(run: &[(f64, f64)], plot_width: f64) -> Vec<(f64, f64)> {
    let columns = plot_width.max(1.0).round() as usize;
    if (run.len() as f64) <= POINTS_PER_PIXEL * columns as f64 {
        return run.to_vec();
    }
    let range = value_range(run.iter().map(|p| p.0));
    let column_of = |x: f64| {
        (((x - range.min) / (range.max - range.min)) * (columns - 1) as f64).round() as usize
    };
    let mut keep = vec![false; run.len()];
    let mut start = 0;
    while start < run.len() {
        let column = column_of(run[start].0);
        let end = start
            + run[start..]
                .iter()
                .take_while(|p| column_of(p.0) == column)
                .count();
        mark_extremes(&run[start..end], start, &mut keep);
        start = end;
    }
    keep[run.len() - 1] = true;
    run.iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(p, _)| *p)
        .collect()
}

fn mark_extremes(bucket: &[(f64, f64)], offset: usize, keep: &mut [bool]) {
    let by_y = |a: &(usize, &(f64, f64)), b: &(usize, &(f64, f64))| a.1.1.total_cmp(&b.1.1);
    keep[offset] = true;
    if let Some((i, _)) = bucket.iter().enumerate().min_by(by_y) {
        keep[offset + i] = true;
    }
    if let Some((i, _)) = bucket.iter().enumerate().max_by(by_y) {
        keep[offset + i] = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ChartSpec {
        ChartSpec {
            title: "loss <train>".to_string(),
            x_label: "step".to_string(),
            y_label: "loss".to_string(),
            width: 480,
            height: 240,
        }
    }

    fn polyline_points(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.split("points=\"")
            .skip(1)
            .map(|rest| {
                let list = &rest[..rest.find('"').unwrap()];
                list.split_whitespace()
                    .map(|pair| {
                        let (x, y) = pair.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        assert_eq!(
            nice_ticks(Range {
                min: 0.0,
                max: 199.0
            }),
            vec![0.0, 50.0, 100.0, 150.0, 200.0]
        );
        assert_eq!(
            nice_ticks(Range {
                min: 0.13,
                max: 0.61
            })
            .len(),
            7
        );
        let lr = nice_ticks(Range {
            min: 0.0,
            max: 2e-6,
        });
        assert_eq!(lr.len(), 5);
        assert!((lr[1] - 5e-7).abs() < 1e-18);
    }

    #[test]
    fn tick_labels_use_digits_for_the_step() {
        assert_eq!(format_tick(150.0, 50.0), "150");
        assert_eq!(format_tick(0.25, 0.05), "0.25");
        assert_eq!(format_tick(0.0, 4e-7), "0");
        assert_eq!(format_tick(2e-6, 5e-7), "2e-6");
        assert_eq!(format_tick(1.5e-6, 5e-7), "1.5e-6");
        assert_eq!(format_tick(5e-7, 5e-7), "5e-7");
        assert_eq!(format_tick(2_000_000.0, 500_000.0), "2e6");
    }

    #[test]
    fn points_map_into_the_plot_area() {
        let points: Vec<(f64, f64)> = (0..=200)
            .map(|i| (f64::from(i), 1.0 - f64::from(i) / 400.0))
            .collect();
        let svg = line_chart(&points, &spec()).into_string();
        let runs = polyline_points(&svg);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].len(), 201);
        let (right, bottom) = (480.0 - PAD_RIGHT, 240.0 - PAD_BOTTOM);
        assert_eq!(runs[0][0].0, PAD_LEFT);
        assert_eq!(runs[0][200].0, right);
        assert!(
            runs[0]
                .iter()
                .all(|(x, y)| (PAD_LEFT..=right).contains(x) && (PAD_TOP..=bottom).contains(y))
        );
        assert!(svg.contains("<title>loss &lt;train&gt;</title>"));
        assert!(svg.contains(">200</text>"));
    }

    #[test]
    fn nan_values_split_the_line_and_all_nan_says_no_data() {
        let points = vec![
            (0.0, 1.0),
            (1.0, 0.9),
            (2.0, f64::NAN),
            (3.0, 0.7),
            (4.0, 0.6),
            (5.0, f64::INFINITY),
            (6.0, 0.5),
        ];
        let svg = line_chart(&points, &spec()).into_string();
        assert_eq!(
            polyline_points(&svg)
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            vec![2, 2]
        );
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        let empty = line_chart(&[(0.0, f64::NAN)], &spec()).into_string();
        assert!(empty.contains("no finite data") && !empty.contains("polyline"));
        assert!(
            line_chart(&[], &spec())
                .into_string()
                .contains("no finite data")
        );
    }

    #[test]
    fn ten_thousand_points_are_decimated_keeping_extremes() {
        let mut points: Vec<(f64, f64)> = (0..10_000)
            .map(|i| (f64::from(i), (f64::from(i) * 0.01).sin()))
            .collect();
        // 60 is the top tick of the y axis (-1..60 → ticks -20..60), so it maps onto PAD_TOP.
        points[5_000].1 = 60.0;
        let svg = line_chart(&points, &spec()).into_string();
        let runs = polyline_points(&svg);
        assert_eq!(runs.len(), 1);
        let plot_columns = (480.0 - PAD_LEFT - PAD_RIGHT) as usize;
        assert!(
            runs[0].len() <= 3 * plot_columns + 1,
            "{} points",
            runs[0].len()
        );
        let top = runs[0].iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        assert_eq!(top, PAD_TOP, "the spike must survive decimation");
        assert!(svg.len() < 40_000, "{} bytes", svg.len());
    }

    #[test]
    fn reference_lines_are_drawn_labelled_and_widen_the_y_axis() {
        let references = [ReferenceLine {
            label: "paper 0.9".to_string(),
            value: 0.9,
        }];
        let svg = line_chart_with_references(&[(0.0, 0.1), (1.0, 0.2)], &references, &spec())
            .into_string();
        assert_eq!(svg.matches("class=\"reference\"").count(), 1);
        assert!(svg.contains(">paper 0.9</text>"));
        // The y ticks now reach 0.9: nice ticks 0 … 1.0, the line at y 45 of the 28–198 plot.
        assert!(svg.contains("text-anchor=\"end\">1.0</text>"), "{svg}");
        assert!(svg.contains("y1=\"45.0\""), "{svg}");
    }

    #[test]
    fn a_constant_series_still_gets_a_span() {
        let svg = line_chart(&[(0.0, 0.5), (10.0, 0.5)], &spec()).into_string();
        let runs = polyline_points(&svg);
        assert_eq!(runs[0].len(), 2);
        assert!(runs[0][0].1 > PAD_TOP && runs[0][0].1 < 240.0 - PAD_BOTTOM);
    }
}
