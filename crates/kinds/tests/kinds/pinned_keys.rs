//! The cache keys of representative stages of every kind, pinned to the values dreampipe
//! computed before parameters became typed structs (commit b20ec7a). A changed key reruns every
//! user's cached stage of that kind, so a change here must be deliberate: bump the kind's
//! `version()` for a changed output, and never change a key by refactoring alone.
use dreampipe_core::cache::hash::HashMemo;
use dreampipe_core::device::Device;
use dreampipe_core::pipeline::{LoadOptions, Pipeline, load_str};
use dreampipe_core::plan::fingerprint::material;
use std::collections::BTreeMap;
use std::path::Path;

/// Every kind once, with defaults and with non-default values of each closed set, a sweep, a
/// gathering reference, LoRA rows and a not-in-key field.
const PIPELINE: &str = r#"
name: pinned
stages:
  prep:
    kind: command
    run: echo hello > $OUT/a.txt
    inputs: [notes.txt]
  instance:
    kind: images
    path: photos
    resolution: 64
  class_images:
    kind: generate
    model: base
    prompt: a photo of a dog
    count: 8
    scheduler: euler-a
    width: 64
    height: 64
    batch_size: 4
    dtype: bf16
  ti:
    kind: textual_inversion
    model: base
    instance_images: instance
    placeholder_token: <toy>
    initializer_token: toy
    learnable_property: style
    num_vectors: 2
    max_train_steps: 16
    lr_scheduler: cosine_with_restarts
    optimizer: adamw8bit
    mixed_precision: bf16
    export: [diffusers, single_file]
    save_dtype: bf16
    validation_prompt: a <toy>
  db:
    kind: dreambooth
    model: ti
    instance_images: instance
    instance_prompt: a photo of sks dog
    class_images: class_images
    class_prompt: a photo of a dog
    num_class_images: 8
    snr_gamma: 5.0
    lr_scheduler: polynomial
    matrix:
      learning_rate: [1.0e-6, 2.0e-6]
  lora:
    kind: dreambooth_lora
    model: base
    instance_images: photos
    instance_prompt: a photo of sks dog
    rank: 8
    lora_alpha: 16
    max_train_steps: 10
    save_dtype: f16
  grid:
    kind: sample_grid
    models: [db, lora, base]
    base_model: base
    lora_scales: [0.5, 1.0]
    prompts: [a photo of sks dog]
    seeds: [0, 7]
    schedulers: [ddim, dpm++]
    steps: [6, 12]
    guidance: 5
  real:
    kind: embed
    images: instance
    clip_model: clip
    dino_model: dino
    batch_size: 2
  scores:
    kind: evaluate
    generated: [grid]
    real: real
    clip_model: clip
    dino_model: dino
    identifier: sks
    class_prompt: a photo of a dog
  world:
    kind: toy_world
    count: 8
    size: 32
  tune:
    kind: finetune
    model: base
    images: world
    resolution: 32
    max_train_steps: 10
    snr_gamma: 5
  ae:
    kind: vae
    model: base
    images: world
    resolution: 32
    max_train_steps: 10
    rec_loss: l1
    fit_scaling_factor: true
  world_scores:
    kind: world_score
    generated: [world, grid]
    identifier: toy
"#;

/// The keys main computed for [`PIPELINE`] (stage id → key), on a CUDA device (`world`, `tune`,
/// `ae` and `world_scores` pinned when they were added, after the `vae` kind landed; they sit last because
/// this test's stand-in upstream digests are the stages' positions). `grid` and `world_scores`
/// were repinned when their kinds' versions were bumped (sample_grid 3: small pictures drawn
/// enlarged; world_score 2: stripes seen by tone).
const PINNED: [(&str, &str); 15] = [
    (
        "class_images",
        "31d6c95275b11b806971ef7f33147f14ba5ba17335aa773f59a749d3d0827b1e",
    ),
    (
        "cpu:db[learning_rate=1e-6]",
        "45aca6507472740a70b028aebf24cbf7ce9d386e06aab7914674663b5a1a2353",
    ),
    (
        "db[learning_rate=1e-6]",
        "fde4fec0189a8fb2b9e1451e42f15b02d82a11dd4e218122b97459ab91d78675",
    ),
    (
        "db[learning_rate=2e-6]",
        "d757445b33245db1c95f393139f9dece5799e7ac7215babf6373dc41985b04bc",
    ),
    (
        "grid",
        "1d783c43eea05afbf7a30366fc03c4f1e1079bccf0fad4da77550c672cdc4844",
    ),
    (
        "instance",
        "6c5fd2ab41f9334bd5cae78e024fd92f0a819cea2eed1e400efaa4266cd22279",
    ),
    (
        "lora",
        "c1ce3598a9052872d14c1b0a9d89fde3fee7975358d25a59b875ba159ae35ea8",
    ),
    (
        "prep",
        "324bfdf1f5f7143ead0903206890451744cdc9d38ed1cd9bafa6f31c292a5588",
    ),
    (
        "real",
        "cb9950ce04b3cd0a28d22126a5eb3311eef25327ba0ec696b0fa3666e456766f",
    ),
    (
        "scores",
        "0d06e8841dbb774b72f48105a4a0077a77e487f580131809750c5c4b6cb1a74b",
    ),
    (
        "ti",
        "f73888062bbaea9afbf957d490653e6dd06c8da939e1f540a8592265b48d995b",
    ),
    (
        "ae",
        "f60087a138bb940dfda60829a2360dac7ca78b01132ed03268e76763dd839c5a",
    ),
    (
        "tune",
        "4d3f4bcc8b9091d206409477e8dd88fe33d72d217604a3cc2ebe266ba663c6dc",
    ),
    (
        "world",
        "d4e0307b137773360f51a1071ef16bef1e7ad32d14ee8bda3ebf84fcd87248af",
    ),
    (
        "world_scores",
        "99cf8e0ed184207b34de3943a934bdf81b157d7fb0654f1963f3d3ab6b223ae7",
    ),
];

/// The files the pipeline's paths name, with fixed contents.
fn write_inputs(dir: &Path) {
    let write = |relative: &str, text: &str| {
        let path = dir.join(relative);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    write("notes.txt", "notes\n");
    write("photos/0.png", "not decoded when keyed\n");
    write(
        "base/model_index.json",
        "{\"_class_name\": \"StableDiffusionPipeline\"}\n",
    );
    write("clip/config.json", "{}\n");
    write("dino/config.json", "{}\n");
}

/// Every stage's key, upstream output digests standing in as `digest-<index>`; a `cpu:`
/// entry for the first dreambooth variant on the CPU (the device type enters GPU kinds' keys).
fn keys(pipeline: &Pipeline) -> BTreeMap<String, String> {
    let memo = HashMemo::in_memory();
    let upstream = |index: usize| Some(format!("digest-{index}"));
    let key_on = |index: usize, device: Device| {
        let stage = &pipeline.stages[index];
        let built = material(stage, &upstream, &memo, device).expect("hash inputs");
        built.expect("every upstream has a digest").key()
    };
    let mut keys = BTreeMap::new();
    for (index, stage) in pipeline.stages.iter().enumerate() {
        keys.insert(stage.id.clone(), key_on(index, Device::Cuda(0)));
        if stage.id == "db[learning_rate=1e-6]" {
            keys.insert(format!("cpu:{}", stage.id), key_on(index, Device::Cpu));
        }
    }
    keys
}

#[test]
fn keys_of_every_kind_stay_as_main_computed_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_inputs(dir.path());
    let file = dir.path().join("pinned.yaml");
    let pipeline = load_str(
        PIPELINE,
        &file,
        dir.path(),
        &LoadOptions::new(dreampipe_kinds::registry()),
    )
    .expect("valid pipeline");
    let found = keys(&pipeline);
    let pinned: BTreeMap<String, String> = PINNED
        .iter()
        .map(|(id, key)| (id.to_string(), key.to_string()))
        .collect();
    if std::env::var_os("PRINT_KEYS").is_some() {
        for (id, key) in &found {
            println!("    (\n        \"{id}\",\n        \"{key}\",\n    ),");
        }
    }
    assert_eq!(found, pinned);
}
