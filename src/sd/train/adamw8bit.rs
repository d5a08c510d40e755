//! 8-bit AdamW as bitsandbytes' `AdamW8bit` (blockwise, `optim_bits=8`): the two moments of
//! every tensor with at least [`MIN_8BIT_SIZE`] elements are stored as `u8` codes into a
//! 256-entry dynamic quantization map (signed map for `m`, unsigned for `v`) with one f32 absmax
//! scale per block of [`BLOCK_SIZE`] elements. A step dequantizes (gather + scale), runs the
//! AdamW update in f32 and requantizes (nearest code via `bucketize` on the code midpoints, as
//! bitsandbytes' pure-torch backend). Smaller tensors keep f32 moments (bitsandbytes'
//! 32-bit path). Written with libtorch ops; the arithmetic mirrors bitsandbytes 0.50's CPU ops.
use super::TrainError;
use super::optim::{AdamWConfig, tensor_bytes, zero_grads};
use super::state_io::{self, STORAGE_8BIT, STORAGE_F32, SavedMoments, SavedParam};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Elements per quantization block: bitsandbytes' `Optimizer2State.init_state` allocates
/// `ceil(n / 256)` absmax values for blockwise 8-bit states and its update kernels use 256
/// (smaller blocks than `quantize_blockwise`'s default 4096 keep outliers local).
pub const BLOCK_SIZE: i64 = 256;
/// Tensors with fewer elements keep f32 moments (bitsandbytes `min_8bit_size` default).
pub const MIN_8BIT_SIZE: usize = 4096;
/// Exponent bits of bitsandbytes' `create_dynamic_map` default (`max_exponent_bits=7`).
const DYNAMIC_MAP_EXPONENT_BITS: i32 = 7;
/// Entries of an 8-bit code table.
const CODE_ENTRIES: usize = 256;
/// bitsandbytes clamps a block's absmax to at least this before taking its reciprocal.
const ABSMAX_FLOOR: f64 = 1e-38;
/// Optimizer name written into saved state.
const ADAMW8BIT_NAME: &str = "adamw8bit";

/// bitsandbytes `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 sorted
/// f32 values in [-1, 1] (signed) or [0, 1] (unsigned), dense near zero.
pub fn create_dynamic_map(signed: bool) -> Tensor {
    let mut data: Vec<f32> = Vec::with_capacity(CODE_ENTRIES);
    for i in 0..DYNAMIC_MAP_EXPONENT_BITS {
        let fraction_items = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let boundaries = Tensor::linspace(0.1, 1.0, fraction_items, (Kind::Float, Device::Cpu));
        let means = (boundaries.narrow(0, 0, fraction_items - 1)
            + boundaries.narrow(0, 1, fraction_items - 1))
            / 2.0;
        let scale = 10f64.powf((i - (DYNAMIC_MAP_EXPONENT_BITS - 1)) as f64);
        data.extend(to_f32_vec(&means.g_mul_scalar(scale)));
        if signed {
            data.extend(to_f32_vec(&means.g_mul_scalar(-scale)));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    Tensor::from_slice(&data)
}

fn to_f32_vec(tensor: &Tensor) -> Vec<f32> {
    let flat = tensor.to_kind(Kind::Float).flatten(0, -1);
    (0..flat.numel() as i64)
        .map(|i| flat.double_value(&[i]) as f32)
        .collect()
}

/// A code table plus the midpoints between neighbouring codes (the rounding boundaries).
struct CodeTable {
    code: Tensor,
    midpoints: Tensor,
}

impl CodeTable {
    fn new(signed: bool) -> Self {
        let code = create_dynamic_map(signed);
        let n = code.numel() as i64;
        let midpoints = (code.narrow(0, 0, n - 1) + code.narrow(0, 1, n - 1)) / 2.0;
        Self { code, midpoints }
    }

    fn to_device(&self, device: Device) -> Self {
        Self {
            code: self.code.to_device(device),
            midpoints: self.midpoints.to_device(device),
        }
    }
}

/// A blockwise-quantized f32 tensor: `u8` codes (flat) and one absmax per block.
pub struct Quantized {
    pub codes: Tensor,
    pub absmax: Tensor,
}

/// bitsandbytes `quantize_blockwise` (pure-torch backend): per block, `absmax = max |x|`,
/// `scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)`, code = nearest table entry.
pub fn quantize_blockwise(values: &Tensor, code: &Tensor) -> Quantized {
    let table = code.numel() as i64;
    let midpoints = (code.narrow(0, 0, table - 1) + code.narrow(0, 1, table - 1)) / 2.0;
    quantize_with(values, &midpoints)
}

fn quantize_with(values: &Tensor, midpoints: &Tensor) -> Quantized {
    let numel = values.numel() as i64;
    let blocks = padded_blocks(&values.flatten(0, -1));
    let absmax = blocks.abs().amax([1].as_slice(), false);
    let inverse = absmax.clamp_min(ABSMAX_FLOOR).reciprocal().unsqueeze(1);
    let scaled = (blocks * inverse)
        .clamp(-1.0, 1.0)
        .flatten(0, -1)
        .narrow(0, 0, numel);
    let codes = scaled
        .bucketize(midpoints, false, false)
        .to_kind(Kind::Uint8);
    Quantized { codes, absmax }
}

/// bitsandbytes `dequantize_blockwise`: `code[codes] * absmax[block]`, shaped as `shape`.
pub fn dequantize_blockwise(quantized: &Quantized, code: &Tensor, shape: &[i64]) -> Tensor {
    let numel = quantized.codes.numel() as i64;
    let values = code.index_select(0, &quantized.codes.to_kind(Kind::Int64));
    let scaled = padded_blocks(&values) * quantized.absmax.unsqueeze(1);
    scaled.flatten(0, -1).narrow(0, 0, numel).view(shape)
}

/// A flat tensor zero-padded to whole blocks, as `(blocks, BLOCK_SIZE)`.
fn padded_blocks(flat: &Tensor) -> Tensor {
    let numel = flat.numel() as i64;
    let padding = block_count(numel) * BLOCK_SIZE - numel;
    flat.constant_pad_nd([0, padding].as_slice())
        .view([-1, BLOCK_SIZE])
}

fn block_count(numel: i64) -> i64 {
    (numel + BLOCK_SIZE - 1) / BLOCK_SIZE
}

/// How one parameter's moments are stored.
enum Moments8 {
    Full {
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
    },
    Blockwise {
        exp_avg: Quantized,
        exp_avg_sq: Quantized,
    },
}

struct ParamState8 {
    step: u64,
    moments: Moments8,
}

/// bitsandbytes-style 8-bit AdamW over a list of trainable f32 tensors (all on one device: the
/// code tables live on the first parameter's device).
pub struct AdamW8bit {
    config: AdamWConfig,
    params: Vec<Tensor>,
    states: Vec<Option<ParamState8>>,
    signed: CodeTable,
    unsigned: CodeTable,
}

impl AdamW8bit {
    pub fn new(params: &[Tensor], config: AdamWConfig) -> Self {
        let device = params.first().map_or(Device::Cpu, Tensor::device);
        Self {
            config,
            params: params.iter().map(Tensor::shallow_clone).collect(),
            states: params.iter().map(|_| None).collect(),
            signed: CodeTable::new(true).to_device(device),
            unsigned: CodeTable::new(false).to_device(device),
        }
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Whether parameter `index` has (or will get) 8-bit moments.
    pub fn is_quantized(&self, index: usize) -> bool {
        self.params
            .get(index)
            .is_some_and(|p| p.numel() >= MIN_8BIT_SIZE)
    }

    /// `(exp_avg, exp_avg_sq)` of parameter `index` as f32 (dequantized when 8-bit).
    pub fn moments_f32(&self, index: usize) -> Option<(Tensor, Tensor)> {
        let state = self.states.get(index)?.as_ref()?;
        let shape = self.params[index].size();
        Some(match &state.moments {
            Moments8::Full {
                exp_avg,
                exp_avg_sq,
            } => (exp_avg.shallow_clone(), exp_avg_sq.shallow_clone()),
            Moments8::Blockwise {
                exp_avg,
                exp_avg_sq,
            } => (
                dequantize_blockwise(exp_avg, &self.signed.code, &shape),
                dequantize_blockwise(exp_avg_sq, &self.unsigned.code, &shape),
            ),
        })
    }

    /// The quantized `(exp_avg, exp_avg_sq)` of parameter `index`, when it is stored in 8 bits.
    pub fn quantized_moments(&self, index: usize) -> Option<(&Quantized, &Quantized)> {
        match &self.states.get(index)?.as_ref()?.moments {
            Moments8::Blockwise {
                exp_avg,
                exp_avg_sq,
            } => Some((exp_avg, exp_avg_sq)),
            Moments8::Full { .. } => None,
        }
    }

    /// One optimizer step on every parameter that has a gradient.
    pub fn step(&mut self) {
        let config = self.config;
        tch::no_grad(|| {
            for index in 0..self.params.len() {
                let grad = self.params[index].grad();
                if !grad.defined() {
                    continue;
                }
                let grad = grad.to_kind(Kind::Float);
                let state =
                    self.states[index].get_or_insert_with(|| initial_state(&self.params[index]));
                state.step += 1;
                let param = &mut self.params[index];
                match &mut state.moments {
                    Moments8::Full {
                        exp_avg,
                        exp_avg_sq,
                    } => update_full(param, &grad, exp_avg, exp_avg_sq, state.step, &config),
                    Moments8::Blockwise {
                        exp_avg,
                        exp_avg_sq,
                    } => {
                        let tables = (&self.signed, &self.unsigned);
                        update_blockwise(
                            param,
                            &grad,
                            (exp_avg, exp_avg_sq),
                            tables,
                            state.step,
                            &config,
                        )
                    }
                }
            }
        });
    }

    pub fn zero_grad(&mut self) {
        zero_grads(&mut self.params);
    }

    /// Bytes held by the moment tensors (codes + absmax scales, or f32 moments).
    pub fn state_bytes(&self) -> usize {
        self.states
            .iter()
            .flatten()
            .map(|state| match &state.moments {
                Moments8::Full {
                    exp_avg,
                    exp_avg_sq,
                } => tensor_bytes(exp_avg) + tensor_bytes(exp_avg_sq),
                Moments8::Blockwise {
                    exp_avg,
                    exp_avg_sq,
                } => quantized_bytes(exp_avg) + quantized_bytes(exp_avg_sq),
            })
            .sum()
    }

    /// Writes the state into directory `dir` (`optimizer.safetensors` + `optimizer.json`).
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        state_io::save(dir, ADAMW8BIT_NAME, self.config, &self.params, |index| {
            let state = self.states[index].as_ref()?;
            Some(saved_moments(state))
        })
    }

    /// Restores state written by [`AdamW8bit::save`] (hyperparameters included).
    pub fn load(&mut self, dir: &Path) -> Result<(), TrainError> {
        let (config, states) = state_io::load(dir, ADAMW8BIT_NAME, &self.params, load_param_state)?;
        self.config = config;
        self.states = states;
        Ok(())
    }
}

/// Fresh moments: zero codes with zero absmax (dequantize to 0, as bitsandbytes' zeroed
/// buffers do) for large tensors, f32 zeros otherwise.
fn initial_state(param: &Tensor) -> ParamState8 {
    let numel = param.numel() as i64;
    let zero_quantized = || Quantized {
        codes: Tensor::zeros([numel], (Kind::Uint8, param.device())),
        absmax: Tensor::zeros([block_count(numel)], (Kind::Float, param.device())),
    };
    let moments = if param.numel() >= MIN_8BIT_SIZE {
        Moments8::Blockwise {
            exp_avg: zero_quantized(),
            exp_avg_sq: zero_quantized(),
        }
    } else {
        Moments8::Full {
            exp_avg: param.zeros_like().to_kind(Kind::Float),
            exp_avg_sq: param.zeros_like().to_kind(Kind::Float),
        }
    };
    ParamState8 { step: 0, moments }
}

/// Moment updates shared by both paths (bitsandbytes: `m.mul_(b1).add_(g, alpha=1-b1)`,
/// `v.mul_(b2).addcmul_(g, g, value=1-b2)`).
fn update_moments(
    grad: &Tensor,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    config: &AdamWConfig,
) {
    let _ = exp_avg.g_mul_scalar_(config.beta1);
    let _ = exp_avg.addcmul_(grad, &scalar_like(grad, 1.0 - config.beta1));
    let _ = exp_avg_sq.g_mul_scalar_(config.beta2);
    let _ = exp_avg_sq.addcmul_(&grad.g_mul_scalar(1.0 - config.beta2), grad);
}

/// A 0-d f32 tensor on `like`'s device: `a.addcmul_(b, scalar)` reproduces torch's
/// `a.add_(b, alpha=scalar)` rounding (both are one fused multiply-add per element on CPU).
fn scalar_like(like: &Tensor, value: f64) -> Tensor {
    Tensor::from(value as f32).to_device(like.device())
}

fn decay_weight(param: &mut Tensor, config: &AdamWConfig) {
    if config.weight_decay > 0.0 {
        let _ = param.g_mul_scalar_(1.0 - config.lr * config.weight_decay);
    }
}

/// bitsandbytes' 32-bit Adam path (tensors below `MIN_8BIT_SIZE`):
/// `p += (-lr * c2 / c1) * m / (sqrt(v) + eps * c2)` with `c2 = sqrt(1 - b2^t)`.
fn update_full(
    param: &mut Tensor,
    grad: &Tensor,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    step: u64,
    config: &AdamWConfig,
) {
    update_moments(grad, exp_avg, exp_avg_sq, config);
    let correction1 = 1.0 - config.beta1.powf(step as f64);
    let correction2 = (1.0 - config.beta2.powf(step as f64)).sqrt();
    let step_size = -config.lr * correction2 / correction1;
    decay_weight(param, config);
    let update = &*exp_avg / (exp_avg_sq.sqrt() + config.eps * correction2);
    let _ = param.addcmul_(&update, &scalar_like(&update, step_size));
}

/// bitsandbytes' blockwise 8-bit Adam path: dequantize, f32 update, requantize.
fn update_blockwise(
    param: &mut Tensor,
    grad: &Tensor,
    (exp_avg, exp_avg_sq): (&mut Quantized, &mut Quantized),
    (signed, unsigned): (&CodeTable, &CodeTable),
    step: u64,
    config: &AdamWConfig,
) {
    let shape = param.size();
    let mut m = dequantize_blockwise(exp_avg, &signed.code, &shape);
    let mut v = dequantize_blockwise(exp_avg_sq, &unsigned.code, &shape);
    update_moments(grad, &mut m, &mut v, config);
    let correction1 = 1.0 - config.beta1.powf(step as f64);
    let correction2 = (1.0 - config.beta2.powf(step as f64)).sqrt();
    let mut denom = v.sqrt().g_div_scalar(correction2);
    let _ = denom.g_add_scalar_(config.eps);
    decay_weight(param, config);
    let _ = param.addcdiv_(&m.g_mul_scalar(-config.lr / correction1), &denom);
    *exp_avg = quantize_with(&m, &signed.midpoints);
    *exp_avg_sq = quantize_with(&v, &unsigned.midpoints);
}

fn quantized_bytes(q: &Quantized) -> usize {
    tensor_bytes(&q.codes) + tensor_bytes(&q.absmax)
}

/// What one parameter's state saves: f32 moments, or the codes and absmax of both.
fn saved_moments(state: &ParamState8) -> SavedMoments {
    match &state.moments {
        Moments8::Full {
            exp_avg,
            exp_avg_sq,
        } => SavedMoments::f32(state.step, exp_avg, exp_avg_sq),
        Moments8::Blockwise {
            exp_avg,
            exp_avg_sq,
        } => {
            let mut tensors = Vec::new();
            push_quantized(&mut tensors, "exp_avg", exp_avg);
            push_quantized(&mut tensors, "exp_avg_sq", exp_avg_sq);
            SavedMoments {
                step: state.step,
                storage: STORAGE_8BIT,
                tensors,
            }
        }
    }
}

fn push_quantized(tensors: &mut Vec<(String, Tensor)>, name: &str, q: &Quantized) {
    tensors.push((format!("{name}.codes"), q.codes.shallow_clone()));
    tensors.push((format!("{name}.absmax"), q.absmax.shallow_clone()));
}

/// A saved parameter's state; its storage must be what the parameter's size calls for.
fn load_param_state(saved: &mut SavedParam<'_>) -> Result<ParamState8, TrainError> {
    let numel = saved.param.numel();
    let quantized = numel >= MIN_8BIT_SIZE;
    let expected = if quantized { STORAGE_8BIT } else { STORAGE_F32 };
    if saved.meta.storage != expected {
        return Err(saved.mismatch(format!(
            "parameter {} stored as '{}', expected '{expected}'",
            saved.index, saved.meta.storage
        )));
    }
    let moments = if quantized {
        let blocks = block_count(numel as i64) as usize;
        let mut take = |name: &str| -> Result<Quantized, TrainError> {
            Ok(Quantized {
                codes: saved.take(&format!("{name}.codes"), Kind::Uint8, numel)?,
                absmax: saved.take(&format!("{name}.absmax"), Kind::Float, blocks)?,
            })
        };
        Moments8::Blockwise {
            exp_avg: take("exp_avg")?,
            exp_avg_sq: take("exp_avg_sq")?,
        }
    } else {
        let (exp_avg, exp_avg_sq) = saved.f32_moments()?;
        Moments8::Full {
            exp_avg,
            exp_avg_sq,
        }
    };
    Ok(ParamState8 {
        step: saved.meta.step,
        moments,
    })
}
