//! Scheduler goldens: every scheduler against diffusers 0.42.1 (tests/fixtures/sd-tiny/schedulers,
//! produced as its README describes), built from the real SD1.x scheduler_config.json.
use dreampipe::sd::schedulers::{
    DdpmScheduler, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, build,
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

const FIXTURES: &str = "tests/fixtures/sd-tiny/schedulers";
const MODEL_CONFIG: &str = "models/tiny-sd/scheduler/scheduler_config.json";
/// Fixture README tolerances: single scheduler steps 1e-5, 50-step final samples 1e-4.
const STEP_TOL: f64 = 1e-5;
const FINAL_TOL: f64 = 1e-4;
/// Sigma tables are float32 numbers computed the same way: allow a float32 rounding step.
const SIGMA_TOL: f64 = 1e-6;
/// Timestep values are compared exactly up to JSON float parsing (serde_json may be 1 ulp off).
const JSON_EXACT: f64 = 1e-12;
/// DDPM's beta table (`linspace(√start, √end)²` in float32) and its cumulative product: ATen's
/// vectorized linspace, pow and cumprod round differently per CPU kernel set. Measured on an
/// Intel Xeon (AVX-512): 0 ULPs with ATen's `avx512` and `avx2` kernels (bit-identical), betas
/// 3 and alphas_cumprod 1 with `default`.
const BETAS_ULPS: u64 = 8;
/// Seeds from schedulers.json (`initial_noise_seed`) and the README (`step_generator_seed`).
const STEP_GENERATOR_SEED: i64 = 101;

/// (kind, fixture name) of every scheduler.
const SCHEDULERS: [(SchedulerKind, &str); 7] = [
    (SchedulerKind::Ddim, "ddim"),
    (SchedulerKind::Pndm, "pndm"),
    (SchedulerKind::Lms, "lms"),
    (SchedulerKind::Euler, "euler"),
    (SchedulerKind::EulerAncestral, "euler_ancestral"),
    (SchedulerKind::DpmSolverMultistep, "dpmsolver_multistep"),
    (SchedulerKind::Ddpm, "ddpm"),
];

fn load_tensors(file: &str) -> HashMap<String, Tensor> {
    let path = Path::new(FIXTURES).join(file);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn schedulers_json() -> Value {
    python_json(&Path::new(FIXTURES).join("schedulers.json"))
}

/// Reads a JSON file written by Python's json module.
fn python_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Python's json writes DPM-Solver's lambda_min_clipped as a bare -Infinity; quote it
    // (SchedulerConfig accepts the quoted form as well as the bare one).
    let text = text.replace("-Infinity", "\"-Infinity\"");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn model_config() -> SchedulerConfig {
    SchedulerConfig::from_file(Path::new(MODEL_CONFIG)).expect("hub scheduler config")
}

fn get<'a>(tensors: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    tensors
        .get(key)
        .unwrap_or_else(|| panic!("fixture tensor {key} missing"))
}

/// Asserts |actual - expected| <= atol + rtol * |expected| everywhere, reporting the key and
/// the max abs diff otherwise.
fn assert_close(key: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    assert_eq!(actual.size(), expected.size(), "{key}: shape");
    let actual = actual.to_kind(Kind::Double);
    let expected = expected.to_kind(Kind::Double);
    let diff = (&actual - &expected).abs();
    let max_diff = diff.max().double_value(&[]);
    let excess = (&diff - (expected.abs() * tol + tol))
        .max()
        .double_value(&[]);
    if std::env::var_os("SCHEDULER_TEST_REPORT").is_some() {
        eprintln!("{key}: max abs diff {max_diff:e}");
    }
    assert!(
        excess <= 0.0 && !max_diff.is_nan(),
        "{key}: max abs diff {max_diff:e} exceeds atol {tol:e} + rtol {tol:e}"
    );
}

fn values(tensor: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&tensor.to_kind(Kind::Double)).expect("tensor to vec")
}

fn json_f64s(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

fn assert_same_values(key: &str, actual: &[f64], expected: &[f64], tol: f64) {
    assert_eq!(actual.len(), expected.len(), "{key}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tol * (1.0 + e.abs()),
            "{key}[{i}]: got {a}, expected {e} (diff {:e})",
            (a - e).abs()
        );
    }
}

fn built(kind: SchedulerKind, config: &SchedulerConfig, steps: usize) -> Box<dyn Scheduler> {
    let mut scheduler = build(kind, config).expect("build scheduler");
    scheduler.set_timesteps(steps).expect("set_timesteps");
    scheduler
}

/// Checks timesteps (values and dtype), sigmas and init_noise_sigma of a fresh N-step schedule.
fn check_schedule(
    name: &str,
    scheduler: &dyn Scheduler,
    golden: &HashMap<String, Tensor>,
    n: usize,
) {
    let prefix = format!("{name}.n{n}");
    let expected = get(golden, &format!("n{n}.timesteps"));
    assert_eq!(
        scheduler.timesteps().kind(),
        expected.kind(),
        "{prefix}.timesteps dtype"
    );
    assert_close(
        &format!("{prefix}.timesteps"),
        scheduler.timesteps(),
        expected,
        0.0,
    );
    let sigma_key = format!("n{n}.sigmas");
    match (scheduler.sigmas(), golden.get(&sigma_key)) {
        (Some(sigmas), Some(expected)) => {
            assert_close(&format!("{prefix}.sigmas"), sigmas, expected, SIGMA_TOL)
        }
        (None, None) => {}
        (ours, theirs) => panic!(
            "{prefix}.sigmas: present here {}, in fixture {}",
            ours.is_some(),
            theirs.is_some()
        ),
    }
    let json = schedulers_json();
    let expected_sigma = json["schedulers"][name][format!("n{n}")]["init_noise_sigma"]
        .as_f64()
        .expect("init_noise_sigma");
    assert_same_values(
        &format!("{prefix}.init_noise_sigma"),
        &[scheduler.init_noise_sigma()],
        &[expected_sigma],
        SIGMA_TOL,
    );
}

/// Runs the fixture loop (`model_output = 0.1 * model_input + 0.001 * t`) for N steps,
/// comparing every step when `per_step`, and the final sample.
fn run_loop(name: &str, kind: SchedulerKind, n: usize, per_step: bool) {
    let golden = load_tensors(&format!("{name}.safetensors"));
    let mut scheduler = built(kind, &model_config(), n);
    check_schedule(name, scheduler.as_ref(), &golden, n);
    let prefix = format!("n{n}");
    let noise = get(&golden, &format!("{prefix}.initial_noise"));
    let mut sample = noise * scheduler.init_noise_sigma();
    let initial = get(&golden, &format!("{prefix}.initial_sample"));
    assert_close(
        &format!("{name}.{prefix}.initial_sample"),
        &sample,
        initial,
        STEP_TOL,
    );
    let _rng = crate::sd_support::global_rng();
    tch::manual_seed(STEP_GENERATOR_SEED);
    let timesteps = values(scheduler.timesteps());
    for (i, &t) in timesteps.iter().enumerate() {
        let step_key = format!("{prefix}.step{i:02}");
        let model_input = scheduler.scale_model_input(&sample, i).expect("scale");
        let model_output = model_input
            .f_mul_scalar(0.1)
            .unwrap()
            .f_add_scalar(0.001 * t)
            .unwrap();
        let output = scheduler.step(&model_output, i, &sample).expect("step");
        if per_step {
            let check = |what: &str, tensor: &Tensor| {
                let key = format!("{step_key}.{what}");
                assert_close(
                    &format!("{name}.{key}"),
                    tensor,
                    get(&golden, &key),
                    STEP_TOL,
                );
            };
            check("model_input", &model_input);
            check("model_output", &model_output);
            check("prev_sample", &output.prev_sample);
            let pred_key = format!("{step_key}.pred_original_sample");
            assert_eq!(
                output.pred_original_sample.is_some(),
                golden.contains_key(&pred_key),
                "{name}.{pred_key}: presence"
            );
            if let Some(pred) = &output.pred_original_sample {
                check("pred_original_sample", pred);
            }
        }
        sample = output.prev_sample;
    }
    let tol = if per_step { STEP_TOL } else { FINAL_TOL };
    let key = format!("{prefix}.final_sample");
    assert_close(&format!("{name}.{key}"), &sample, get(&golden, &key), tol);
}

#[test]
fn every_scheduler_matches_diffusers_step_by_step_for_10_steps() {
    for (kind, name) in SCHEDULERS {
        run_loop(name, kind, 10, true);
    }
}

#[test]
fn every_scheduler_matches_diffusers_final_sample_for_50_steps() {
    for (kind, name) in SCHEDULERS {
        run_loop(name, kind, 50, false);
    }
}

#[test]
fn pndm_runs_n_plus_one_model_calls_with_the_second_timestep_repeated() {
    let scheduler = built(SchedulerKind::Pndm, &model_config(), 10);
    assert_eq!(
        values(scheduler.timesteps()),
        vec![
            901.0, 801.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0
        ]
    );
}

#[test]
fn timestep_spacing_tables_match_for_every_scheduler_spacing_and_step_count() {
    let json = schedulers_json();
    let base = model_config();
    for (kind, name) in SCHEDULERS {
        let tables = json["timestep_spacing_tables"][name]
            .as_object()
            .unwrap_or_else(|| panic!("no tables for {name}"));
        for (spacing, by_steps) in tables {
            let mut config = base.clone();
            config.timestep_spacing = Some(spacing.clone());
            for (steps, table) in by_steps.as_object().expect("steps table") {
                let key = format!("{name}.{spacing}.{steps}");
                let n: usize = steps.parse().expect("step count");
                let scheduler = built(kind, &config, n);
                let expected = json_f64s(&table["timesteps"]);
                let actual = values(scheduler.timesteps());
                assert_same_values(&format!("{key}.timesteps"), &actual, &expected, JSON_EXACT);
                let init = table["init_noise_sigma"]
                    .as_f64()
                    .expect("init_noise_sigma");
                let ours = scheduler.init_noise_sigma();
                assert_same_values(
                    &format!("{key}.init_noise_sigma"),
                    &[ours],
                    &[init],
                    SIGMA_TOL,
                );
                match (scheduler.sigmas(), table.get("sigmas")) {
                    (Some(sigmas), Some(expected)) => assert_same_values(
                        &format!("{key}.sigmas"),
                        &values(sigmas),
                        &json_f64s(expected),
                        SIGMA_TOL,
                    ),
                    (None, None) => {}
                    _ => panic!("{key}.sigmas: presence differs from the fixture"),
                }
            }
        }
    }
}

#[test]
fn effective_configs_from_diffusers_build_the_same_schedules() {
    // `effective_config` is the config diffusers ended up with (it has explicit defaults and,
    // for DPM-Solver, Python's `-Infinity`); building from it must give the same timesteps.
    let json = schedulers_json();
    for (kind, name) in SCHEDULERS {
        let entry = &json["schedulers"][name];
        let text = entry["effective_config"].to_string();
        let config = SchedulerConfig::from_json(&text, name).expect("effective_config parses");
        assert_eq!(SchedulerKind::of_config(&config).expect("class"), kind);
        for n in [10usize, 50] {
            let scheduler = built(kind, &config, n);
            let expected = json_f64s(&entry[format!("n{n}")]["timesteps"]);
            assert_same_values(
                &format!("{name}.effective.n{n}.timesteps"),
                &values(scheduler.timesteps()),
                &expected,
                JSON_EXACT,
            );
        }
    }
}

#[test]
fn ddpm_training_helpers_match_add_noise_get_velocity_and_tables() {
    let golden = load_tensors("add_noise.safetensors");
    let ddpm = DdpmScheduler::new(&model_config()).expect("ddpm");
    let betas = get(&golden, "betas");
    crate::sd_support::assert_within_ulps("betas", ddpm.betas(), betas, BETAS_ULPS);
    let alphas_cumprod = get(&golden, "alphas_cumprod");
    let ours = ddpm.alphas_cumprod();
    crate::sd_support::assert_within_ulps("alphas_cumprod", ours, alphas_cumprod, BETAS_ULPS);
    let (original, noise) = (get(&golden, "original"), get(&golden, "noise"));
    let timesteps = get(&golden, "timesteps");
    let noisy = ddpm
        .add_noise(original, noise, timesteps)
        .expect("add_noise");
    assert_close("noisy", &noisy, get(&golden, "noisy"), STEP_TOL);
    let velocity = ddpm
        .get_velocity(original, noise, timesteps)
        .expect("get_velocity");
    assert_close("velocity", &velocity, get(&golden, "velocity"), STEP_TOL);
}

#[test]
fn unknown_beta_schedule_is_an_error_naming_the_key_and_file() {
    let text = r#"{"_class_name": "PNDMScheduler", "beta_schedule": "cosine"}"#;
    let config = SchedulerConfig::from_json(text, "my/scheduler_config.json").unwrap();
    let error = build(SchedulerKind::Ddim, &config)
        .err()
        .expect("must fail");
    assert_eq!(
        error.to_string(),
        "my/scheduler_config.json: `beta_schedule` = \"cosine\" is not valid for DDIMScheduler; \
         use one of: linear, scaled_linear, squaredcos_cap_v2"
    );
}

#[test]
fn scheduler_names_and_class_names_parse() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
        assert_eq!(
            SchedulerKind::from_class_name(kind.class_name()),
            Some(kind)
        );
    }
    assert_eq!(
        SchedulerKind::of_config(&model_config()).unwrap(),
        SchedulerKind::Pndm
    );
    let error = "heun".parse::<SchedulerKind>().unwrap_err();
    assert!(matches!(error, SchedulerError::UnknownKind { .. }));
    assert_eq!(
        error.to_string(),
        "unknown scheduler \"heun\"; use one of: ddim, pndm, lms, euler, euler-a, dpm++, ddpm"
    );
}

#[test]
fn out_of_range_step_index_and_step_counts_are_errors() {
    let mut scheduler = built(SchedulerKind::Ddim, &model_config(), 4);
    let x = Tensor::zeros([1, 4, 2, 2], (Kind::Float, tch::Device::Cpu));
    let error = scheduler.step(&x, 4, &x).expect_err("index 4 of 4");
    assert!(
        error
            .to_string()
            .contains("step index 4 is out of range (4 timesteps)"),
        "{error}"
    );
    let error = scheduler.set_timesteps(1001).expect_err("too many steps");
    assert!(
        error
            .to_string()
            .contains("num_inference_steps = 1001 is invalid"),
        "{error}"
    );
}

/// A config like the model's with `prediction_type` (and optionally the spacing) replaced.
fn config_with(prediction: &str, spacing: Option<&str>) -> SchedulerConfig {
    let mut config = model_config();
    config.prediction_type = Some(prediction.to_string());
    config.timestep_spacing = spacing.map(str::to_string);
    config
}

#[test]
fn exact_model_outputs_recover_the_clean_sample_for_every_prediction_type() {
    // x_t = add_noise(x0, eps, t); a model that outputs the exact eps / v / x0 target must make
    // pred_original_sample == x0 (DDIM, DDPM; Euler and LMS in sigma space, x = x_t * sqrt(1 + sigma^2)).
    let golden = load_tensors("add_noise.safetensors");
    let x0 = get(&golden, "original").narrow(0, 0, 1);
    let eps = get(&golden, "noise").narrow(0, 0, 1);
    let ddpm = DdpmScheduler::new(&model_config()).expect("ddpm");
    let _rng = crate::sd_support::global_rng();
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::Euler,
        SchedulerKind::Lms,
    ] {
        for prediction in ["epsilon", "v_prediction", "sample"] {
            let mut scheduler = built(kind, &config_with(prediction, Some("leading")), 10);
            let step = 3;
            let t = values(scheduler.timesteps())[step] as i64;
            let timesteps = Tensor::from_slice(&[t]);
            let x_t = ddpm.add_noise(&x0, &eps, &timesteps).unwrap();
            let target = match prediction {
                "epsilon" => eps.shallow_clone(),
                "v_prediction" => ddpm.get_velocity(&x0, &eps, &timesteps).unwrap(),
                _ => x0.shallow_clone(),
            };
            let sample = match scheduler.sigmas() {
                Some(sigmas) => {
                    let sigma = values(sigmas)[step];
                    &x_t * (sigma * sigma + 1.0).sqrt()
                }
                None => x_t,
            };
            let output = scheduler.step(&target, step, &sample).expect("step");
            let pred = output.pred_original_sample.expect("pred_original_sample");
            assert_close(
                &format!("{kind}.{prediction}.pred_original"),
                &pred,
                &x0,
                1e-4,
            );
        }
    }
}

#[test]
fn pndm_without_skip_prk_steps_runs_the_runge_kutta_warm_up_first() {
    // Expected values derived by hand from diffusers' PNDMScheduler.set_timesteps (N=10,
    // leading, steps_offset 1): 12 PRK timesteps around the 4 highest, then PLMS from 601.
    let mut config = model_config();
    config.skip_prk_steps = Some(false);
    let scheduler = built(SchedulerKind::Pndm, &config, 10);
    let expected = [
        901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601, 501, 401, 301, 201, 101, 1,
    ];
    let expected: Vec<f64> = expected.iter().map(|&t| t as f64).collect();
    assert_eq!(values(scheduler.timesteps()), expected);
}

#[test]
fn pndm_prk_and_plms_runs_end_close_to_each_other() {
    // Both integrate the same ODE: with the fixture's smooth model the 10-step results agree to
    // within the methods' discretisation difference.
    let golden = load_tensors("pndm.safetensors");
    let noise = get(&golden, "n10.initial_noise");
    let run = |skip_prk: bool| {
        let mut config = model_config();
        config.skip_prk_steps = Some(skip_prk);
        let mut scheduler = built(SchedulerKind::Pndm, &config, 10);
        let mut sample = noise.shallow_clone();
        for (i, t) in values(scheduler.timesteps()).into_iter().enumerate() {
            let model_output = &sample * 0.1 + 0.001 * t;
            sample = scheduler
                .step(&model_output, i, &sample)
                .unwrap()
                .prev_sample;
        }
        sample
    };
    let (plms, prk) = (run(true), run(false));
    assert_close("pndm.prk_vs_plms", &prk, &plms, 0.05);
}

/// The training sigmas `sqrt((1 - acp) / acp)` of the model config, in float64.
fn train_sigmas() -> Vec<f64> {
    let ddpm = DdpmScheduler::new(&model_config()).expect("ddpm");
    values(ddpm.alphas_cumprod())
        .into_iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// The training sigma at fractional timestep `t`, interpolated in log space.
fn sigma_at(train: &[f64], t: f64) -> f64 {
    let low = (t.floor() as usize).min(train.len() - 2);
    let w = t - low as f64;
    ((1.0 - w) * train[low].ln() + w * train[low + 1].ln()).exp()
}

#[test]
fn karras_sigmas_follow_the_rho_7_ramp_and_map_back_to_their_timesteps() {
    let train = train_sigmas();
    let (sigma_max, sigma_min) = (train[999], train[0]);
    let mut config = model_config();
    config.use_karras_sigmas = Some(true);
    for kind in [
        SchedulerKind::Euler,
        SchedulerKind::Lms,
        SchedulerKind::DpmSolverMultistep,
    ] {
        let scheduler = built(kind, &config, 20);
        let sigmas = values(scheduler.sigmas().expect("sigmas"));
        assert_eq!(sigmas.len(), 21, "{kind}: sigmas");
        assert_eq!(sigmas[20], 0.0, "{kind}: final sigma");
        assert_same_values(
            &format!("{kind}.karras.ends"),
            &[sigmas[0], sigmas[19]],
            &[sigma_max, sigma_min],
            1e-6,
        );
        let roots: Vec<f64> = sigmas[..20].iter().map(|s| s.powf(1.0 / 7.0)).collect();
        let step = (roots[19] - roots[0]) / 19.0;
        for (i, root) in roots.iter().enumerate() {
            let expected = roots[0] + step * i as f64;
            assert!(
                (root - expected).abs() < 1e-6,
                "{kind}: sigma {i} off the rho-7 ramp"
            );
        }
        let timesteps = values(scheduler.timesteps());
        assert_eq!(timesteps.len(), 20, "{kind}: timesteps");
        assert!(
            timesteps.windows(2).all(|w| w[0] > w[1]),
            "{kind}: {timesteps:?}"
        );
        for (i, (&t, &sigma)) in timesteps.iter().zip(&sigmas).enumerate() {
            if kind == SchedulerKind::DpmSolverMultistep {
                // Rounded to the nearest training timestep.
                let exact_t = (0..999)
                    .map(|k| k as f64)
                    .find(|&k| sigma_at(&train, k + 1.0) >= sigma)
                    .map(|k| {
                        k + (sigma.ln() - train[k as usize].ln())
                            / (train[k as usize + 1].ln() - train[k as usize].ln())
                    })
                    .unwrap_or(999.0);
                assert!(
                    (t - exact_t).abs() <= 0.5 + 1e-6,
                    "{kind}: t[{i}] = {t}, sigma's t = {exact_t}"
                );
            } else {
                let back = sigma_at(&train, t);
                assert!(
                    (back - sigma).abs() <= 1e-4 * sigma,
                    "{kind}: t[{i}] = {t} gives sigma {back}, not {sigma}"
                );
            }
        }
    }
    assert_eq!(
        values(built(SchedulerKind::DpmSolverMultistep, &config, 20).timesteps())[0],
        999.0
    );
}

#[test]
fn dpm_solver_karras_20_steps_lands_near_the_50_step_reference() {
    // Same ODE, different discretisation: DPM-Solver++(2M) with 20 Karras steps should end close
    // to diffusers' 50-step DPM-Solver++ result from the fixture.
    let golden = load_tensors("dpmsolver_multistep.safetensors");
    let mut config = model_config();
    config.use_karras_sigmas = Some(true);
    let mut scheduler = built(SchedulerKind::DpmSolverMultistep, &config, 20);
    let mut sample = get(&golden, "n50.initial_noise").shallow_clone();
    for (i, t) in values(scheduler.timesteps()).into_iter().enumerate() {
        let model_output = &sample * 0.1 + 0.001 * t;
        sample = scheduler
            .step(&model_output, i, &sample)
            .unwrap()
            .prev_sample;
    }
    assert_close(
        "dpm++.karras20_vs_n50",
        &sample,
        get(&golden, "n50.final_sample"),
        2e-2,
    );
}

#[test]
fn pipeline_runs_get_the_timesteps_and_unet_call_counts_diffusers_used() {
    let path = Path::new("tests/fixtures/sd-tiny/pipeline/pipeline.json");
    let json = python_json(path);
    let steps = json["num_inference_steps"]
        .as_u64()
        .expect("num_inference_steps") as usize;
    for (kind, name) in SCHEDULERS {
        let run = &json["runs"][name];
        let scheduler = built(kind, &model_config(), steps);
        let timesteps = values(scheduler.timesteps());
        let key = format!("pipeline.{name}");
        let expected = json_f64s(&run["timesteps_passed_to_unet"]);
        assert_same_values(
            &format!("{key}.timesteps"),
            &timesteps,
            &expected,
            JSON_EXACT,
        );
        let calls = run["num_unet_calls"].as_u64().expect("num_unet_calls") as usize;
        assert_eq!(timesteps.len(), calls, "{key}: UNet calls");
        let init = run["init_noise_sigma"].as_f64().expect("init_noise_sigma");
        assert_same_values(
            &format!("{key}.init"),
            &[scheduler.init_noise_sigma()],
            &[init],
            SIGMA_TOL,
        );
    }
}

#[test]
fn zero_terminal_snr_rescaling_keeps_the_first_alpha_and_zeroes_the_last() {
    let plain = values(
        DdpmScheduler::new(&model_config())
            .unwrap()
            .alphas_cumprod(),
    );
    let mut config = model_config();
    config.rescale_betas_zero_snr = Some(true);
    let rescaled = values(DdpmScheduler::new(&config).unwrap().alphas_cumprod());
    assert_same_values("rescaled.acp[0]", &[rescaled[0]], &[plain[0]], 1e-6);
    assert!(
        rescaled[999].abs() < 1e-12,
        "terminal alphas_cumprod {}",
        rescaled[999]
    );
    assert!(
        rescaled.windows(2).all(|w| w[0] > w[1]),
        "alphas_cumprod must decrease"
    );
    // Euler floors the terminal alphas_cumprod at 2**-24, so its largest sigma is finite:
    // sqrt((1 - 2^-24) / 2^-24) = 4096 (to float32 precision).
    let euler = built(SchedulerKind::Euler, &config, 10);
    let first_sigma = values(euler.sigmas().unwrap())[0];
    assert_same_values("rescaled.euler.sigma_max", &[first_sigma], &[4096.0], 1e-6);
}
