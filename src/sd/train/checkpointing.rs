//! Gradient checkpointing for a sequence of blocks, in two phases (libtorch's C++ API has no
//! `torch.utils.checkpoint` and tch has no custom autograd functions):
//!
//! 1. [`forward_without_grad`] runs every block under `no_grad`, keeping only each block's input;
//! 2. [`CheckpointedForward::backward`] walks the blocks from the end: block `i` is recomputed
//!    with grad from its saved input (detached, `requires_grad`), `(out * grad_out).sum()` is
//!    backpropagated — parameter grads accumulate as in a plain backward — and the input's grad
//!    becomes the incoming grad of block `i - 1`.
//!
//! Blocks may also read shared context tensors (a UNet's time embedding, the text encoder's
//! hidden states). During the backward they see detached leaf copies whose grads accumulate
//! over all blocks; those grads are then pushed once through the context's own graph, so
//! whatever produced the context (time-embedding MLP, text encoder) gets its parameter grads.
//!
//! Blocks must be deterministic (no dropout / RNG): unlike torch's checkpoint, the RNG state
//! is not replayed for the recomputation.
use super::TrainError;
use tch::Tensor;

/// One block of the sequence: `(hidden, context) -> hidden`, closing over its parameters.
pub type Block<'a> = &'a dyn Fn(&Tensor, &[Tensor]) -> Tensor;

/// Result of the grad-free forward pass: the block inputs and the final output.
pub struct CheckpointedForward {
    saved_inputs: Vec<Tensor>,
    output: Tensor,
}

/// Phase 1: runs `blocks` in order on `input` (with `context`) without building a graph.
pub fn forward_without_grad(
    blocks: &[Block],
    input: &Tensor,
    context: &[Tensor],
) -> CheckpointedForward {
    tch::no_grad(|| {
        let context: Vec<Tensor> = context.iter().map(Tensor::detach).collect();
        let mut saved_inputs = Vec::with_capacity(blocks.len());
        let mut current = input.detach();
        for block in blocks {
            let next = block(&current, &context);
            saved_inputs.push(current);
            current = next;
        }
        CheckpointedForward {
            saved_inputs,
            output: current,
        }
    })
}

impl CheckpointedForward {
    /// The sequence's output (no graph attached).
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// Phase 2: backpropagates `grad_output` (d loss / d output) through every block, last
    /// first, accumulating parameter grads, then through `context` (the same tensors as in
    /// phase 1, graphs attached). Returns d loss / d input.
    pub fn backward(
        self,
        blocks: &[Block],
        grad_output: &Tensor,
        context: &[Tensor],
    ) -> Result<Tensor, TrainError> {
        if blocks.len() != self.saved_inputs.len() {
            return Err(TrainError::Checkpointing(format!(
                "backward got {} blocks but the forward pass ran {}; pass the same blocks",
                blocks.len(),
                self.saved_inputs.len()
            )));
        }
        let leaves: Vec<Tensor> = context.iter().map(context_leaf).collect();
        let mut grad = grad_output.shallow_clone();
        for (index, (block, input)) in blocks.iter().zip(&self.saved_inputs).enumerate().rev() {
            grad = recompute_and_backward(block, input, &grad, &leaves).ok_or_else(|| {
                TrainError::Checkpointing(format!(
                    "block {index}'s output does not depend on its input, so no gradient reaches the blocks before it"
                ))
            })?;
        }
        backward_into_context(context, &leaves);
        Ok(grad)
    }
}

/// A detached copy of a context tensor that collects grads when the original needs them.
fn context_leaf(tensor: &Tensor) -> Tensor {
    tensor.detach().set_requires_grad(tensor.requires_grad())
}

/// Pushes the grads gathered on the context leaves through the context tensors' graphs.
fn backward_into_context(context: &[Tensor], leaves: &[Tensor]) {
    let terms: Vec<Tensor> = context
        .iter()
        .zip(leaves)
        .filter_map(|(tensor, leaf)| {
            let grad = leaf.grad();
            (tensor.requires_grad() && grad.defined()).then(|| (tensor * grad).sum(tensor.kind()))
        })
        .collect();
    if let Some(first) = terms.first() {
        terms
            .iter()
            .skip(1)
            .fold(first.shallow_clone(), |sum, term| sum + term)
            .backward();
    }
}

/// Recomputes `block(input, context)` with grad and backpropagates `grad_output` through it;
/// returns the grad with respect to `input` (None when the output does not depend on it).
pub fn recompute_and_backward(
    block: Block,
    input: &Tensor,
    grad_output: &Tensor,
    context: &[Tensor],
) -> Option<Tensor> {
    let input = input.detach().set_requires_grad(true);
    let output = block(&input, context);
    (output * grad_output).sum(grad_output.kind()).backward();
    let grad = input.grad();
    grad.defined().then_some(grad)
}

/// A whole checkpointed training step for a block sequence: grad-free forward, `loss_fn` on the
/// output (with grad), then the block-by-block backward. Returns the (detached) loss.
pub fn checkpointed_loss_backward(
    blocks: &[Block],
    input: &Tensor,
    context: &[Tensor],
    loss_fn: impl FnOnce(&Tensor) -> Tensor,
) -> Result<Tensor, TrainError> {
    let forward = forward_without_grad(blocks, input, context);
    let output = forward.output().detach().set_requires_grad(true);
    let loss = loss_fn(&output);
    loss.backward();
    let grad_output = output.grad();
    if !grad_output.defined() {
        return Err(TrainError::Checkpointing(
            "the loss does not depend on the sequence output".to_string(),
        ));
    }
    let _grad_input = forward.backward(blocks, &grad_output, context)?;
    Ok(loss.detach())
}
