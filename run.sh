#!/usr/bin/env bash
# Set up a virtual environment in .venv, then
#   ./run.sh        run the five notebooks in order (the main job; results go to outputs/)
#   ./run.sh test   run the unit tests and every notebook, offline, on the tiny profile
#   ./run.sh test-colab  the same, under the package versions Colab ships (constraints/colab.txt),
#                   in .venv-colab, with tiny models, caches and outputs of its own
#   ./run.sh browser-check   use notebook 04's widget panel in headless Chromium (tools/browser_check.py)
#   ./run.sh rehearse [PX]  the five notebooks on the full profile, offline, as a quick run, against a local
#                   mirror of its Hub repos (random weights; built once, see rehearsal/); PX: IPA_RESOLUTION
#   ./run.sh gpu-check [--wheels DIR]  on a CUDA machine, with its own python and torch (no .venv): the T4
#                   budget measured on a GPU made to look like a T4 (bench/gpu_check.py; --tiny: CPU self-test)
# Without a CUDA GPU the notebooks use the tiny profile (small random models); IPA_PROFILE overrides.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ "${1:-}" = gpu-check ]; then
  # the GPU machine's own python and CUDA torch, never .venv's CPU build; missing packages come from wheels
  # (--wheels DIR or $IPA_WHEELS), installed without dependencies into a folder of the check's own
  "$PY" -c "import torch" 2>/dev/null || { echo "gpu-check: $PY has no torch. Run it with the GPU machine's own" \
    "python, the one that holds its CUDA torch: PYTHON=/path/to/python3 ./run.sh gpu-check" >&2; exit 2; }
  exec "$PY" bench/gpu_check.py "${@:2}"
fi
VENV=.venv PINS=""
[ "${1:-}" = test-colab ] && VENV=.venv-colab PINS="-c constraints/colab.txt"
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
. $VENV/bin/activate
# torch first, pinned: on our CI disk this is the small CPU build; in Colab torch is already installed.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0 $PINS
python -m pip install -q -r requirements.txt $PINS
python -m pip install -q . $PINS  # the helpers package, installed as Colab installs it (not editable)
NBVAL="--nbval-lax --nbval-current-env -p no:cacheprovider"
case "${1:-main}" in
  main)
    python -m pytest $NBVAL notebooks/ ;;
  test-colab)
    # what the suite builds, caches and writes stays in .venv-colab, apart from the other versions' own;
    # outputs start empty each run. Then on to the test command (;;& tries the next patterns too).
    export IPA_TINY_CACHE=$PWD/$VENV/cache HF_HOME=$PWD/$VENV/cache/hf IPA_OUTPUT_ROOT=$PWD/$VENV/outputs
    rm -rf "$IPA_OUTPUT_ROOT" ;;&
  test)
    # a fresh output root each run: results of older code or models must not meet the notebooks' resume checks
    export IPA_OUTPUT_ROOT=$PWD/outputs/test
    rm -rf "$IPA_OUTPUT_ROOT" ;;&
  test|test-colab)
    export IPA_PROFILE=tiny HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    # tiny models gain nothing from threads, and oversubscribed cores make them many times slower
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    python -m pytest $NBVAL -ra tests/ notebooks/ ;;
  browser-check)
    # notebook 04's panel used in headless Chromium through JupyterLab (tools/browser_check.py; ~2 min here)
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || \
      { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
      { echo "browser-check needs Chromium (or Google Chrome) on PATH: as root, this command installs it" \
        "(apt-get install chromium); otherwise install it yourself" >&2; exit 2; }
    python -m pip install -q -r requirements-browser.txt
    python tools/browser_check.py "${@:2}" ;;
  rehearse)
    MIRROR=$(python -m rehearsal.build_mirror | tail -n 1)  # $IPA_MIRROR_DIR, else ~/.cache/ipa-text-aware/mirror
    OUT=$(mktemp -d -t ipa-rehearsal.XXXXXX)
    export IPA_PROFILE=full IPA_QUICK=1 IPA_OUTPUT_ROOT="$OUT" HF_HOME="$MIRROR" HF_HUB_CACHE="$MIRROR/hub" \
      HF_DATASETS_CACHE="$MIRROR/datasets" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    if [ -n "${2:-}" ]; then export IPA_RESOLUTION="$2"; fi
    # at 512 px on a CPU one cell draws 32 pictures in over half an hour: past nbval's default 2000 s per cell
    python -m pytest $NBVAL --nbval-cell-timeout 14400 -ra notebooks/ && rm -rf "$OUT" || {
      echo "outputs kept in $OUT" >&2; exit 1; } ;;
  *)
    echo "usage: ./run.sh [main|test|test-colab|browser-check|rehearse [PX]|gpu-check [--wheels DIR]]" >&2; exit 2 ;;
esac
