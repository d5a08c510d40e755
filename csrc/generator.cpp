// Seeded CPU random generators of their own for src/sd/rng.rs: what `torch.Generator("cpu")
// .manual_seed(seed)` is in Python, and the generator overloads of the random ops the code
// draws with (tch 0.24 only reaches libtorch's one global generator). A generator seeded with s
// draws exactly what the global generator draws after `manual_seed(s)`. Nothing throws across
// the C boundary: failures are reported through `err`.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>

namespace {

void write_error(char* err, size_t err_len, const char* message) {
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", message);
  }
}

template <typename Draw>
int draw_into(at::Tensor** out, char* err, size_t err_len, Draw draw) {
  try {
    *out = new at::Tensor(draw());
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  } catch (...) {
    write_error(err, err_len, "unknown libtorch error");
  }
  return 1;
}

}  // namespace

extern "C" {

// A new CPU generator seeded with `seed`; free it with dreampipe_generator_free.
void* dreampipe_generator_new(uint64_t seed) {
  try {
    return new at::Generator(at::make_generator<at::CPUGeneratorImpl>(seed));
  } catch (...) {
    return nullptr;
  }
}

void dreampipe_generator_free(void* generator) {
  delete static_cast<at::Generator*>(generator);
}

// `randn(sizes, generator=g, dtype=scalar_type)` on the CPU into a new tch tensor handle.
int dreampipe_randn(void* generator, const int64_t* sizes, size_t ndim, int scalar_type,
                    at::Tensor** out, char* err, size_t err_len) {
  auto& gen = *static_cast<at::Generator*>(generator);
  return draw_into(out, err, err_len, [&] {
    auto options = at::TensorOptions().dtype(static_cast<at::ScalarType>(scalar_type));
    return at::randn(at::IntArrayRef(sizes, ndim), gen, options);
  });
}

// `randint(low, high, sizes, generator=g)` as int64 on the CPU into a new tch tensor handle.
int dreampipe_randint(void* generator, int64_t low, int64_t high, const int64_t* sizes, size_t ndim,
                      at::Tensor** out, char* err, size_t err_len) {
  auto& gen = *static_cast<at::Generator*>(generator);
  return draw_into(out, err, err_len, [&] {
    return at::randint(low, high, at::IntArrayRef(sizes, ndim), gen, at::TensorOptions().dtype(at::kLong));
  });
}

}  // extern "C"
