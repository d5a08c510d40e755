//! The process-wide CPU random generator. diffusers draws the initial latents and the DDPM /
//! Euler-ancestral step noise from one seeded CPU `torch.Generator`; tch only exposes libtorch's
//! global CPU generator (`tch::manual_seed`), which every thread of the process shares. A run
//! that must be reproducible takes [`seed_global`]'s guard and holds it from the seeding to its
//! last draw, so concurrent runs (two pipeline stages, parallel tests) cannot interleave draws.
//!
//! Every code path that seeds or draws from the global generator must hold the guard; the lock is
//! not reentrant, so a thread holding it must not call anything that takes it again (such as
//! `StableDiffusion::txt2img`).
use std::sync::{Mutex, MutexGuard};

static GLOBAL_RNG: Mutex<()> = Mutex::new(());

/// Exclusive use of the global CPU generator while it lives.
#[must_use = "the generator is only exclusive while the guard lives"]
pub struct GlobalRngGuard {
    _lock: MutexGuard<'static, ()>,
}

/// Waits for exclusive use of the global CPU generator without seeding it: for code that draws
/// numbers nobody needs to reproduce (such as the random init of modules about to be overwritten
/// by loaded weights) while a seeded run may be in progress on another thread.
pub fn lock_global() -> GlobalRngGuard {
    // A run that panicked while holding the lock leaves no state worth protecting: seeded runs re-seed.
    let lock = GLOBAL_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    GlobalRngGuard { _lock: lock }
}

/// Waits for exclusive use of the global CPU generator, then seeds it with `seed`
/// (`torch.Generator().manual_seed(seed)` on CPU draws the same numbers).
pub fn seed_global(seed: u64) -> GlobalRngGuard {
    let guard = lock_global();
    // libtorch takes the seed as a uint64; the cast keeps the bit pattern.
    tch::manual_seed(seed as i64);
    guard
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn reseeding_reproduces_the_same_draws() {
        let first = {
            let _rng = seed_global(7);
            Tensor::randn([32], (Kind::Float, Device::Cpu))
        };
        let _rng = seed_global(7);
        let second = Tensor::randn([32], (Kind::Float, Device::Cpu));
        assert!(first.equal(&second));
    }

    #[test]
    fn seeds_above_i64_max_are_accepted_and_distinct() {
        let draw = |seed| {
            let _rng = seed_global(seed);
            Tensor::randn([32], (Kind::Float, Device::Cpu))
        };
        assert!(!draw(u64::MAX).equal(&draw(u64::MAX - 1)));
    }
}
