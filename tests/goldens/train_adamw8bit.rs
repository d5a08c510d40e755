//! 8-bit blockwise AdamW against bitsandbytes 0.50.2 `AdamW8bit` goldens on CPU with nearest-code
//! requantization (tests/fixtures/train/make_train_goldens.py explains why), against f32 AdamW on
//! a regression problem, and bit-exact save/load resume.
use dreampipe::sd::rng::Generator;
use dreampipe::sd::train::adamw8bit::{
    AdamW8bit, BLOCK_SIZE, MIN_8BIT_SIZE, create_dynamic_map, dequantize_blockwise,
    quantize_blockwise,
};
use dreampipe::sd::train::optim::{AdamW, AdamWConfig};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

const FIXTURE: &str = "tests/fixtures/train/adamw8bit.safetensors";
/// Goldens tolerance asked for the training building blocks (measured max |diff| on CPU: 0).
const ATOL: f64 = 1e-6;
/// The dynamic quantization maps come from ATen's vectorized linspace. Measured against
/// bitsandbytes' on an Intel Xeon (AVX-512): 0 ULPs with ATen's `avx512` and `avx2` kernels,
/// 2 with `default`.
const QMAP_ULPS: u64 = 8;

fn goldens() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(FIXTURE)
        .expect("fixture")
        .into_iter()
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

fn set_grad(param: &Tensor, grad: &Tensor) {
    let mut current = param.grad();
    if current.defined() {
        let _ = current.zero_();
    }
    (param * grad).sum(Kind::Float).backward();
}

fn config() -> AdamWConfig {
    AdamWConfig {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

#[test]
fn dynamic_maps_equal_bitsandbytes() {
    let g = goldens();
    let (signed, unsigned) = (&g["qmap_signed"], &g["qmap_unsigned"]);
    crate::sd_support::assert_within_ulps(
        "signed map",
        &create_dynamic_map(true),
        signed,
        QMAP_ULPS,
    );
    crate::sd_support::assert_within_ulps(
        "unsigned map",
        &create_dynamic_map(false),
        unsigned,
        QMAP_ULPS,
    );
}

#[test]
fn blockwise_quantization_round_trips_within_half_a_code_gap() {
    let x = Generator::new(5).randn(&[5000], Kind::Float) * 0.3;
    let code = create_dynamic_map(true);
    let q = quantize_blockwise(&x, &code);
    assert_eq!(q.absmax.size(), vec![(5000 + BLOCK_SIZE - 1) / BLOCK_SIZE]);
    assert_eq!(q.codes.kind(), Kind::Uint8);
    let back = dequantize_blockwise(&q, &code, &[5000]);
    // The largest gap of the signed map is between its two top codes (0.9930 -> 1.0 is smaller).
    let max_gap = (code.narrow(0, 1, 255) - code.narrow(0, 0, 255))
        .max()
        .double_value(&[]);
    let absmax = q.absmax.max().double_value(&[]);
    let err = max_abs_diff(&x, &back);
    assert!(
        err <= 0.5 * max_gap * absmax + 1e-7,
        "err {err}, gap {max_gap}"
    );
    // Independent check of the rounding rule: brute-force nearest code of x / absmax.
    let absmax_per_element = q
        .absmax
        .repeat_interleave_self_int(BLOCK_SIZE, 0, None)
        .narrow(0, 0, 5000);
    let scaled = (&x / absmax_per_element).unsqueeze(1);
    let nearest = (scaled - code.unsqueeze(0)).abs().argmin(1, false);
    assert!(nearest.equal(&q.codes.to_kind(Kind::Int64)));
}

#[test]
fn adamw8bit_matches_bitsandbytes_over_three_steps() {
    let g = goldens();
    let params: Vec<Tensor> = (0..2)
        .map(|i| {
            g[&format!("param{i}.initial")]
                .copy()
                .set_requires_grad(true)
        })
        .collect();
    let mut opt = AdamW8bit::new(&params, config());
    assert!(opt.is_quantized(0) && !opt.is_quantized(1));
    for step in 0..3 {
        for (i, p) in params.iter().enumerate() {
            set_grad(p, &g[&format!("step{step}.grad{i}")]);
        }
        opt.step();
        for (i, p) in params.iter().enumerate() {
            let diff = max_abs_diff(p, &g[&format!("step{step}.param{i}")]);
            assert!(diff <= ATOL, "step {step} param {i}: max |diff| {diff}");
        }
    }
    let (m, v) = opt.quantized_moments(0).expect("8-bit state");
    for (ours, key) in [(m, "1"), (v, "2")] {
        let theirs = &g[&format!("final.state{key}.0")].flatten(0, -1);
        assert!(
            ours.codes.equal(theirs),
            "state{key} codes differ from bitsandbytes"
        );
        let absmax = &g[&format!("final.absmax{key}.0")];
        assert!(max_abs_diff(&ours.absmax, absmax) <= ATOL, "absmax{key}");
    }
    let (m_small, v_small) = opt.moments_f32(1).expect("f32 state");
    assert!(max_abs_diff(&m_small, &g["final.state1.1"]) <= ATOL);
    assert!(max_abs_diff(&v_small, &g["final.state2.1"]) <= ATOL);
}

/// Linear least squares with ~100k trainable weights; returns the loss of each step.
fn regression_losses(
    step: &mut dyn FnMut(),
    w: &Tensor,
    x: &Tensor,
    y: &Tensor,
    steps: usize,
) -> Vec<f64> {
    (0..steps)
        .map(|_| {
            let mut grad = w.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
            let loss = (x.matmul(w) - y).square().mean(Kind::Float);
            loss.backward();
            step();
            loss.double_value(&[])
        })
        .collect()
}

fn regression_problem() -> (Tensor, Tensor, Tensor) {
    // A generator of its own, so parallel tests cannot interleave draws with this one.
    let mut rng = Generator::new(21);
    let opts = (Kind::Float, Device::Cpu);
    let x = rng.randn(&[64, 400], Kind::Float);
    let target_w = rng.randn(&[400, 250], Kind::Float) * 0.05;
    let y = x.matmul(&target_w);
    let w0 = Tensor::zeros([400, 250], opts);
    (x, y, w0)
}

#[test]
fn adamw8bit_tracks_f32_adamw_with_a_quarter_of_the_state() {
    let (x, y, w0) = regression_problem();
    let steps = 60;
    let config = AdamWConfig {
        weight_decay: 0.0,
        ..config()
    };
    let w32 = w0.copy().set_requires_grad(true);
    let mut opt32 = AdamW::new(&[w32.shallow_clone()], config);
    let losses32 = regression_losses(
        &mut || opt32.step().expect("AdamW step"),
        &w32,
        &x,
        &y,
        steps,
    );
    let w8 = w0.copy().set_requires_grad(true);
    let mut opt8 = AdamW8bit::new(&[w8.shallow_clone()], config);
    let losses8 = regression_losses(&mut || opt8.step(), &w8, &x, &y, steps);
    let (first, last32, last8) = (losses32[0], losses32[steps - 1], losses8[steps - 1]);
    println!("loss {first} -> f32 {last32}, 8-bit {last8}");
    assert!(last32 < 0.2 * first, "the problem must actually train");
    assert!(
        (last8 - last32).abs() <= 0.05 * last32,
        "final loss 8-bit {last8} vs f32 {last32}"
    );
    let worst = losses32
        .iter()
        .zip(&losses8)
        .map(|(a, b)| (a - b).abs() / a)
        .fold(0.0, f64::max);
    println!("worst per-step relative loss gap {worst}");
    assert!(worst <= 0.05);
    let ratio = opt8.state_bytes() as f64 / opt32.state_bytes() as f64;
    println!(
        "state bytes: 8-bit {} f32 {} ratio {ratio}",
        opt8.state_bytes(),
        opt32.state_bytes()
    );
    assert_eq!(opt32.state_bytes(), 2 * 4 * 100_000);
    assert_eq!(opt8.state_bytes(), 2 * (100_000 + 4 * 391));
    assert!(ratio < 0.3);
}

#[test]
fn adamw8bit_save_load_resume_is_bit_exact() {
    let (x, y, w0) = regression_problem();
    let small0 = Tensor::ones([MIN_8BIT_SIZE as i64 - 1], (Kind::Float, Device::Cpu));
    let run = |opt: &mut AdamW8bit, w: &Tensor, small: &Tensor, steps: usize| {
        for _ in 0..steps {
            opt.zero_grad();
            let loss = (x.matmul(w) - &y).square().mean(Kind::Float)
                + small.square().sum(Kind::Float) * 1e-3;
            loss.backward();
            opt.step();
        }
    };
    let (w_full, s_full) = (
        w0.copy().set_requires_grad(true),
        small0.copy().set_requires_grad(true),
    );
    let mut full = AdamW8bit::new(&[w_full.shallow_clone(), s_full.shallow_clone()], config());
    run(&mut full, &w_full, &s_full, 6);

    let dir = tempfile::tempdir().unwrap();
    let (w_res, s_res) = (
        w0.copy().set_requires_grad(true),
        small0.copy().set_requires_grad(true),
    );
    let mut first = AdamW8bit::new(&[w_res.shallow_clone(), s_res.shallow_clone()], config());
    run(&mut first, &w_res, &s_res, 3);
    first.save(dir.path()).unwrap();
    let mut second = AdamW8bit::new(
        &[w_res.shallow_clone(), s_res.shallow_clone()],
        AdamWConfig::default(),
    );
    second.load(dir.path()).unwrap();
    assert_eq!(second.state_bytes(), first.state_bytes());
    run(&mut second, &w_res, &s_res, 3);
    assert!(w_full.equal(&w_res) && s_full.equal(&s_res));
    let (a, b) = (
        full.quantized_moments(0).unwrap(),
        second.quantized_moments(0).unwrap(),
    );
    assert!(a.0.codes.equal(&b.0.codes) && a.1.absmax.equal(&b.1.absmax));

    // An f32 AdamW state cannot be loaded into the 8-bit optimizer.
    let f32_dir = tempfile::tempdir().unwrap();
    AdamW::new(&[w_res.shallow_clone()], config())
        .save(f32_dir.path())
        .unwrap();
    let err = AdamW8bit::new(&[w_res.shallow_clone()], config())
        .load(f32_dir.path())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("saved by optimizer 'adamw', loading into 'adamw8bit'"),
        "{err}"
    );
}
