//! The progress line `watch` and `submit --wait` draw: built here, so it
//! can be checked at any width, and drawn by indicatif.
//!
//! `batch 4f1c2a9e0b7d3c58 [=====>      ] 3,100/10,000 items  1,919/s  eta 4 s  processing`
//!
//! It never runs past the terminal's width (the bar shrinks first, then
//! the state is cut), shows no bar before the batch's size is known, and
//! prints rates as whole numbers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The rate is measured over this much recent history.
const RATE_WINDOW: Duration = Duration::from_secs(5);
const BAR_MAX: usize = 30;
const BAR_MIN: usize = 6;

/// A progress line on stderr (hidden unless `shown`) whose text is built by
/// [`line`], and the terminal's width to build it for: indicatif only draws.
pub fn line_bar(shown: bool) -> (indicatif::ProgressBar, usize) {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let width = usize::from(
        console::Term::stderr()
            .size_checked()
            .map_or(80, |(_, cols)| cols),
    );
    let bar = if shown {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    (bar, width)
}

/// `12,345`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `4 s`, `2 min 5 s`, `1 h 3 min`.
fn duration(seconds: f64) -> String {
    crate::render::age(seconds)
}

/// Items done over time, for the rate and the time left.
#[derive(Debug, Default)]
pub struct Meter {
    samples: VecDeque<(Instant, u64)>,
}

impl Meter {
    pub fn record(&mut self, at: Instant, done: u64) {
        self.samples.push_back((at, done));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > RATE_WINDOW)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
    }

    /// Items per second over the recent window; `None` until there are two
    /// samples apart in time.
    pub fn rate(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let seconds = last.0.duration_since(first.0).as_secs_f64();
        (seconds > 0.0).then(|| last.1.saturating_sub(first.1) as f64 / seconds)
    }
}

/// One progress line, at most `width` columns.
pub fn line(
    label: &str,
    done: u64,
    total: Option<u64>,
    rate: Option<f64>,
    state: &str,
    width: usize,
) -> String {
    let Some(total) = total.filter(|&t| t > 0) else {
        return fit(&format!("{label}  {state}"), width);
    };
    let counts = format!("{}/{} items", thousands(done), thousands(total));
    let mut parts = vec![counts];
    if let Some(rate) = rate {
        parts.push(format!("{}/s", thousands(rate.round() as u64)));
        if rate >= 0.5 && done < total {
            parts.push(format!("eta {}", duration((total - done) as f64 / rate)));
        }
    }
    let tail = parts.join("  ");
    // label + " [" + bar + "] " + tail + "  " + state
    let fixed = label.chars().count() + 4 + tail.chars().count();
    let room = width.saturating_sub(fixed);
    if room < BAR_MIN {
        // No room for a bar: the numbers matter more.
        return fit(&format!("{label}  {tail}  {state}"), width);
    }
    let bar_width = room
        .saturating_sub(2 + state.chars().count())
        .clamp(BAR_MIN, BAR_MAX);
    let filled = ((done.min(total) as f64 / total as f64) * bar_width as f64).round() as usize;
    let bar = match filled {
        0 => " ".repeat(bar_width),
        n if n >= bar_width => "=".repeat(bar_width),
        n => format!("{}>{}", "=".repeat(n - 1), " ".repeat(bar_width - n)),
    };
    fit(&format!("{label} [{bar}] {tail}  {state}"), width)
}

/// `text` cut to `width` columns (with `…` when cut).
fn fit(text: &str, width: usize) -> String {
    let text = text.trim_end();
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn no_bar_before_the_size_is_known() {
        let text = line(
            "batch 4f1c2a9e0b7d3c58",
            0,
            None,
            None,
            "waiting for its status",
            80,
        );
        assert_eq!(text, "batch 4f1c2a9e0b7d3c58  waiting for its status");
        let zero = line("batch 4f1c2a9e0b7d3c58", 0, Some(0), None, "pending", 80);
        assert!(!zero.contains('['), "{zero}");
    }

    #[test]
    fn the_line_fits_80_and_120_columns_with_whole_rates() {
        for width in [40, 80, 120] {
            for (done, total) in [
                (0, 10_000),
                (3_100, 10_000),
                (10_000, 10_000),
                (7, 1_000_000),
            ] {
                let text = line(
                    "batch 4f1c2a9e0b7d3c58",
                    done,
                    Some(total),
                    Some(1_918.736_2),
                    "processing",
                    width,
                );
                assert!(text.chars().count() <= width, "{width}: {text}");
                assert!(!text.contains("1,918.7"), "{text}");
                if width >= 80 {
                    assert!(text.contains("1,919/s"), "{width}: {text}");
                    assert!(
                        text.contains(&format!("{}/{}", thousands(done), thousands(total))),
                        "{text}"
                    );
                }
            }
        }
        let half = line("b", 5_000, Some(10_000), Some(1000.0), "processing", 80);
        assert!(half.contains("[") && half.contains("eta 5 s"), "{half}");
        let done = line("b", 10, Some(10), Some(5.0), "committed", 80);
        assert!(
            done.contains(&"=".repeat(BAR_MIN)) && !done.contains("eta"),
            "{done}"
        );
    }

    #[test]
    fn the_rate_comes_from_recent_samples() {
        let mut meter = Meter::default();
        let start = Instant::now();
        assert_eq!(meter.rate(), None);
        meter.record(start, 0);
        assert_eq!(meter.rate(), None);
        meter.record(start + Duration::from_secs(2), 2_000);
        assert_eq!(meter.rate(), Some(1_000.0));
        for s in 3..20 {
            meter.record(start + Duration::from_secs(s), 2_000 + (s - 2) * 100);
        }
        let rate = meter.rate().unwrap();
        assert!((rate - 100.0).abs() < 1e-9, "{rate}");
    }
}
