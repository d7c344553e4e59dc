#!/usr/bin/env bash
# The test command: installs what the tests need (venv, packages, headless Chromium where possible), then runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not browser"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The playground test drives Debian's Chromium (nothing can download a browser here); the DICOMweb tests run a real
# PACS: Debian's Orthanc with its DICOMweb plugin, and orthanc-wsi's dicomizer makes their whole-slide image.
# Install what is missing when we can.
APT_PACKAGES=()
command -v chromium >/dev/null 2>&1 || APT_PACKAGES+=(chromium chromium-driver)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || APT_PACKAGES+=(orthanc)
ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 || APT_PACKAGES+=(orthanc-dicomweb)
command -v OrthancWSIDicomizer >/dev/null 2>&1 || APT_PACKAGES+=(orthanc-wsi)
if [ "${#APT_PACKAGES[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null) \
    || echo "warning: could not install ${APT_PACKAGES[*]}; browser and PACS tests will fail under CI" >&2
fi
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check . && ruff format --check .
# The GPU check (scripts/gpu_check.py) runs on a lent GPU machine that has transformers 5.17 and none of our
# packages: smoke-test it here with that version in a venv of its own, and with ours, so it cannot rot unseen.
GPU_VENV=${GPU_VENV:-.venv-gpu-check}
[ -x "$GPU_VENV/bin/python" ] || python3 -m venv "$GPU_VENV"
if ! "$GPU_VENV/bin/python" -c "import torch, transformers; assert transformers.__version__ == '5.17.0'" 2>/dev/null; then
  "$GPU_VENV/bin/python" -m pip install -q torch==2.13.0
  "$GPU_VENV/bin/python" -m pip install -q transformers==5.17.0 pillow numpy safetensors
fi
for py in "$GPU_VENV/bin/python" python; do
  "$py" scripts/gpu_check.py --cpu-smoke >"${TMPDIR:-/tmp}/gpu_check_smoke.log" 2>&1 \
    || { tail -40 "${TMPDIR:-/tmp}/gpu_check_smoke.log"; echo "gpu_check.py --cpu-smoke failed with $py" >&2; exit 1; }
  echo "gpu_check.py --cpu-smoke ok with transformers $("$py" -c 'import transformers; print(transformers.__version__)')"
done
exec python -m pytest "$@"
