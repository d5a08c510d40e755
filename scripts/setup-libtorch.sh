#!/usr/bin/env bash
# Provides a lean CPU libtorch 2.11.0 (the version tch 0.24.0 needs) built from PyPI wheels,
# cached outside the repository. Prints the libtorch folder on its last line of stdout.
#
#   DREAMPIPE_LIBTORCH_DIR  where the libtorch folder lives
#                           (default: ${XDG_CACHE_HOME:-$HOME/.cache}/dreampipe/libtorch-2.11.0-cpu)
#   LIBTORCH_USE_PYTORCH=1  use the PyTorch 2.11 installed for `python3` instead (nothing is fetched)
#
# Idempotent: a finished folder carries a `.dreampipe-complete` marker and is reused as is.
# Safe to interrupt: work happens in a `.partial` folder that is renamed into place only at the
# end; a leftover partial folder is deleted and the setup redone.
set -euo pipefail

TORCH_VERSION=2.11.0
CUDA_RUNTIME_VERSION=13.0.96   # libtorch_cpu.so NEEDs libcudart.so.13 (profiler symbols)
CUPTI_VERSION=13.0.85          # ... and libcupti.so.13
MARKER=.dreampipe-complete

say() { echo "setup-libtorch: $*" >&2; }
die() { say "error: $*"; exit 1; }

if [[ "${LIBTORCH_USE_PYTORCH:-}" == 1 ]]; then
  python3 -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.11.") else 1)' 2>/dev/null \
    || die "LIBTORCH_USE_PYTORCH=1 needs PyTorch 2.11 importable by python3 (pip install torch==$TORCH_VERSION)"
  say "using the PyTorch installed for python3 (LIBTORCH_USE_PYTORCH=1)"
  python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))'
  exit 0
fi

dest="${DREAMPIPE_LIBTORCH_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dreampipe/libtorch-$TORCH_VERSION-cpu}"
if [[ -f "$dest/$MARKER" ]]; then
  echo "$dest"
  exit 0
fi

command -v python3 >/dev/null || die "python3 is needed to fetch the PyTorch wheel from PyPI; install Python 3 with pip"
python3 -m pip --version >/dev/null 2>&1 || die "pip is needed (python3 -m pip); install it, e.g. apt-get install python3-pip"
command -v cc >/dev/null || die "a C compiler (cc) is needed to build the CUDA-free libtorch.so stub; install gcc"

parent=$(dirname "$dest")
mkdir -p "$parent"
partial="$dest.partial"
rm -rf "$partial" "$dest"   # a folder without the marker is an interrupted setup: redo it
mkdir -p "$partial/wheels"

say "fetching torch==$TORCH_VERSION from PyPI (~530 MB, once) into $partial"
pip_get() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --disable-pip-version-check \
    -d "$partial/wheels" "$@" \
    || die "pip could not download $* — is PyPI reachable? (set LIBTORCH_USE_PYTORCH=1 to use an installed PyTorch 2.11 instead)"
}
pip_get --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp "torch==$TORCH_VERSION"
pip_get "nvidia-cuda-runtime==$CUDA_RUNTIME_VERSION"
pip_get "nvidia-cuda-cupti==$CUPTI_VERSION"

say "extracting headers and CPU libraries"
python3 - "$partial" <<'PY'
import glob, os, re, shutil, sys, zipfile
out = sys.argv[1]
lib = os.path.join(out, "lib")
os.makedirs(lib, exist_ok=True)
keep_lib = re.compile(r"^torch/lib/(libtorch_cpu\.so|libc10\.so|libgomp[^/]*\.so[^/]*|libshm\.so)$")
for whl in glob.glob(os.path.join(out, "wheels", "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if name.endswith("/"):
                continue
            if name.startswith("torch/include/"):
                target = os.path.join(out, name[len("torch/"):])
            elif keep_lib.match(name) or re.match(r"^nvidia/cu13/lib/lib(cudart|cupti)\.so\.13$", name):
                target = os.path.join(lib, os.path.basename(name))
            else:
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
for needed in ("libtorch_cpu.so", "libc10.so", "libcudart.so.13", "libcupti.so.13"):
    if not os.path.exists(os.path.join(lib, needed)):
        sys.exit(f"setup-libtorch: error: {needed} was not found in the downloaded wheels")
PY
rm -rf "$partial/wheels"

# libtorch.so NEEDs libtorch_cuda.so; an empty stub lets `-ltorch` link without CUDA.
cc -shared -o "$partial/lib/libtorch.so" -x c /dev/null
echo "$TORCH_VERSION" > "$partial/build-version"
touch "$partial/$MARKER"
mv "$partial" "$dest"
say "libtorch $TORCH_VERSION (CPU) is ready at $dest"
echo "$dest"
