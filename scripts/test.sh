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
exec python -m pytest "$@"
