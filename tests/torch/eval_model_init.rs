//! `dreampipe model init --like clip-l14|clip-b32|dino-s16`: folders of the published shapes and
//! preprocessing that the `evaluate` stage loads, marked as random weights. The DINO folder is
//! written and loaded whole (21,665,664 parameters: ViT-S/16 without its pooler); the CLIP
//! folders' configs are checked without writing 0.6–1.7 GB of weights.
use dreampipe::embed::clip_model::ClipModelConfig;
use dreampipe::embed::init::{EmbedArchitecture, has_random_weights, write_configs};
use dreampipe::embed::preprocess::{ImageProcessor, ResizeTo};
use dreampipe::embed::resample::Filter;
use dreampipe::embed::vit::VitModel;
use std::process::Command;

#[test]
fn dino_s16_is_written_with_vit_s16_shapes_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dino");
    let output = Command::new(crate::dreampipe())
        .args(["model", "init", "--like", "dino-s16", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("21665664 parameters"), "{text}");
    assert!(has_random_weights(&out));
    let model = VitModel::load(&out, tch::Device::Cpu).unwrap();
    assert_eq!(
        (
            model.config.hidden_size,
            model.config.layers,
            model.config.heads
        ),
        (384, 12, 6)
    );
    let embeds = model.cls_embeds(&tch::Tensor::zeros(
        [2, 3, 224, 224],
        (tch::Kind::Float, tch::Device::Cpu),
    ));
    assert_eq!(embeds.size(), [2, 384]);
    let processor = ImageProcessor::from_dir(&out).unwrap();
    assert_eq!(
        processor.resize,
        Some((
            ResizeTo::Exact {
                height: 224,
                width: 224
            },
            Filter::Bilinear
        ))
    );
    assert_eq!(processor.crop, None);
    assert_eq!(
        processor.normalize,
        Some(([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    );
    // A second init into the same folder is refused.
    let again = Command::new(crate::dreampipe())
        .args(["model", "init", "--like", "dino-s16", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("output folder exists and is not empty")
    );
}

#[test]
fn clip_configs_have_the_published_sizes_and_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    // (architecture, text hidden, vision hidden, vision layers, patch, projection)
    for (architecture, text, vision, layers, patch, projection) in [
        (EmbedArchitecture::ClipL14, 768, 1024, 24, 14, 768),
        (EmbedArchitecture::ClipB32, 512, 768, 12, 32, 512),
    ] {
        let out = dir.path().join(architecture.name());
        write_configs(&out, architecture, 0).unwrap();
        let config = ClipModelConfig::from_file(&out.join("config.json")).unwrap();
        assert_eq!(config.text.hidden_size, text);
        assert_eq!(config.text.vocab_size, 49408);
        assert_eq!(
            (
                config.vision.layer.hidden_size,
                config.vision.layers,
                config.vision.patch_size,
                config.vision.image_size
            ),
            (vision, layers, patch, 224)
        );
        assert_eq!(config.projection_dim, projection);
        let processor = ImageProcessor::from_dir(&out).unwrap();
        assert_eq!(
            processor.resize,
            Some((ResizeTo::ShortestEdge(224), Filter::Bicubic))
        );
        assert_eq!(processor.crop, Some((224, 224)));
        assert!(out.join("vocab.json").is_file() && out.join("merges.txt").is_file());
    }
}
