//! Loss helpers against torch / diffusers goldens (tests/fixtures/train/make_train_goldens.py and
//! the sd-tiny DreamBooth fixture), and gradient checkpointing against a plain backward.
use dreampipe::sd::train::checkpointing::{
    Block, checkpointed_loss_backward, forward_without_grad,
};
use dreampipe::sd::train::loss::{
    PredictionType, compute_snr, min_snr_mse, min_snr_weights, mse, offset_noise,
    prior_preservation_loss,
};
use std::collections::HashMap;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

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
    tch::manual_seed(7);
    let out = offset_noise(&g["offset_noise.input"], 0.1).unwrap();
    assert!(max_abs_diff(&out, &g["offset_noise.seed7_offset0.1"]) <= ATOL);
}

/// A small sequence of nn layers (linear, tanh, layer norm, linear) as checkpointable blocks,
/// plus a "time embedding" linear whose output is shared context for two blocks.
struct Sequence {
    _vs: nn::VarStore,
    time_embedding: nn::Linear,
    linear1: nn::Linear,
    norm: nn::LayerNorm,
    linear2: nn::Linear,
    linear3: nn::Linear,
}

fn sequence() -> (Sequence, Vec<Tensor>) {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let seq = Sequence {
        time_embedding: nn::linear(&root / "temb", 2, 16, Default::default()),
        linear1: nn::linear(&root / "l1", 6, 16, Default::default()),
        norm: nn::layer_norm(&root / "norm", vec![16], Default::default()),
        linear2: nn::linear(&root / "l2", 16, 16, Default::default()),
        linear3: nn::linear(&root / "l3", 16, 4, Default::default()),
        _vs: vs,
    };
    let params = seq._vs.trainable_variables();
    (seq, params)
}

fn take_grads(params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| {
            let grad = p.grad().copy();
            let _ = p.grad().zero_();
            grad
        })
        .collect()
}

#[test]
fn checkpointed_grads_equal_plain_backward() {
    let (seq, params) = sequence();
    let b0 = |x: &Tensor, ctx: &[Tensor]| seq.linear1.forward(x).tanh() + &ctx[0];
    let b1 = |x: &Tensor, _: &[Tensor]| seq.norm.forward(x);
    let b2 = |x: &Tensor, ctx: &[Tensor]| seq.linear2.forward(&(x * &ctx[0])).gelu("none") + x;
    let b3 = |x: &Tensor, _: &[Tensor]| seq.linear3.forward(x);
    let blocks: [Block; 4] = [&b0, &b1, &b2, &b3];
    let input = Tensor::randn([5, 6], (Kind::Float, Device::Cpu));
    let time_input = Tensor::randn([5, 2], (Kind::Float, Device::Cpu));
    let target = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
    let loss_fn = |y: &Tensor| (y - &target).square().mean(Kind::Float);

    let plain_input = input.copy().set_requires_grad(true);
    let context = [seq.time_embedding.forward(&time_input)];
    let out = blocks
        .iter()
        .fold(plain_input.shallow_clone(), |x, b| b(&x, &context));
    let plain_loss = loss_fn(&out);
    plain_loss.backward();
    let plain = take_grads(&params);
    let plain_input_grad = plain_input.grad().copy();
    assert_eq!(plain.len(), 10);
    for grad in &plain {
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    let context = [seq.time_embedding.forward(&time_input)];
    let loss = checkpointed_loss_backward(&blocks, &input, &context, loss_fn).unwrap();
    assert!((loss.double_value(&[]) - plain_loss.double_value(&[])).abs() <= 1e-7);
    for (ours, expected) in take_grads(&params).iter().zip(&plain) {
        assert!(max_abs_diff(ours, expected) <= ATOL);
    }

    // The two-phase API also returns d loss / d input.
    let context = [seq.time_embedding.forward(&time_input)];
    let forward = forward_without_grad(&blocks, &input, &context);
    assert!(!forward.output().requires_grad());
    let output = forward.output().detach().set_requires_grad(true);
    loss_fn(&output).backward();
    let input_grad = forward.backward(&blocks, &output.grad(), &context).unwrap();
    assert!(max_abs_diff(&input_grad, &plain_input_grad) <= ATOL);
    for (ours, expected) in take_grads(&params).iter().zip(&plain) {
        assert!(max_abs_diff(ours, expected) <= ATOL);
    }
}

#[test]
fn checkpointed_backward_rejects_a_different_block_list() {
    let (seq, _params) = sequence();
    let b0 = |x: &Tensor, _: &[Tensor]| seq.linear1.forward(x);
    let input = Tensor::randn([2, 6], (Kind::Float, Device::Cpu));
    let forward = forward_without_grad(&[&b0], &input, &[]);
    let grad = forward.output().ones_like();
    let err = forward.backward(&[&b0, &b0], &grad, &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "gradient checkpointing: backward got 2 blocks but the forward pass ran 1; pass the same blocks"
    );
}
