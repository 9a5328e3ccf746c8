#!/usr/bin/env bash
# Installs NVIDIA's ptxas into .tools/bin without a GPU or CUDA toolkit: the
# binary ships in the nvidia-cuda-nvcc wheel on PyPI and needs only libc.
# ptxas 13.0 accepts PTX ISA up to 9.0 and targets sm_80 and sm_90.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=13.0.88
if [ -x .tools/bin/ptxas ] && .tools/bin/ptxas --version | grep -q "V$VERSION"; then
  exit 0
fi
echo "installing ptxas $VERSION from PyPI (nvidia-cuda-nvcc)"
mkdir -p .tools/whl .tools/bin
python3 -m pip download -q --no-deps -d .tools/whl "nvidia-cuda-nvcc==$VERSION"
# A wheel is a zip; python's zipfile avoids depending on `unzip`.
python3 - <<'PY'
import glob, zipfile, os
whl = glob.glob(".tools/whl/nvidia_cuda_nvcc-13.0.88-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/bin/ptxas"))
    with z.open(name) as src, open(".tools/bin/ptxas", "wb") as dst:
        dst.write(src.read())
os.chmod(".tools/bin/ptxas", 0o755)
PY
.tools/bin/ptxas --version | tail -1
