//! The random streams of a run, all derived from `(seed, step)` or `(seed, sample)` so a resumed
//! run draws exactly what an uninterrupted one would: the tensor draws of one micro-batch, the
//! data-side choices of one sample, and the shuffled order of each epoch.
use crate::sd::rng::{self, SeededScope};

/// Salts that keep the derived random streams of one step apart.
const SALT_TENSORS: u64 = 0x7465_6e73_6f72_7321;
const SALT_SAMPLE: u64 = 0x7361_6d70_6c65_7321;
const SALT_EPOCH: u64 = 0x6570_6f63_6873_2121;
const SALT_CAPTION: u64 = 0x6361_7074_696f_6e21;

/// splitmix64: a small, well-mixed hash used to derive independent seeds.
pub(crate) fn splitmix64(mut state: u64) -> u64 {
    state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn mix(seed: u64, salt: u64, a: u64, b: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed ^ salt).wrapping_add(a)).wrapping_add(b))
}

/// Opens a seeded scope (see `sd::rng`) for the tensor draws (VAE sample, noise, timesteps) of
/// micro-batch `micro` of optimizer step `step`; keep it until the last draw. Deviation from
/// diffusers' single stream: every step starts from its own seed, so a resumed run draws exactly
/// the same values.
pub fn seed_step_tensors(seed: u64, step: u64, micro: u64) -> SeededScope {
    rng::seeded(mix(seed, SALT_TENSORS, step, micro))
}

/// A deterministic stream for the data-side choices of one sample (crop, flip, template).
pub struct SampleRng(u64);

impl SampleRng {
    /// The stream of dataset sample number `sample` (counted over the whole run).
    pub fn for_sample(seed: u64, sample: u64) -> Self {
        Self(mix(seed, SALT_SAMPLE, sample, 0))
    }

    /// The stream of sample `sample`'s caption choice (caption dropout), apart from its crop
    /// and flip draws so that a rate of 0 draws nothing they see.
    pub fn for_caption(seed: u64, sample: u64) -> Self {
        Self(mix(seed, SALT_CAPTION, sample, 0))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = splitmix64(self.0);
        self.0
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The dataset index of run-wide sample number `sample`: each epoch visits every index once,
/// in an order shuffled from `(seed, epoch)` (like a DataLoader with `shuffle=True`).
pub fn dataset_index(seed: u64, len: usize, sample: u64) -> usize {
    let len = len.max(1);
    let epoch = sample / len as u64;
    let position = (sample % len as u64) as usize;
    epoch_order(seed, len, epoch)[position]
}

fn epoch_order(seed: u64, len: usize, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = SampleRng(mix(seed, SALT_EPOCH, epoch, len as u64));
    for i in (1..len).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_visits_every_index_once_in_a_seeded_order() {
        let len = 7;
        let epoch0: Vec<usize> = (0..7).map(|s| dataset_index(5, len, s)).collect();
        let epoch1: Vec<usize> = (7..14).map(|s| dataset_index(5, len, s)).collect();
        let mut sorted = epoch0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        let mut sorted1 = epoch1.clone();
        sorted1.sort();
        assert_eq!(sorted1, (0..7).collect::<Vec<_>>());
        assert_ne!(epoch0, epoch1);
        let other_seed: Vec<usize> = (0..7).map(|s| dataset_index(6, len, s)).collect();
        assert_ne!(epoch0, other_seed);
    }
}
