//! Seeded random draws without a process-wide lock. diffusers draws the initial latents and the
//! DDPM / Euler-ancestral step noise from a seeded CPU `torch.Generator`; here every seeded run
//! (a `txt2img` call, a training step) owns such a generator through csrc/generator.cpp, so two
//! runs on two threads (two stages on two devices) draw at the same time without waiting on each
//! other and without interleaving.
//!
//! [`seeded`] installs a generator for the current thread until its scope is dropped; the draw
//! functions ([`randn`], [`randint`]) use the innermost scope of the thread. Outside any scope
//! they fall back to libtorch's global generator (code that seeds it with `tch::manual_seed`,
//! such as benches and some tests). A seeded draw is made on the CPU and moved to the target
//! device, so a seed gives the same numbers on every device (as diffusers' CPU generators).
use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::marker::PhantomData;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

/// Bytes reserved for libtorch's error message.
const ERROR_BUFFER_LEN: usize = 512;

unsafe extern "C" {
    fn dreampipe_generator_new(seed: u64) -> *mut c_void;
    fn dreampipe_generator_free(generator: *mut c_void);
    fn dreampipe_randn(
        generator: *mut c_void,
        sizes: *const i64,
        ndim: usize,
        scalar_type: c_int,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn dreampipe_randint(
        generator: *mut c_void,
        low: i64,
        high: i64,
        sizes: *const i64,
        ndim: usize,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// A seeded CPU generator (`torch.Generator("cpu").manual_seed(seed)`).
pub struct Generator {
    handle: *mut c_void,
}

// SAFETY: libtorch's CPU generator guards its state with its own mutex; the handle is owned.
unsafe impl Send for Generator {}

impl Generator {
    pub fn new(seed: u64) -> Self {
        // SAFETY: returns an owned heap generator or null (only on allocation failure).
        let handle = unsafe { dreampipe_generator_new(seed) };
        assert!(
            !handle.is_null(),
            "libtorch could not create a CPU generator"
        );
        Self { handle }
    }

    /// Standard normal values of `kind` (a floating-point kind) on the CPU.
    pub fn randn(&mut self, size: &[i64], kind: Kind) -> Tensor {
        let scalar_type = scalar_type(kind);
        draw(|out, err| unsafe {
            // SAFETY: the size slice, out-pointer and error buffer outlive the call.
            dreampipe_randn(
                self.handle,
                size.as_ptr(),
                size.len(),
                scalar_type,
                out,
                err.as_mut_ptr(),
                err.len(),
            )
        })
    }

    /// Uniform int64 values in `low..high` on the CPU.
    pub fn randint(&mut self, low: i64, high: i64, size: &[i64]) -> Tensor {
        draw(|out, err| unsafe {
            // SAFETY: as in `randn`.
            dreampipe_randint(
                self.handle,
                low,
                high,
                size.as_ptr(),
                size.len(),
                out,
                err.as_mut_ptr(),
                err.len(),
            )
        })
    }
}

/// libtorch's `ScalarType` code of a floating-point kind (c10/core/ScalarType.h).
fn scalar_type(kind: Kind) -> c_int {
    match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::BFloat16 => 15,
        other => panic!("normal draws need a floating-point kind, not {other:?}"),
    }
}

/// Runs a shim draw and takes ownership of the tensor it returns.
fn draw(call: impl FnOnce(*mut *mut C_tensor, &mut [c_char; ERROR_BUFFER_LEN]) -> c_int) -> Tensor {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0 as c_char; ERROR_BUFFER_LEN];
    if call(&mut out, &mut err) != 0 {
        // SAFETY: the shim wrote a NUL-terminated message.
        let message = unsafe { CStr::from_ptr(err.as_ptr()) };
        // Only invalid sizes fail, and callers take sizes from valid tensors.
        panic!("random draw failed: {}", message.to_string_lossy());
    }
    // SAFETY: the shim returned a new heap tensor whose ownership passes to tch.
    unsafe { Tensor::from_ptr(out) }
}

impl Drop for Generator {
    fn drop(&mut self) {
        // SAFETY: the handle came from dreampipe_generator_new and is freed once.
        unsafe { dreampipe_generator_free(self.handle) }
    }
}

thread_local! {
    /// The thread's seeded scopes, innermost last: (scope id, generator).
    static SCOPES: RefCell<Vec<(u64, Generator)>> = const { RefCell::new(Vec::new()) };
    static NEXT_SCOPE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The current thread draws from a generator seeded with `seed` until this is dropped. Not
/// `Send`: it belongs to the thread that opened it.
#[must_use = "draws are seeded only while the scope lives"]
pub struct SeededScope {
    id: u64,
    _thread_bound: PhantomData<*const ()>,
}

/// Opens a seeded scope on the current thread (what `Generator().manual_seed(seed)` is to a
/// diffusers call).
pub fn seeded(seed: u64) -> SeededScope {
    let id = NEXT_SCOPE.with(|next| {
        let id = next.get();
        next.set(id + 1);
        id
    });
    SCOPES.with(|scopes| scopes.borrow_mut().push((id, Generator::new(seed))));
    SeededScope {
        id,
        _thread_bound: PhantomData,
    }
}

impl Drop for SeededScope {
    fn drop(&mut self) {
        SCOPES.with(|scopes| scopes.borrow_mut().retain(|(id, _)| *id != self.id));
    }
}

/// Draws with the innermost scope's generator, or returns None outside every scope.
fn with_scope<T>(draw: impl FnOnce(&mut Generator) -> T) -> Option<T> {
    SCOPES.with(|scopes| scopes.borrow_mut().last_mut().map(|(_, g)| draw(g)))
}

/// Standard normal values of `kind` on `device` (in a scope: drawn on the CPU, then moved).
pub fn randn(size: &[i64], kind: Kind, device: Device) -> Tensor {
    with_scope(|g| g.randn(size, kind).to_device(device))
        .unwrap_or_else(|| Tensor::randn(size, (kind, device)))
}

/// Uniform int64 values in `low..high` on `device` (in a scope: drawn on the CPU, then moved).
pub fn randint(low: i64, high: i64, size: &[i64], device: Device) -> Tensor {
    with_scope(|g| g.randint(low, high, size).to_device(device))
        .unwrap_or_else(|| Tensor::randint_low(low, high, size, (Kind::Int64, device)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `g = torch.Generator("cpu").manual_seed(1234); torch.randn(4, generator=g);
    /// torch.randint(0, 1000, (4,), generator=g)` in torch 2.11 (fewer than 16 normals take
    /// the scalar path, so these are exact on every CPU).
    #[test]
    fn a_generator_draws_what_torch_generator_draws() {
        let mut generator = Generator::new(1234);
        let normals = Vec::<f32>::try_from(generator.randn(&[4], Kind::Float)).unwrap();
        let integers = Vec::<i64>::try_from(generator.randint(0, 1000, &[4])).unwrap();
        assert_eq!(
            normals,
            [0.046_130_463, 0.402_402_82, -1.011_529_1, 0.216_738_24]
        );
        assert_eq!(integers, [575, 529, 343, 841]);
    }

    #[test]
    fn scopes_nest_and_restore_the_outer_stream() {
        let straight: Vec<Tensor> = {
            let _outer = seeded(7);
            (0..2)
                .map(|_| randn(&[4], Kind::Float, Device::Cpu))
                .collect()
        };
        let _outer = seeded(7);
        let first = randn(&[4], Kind::Float, Device::Cpu);
        {
            let _inner = seeded(99);
            let _ = randn(&[4], Kind::Float, Device::Cpu);
        }
        let second = randn(&[4], Kind::Float, Device::Cpu);
        assert!(first.equal(&straight[0]) && second.equal(&straight[1]));
    }

    #[test]
    fn seeds_above_i64_max_are_accepted_and_distinct() {
        let draw = |seed| Generator::new(seed).randn(&[32], Kind::Float);
        assert!(!draw(u64::MAX).equal(&draw(u64::MAX - 1)));
    }
}
