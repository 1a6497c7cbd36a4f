//! What a running job shows: on a terminal, an indicatif bar (images/s, ETA once the number of
//! inputs is known, failures) and, on a slow backend, a second bar of masked passes so something
//! moves within seconds even when one image takes minutes; otherwise a plain log line every few
//! seconds; with `--quiet`, nothing.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Verbosity;

/// The job's counts at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub explained: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Inputs this job will handle, once the reader has seen them all.
    pub total: Option<u64>,
    pub passes_done: u64,
    pub passes_planned: u64,
}

enum Display {
    Off,
    Bars {
        _multi: MultiProgress,
        images: ProgressBar,
        passes: Option<ProgressBar>,
        known_total: bool,
    },
    Log {
        every: Duration,
        last: Instant,
    },
}

pub struct Progress {
    display: Display,
    start: Instant,
    quiet: bool,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Progress {
    /// `slow`: show masked passes too (a backend taking seconds to minutes per image).
    pub fn new(verbosity: Verbosity, slow: bool, log_every: f64) -> Progress {
        let start = Instant::now();
        let quiet = verbosity == Verbosity::Quiet;
        let display = if quiet {
            Display::Off
        } else if std::io::stderr().is_terminal() {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
            let images = multi.add(ProgressBar::no_length());
            images.set_style(style("{spinner} {pos} images  {per_sec}  {msg}"));
            let passes = slow.then(|| {
                let b = multi.add(ProgressBar::new(0));
                b.set_style(style(
                    "  {bar:30} {pos}/{len} masked passes (of the images started so far)",
                ));
                b
            });
            Display::Bars {
                _multi: multi,
                images,
                passes,
                known_total: false,
            }
        } else {
            Display::Log {
                every: Duration::from_secs_f64(log_every.max(0.1)),
                last: start,
            }
        };
        Progress {
            display,
            start,
            quiet,
        }
    }

    /// Show the current counts (throttled by indicatif or by the log interval).
    pub fn update(&mut self, s: &Snapshot) {
        match &mut self.display {
            Display::Off => {}
            Display::Bars {
                images,
                passes,
                known_total,
                ..
            } => {
                if let (Some(total), false) = (s.total, *known_total) {
                    images.set_length(total);
                    images.set_style(style(
                        "{bar:30} {pos}/{len} images  {per_sec}  eta {eta}  {msg}",
                    ));
                    *known_total = true;
                }
                images.set_position(s.explained + s.failed);
                images.set_message(status(s));
                if let Some(p) = passes {
                    p.set_length(s.passes_planned);
                    p.set_position(s.passes_done);
                }
            }
            Display::Log { every, last } => {
                if last.elapsed() >= *every {
                    *last = Instant::now();
                    eprintln!("progress: {}", log_line(s, self.start.elapsed()));
                }
            }
        }
    }

    /// Print a message (a per-image error, a notice) without tearing the bars.
    pub fn message(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match &self.display {
            Display::Bars { images, .. } => images.suspend(|| eprintln!("{msg}")),
            _ => eprintln!("{msg}"),
        }
    }

    /// Remove the bars.
    pub fn finish(&mut self) {
        if let Display::Bars { images, passes, .. } = &self.display {
            if let Some(p) = passes {
                p.finish_and_clear();
            }
            images.finish_and_clear();
        }
    }
}

fn status(s: &Snapshot) -> String {
    let mut parts = Vec::new();
    if s.failed > 0 {
        parts.push(format!("{} failed", s.failed));
    }
    if s.skipped > 0 {
        parts.push(format!("{} skipped (done before)", s.skipped));
    }
    parts.join(", ")
}

/// `12 explained, 1 failed, 0 skipped of 40, 3.1 images/s, masked passes 120/512`.
pub fn log_line(s: &Snapshot, elapsed: Duration) -> String {
    let done = s.explained + s.failed;
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let mut line = format!(
        "{} explained, {} failed, {} skipped",
        s.explained, s.failed, s.skipped
    );
    if let Some(t) = s.total {
        line.push_str(&format!(" of {t}"));
    }
    line.push_str(&format!(", {rate:.2} images/s"));
    if s.passes_planned > 0 {
        line.push_str(&format!(
            ", masked passes {}/{}",
            s.passes_done, s.passes_planned
        ));
    }
    line
}
