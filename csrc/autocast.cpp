// libtorch's autocast switch for src/sd/autocast.rs: what `torch.autocast(device_type, dtype)`
// does on entry and exit, for the CPU and CUDA (tch 0.24 binds only CUDA's on/off switch, not
// the CPU one nor the dtype). The state is thread-local in libtorch, like Python's context
// manager. Nothing throws across the C boundary: failures are reported through `err`.
#include <ATen/autocast_mode.h>

#include <cstddef>
#include <cstdio>
#include <exception>

namespace {

// Codes shared with src/sd/autocast.rs.
constexpr int kDeviceCpu = 0;
constexpr int kDeviceCuda = 1;
constexpr int kDtypeBFloat16 = 0;
constexpr int kDtypeHalf = 1;

void write_error(char* err, size_t err_len, const char* message) {
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", message);
  }
}

bool device_type(int code, at::DeviceType* out) {
  switch (code) {
    case kDeviceCpu: *out = at::kCPU; return true;
    case kDeviceCuda: *out = at::kCUDA; return true;
    default: return false;
  }
}

bool scalar_type(int code, at::ScalarType* out) {
  switch (code) {
    case kDtypeBFloat16: *out = at::kBFloat16; return true;
    case kDtypeHalf: *out = at::kHalf; return true;
    default: return false;
  }
}

}  // namespace

extern "C" {

// Enters autocast for `device` with `dtype`; the previous state goes to `previous_enabled` and
// `previous_dtype` (an opaque code) for dreampipe_autocast_exit. Returns 0, or 1 with `err`.
int dreampipe_autocast_enter(int device, int dtype, int* previous_enabled, int* previous_dtype,
                             char* err, size_t err_len) {
  try {
    at::DeviceType type;
    at::ScalarType lower;
    if (!device_type(device, &type) || !scalar_type(dtype, &lower)) {
      write_error(err, err_len, "unknown autocast device or dtype code");
      return 1;
    }
    if (!at::autocast::is_autocast_available(type)) {
      write_error(err, err_len, "libtorch has no autocast for this device");
      return 1;
    }
    *previous_enabled = at::autocast::is_autocast_enabled(type) ? 1 : 0;
    *previous_dtype = static_cast<int>(at::autocast::get_autocast_dtype(type));
    at::autocast::set_autocast_dtype(type, lower);
    at::autocast::set_autocast_enabled(type, true);
    at::autocast::increment_nesting();
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  } catch (...) {
    write_error(err, err_len, "unknown libtorch error");
    return 1;
  }
}

// Leaves autocast: restores the state saved by dreampipe_autocast_enter and, when the last
// autocast region of the thread ends, drops the cache of casted weights (as Python does).
void dreampipe_autocast_exit(int device, int previous_enabled, int previous_dtype) {
  try {
    at::DeviceType type;
    if (!device_type(device, &type)) return;
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(type, previous_enabled != 0);
    at::autocast::set_autocast_dtype(type, static_cast<at::ScalarType>(previous_dtype));
  } catch (...) {
    // Restoring thread-local flags does not throw in libtorch; nothing to report if it did.
  }
}

}  // extern "C"
