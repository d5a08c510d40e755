//! Scheduler goldens: every scheduler against diffusers 0.42.1 (tests/fixtures/sd-tiny/schedulers,
//! produced as its README describes), built from the real SD1.x scheduler_config.json.
use dreampipe::sd::schedulers::{
    DdpmScheduler, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, build,
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
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
/// Seeds from schedulers.json (`initial_noise_seed`) and the README (`step_generator_seed`).
const STEP_GENERATOR_SEED: i64 = 101;

/// tch's global CPU generator is process-wide and tests run on parallel threads: loops that
/// seed it and draw from it hold this lock.
static GLOBAL_RNG: Mutex<()> = Mutex::new(());

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
    let path = Path::new(FIXTURES).join("schedulers.json");
    let text = std::fs::read_to_string(&path).expect("schedulers.json");
    // Python's json writes DPM-Solver's lambda_min_clipped as a bare -Infinity; quote it
    // (SchedulerConfig accepts the quoted form as well as the bare one).
    let text = text.replace("-Infinity", "\"-Infinity\"");
    serde_json::from_str(&text).expect("schedulers.json parses")
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
    let _rng = GLOBAL_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
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
    assert_close("betas", ddpm.betas(), get(&golden, "betas"), 0.0);
    assert_close(
        "alphas_cumprod",
        ddpm.alphas_cumprod(),
        get(&golden, "alphas_cumprod"),
        0.0,
    );
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
    let _rng = GLOBAL_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
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
