//! Training progress for people: an indicatif bar (step, loss, it/s, ETA) when stderr is a
//! terminal, and plain periodic lines otherwise (log files, SLURM, CI), where a bar's carriage
//! returns would make a mess.
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A live bar on stderr.
    Bar,
    /// One line every `every` steps.
    Lines,
    /// Nothing (tests, `--quiet`).
    Hidden,
}

impl ProgressMode {
    /// `Bar` on a terminal, `Lines` otherwise.
    pub fn detect() -> ProgressMode {
        if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        }
    }
}

/// The progress reporter of one run (or of one resumed part of a run).
pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    start_step: u64,
    max_steps: u64,
    every: u64,
    started: Instant,
    out: Box<dyn Write + Send>,
}

impl Progress {
    /// Progress from `start_step` (0, or the resumed step) to `max_steps`; plain lines every
    /// `every` steps (the run's `log.every`).
    pub fn new(mode: ProgressMode, start_step: u64, max_steps: u64, every: u64) -> Progress {
        Self::with_output(mode, start_step, max_steps, every, Box::new(std::io::stderr()))
    }

    /// As `new`, with plain lines and messages going to `out` instead of stderr.
    pub fn with_output(
        mode: ProgressMode,
        start_step: u64,
        max_steps: u64,
        every: u64,
        out: Box<dyn Write + Send>,
    ) -> Progress {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar:.cyan/blue} {pos}/{len} ETA {eta_precise} {msg}",
            )
            .expect("static progress template is valid")
            .progress_chars("=> ");
            let bar = ProgressBar::with_draw_target(Some(max_steps), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_position(start_step);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Progress { mode, bar, start_step, max_steps, every: every.max(1), started: Instant::now(), out }
    }

    /// Reports that `step` optimizer steps are done, with the step's loss and learning rate.
    pub fn update(&mut self, step: u64, loss: f64, lr: f64) {
        let rate = self.rate(step);
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(step);
                    bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {}", format_rate(rate)));
                }
            }
            ProgressMode::Lines => {
                if step.is_multiple_of(self.every) || step == self.max_steps {
                    let eta = eta(rate, self.max_steps.saturating_sub(step));
                    let line = format_line(step, self.max_steps, loss, lr, rate, eta);
                    let _ = writeln!(self.out, "{line}");
                }
            }
            ProgressMode::Hidden => {}
        }
    }

    /// A message that does not break the bar (warnings, "checkpoint written", ...).
    pub fn message(&mut self, msg: &str) {
        match (&self.bar, self.mode) {
            (Some(bar), _) => bar.println(msg),
            (None, ProgressMode::Lines) => {
                let _ = writeln!(self.out, "{msg}");
            }
            _ => {}
        }
    }

    /// Steps per second since this reporter started (over the steps it saw).
    pub fn rate(&self, step: u64) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        let done = step.saturating_sub(self.start_step) as f64;
        if secs > 0.0 {
            done / secs
        } else {
            0.0
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
            eprintln!(); // indicatif leaves the cursor at the end of the finished bar
        }
        let _ = self.out.flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

/// Time left at `rate` steps/s for `remaining` steps; None before any step is timed.
pub fn eta(rate: f64, remaining: u64) -> Option<Duration> {
    (rate > 0.0 && rate.is_finite()).then(|| Duration::from_secs_f64(remaining as f64 / rate))
}

/// `step 120/50000 (0.2%) loss 0.1234 lr 5.00e-5 1.23 it/s ETA 11h17m`
pub fn format_line(step: u64, max_steps: u64, loss: f64, lr: f64, rate: f64, eta: Option<Duration>) -> String {
    let pct = if max_steps > 0 { 100.0 * step as f64 / max_steps as f64 } else { 0.0 };
    let eta = eta.map(format_duration).unwrap_or_else(|| "?".to_string());
    format!("step {step}/{max_steps} ({pct:.1}%) loss {loss:.4} lr {lr:.2e} {} ETA {eta}", format_rate(rate))
}

/// `2.50 it/s`, or `4.0 s/it` when slower than one step a second (a big batch on one GPU).
pub fn format_rate(rate: f64) -> String {
    if rate >= 1.0 || rate <= 0.0 {
        format!("{rate:.2} it/s")
    } else {
        format!("{:.1} s/it", 1.0 / rate)
    }
}

/// `45s`, `3m07s`, `11h17m`, `2d03h`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn durations_rates_and_lines() {
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(187)), "3m07s");
        assert_eq!(format_duration(Duration::from_secs(11 * 3600 + 17 * 60 + 5)), "11h17m");
        assert_eq!(format_duration(Duration::from_secs(2 * 86_400 + 3 * 3600)), "2d03h");
        assert_eq!(format_rate(2.5), "2.50 it/s");
        assert_eq!(format_rate(0.25), "4.0 s/it");
        assert_eq!(eta(2.0, 100), Some(Duration::from_secs(50)));
        assert_eq!(eta(0.0, 100), None);
        assert_eq!(
            format_line(120, 50_000, 0.12344, 5e-5, 1.234, eta(1.234, 49_880)),
            "step 120/50000 (0.2%) loss 0.1234 lr 5.00e-5 1.23 it/s ETA 11h13m"
        );
        assert!(format_line(0, 10, 1.0, 1e-4, 0.0, None).ends_with("ETA ?"));
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_lines_every_n_steps_and_at_the_end() {
        let buf = Shared::default();
        let mut p = Progress::with_output(ProgressMode::Lines, 100, 125, 10, Box::new(buf.clone()));
        for step in 101..=125 {
            p.update(step, 0.5, 1e-4);
        }
        p.message("checkpoint written");
        p.finish();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("step 110/125 (88.0%) loss 0.5000"), "{text}");
        assert!(lines[1].starts_with("step 120/125") && lines[2].starts_with("step 125/125"), "{text}");
        assert_eq!(lines[3], "checkpoint written");
        let hidden = Shared::default();
        let mut p = Progress::with_output(ProgressMode::Hidden, 0, 10, 1, Box::new(hidden.clone()));
        p.update(10, 0.1, 1e-4);
        p.message("x");
        assert!(hidden.0.lock().unwrap().is_empty());
    }
}
