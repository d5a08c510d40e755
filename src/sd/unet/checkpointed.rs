//! Gradient checkpointing of the UNet, per down / mid / up block (diffusers'
//! `enable_gradient_checkpointing`), in two phases because libtorch's C++ API has no
//! `torch.utils.checkpoint` and tch no custom autograd functions:
//!
//! 1. [`UNet2DConditionModel::forward_checkpointed`] runs the UNet without a graph and keeps
//!    only each block's inputs (hidden state, consumed skips);
//! 2. [`CheckpointedUNet::backward`] takes d loss / d output and walks the blocks from the end:
//!    each block is recomputed with grad from its saved inputs (detached leaves) and
//!    `Σ output · grad` is backpropagated, so parameter grads accumulate as in a plain backward.
//!    The skip connections make the UNet a DAG: the grads reaching a skip leaf of an up block
//!    are kept by skip index and added to the matching output of its down block. The time
//!    embedding and the text context are leaves shared by every block; their accumulated grads
//!    are pushed once through their own graphs (time-embedding MLP, a trained text encoder).
//!
//! Peak memory holds one block's activations instead of the whole UNet's, at the cost of a
//! second forward pass. Blocks are deterministic (no dropout), so the recomputation matches.
use super::{AddedConditions, UNet2DConditionModel};
use crate::sd::autocast::{Autocast, AutocastRegion};
use tch::Tensor;

/// What one up block consumed: its input, its skips and where they sit in the skip list.
struct UpInputs {
    hidden: Tensor,
    skips: Vec<Tensor>,
    first_skip: usize,
    upsample_size: Option<[i64; 2]>,
}

/// The grad-free forward pass: the saved inputs of every block and the output.
pub struct CheckpointedUNet {
    sample: Tensor,
    timesteps: Tensor,
    /// SDXL's added conditions (their grad-free copies).
    added: Option<AddedConditions>,
    /// Input of each down block and the skip indices its outputs occupy.
    down: Vec<(Tensor, std::ops::Range<usize>)>,
    mid: Tensor,
    up: Vec<UpInputs>,
    /// Input of conv_norm_out.
    post: Tensor,
    skip_count: usize,
    output: Tensor,
}

impl UNet2DConditionModel {
    /// Phase 1: the prediction for `sample` (no graph), keeping what the backward recomputes from.
    /// SDXL's `added` conditions enter the time embedding as in the plain forward.
    pub fn forward_checkpointed(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditions>,
    ) -> CheckpointedUNet {
        tch::no_grad(|| {
            let sample = sample.detach();
            let context = context.detach();
            let added = added.map(|a| AddedConditions {
                text_embeds: a.text_embeds.detach(),
                time_ids: a.time_ids.detach(),
            });
            let temb = self.full_time_embedding(&sample, timesteps, added.as_ref());
            let mut hidden = self.conv_in.forward(&self.centered(&sample));
            let mut skips = vec![hidden.shallow_clone()];
            let mut down = Vec::with_capacity(self.down_blocks.len());
            for block in &self.down_blocks {
                let (output, block_skips) = block.forward(&hidden, &temb, &context);
                let range = skips.len()..skips.len() + block_skips.len();
                down.push((hidden, range));
                skips.extend(block_skips);
                hidden = output;
            }
            let skip_count = skips.len();
            let mid = hidden.shallow_clone();
            hidden = self.mid_block.forward(&hidden, &temb, &context);
            let (hidden, up) = self.up_blocks_saving_inputs(hidden, skips, &temb, &context);
            let output = self
                .conv_out
                .forward(&self.conv_norm_out.forward(&hidden).silu());
            CheckpointedUNet {
                sample,
                timesteps: timesteps.shallow_clone(),
                added,
                down,
                mid,
                up,
                post: hidden,
                skip_count,
                output,
            }
        })
    }

    /// The up blocks of phase 1 (no graph): their output, and what each consumed.
    fn up_blocks_saving_inputs(
        &self,
        mut hidden: Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
    ) -> (Tensor, Vec<UpInputs>) {
        let mut up = Vec::with_capacity(self.up_blocks.len());
        for block in &self.up_blocks {
            let first_skip = skips.len().saturating_sub(block.skip_count());
            let block_skips = skips.split_off(first_skip);
            let upsample_size = skips.last().map(|next| {
                let size = next.size();
                [size[2], size[3]]
            });
            let output = block.forward(&hidden, &block_skips, temb, context, upsample_size);
            up.push(UpInputs {
                hidden,
                skips: block_skips,
                first_skip,
                upsample_size,
            });
            hidden = output;
        }
        (hidden, up)
    }

    fn centered(&self, sample: &Tensor) -> Tensor {
        if self.config.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        }
    }
}

/// A detached copy that collects grads when `requires_grad`.
fn leaf(tensor: &Tensor, requires_grad: bool) -> Tensor {
    tensor.detach().set_requires_grad(requires_grad)
}

/// `Σ output · grad`, backpropagated. Outputs without a graph (frozen layers on inputs that
/// need no gradient, as LoRA training's `conv_in` and time embedding) have nothing to feed.
fn backward_pairs(pairs: &[(&Tensor, &Tensor)]) {
    let terms: Vec<Tensor> = pairs
        .iter()
        .filter(|(output, grad)| grad.defined() && output.requires_grad())
        .map(|(output, grad)| (*output * *grad).sum(output.kind()))
        .collect();
    if let Some(first) = terms.first() {
        terms
            .iter()
            .skip(1)
            .fold(first.shallow_clone(), |sum, term| sum + term)
            .backward();
    }
}

fn add_grad(slot: &mut Option<Tensor>, grad: Tensor) {
    if !grad.defined() {
        return;
    }
    *slot = Some(match slot.take() {
        Some(sum) => sum + grad,
        None => grad,
    });
}

impl CheckpointedUNet {
    /// The prediction (no graph attached).
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// Phase 2: backpropagates `grad_output` (d loss / d output) through `unet`, block by block,
    /// and into `context` (the tensor given to phase 1, with its graph). With `autocast`, each
    /// recomputed forward runs in the same autocast region phase 1 ran in (as
    /// `torch.utils.checkpoint` restores it); the backward passes run outside it.
    /// `text_embeds` is the added conditions' pooled embedding with its graph (SDXL, when the
    /// text encoders train), given the same way as `context`.
    pub fn backward(
        self,
        unet: &UNet2DConditionModel,
        grad_output: &Tensor,
        (context, text_embeds): (&Tensor, Option<&Tensor>),
        autocast: Option<Autocast>,
    ) -> Result<(), String> {
        let trains_text = text_embeds.is_some_and(Tensor::requires_grad);
        let added = self.added.as_ref().map(|a| AddedConditions {
            text_embeds: leaf(&a.text_embeds, trains_text),
            time_ids: a.time_ids.shallow_clone(),
        });
        let temb_graph_free = tch::no_grad(|| {
            let _region = region(autocast)?;
            Ok::<_, String>(unet.full_time_embedding(&self.sample, &self.timesteps, added.as_ref()))
        })?;
        let blocks = Recompute {
            unet,
            temb: leaf(&temb_graph_free, true),
            ctx: leaf(context, context.requires_grad()),
            autocast,
        };
        let mut skip_grads: Vec<Option<Tensor>> = (0..self.skip_count).map(|_| None).collect();
        let grad = self.backward_up(&blocks, grad_output, &mut skip_grads)?;
        let grad = self.backward_down(&blocks, grad, &mut skip_grads)?;
        self.backward_inputs(&blocks, &grad, &mut skip_grads, added.as_ref())?;
        // One backward for the context and the pooled embedding: both come out of the same
        // text-encoder graph when the encoders train.
        let mut into_text = Vec::new();
        let ctx_grad = blocks.ctx.grad();
        if context.requires_grad() {
            into_text.push((context, &ctx_grad));
        }
        let pooled_grad = added.as_ref().map(|a| a.text_embeds.grad());
        if let (Some(original), Some(grad)) = (text_embeds, &pooled_grad)
            && original.requires_grad()
        {
            into_text.push((original, grad));
        }
        backward_pairs(&into_text);
        Ok(())
    }

    /// The output head, then the up blocks from the last; returns d loss / d mid-block output
    /// and keeps each skip leaf's grads in `skip_grads`.
    fn backward_up(
        &self,
        blocks: &Recompute<'_>,
        grad_output: &Tensor,
        skip_grads: &mut [Option<Tensor>],
    ) -> Result<Tensor, String> {
        let unet = blocks.unet;
        let post = leaf(&self.post, true);
        let output = {
            let _region = blocks.region()?;
            unet.conv_out
                .forward(&unet.conv_norm_out.forward(&post).silu())
        };
        backward_pairs(&[(&output, grad_output)]);
        let mut grad = post.grad();
        for (block, inputs) in unet.up_blocks.iter().zip(&self.up).rev() {
            let hidden = leaf(&inputs.hidden, true);
            let skips: Vec<Tensor> = inputs.skips.iter().map(|s| leaf(s, true)).collect();
            let output = {
                let _region = blocks.region()?;
                block.forward(
                    &hidden,
                    &skips,
                    &blocks.temb,
                    &blocks.ctx,
                    inputs.upsample_size,
                )
            };
            backward_pairs(&[(&output, &grad)]);
            for (offset, skip) in skips.iter().enumerate() {
                add_grad(&mut skip_grads[inputs.first_skip + offset], skip.grad());
            }
            grad = hidden.grad();
        }
        Ok(grad)
    }

    /// The mid block, then the down blocks from the last (each output fed its grad plus its
    /// skips' grads); returns d loss / d `conv_in` output.
    fn backward_down(
        &self,
        blocks: &Recompute<'_>,
        grad: Tensor,
        skip_grads: &mut [Option<Tensor>],
    ) -> Result<Tensor, String> {
        let unet = blocks.unet;
        let hidden = leaf(&self.mid, true);
        let output = {
            let _region = blocks.region()?;
            unet.mid_block.forward(&hidden, &blocks.temb, &blocks.ctx)
        };
        backward_pairs(&[(&output, &grad)]);
        let mut grad = hidden.grad();
        for (block, (input, range)) in unet.down_blocks.iter().zip(&self.down).rev() {
            let hidden = leaf(input, true);
            let (output, block_skips) = {
                let _region = blocks.region()?;
                block.forward(&hidden, &blocks.temb, &blocks.ctx)
            };
            let skip_grads_here: Vec<Tensor> = range
                .clone()
                .map(|index| skip_grads[index].take().unwrap_or_default())
                .collect();
            let mut pairs = vec![(&output, &grad)];
            pairs.extend(block_skips.iter().zip(&skip_grads_here));
            backward_pairs(&pairs);
            grad = hidden.grad();
        }
        Ok(grad)
    }

    /// `conv_in` (its output is also the first skip), then the time embedding's own graph with
    /// the grads every block gave the shared time-embedding leaf.
    fn backward_inputs(
        &self,
        blocks: &Recompute<'_>,
        grad: &Tensor,
        skip_grads: &mut [Option<Tensor>],
        added: Option<&AddedConditions>,
    ) -> Result<(), String> {
        let unet = blocks.unet;
        let first = {
            let _region = blocks.region()?;
            unet.conv_in.forward(&unet.centered(&self.sample))
        };
        let first_skip = skip_grads[0].take().unwrap_or_default();
        backward_pairs(&[(&first, grad), (&first, &first_skip)]);
        let temb_with_graph = {
            let _region = blocks.region()?;
            unet.full_time_embedding(&self.sample, &self.timesteps, added)
        };
        backward_pairs(&[(&temb_with_graph, &blocks.temb.grad())]);
        Ok(())
    }
}

/// What every block recomputed in phase 2 reads: the UNet, the time embedding and the context
/// as leaves collecting grads, and the autocast phase 1 ran in.
struct Recompute<'u> {
    unet: &'u UNet2DConditionModel,
    temb: Tensor,
    ctx: Tensor,
    autocast: Option<Autocast>,
}

impl Recompute<'_> {
    /// Enters the autocast region a recomputed forward runs in (none without autocast).
    fn region(&self) -> Result<Option<AutocastRegion>, String> {
        region(self.autocast)
    }
}

/// Enters `autocast`'s region, if any.
fn region(autocast: Option<Autocast>) -> Result<Option<AutocastRegion>, String> {
    autocast.map(AutocastRegion::enter).transpose()
}

#[cfg(test)]
mod tests {
    use crate::sd::unet::UNet2DConditionModel;
    use std::path::Path;
    use tch::{Device, Kind, Tensor};

    /// Plain and checkpointed backward sum the same products in another order: float32
    /// rounding only.
    const GRAD_TOLERANCE: f64 = 1e-5;

    fn grads(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, t.grad().copy()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    fn zero_grads(vs: &tch::nn::VarStore) {
        for (_, mut t) in vs.variables() {
            t.zero_grad();
        }
    }

    #[test]
    fn checkpointed_grads_equal_plain_backward() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-sd/unet");
        let (vs, unet) = UNet2DConditionModel::load(&dir, Device::Cpu, Kind::Float, None)
            .expect("load tiny unet");
        let mut rng = crate::sd::rng::Generator::new(3);
        let sample = rng.randn(&[2, 4, 8, 8], Kind::Float);
        let timesteps = Tensor::from_slice(&[10i64, 700]);
        let dim = unet.config().cross_attention_dim;
        let context_leaf = rng
            .randn(&[2, 77, dim], Kind::Float)
            .set_requires_grad(true);
        let weights = rng.randn(&[2, 4, 8, 8], Kind::Float);

        let context = &context_leaf * 1.5;
        (unet.forward(&sample, &timesteps, &context) * &weights)
            .sum(Kind::Float)
            .backward();
        let plain = grads(&vs);
        let plain_context = context_leaf.grad().copy();
        assert!(plain.iter().all(|(_, g)| g.defined()));
        zero_grads(&vs);
        let mut context_grad = context_leaf.grad();
        let _ = context_grad.zero_();

        let context = &context_leaf * 1.5;
        let run = unet.forward_checkpointed(&sample, &timesteps, &context, None);
        run.backward(&unet, &weights, (&context, None), None)
            .unwrap();
        let checkpointed = grads(&vs);
        assert_eq!(plain.len(), checkpointed.len());
        for ((name, a), (_, b)) in plain.iter().zip(&checkpointed) {
            let difference = (a - b).abs().max().double_value(&[]);
            let scale = a.abs().max().double_value(&[]).max(1.0);
            assert!(difference <= GRAD_TOLERANCE * scale, "{name}: {difference}");
        }
        let difference = (plain_context - context_leaf.grad())
            .abs()
            .max()
            .double_value(&[]);
        assert!(difference <= GRAD_TOLERANCE, "context grad: {difference}");
    }
}
