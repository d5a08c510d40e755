// AdamW updates on libtorch tensors for src/sd/train/optim.rs, for what tch 0.24 cannot express:
// `addcmul_` / `addcdiv_` with a `value` scalar, and the fused CPU/CUDA kernel `_fused_adamw_`.
// The `at::Tensor*` arguments are tch's `C_tensor` handles (tch stores a heap `torch::Tensor`).
// Nothing throws across the C boundary: every entry point catches and reports through `err`.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/scalar_tensor.h>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

// Status codes shared with src/sd/train/aten_adamw.rs.
constexpr int kOk = 0;
// The tensors were rejected before anything was modified.
constexpr int kRejected = 1;
// libtorch failed while updating: some tensors may already hold new values.
constexpr int kFailed = 2;

struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
};

void write_error(char* err, size_t err_len, const char* message) {
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", message);
  }
}

// Why `other` cannot be updated together with `param`, or an empty string. The fused kernel
// walks raw buffers, so it also needs one dtype and contiguous memory; the single-tensor ops
// promote dtypes as torch does (f32 moments restored for a half-precision parameter).
std::string mismatch(const at::Tensor& param, const at::Tensor& other, const char* name, bool fused) {
  if (!other.defined()) return std::string(name) + " is undefined";
  if (other.sizes() != param.sizes()) return std::string(name) + " has another shape than the parameter";
  if (other.device() != param.device()) return std::string(name) + " is on another device than the parameter";
  if (fused && other.scalar_type() != param.scalar_type()) return std::string(name) + " has another dtype than the parameter";
  if (fused && !other.is_contiguous()) return std::string(name) + " is not contiguous";
  return {};
}

std::string check_one(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, bool fused) {
  if (!param.defined()) return "the parameter is undefined";
  if (!at::isFloatingType(param.scalar_type())) return "the parameter is not a floating-point tensor";
  if (fused && !param.is_contiguous()) return "the parameter is not contiguous";
  for (auto [tensor, name] : {std::pair{&grad, "the gradient"}, std::pair{&exp_avg, "exp_avg"},
                              std::pair{&exp_avg_sq, "exp_avg_sq"}}) {
    std::string problem = mismatch(param, *tensor, name, fused);
    if (!problem.empty()) return problem;
  }
  return {};
}

// torch.optim.adam._single_tensor_adam with decoupled weight decay, op for op.
void single_tensor_adamw(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                         at::Tensor& exp_avg_sq, double step, const Hyper& h) {
  if (h.weight_decay != 0.0) param.mul_(1.0 - h.lr * h.weight_decay);
  exp_avg.lerp_(grad, 1.0 - h.beta1);
  exp_avg_sq.mul_(h.beta2).addcmul_(grad, grad, 1.0 - h.beta2);
  const double bias_correction1 = 1.0 - std::pow(h.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(h.beta2, step);
  const double step_size = h.lr / bias_correction1;
  // torch divides out of place; dividing the fresh sqrt in place gives the same values.
  at::Tensor denom = exp_avg_sq.sqrt();
  denom.div_(std::sqrt(bias_correction2)).add_(h.eps);
  param.addcdiv_(exp_avg, denom, -step_size);
}

}  // namespace

extern "C" {

// One `_single_tensor_adam` (AdamW) update of one parameter; `step` is its count after increment.
int dreampipe_adamw_single_tensor(at::Tensor* param, const at::Tensor* grad, at::Tensor* exp_avg,
                                  at::Tensor* exp_avg_sq, double step, double lr, double beta1,
                                  double beta2, double eps, double weight_decay, char* err,
                                  size_t err_len) {
  try {
    std::string problem = check_one(*param, *grad, *exp_avg, *exp_avg_sq, false);
    if (!problem.empty()) {
      write_error(err, err_len, problem.c_str());
      return kRejected;
    }
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return kRejected;
  }
  try {
    single_tensor_adamw(*param, *grad, *exp_avg, *exp_avg_sq, step, Hyper{lr, beta1, beta2, eps, weight_decay});
    return kOk;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return kFailed;
  }
}

// `torch._fused_adamw_` over `count` parameters (all on one device, one dtype); `steps[i]` is
// parameter i's step count after increment (torch passes it as a float32 scalar tensor).
int dreampipe_adamw_fused(at::Tensor* const* params, at::Tensor* const* grads,
                          at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                          const double* steps, size_t count, double lr, double beta1, double beta2,
                          double eps, double weight_decay, char* err, size_t err_len) {
  std::vector<at::Tensor> p, g, m, v, s;
  try {
    p.reserve(count);
    g.reserve(count);
    m.reserve(count);
    v.reserve(count);
    s.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      std::string problem = check_one(*params[i], *grads[i], *exp_avgs[i], *exp_avg_sqs[i], true);
      if (problem.empty() && i > 0 && (params[i]->device() != p[0].device() || params[i]->scalar_type() != p[0].scalar_type())) {
        problem = "the parameters differ in device or dtype";
      }
      if (!problem.empty()) {
        write_error(err, err_len, ("parameter " + std::to_string(i) + ": " + problem).c_str());
        return kRejected;
      }
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      s.push_back(at::scalar_tensor(steps[i], at::TensorOptions().dtype(at::kFloat).device(params[i]->device())));
    }
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return kRejected;
  }
  try {
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, false, false);
    return kOk;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return kFailed;
  }
}

}  // extern "C"
