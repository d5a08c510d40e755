//! Loss helpers against torch / diffusers goldens (tests/fixtures/train/make_train_goldens.py and
//! the sd-tiny DreamBooth fixture).
use dreampipe::sd::train::loss::{
    PredictionType, compute_snr, min_snr_mse, min_snr_weights, mse, offset_noise,
    prior_preservation_loss,
};
use std::collections::HashMap;
use tch::Tensor;

/// Goldens tolerance asked for the training building blocks.
const ATOL: f64 = 1e-6;

fn goldens(path: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .expect("fixture")
        .into_iter()
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn scalar_close(value: &Tensor, expected: &Tensor) {
    let (v, e) = (value.double_value(&[]), expected.double_value(&[0]));
    assert!((v - e).abs() <= ATOL * e.abs().max(1.0), "{v} vs {e}");
}

#[test]
fn mse_and_prior_preservation_match_torch() {
    let g = goldens("tests/fixtures/train/loss.safetensors");
    scalar_close(&mse(&g["pred"], &g["target"]).unwrap(), &g["mse"]);
    let loss = prior_preservation_loss(&g["pred"], &g["target"], 0.5).unwrap();
    scalar_close(&loss, &g["prior_preservation_w0.5"]);
}

#[test]
fn prior_preservation_reproduces_the_dreambooth_fixture_loss() {
    let g = goldens("tests/fixtures/sd-tiny/training/dreambooth.safetensors");
    let loss = prior_preservation_loss(&g["model_pred"], &g["target"], 1.0).unwrap();
    scalar_close(&loss, &g["loss_step1"]);
}

#[test]
fn min_snr_matches_diffusers_for_epsilon_and_v_prediction() {
    let g = goldens("tests/fixtures/train/loss.safetensors");
    let (alphas, timesteps) = (&g["alphas_cumprod"], &g["timesteps"]);
    let snr = compute_snr(alphas, timesteps).unwrap();
    let rel = ((&snr - &g["snr"]).abs() / &g["snr"])
        .max()
        .double_value(&[]);
    assert!(rel <= 1e-6, "snr relative diff {rel}");
    for (prediction, tag) in [
        (PredictionType::Epsilon, "epsilon"),
        (PredictionType::VPrediction, "v_prediction"),
    ] {
        let weights = min_snr_weights(alphas, timesteps, 5.0, prediction).unwrap();
        assert!(
            max_abs_diff(&weights, &g[&format!("min_snr_{tag}.weights")]) <= ATOL,
            "{tag}"
        );
        let loss =
            min_snr_mse(&g["pred"], &g["target"], timesteps, alphas, 5.0, prediction).unwrap();
        scalar_close(&loss, &g[&format!("min_snr_{tag}.loss")]);
    }
}

#[test]
fn loss_errors_name_the_problem() {
    let g = goldens("tests/fixtures/train/loss.safetensors");
    let odd = g["pred"].narrow(0, 0, 3);
    assert_eq!(
        prior_preservation_loss(&odd, &odd, 1.0)
            .unwrap_err()
            .to_string(),
        "loss: prior preservation needs an even batch [instance..., class...], got batch size 3"
    );
    let late = Tensor::from_slice(&[5i64, 1000]);
    assert_eq!(
        compute_snr(&g["alphas_cumprod"], &late)
            .unwrap_err()
            .to_string(),
        "loss: timesteps must lie in [0, 1000) (the scheduler's num_train_timesteps), got 5..=1000"
    );
    let err = min_snr_mse(
        &g["pred"],
        &g["target"],
        &late,
        &g["alphas_cumprod"],
        5.0,
        PredictionType::Epsilon,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "loss: min-SNR weighting needs one timestep per sample: batch 4, timesteps [2]"
    );
}

#[test]
fn offset_noise_matches_torch_draw() {
    let g = goldens("tests/fixtures/train/loss.safetensors");
    let _rng = crate::sd_support::global_rng();
    tch::manual_seed(7);
    let out = offset_noise(&g["offset_noise.input"], 0.1).unwrap();
    assert!(max_abs_diff(&out, &g["offset_noise.seed7_offset0.1"]) <= ATOL);
}
