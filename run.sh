#!/usr/bin/env bash
# Set up a virtual environment in .venv, then
#   ./run.sh        run the five notebooks in order (the main job; results go to outputs/)
#   ./run.sh test   run the unit tests and every notebook, offline, on the tiny profile
#   ./run.sh test-colab  the same, under Colab's Python (where this machine has it), torch and package
#                   versions (constraints/colab.txt), in .venv-colab, with tiny models, caches and outputs
#                   of its own
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
minor() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }  # "3.13", or nothing
colab_python() {  # $PYTHON if given, else Python $1 where this machine has it (on PATH or pyenv's), else $PY
  local p
  [ -n "${PYTHON:-}" ] && { echo "$PYTHON"; return; }
  for p in "python$1" $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$1"*/bin/"python$1" 2>/dev/null | sort -rV); do
    [ "$(minor "$p")" = "$1" ] && { echo "$p"; return; }
  done
  echo "test-colab: this machine has no Python $1 (Colab's, constraints/colab.txt): running on $("$PY" -V 2>&1)" \
    "($PY) instead; PYTHON=/path/to/python$1 ./run.sh test-colab picks one" >&2
  echo "$PY"
}
if [ "${1:-}" = test-colab ]; then
  # Colab's Python and torch, as constraints/colab.txt names them (its "# python X.Y" line and torch==)
  VENV=.venv-colab PINS="-c constraints/colab.txt"
  PY=$(colab_python "$(sed -n 's/^# python \([0-9.]*\).*/\1/p' constraints/colab.txt | head -n 1)")
  if [ -e $VENV ] && [ "$(minor $VENV/bin/python)" != "$(minor "$PY")" ]; then
    echo "test-colab: $VENV holds Python $(minor $VENV/bin/python || echo '(none that runs)'), not" \
      "$(minor "$PY"): building it anew" >&2
    rm -rf $VENV
  fi
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
. $VENV/bin/activate
# torch first, pinned. .venv: the small CPU build, unless a torch is there already (your own CUDA build; in
# Colab torch is already installed). .venv-colab: Colab's release exactly (PyPI's build, with CUDA: ~4.6 GB).
if [ $VENV = .venv-colab ]; then python -m pip install -q "$(grep -m1 '^torch==' constraints/colab.txt)" $PINS
else python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0; fi
python -m pip install -q -r requirements.txt $PINS
python -m pip install -q . $PINS  # the helpers package, installed as Colab installs it (not editable)
NBVAL="--nbval-lax --nbval-current-env -p no:cacheprovider"
case "${1:-main}" in
  main)
    python -m pytest $NBVAL notebooks/ ;;
  test-colab)
    # what the suite builds, caches and writes stays in .venv-colab, apart from the other versions' own;
    # outputs start empty each run. Then on to the test command (;;& tries the next patterns too).
    # IPA_TEST_PART: the two-process launch tests run in `test` only (tests/_launch.py; CI time)
    export IPA_TINY_CACHE=$PWD/$VENV/cache HF_HOME=$PWD/$VENV/cache/hf IPA_OUTPUT_ROOT=$PWD/$VENV/outputs IPA_TEST_PART=colab
    python -c 'import sys, torch; print(f"test-colab: Python {sys.version.split()[0]} ({sys.base_prefix}),"
                                       f" torch {torch.__version__}")'
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
