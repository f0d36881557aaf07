#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 into the active Python environment.
#
# PyPI's horovod 0.28.1 is the last release and only builds against torch 2.x once its CMake C++
# standard is raised from 14 to 17. This script downloads the sdist from the package index, patches
# it, builds a wheel with PyTorch + Gloo (and NCCL when a CUDA torch and nvcc are present), caches
# the wheel outside git and installs it. A second run with the same torch reuses the cached wheel.
#
# Environment:
#   PYTHON                  interpreter to install into (default: python on PATH)
#   LEPTON_WHEEL_CACHE      wheel cache (default: ~/.cache/lepton-spark/wheels)
#   LEPTON_HOROVOD_FLAVOUR  force "cpu" or "cuda" (default: detected)
#   MAX_JOBS                parallel compile jobs (default: nproc)
# Arguments:
#   --print-flavour         print the flavour this machine would build (cpu or cuda), build nothing
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON=${PYTHON:-python}
# Absolute, so that it still works after the build cds into the source tree.
PYTHON=$("$PYTHON" -c 'import sys; print(sys.executable)')
CACHE=${LEPTON_WHEEL_CACHE:-$HOME/.cache/lepton-spark/wheels}

# --print-flavour: say which flavour would be built here (cpu or cuda) and stop.
print_flavour=${1:-}

if [ "$print_flavour" != --print-flavour ] && "$PYTHON" -c "import horovod.torch" >/dev/null 2>&1 \
   && [ "$("$PYTHON" -c 'import horovod; print(horovod.__version__)')" = "$HOROVOD_VERSION" ]; then
  echo "horovod $HOROVOD_VERSION already installed in $("$PYTHON" -c 'import sys; print(sys.prefix)')"
  exit 0
fi

torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)')
torch_cuda=$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")')
flavour=${LEPTON_HOROVOD_FLAVOUR:-}
if [ -z "$flavour" ]; then
  if [ -n "$torch_cuda" ] && command -v nvcc >/dev/null 2>&1; then flavour=cuda; else flavour=cpu; fi
fi
case "$flavour" in cpu|cuda) ;; *) echo "LEPTON_HOROVOD_FLAVOUR must be cpu or cuda, not '$flavour'" >&2; exit 2;; esac
if [ "$print_flavour" = --print-flavour ]; then echo "$flavour"; exit 0; fi
py_tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
slot="$CACHE/horovod-$HOROVOD_VERSION-$py_tag-torch$torch_version-$flavour"

if ! ls "$slot"/horovod-*.whl >/dev/null 2>&1; then
  echo "building horovod $HOROVOD_VERSION ($flavour, torch $torch_version); about 5 minutes on 2 cores"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
  tar -xzf "$work"/horovod-$HOROVOD_VERSION.tar.gz -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"
  # torch 2.x headers need C++17.
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  # GCC 13 no longer includes these transitively.
  for header in "$src/horovod/common/common.h" "$src/horovod/common/group_table.h"; do
    sed -i '1i #include <cstdint>\n#include <stdexcept>\n#include <string>' "$header"
  done
  "$PYTHON" -m pip install --quiet "cmake<4" cffi wheel setuptools packaging
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
         HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 CMAKE_POLICY_VERSION_MINIMUM=3.5
  export MAKEFLAGS="-j${MAX_JOBS:-$(nproc)}"
  if [ "$flavour" = cuda ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    if [ -z "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ]; then
      HOROVOD_BUILD_CUDA_CC_LIST=$("$PYTHON" -c 'import torch
caps = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
print(",".join(caps) or "90")')
      export HOROVOD_BUILD_CUDA_CC_LIST
    fi
    if [ -z "${HOROVOD_NCCL_INCLUDE:-}" ]; then
      # The nvidia-nccl wheel that CUDA torch depends on ships headers and the library.
      nccl_root=$("$PYTHON" -c 'import os, nvidia.nccl as m; print(os.path.dirname(m.__file__) if m.__file__ else list(m.__path__)[0])' 2>/dev/null || true)
      if [ -n "$nccl_root" ]; then
        export HOROVOD_NCCL_INCLUDE="$nccl_root/include" HOROVOD_NCCL_LIB="$nccl_root/lib"
      fi
    fi
    echo "CUDA flavour: capabilities $HOROVOD_BUILD_CUDA_CC_LIST, NCCL ${HOROVOD_NCCL_INCLUDE:-from system}"
  fi
  (cd "$src" && "$PYTHON" -m pip wheel --no-build-isolation --no-deps . -w "$work/dist")
  mkdir -p "$CACHE"
  # Publish the wheel atomically so an interrupted build never leaves a half wheel in the cache.
  tmp_slot=$(mktemp -d "$CACHE/.tmp-XXXXXX")
  cp "$work"/dist/horovod-*.whl "$tmp_slot"/
  rm -rf "$slot"
  mv "$tmp_slot" "$slot"
else
  echo "reusing cached wheel in $slot"
fi

"$PYTHON" -m pip install --quiet --no-deps --force-reinstall "$slot"/horovod-*.whl
# horovod's own runtime requirements, without the [spark] extra (it pins pyarrow<11).
"$PYTHON" -m pip install --quiet cloudpickle psutil pyyaml packaging cffi
"$PYTHON" - <<'PY'
import horovod
import horovod.torch as hvd

ops = ["gloo" if hvd.gloo_built() else "", "nccl" if hvd.nccl_built() else ""]
print(f"horovod {horovod.__version__} ready ({' + '.join(o for o in ops if o)})")
PY
