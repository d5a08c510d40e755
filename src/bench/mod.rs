//! Benchmarks that mirror, operation for operation, what `bench/diffusers_bench.py` times in
//! diffusers: txt2img sampling ([`txt2img`]) and one DreamBooth optimizer step
//! ([`dreambooth`]). Each run yields one flat JSON record (`serde_json::Value`) that
//! `bench/report.py` joins with the Python side's records into the comparison table.
pub mod dreambooth;
pub mod txt2img;

use std::time::Instant;

/// Bytes per kibibyte (`ru_maxrss` is in KiB on Linux).
const KIB: f64 = 1024.0;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Pipeline(#[from] crate::sd::pipeline::Txt2ImgError),
    #[error("{dir}: cannot load the {component}: {reason}")]
    Load {
        dir: std::path::PathBuf,
        component: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Train(#[from] crate::sd::train::TrainError),
    #[error("--{field} {value}: {problem}")]
    BadArgument {
        field: &'static str,
        value: String,
        problem: &'static str,
    },
}

/// Pins libtorch's intra-op and inter-op thread pools (the Python side calls
/// `torch.set_num_threads` / `torch.set_num_interop_threads` with the same numbers).
pub fn pin_threads(intra_op: i32) {
    tch::set_num_threads(intra_op);
    tch::set_num_interop_threads(1);
}

/// Peak resident set size of this process so far, in MiB (`getrusage(RUSAGE_SELF).ru_maxrss`,
/// the same call Python's `resource.getrusage` makes).
pub fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage fills a zeroed, properly sized struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let status = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if status != 0 {
        return f64::NAN;
    }
    usage.ru_maxrss as f64 / KIB
}

/// CPU seconds (user + system) this process has used so far, all threads
/// (`getrusage(RUSAGE_SELF)`, what Python's `time.process_time()` reads). On a machine shared
/// with other work, CPU time per step is far steadier than wall time.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills a zeroed, properly sized struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// A wall-clock and CPU-time reading taken together.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub wall: Instant,
    pub cpu: f64,
}

impl Stamp {
    pub fn now() -> Self {
        Self {
            wall: Instant::now(),
            cpu: process_cpu_seconds(),
        }
    }

    /// (wall seconds, CPU seconds) from `self` to `later`.
    pub fn until(&self, later: &Stamp) -> (f64, f64) {
        (
            later.wall.duration_since(self.wall).as_secs_f64(),
            later.cpu - self.cpu,
        )
    }
}

/// Seconds since `start`.
pub fn seconds_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// Mean of `values` (NaN when empty).
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// Rounds to 4 decimals for the JSON records.
pub fn round4(value: f64) -> f64 {
    (value * 1e4).round() / 1e4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_of_values_and_of_nothing() {
        assert_eq!(mean(&[1.0, 2.0, 6.0]), 3.0);
        assert!(mean(&[]).is_nan());
    }

    #[test]
    fn round4_keeps_four_decimals() {
        assert_eq!(round4(1.234_567), 1.2346);
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let before = Stamp::now();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(std::hint::black_box(x), 1);
        let (wall, cpu) = before.until(&Stamp::now());
        assert!(cpu > 0.0 && wall > 0.0, "cpu {cpu} wall {wall}");
    }

    #[test]
    fn peak_rss_is_at_least_the_buffer_we_touch() {
        let buffer = vec![1u8; 64 << 20];
        let touched: u64 = buffer.iter().step_by(4096).map(|&b| b as u64).sum();
        assert!(touched > 0);
        assert!(peak_rss_mib() >= 64.0, "peak RSS {} MiB", peak_rss_mib());
    }
}
