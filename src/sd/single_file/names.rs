//! Tensor names between a diffusers folder and the original (LDM / CompVis) single-file layout
//! that A1111, ComfyUI and model sites use. One function per component maps a diffusers name
//! to its single-file name, driven by the component's diffusers config (blocks, layers per
//! block, which blocks have attention), so reading (single file → folder) and writing (folder →
//! single file) share it. Facts from diffusers' `single_file_utils.py`, written here anew.

/// Prefix of the UNet's tensors in a single file.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the VAE's tensors.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of an SD 1.x CLIP ViT-L text encoder (transformers' own names follow it).
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of an SD 2.x OpenCLIP ViT-H text encoder.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// Prefix of SDXL's first text encoder (CLIP ViT-L, transformers' names follow it).
pub const XL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Prefix of SDXL's second text encoder (OpenCLIP ViT-bigG, with `text_projection`).
pub const XL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
/// The projection of `CLIPTextModelWithProjection`: a linear weight `[out, in]` in diffusers,
/// OpenCLIP's `text_projection` matrix `[in, out]` (the transpose) in a single file.
pub const TEXT_PROJECTION: &str = "text_projection.weight";

/// What the UNet mapping needs from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetLayout {
    pub layers_per_block: usize,
    /// Per down block, whether it has attention (`CrossAttnDownBlock2D`).
    pub down_attention: Vec<bool>,
    /// Per up block, whether it has attention (`CrossAttnUpBlock2D`).
    pub up_attention: Vec<bool>,
}

/// The single-file name (after [`UNET_PREFIX`]) of a diffusers UNet tensor.
pub fn unet_name(name: &str, layout: &UnetLayout) -> Option<String> {
    let fixed = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        // SDXL's added conditioning.
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
    ];
    if let Some(mapped) = replace_prefix(name, &fixed) {
        return Some(mapped);
    }
    let parts: Vec<&str> = name.split('.').collect();
    let per_down = layout.layers_per_block + 1;
    let per_up = layout.layers_per_block + 1;
    let rest = |from: usize| parts[from..].join(".");
    match parts.as_slice() {
        ["down_blocks", block, "resnets", layer, ..] => {
            let index = block.parse::<usize>().ok()? * per_down + layer.parse::<usize>().ok()? + 1;
            Some(format!("input_blocks.{index}.0.{}", resnet_rest(&rest(4))))
        }
        ["down_blocks", block, "attentions", layer, ..] => {
            let index = block.parse::<usize>().ok()? * per_down + layer.parse::<usize>().ok()? + 1;
            Some(format!("input_blocks.{index}.1.{}", rest(4)))
        }
        ["down_blocks", block, "downsamplers", "0", "conv", ..] => {
            let index = (block.parse::<usize>().ok()? + 1) * per_down;
            Some(format!("input_blocks.{index}.0.op.{}", rest(5)))
        }
        ["mid_block", "resnets", layer, ..] => {
            let index = layer.parse::<usize>().ok()? * 2;
            Some(format!("middle_block.{index}.{}", resnet_rest(&rest(3))))
        }
        ["mid_block", "attentions", "0", ..] => Some(format!("middle_block.1.{}", rest(3))),
        ["up_blocks", block, "resnets", layer, ..] => {
            let index = block.parse::<usize>().ok()? * per_up + layer.parse::<usize>().ok()?;
            Some(format!("output_blocks.{index}.0.{}", resnet_rest(&rest(4))))
        }
        ["up_blocks", block, "attentions", layer, ..] => {
            let index = block.parse::<usize>().ok()? * per_up + layer.parse::<usize>().ok()?;
            Some(format!("output_blocks.{index}.1.{}", rest(4)))
        }
        ["up_blocks", block, "upsamplers", "0", "conv", ..] => {
            let block = block.parse::<usize>().ok()?;
            let index = block * per_up + layout.layers_per_block;
            let slot = if *layout.up_attention.get(block)? {
                2
            } else {
                1
            };
            Some(format!("output_blocks.{index}.{slot}.conv.{}", rest(5)))
        }
        _ => None,
    }
}

/// A UNet resnet's inner names: diffusers → LDM.
fn resnet_rest(rest: &str) -> String {
    let renames = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("time_emb_proj.", "emb_layers.1."),
        ("conv_shortcut.", "skip_connection."),
    ];
    replace_prefix(rest, &renames).unwrap_or_else(|| rest.to_string())
}

/// The single-file name (after [`VAE_PREFIX`]) of a diffusers VAE tensor; `up_blocks` is the
/// decoder's number of up blocks (LDM numbers them the other way round).
pub fn vae_name(name: &str, up_blocks: usize) -> Option<String> {
    let fixed = [
        ("encoder.conv_norm_out.", "encoder.norm_out."),
        ("decoder.conv_norm_out.", "decoder.norm_out."),
        ("encoder.conv_in.", "encoder.conv_in."),
        ("encoder.conv_out.", "encoder.conv_out."),
        ("decoder.conv_in.", "decoder.conv_in."),
        ("decoder.conv_out.", "decoder.conv_out."),
        ("quant_conv.", "quant_conv."),
        ("post_quant_conv.", "post_quant_conv."),
    ];
    if let Some(mapped) = replace_prefix(name, &fixed) {
        return Some(mapped);
    }
    let parts: Vec<&str> = name.split('.').collect();
    let rest = |from: usize| parts[from..].join(".");
    match parts.as_slice() {
        [coder, "down_blocks", block, "resnets", layer, ..] => Some(format!(
            "{coder}.down.{block}.block.{layer}.{}",
            vae_resnet_rest(&rest(5))
        )),
        [coder, "down_blocks", block, "downsamplers", "0", "conv", ..] => {
            Some(format!("{coder}.down.{block}.downsample.conv.{}", rest(6)))
        }
        [coder, "up_blocks", block, "resnets", layer, ..] => {
            let ldm = up_blocks.checked_sub(1 + block.parse::<usize>().ok()?)?;
            Some(format!(
                "{coder}.up.{ldm}.block.{layer}.{}",
                vae_resnet_rest(&rest(5))
            ))
        }
        [coder, "up_blocks", block, "upsamplers", "0", "conv", ..] => {
            let ldm = up_blocks.checked_sub(1 + block.parse::<usize>().ok()?)?;
            Some(format!("{coder}.up.{ldm}.upsample.conv.{}", rest(6)))
        }
        [coder, "mid_block", "resnets", layer, ..] => {
            let number = layer.parse::<usize>().ok()? + 1;
            Some(format!(
                "{coder}.mid.block_{number}.{}",
                vae_resnet_rest(&rest(4))
            ))
        }
        [coder, "mid_block", "attentions", "0", ..] => {
            let renames = [
                ("group_norm.", "norm."),
                ("to_q.", "q."),
                ("to_k.", "k."),
                ("to_v.", "v."),
                ("to_out.0.", "proj_out."),
            ];
            let inner = replace_prefix(&rest(4), &renames)?;
            Some(format!("{coder}.mid.attn_1.{inner}"))
        }
        _ => None,
    }
}

fn vae_resnet_rest(rest: &str) -> String {
    replace_prefix(rest, &[("conv_shortcut.", "nin_shortcut.")]).unwrap_or_else(|| rest.to_string())
}

/// Whether a VAE tensor is an attention projection that LDM stores as a 1×1 convolution
/// (`[C, C, 1, 1]`) and diffusers as a linear layer (`[C, C]`).
pub fn is_vae_attention_weight(name: &str) -> bool {
    name.contains("mid_block.attentions.0.")
        && !name.contains("group_norm")
        && name.ends_with(".weight")
}

/// Where a diffusers (transformers) CLIP text-encoder tensor sits in an OpenCLIP single file:
/// the name after [`OPEN_CLIP_PREFIX`], and which third of a fused `in_proj` it is (0 = q,
/// 1 = k, 2 = v) when it is one.
pub fn open_clip_name(name: &str) -> Option<(String, Option<usize>)> {
    let fixed = [
        (
            "text_model.embeddings.token_embedding.weight",
            "token_embedding.weight",
        ),
        (
            "text_model.embeddings.position_embedding.weight",
            "positional_embedding",
        ),
        ("text_model.final_layer_norm.", "ln_final."),
        (TEXT_PROJECTION, "text_projection"),
    ];
    if let Some(mapped) = replace_prefix(name, &fixed) {
        return Some((mapped, None));
    }
    let rest = name.strip_prefix("text_model.encoder.layers.")?;
    let (layer, inner) = rest.split_once('.')?;
    let block = format!("transformer.resblocks.{layer}.");
    for (third, projection) in ["q_proj.", "k_proj.", "v_proj."].iter().enumerate() {
        if let Some(tail) = inner.strip_prefix(&format!("self_attn.{projection}")) {
            return Some((format!("{block}attn.in_proj_{tail}"), Some(third)));
        }
    }
    let renames = [
        ("self_attn.out_proj.", "attn.out_proj."),
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ];
    Some((format!("{block}{}", replace_prefix(inner, &renames)?), None))
}

/// `text` with the first matching `(from, to)` prefix replaced.
fn replace_prefix(text: &str, pairs: &[(&str, &str)]) -> Option<String> {
    pairs.iter().find_map(|(from, to)| {
        if from.ends_with('.') {
            text.strip_prefix(from).map(|rest| format!("{to}{rest}"))
        } else {
            (text == *from).then(|| to.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> UnetLayout {
        UnetLayout {
            layers_per_block: 2,
            down_attention: vec![true, true, true, false],
            up_attention: vec![false, true, true, true],
        }
    }

    #[test]
    fn unet_names_follow_the_ldm_block_numbering() {
        let layout = sd15();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.1.attentions.0.proj_in.weight",
                "input_blocks.4.1.proj_in.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.bias",
                "input_blocks.9.0.op.bias",
            ),
            (
                "down_blocks.3.resnets.1.time_emb_proj.weight",
                "input_blocks.11.0.emb_layers.1.weight",
            ),
            (
                "mid_block.resnets.1.conv2.weight",
                "middle_block.2.out_layers.3.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv_shortcut.weight",
                "output_blocks.2.0.skip_connection.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.attentions.2.norm.bias",
                "output_blocks.5.1.norm.bias",
            ),
            (
                "up_blocks.2.upsamplers.0.conv.weight",
                "output_blocks.8.2.conv.weight",
            ),
            ("conv_norm_out.bias", "out.0.bias"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(
                unet_name(diffusers, &layout).as_deref(),
                Some(ldm),
                "{diffusers}"
            );
        }
        assert_eq!(unet_name("not.a.tensor", &layout), None);
    }

    #[test]
    fn vae_names_reverse_the_up_blocks_and_rename_attention() {
        let cases = [
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.weight",
                "encoder.down.0.downsample.conv.weight",
            ),
            (
                "decoder.up_blocks.0.resnets.2.norm1.bias",
                "decoder.up.3.block.2.norm1.bias",
            ),
            (
                "decoder.up_blocks.3.upsamplers.0.conv.weight",
                "decoder.up.0.upsample.conv.weight",
            ),
            (
                "decoder.mid_block.resnets.1.conv2.weight",
                "decoder.mid.block_2.conv2.weight",
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.bias",
                "encoder.mid.attn_1.norm.bias",
            ),
            ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(vae_name(diffusers, 4).as_deref(), Some(ldm), "{diffusers}");
        }
        assert!(is_vae_attention_weight(
            "decoder.mid_block.attentions.0.to_k.weight"
        ));
        assert!(!is_vae_attention_weight(
            "decoder.mid_block.attentions.0.to_k.bias"
        ));
        assert!(!is_vae_attention_weight(
            "decoder.mid_block.attentions.0.group_norm.weight"
        ));
    }

    #[test]
    fn open_clip_names_fuse_q_k_v() {
        let cases = [
            (
                "text_model.embeddings.position_embedding.weight",
                "positional_embedding",
                None,
            ),
            (
                "text_model.encoder.layers.3.self_attn.k_proj.weight",
                "transformer.resblocks.3.attn.in_proj_weight",
                Some(1),
            ),
            (
                "text_model.encoder.layers.3.self_attn.v_proj.bias",
                "transformer.resblocks.3.attn.in_proj_bias",
                Some(2),
            ),
            (
                "text_model.encoder.layers.0.mlp.fc2.weight",
                "transformer.resblocks.0.mlp.c_proj.weight",
                None,
            ),
            ("text_model.final_layer_norm.bias", "ln_final.bias", None),
        ];
        for (diffusers, ldm, third) in cases {
            assert_eq!(
                open_clip_name(diffusers),
                Some((ldm.to_string(), third)),
                "{diffusers}"
            );
        }
    }
}
