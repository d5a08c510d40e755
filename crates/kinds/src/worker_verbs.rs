//! The torch worker's verbs as both binaries register them with the runner's CLI
//! (`dreampipe_core::cli::command`): the front lists them in `--help` and hands them to
//! `dreampipe-torch`, which gives them their real arguments (`dreampipe::cli`).
use dreampipe_core::cli::ExternalVerb;

pub const WORKER_VERBS: &[ExternalVerb] = &[
    ExternalVerb {
        name: "doctor",
        about: Some(
            "Print libtorch's version and location, CUDA availability and devices, the cache root",
        ),
        hidden: false,
        before: Some("run"),
    },
    ExternalVerb {
        name: "sample",
        about: Some("Generate images from a prompt (txt2img) with a diffusers model folder"),
        hidden: false,
        before: Some("run"),
    },
    ExternalVerb {
        name: "model",
        about: Some(
            "Model-folder utilities (`model init`: random-weight folders in a known architecture)",
        ),
        hidden: false,
        before: None,
    },
    ExternalVerb {
        name: "bench",
        about: None,
        hidden: true,
        before: None,
    },
];
