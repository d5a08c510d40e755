//! The pipelines core's verbs write or run, which name this crate's kinds: `dreampipe init`'s
//! starter DreamBooth pipeline and `dreampipe bench-cache`'s `command` pipelines. Handed to the
//! runner with the registry ([`crate::registry`]).
use dreampipe_core::stages::templates::PipelineTemplates;

/// The pipelines [`crate::registry`] registers.
pub fn templates() -> PipelineTemplates {
    PipelineTemplates {
        starter: STARTER_TEMPLATE,
        starter_fallback_name: "dreambooth",
        bench_sweep,
        bench_noop: BENCH_NOOP,
    }
}

/// Defaults and comments follow the seed study (DreamBooth on SD 1.x, diffusers' training
/// script and the Hugging Face DreamBooth experiments): see each comment.
pub const STARTER_TEMPLATE: &str = r#"# dreampipe starter: DreamBooth fine-tuning on your own subject.
#   dreampipe validate dreampipe.yaml    # check the file
#   dreampipe run dreampipe.yaml         # run what changed; prints the HTML report's path
# Change a value here or per run: --set db.max_train_steps=800, --set params.class=cat
name: {name}
params:
  model: {model}          # base model: a diffusers folder (Stable Diffusion 1.x)
  class: {class}          # your subject's class noun
  token: sks              # rare token that names your subject in prompts
stages:
  instance:
    kind: images
    path: {images}        # 3–20 photos of the subject: varied poses, backgrounds, lighting
    resolution: 512
    center_crop: true

  # Class images for prior preservation: the base model's idea of the class, so that training
  # on your subject does not make every member of the class look like it.
  class_images:
    kind: generate
    model: ${params.model}
    prompt: a photo of ${params.class}
    count: 200            # the study's default
    scheduler: ddim
    steps: 50
    guidance: 7.5
    seed: 0

  db:
    kind: dreambooth
    model: ${params.model}
    instance_images: instance
    instance_prompt: a photo of ${params.token} ${params.class}
    class_images: class_images
    class_prompt: a photo of ${params.class}
    with_prior_preservation: true
    prior_loss_weight: 1.0
    # Text encoder trained too: the best results in the study (faces especially).
    train_text_encoder: true
    # Objects and pets: 400 steps at 2e-6.
    # Faces: about 1200 steps at 1e-6–2e-6, always with prior preservation.
    # Too many steps or too high a rate overfits: samples copy the training photos.
    learning_rate: 2e-6
    max_train_steps: 400
    lr_scheduler: constant
    lr_warmup_steps: 0
    train_batch_size: 1
    gradient_accumulation_steps: 1
    # Fits a 16 GB GPU: fp16 mixed precision, 8-bit Adam and gradient checkpointing.
    # With 24 GB or more: mixed_precision: no, optimizer: adamw, gradient_checkpointing: false.
    mixed_precision: fp16
    optimizer: adamw8bit
    gradient_checkpointing: true
    seed: 0
    resolution: 512
    # Sweep to find your settings (one run per combination, compared side by side in the report):
    # matrix:
    #   learning_rate: [1e-6, 2e-6]
    #   max_train_steps: [400, 800, 1200]

  grid:
    kind: sample_grid
    models: db
    prompts:
      - a photo of ${params.token} ${params.class}
      - a photo of ${params.token} ${params.class} on the beach
      - an oil painting of ${params.token} ${params.class}
    seeds: [0, 1, 2, 3]
    # DDIM with 100 steps: on fine-tuned (slightly overfit) models DDIM gave cleaner samples
    # than PNDM or LMS in the study.
    schedulers: [ddim]
    steps: 100
    guidance: 7.5
"#;

/// A `command` stage swept over `count` one-line scripts (the plan benchmark).
fn bench_sweep(count: usize) -> String {
    let values: Vec<String> = (0..count).map(|i| format!("'echo {i} > $OUT/x'")).collect();
    format!(
        "stages:\n  sweep:\n    kind: command\n    matrix:\n      run: [{}]\n",
        values.join(", ")
    )
}

/// A `command` stage reading the folder `model` (the no-op rerun benchmark).
const BENCH_NOOP: &str = "stages:\n  train:\n    kind: command\n    inputs: model\n    run: echo trained > $OUT/weights.txt\n";
