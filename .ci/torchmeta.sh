#!/usr/bin/env bash
# CI: the torchmeta interop tests, against torchmeta itself, in a separate virtual environment.
#
# torchmeta 1.8.0 pins torch<1.10, so it is installed with --no-deps, beside torch 2.14.1 and
# torchvision 0.29.1 (the torchvision that imports cleanly, and only beside that torch) and its
# runtime dependencies; lightning_contrastive.compat.patch_torchmeta makes it run there. This
# project installs unchanged (torch 2.14.1 satisfies torch>=2.1). The environment lives outside the
# repository and is deleted afterwards (it holds a 5.5 GB CUDA build of torch); set TORCHMETA_VENV
# to build it at, or reuse it from, a path of your choice instead.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${TORCHMETA_VENV:-}" ]]; then
    venv="$TORCHMETA_VENV"
else
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    venv="$scratch/venv"
fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"

# pip reports torchmeta's unmet torch/torchvision pins as a dependency conflict: expected, and harmless.
"$venv/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1
"$venv/bin/pip" install --quiet --no-deps torchmeta==1.8.0
"$venv/bin/pip" install --quiet numpy Pillow h5py tqdm requests ordered-set pytest
"$venv/bin/pip" install --quiet -e .
echo "torchmeta environment ready in ${SECONDS}s"

"$venv/bin/python" -m pytest tests/torchmeta -q
