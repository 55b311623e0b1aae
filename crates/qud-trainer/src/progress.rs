//! Progress of a long loop (training steps, teacher-cache building): a bar with rate and ETA,
//! redrawn on stderr when stderr is a terminal. Elsewhere callers log plain periodic lines.

use std::io::IsTerminal;
use std::time::Instant;

pub(crate) struct Progress {
    drawn: bool,
    start: Instant,
    first: usize,
    total: usize,
    items_per_unit: usize,
    items: &'static str,
}

impl Progress {
    /// A loop over `total` units (steps, samples) starting at unit `first` (a resumed run), each
    /// worth `items_per_unit` of `items` (images) in the rate.
    pub fn new(first: usize, total: usize, items_per_unit: usize, items: &'static str) -> Self {
        Self {
            drawn: std::io::stderr().is_terminal(),
            start: Instant::now(),
            first,
            total,
            items_per_unit,
            items,
        }
    }

    /// Whether the bar is drawn (stderr is a terminal).
    pub fn is_drawn(&self) -> bool {
        self.drawn
    }

    /// Items per second since the start, and seconds left, at unit `done`.
    pub fn rate_and_eta(&self, done: usize) -> (f64, f64) {
        let units = done.saturating_sub(self.first).max(1) as f64;
        let elapsed = self.start.elapsed().as_secs_f64().max(1e-9);
        let left = self.total.saturating_sub(done) as f64 * elapsed / units;
        (units * self.items_per_unit as f64 / elapsed, left)
    }

    /// Redraw the bar at unit `done`, `label` before the counts and `detail` after them.
    pub fn draw(&self, done: usize, label: &str, detail: &str) {
        if !self.drawn {
            return;
        }
        let (rate, eta) = self.rate_and_eta(done);
        let width = 30;
        let filled = (width * done / self.total.max(1)).min(width);
        eprint!(
            "\r\x1b[2K{label} [{}{}] {done}/{} {detail} {rate:.1} {}/s ETA {}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.total,
            self.items,
            clock(eta)
        );
        if done >= self.total {
            eprintln!();
        }
    }
}

/// `h:mm:ss`.
pub(crate) fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rate_and_eta_count_from_the_first_unit() {
        let mut p = super::Progress::new(10, 110, 32, "img");
        p.start -= std::time::Duration::from_secs(20);
        let (rate, eta) = p.rate_and_eta(60);
        // 50 steps of 32 images in 20 s; 50 steps left at that pace.
        assert!((rate - 80.0).abs() < 1.0, "{rate}");
        assert!((eta - 20.0).abs() < 0.5, "{eta}");
        assert_eq!(super::clock(3_725.0), "1:02:05");
    }
}
