#!/usr/bin/env bash
# wider: set up on first use, then run a preset, the tests, or TensorBoard.
#
#   ./run.sh                     set up (first time), prepare the embedded corpus, train the default preset
#   ./run.sh PRESET [flags...]   train a named preset; flags go to the recipe (see ./run.sh PRESET --help)
#   ./run.sh test [pytest args]  run the test suite (what CI runs)
#   ./run.sh tensorboard         serve runs/ on port 6006 (WIDER_TB_PORT to change)
#   ./run.sh info PRESET         parameters, FLOPs and tokens per step of a preset
#   ./run.sh prepare [TASK]      set up and prepare the embedded data only (the corpus: cache/embedded/, about 10 s;
#                                TASK masked_lm / classification: cache/embedded_mlm/, image_classification: digits)
#   ./run.sh --help              this text and the presets
#
# Environment: WIDER_PYTHON (interpreter for the venv, default python3.11 or python3), WIDER_CPU_RANKS (CPU
# ranks when there is no GPU, default 2), OMP_NUM_THREADS (threads per CPU rank, default 1),
# WIDER_NUM_GPUS (GPUs to use, default all), WIDER_TORCH_INDEX (pip index for torch on CPU-only machines),
# WIDER_MASTER_PORT (rendezvous port, default a free one: two runs on one machine do not collide on 29500).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
# torch JIT extensions (DeepSpeed's CPU shm op) build inside the venv, not in ~/.cache: a fresh clone never
# waits on a lock that a build killed in another checkout left there (wider/parallel.py, clear_stale_build_lock).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
DEFAULT_PRESET=widenet_smoke

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
  local stamp=$VENV/.wider-setup
  local want
  want=$(cat requirements.txt pyproject.toml run.sh | sha256sum | cut -c1-16)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then return 0; fi
  echo "[wider] setting up $VENV (first use or requirements changed)"
  local base=${WIDER_PYTHON:-$(command -v python3.11 || command -v python3)}
  [[ -x $PY ]] || "$base" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  local torch_pin
  torch_pin=$(grep -E '^torch==' requirements.txt)
  if has_gpu; then
    "$PY" -m pip install -q "$torch_pin" 2>&1 | grep -v "is ignored" || true
  else
    # A CPU build of torch: the +cpu wheel (found locally on the development machines) or PyTorch's CPU index.
    "$PY" -m pip install -q "${torch_pin}+cpu" 2>&1 | grep -v "is ignored" || \
      "$PY" -m pip install -q "$torch_pin" --index-url "${WIDER_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
  "$PY" -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
  # wider itself (with patches/ and data_prep/), editable: the recipes, tools and tests import it from any
  # directory. No build isolation and no dependencies: setuptools and the pins above are already in the venv.
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "is ignored" || true
  "$PY" -c "import torch, deepspeed, megatron.core, sentencepiece, tensorboard, lm_eval, wider, patches, data_prep" \
    2>/dev/null || {
    echo "[wider] set-up failed: the packages of requirements.txt or wider itself do not import; see the pip" \
      "output above" >&2
    exit 1; }
  # `lm_eval --model wider ...`: lm-eval 0.4.13 has no plugin discovery, so a one-line .pth in the venv registers
  # the model when lm-eval loads its own (wider/eval/lm_eval_hook.py and wider/eval/harness.py say why).
  "$PY" -m wider.eval.lm_eval_hook install
  if ! has_gpu; then
    # DeepSpeed compiles a shared-memory communication op with g++ at first use on CPU (about a minute):
    # do it now, once, rather than inside the first run or test.
    # Bounded: a build that hangs fails the set-up here, with its name, instead of every later run.
    echo "[wider] building DeepSpeed's CPU communication op (once)"
    timeout 1200 "$PY" -W ignore -c "from wider.parallel import build_cpu_comm_op; build_cpu_comm_op()" \
      || echo "[wider] note: building DeepSpeed's shm op failed or took over 20 minutes; gloo is used without it"
  fi
  echo "$want" > "$stamp"
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  echo
  echo "presets:"
  "$PY" -W ignore -c "from wider.presets import describe
for n, d in describe(): print(f'  {n:<16} {d}')"
}

prepare_embedded() {  # the embedded data of a task (DESIGN 5.8): the corpus for causal_lm, cache/embedded
  "$PY" -W ignore data_prep/prepare_embedded.py --task "${1:-causal_lm}"
}

launch() {
  local preset=$1; shift
  local spec task recipe
  # The preset's task picks the recipe (the causal LM: recipes/pretrain_<arch>.py; wider/tasks/__init__.py).
  spec=$("$PY" -W ignore -c "import sys; from wider.presets import get; from wider.tasks import recipe_for
try: c = get(sys.argv[1]); print(c.model.task, recipe_for(c.model.arch, c.model.task))
except ValueError as e: sys.exit(f'error: {e}')" "$preset")
  read -r task recipe <<< "$spec"
  # The embedded data of the preset's task is its default data; it is prepared once and cached.
  prepare_embedded "$task"
  local port=${WIDER_MASTER_PORT:-$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
  # wider.launch = the deepspeed command, after checking every input in this one process (invalid input: one
  # line, exit 2, nothing written) and with signals turned into a checkpoint and exit 0 (DESIGN.md 4.4).
  if has_gpu; then
    local n=${WIDER_NUM_GPUS:-$(nvidia-smi -L | wc -l)}
    exec "$PY" -m wider.launch --num_gpus "$n" --master_port "$port" "$recipe" --preset "$preset" "$@"
  else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # cpu: skips the CUDA probe and its warning
    exec "$PY" -m wider.launch --num_gpus "${WIDER_CPU_RANKS:-2}" --master_port "$port" "$recipe" --preset "$preset" "$@"
  fi
}

cmd=${1:-$DEFAULT_PRESET}
case "$cmd" in
  -h|--help|help) setup; usage ;;
  # Unbuffered: a CI log cut off by a time limit still shows the tests that ran.
  test) shift; setup; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
        exec "$PY" -m pytest -q tests "$@" ;;
  tensorboard) shift; setup; exec "$VENV/bin/tensorboard" --logdir runs --port "${WIDER_TB_PORT:-6006}" --bind_all "$@" ;;
  info) shift; setup; exec "$PY" -W ignore -m wider.info --preset "$@" ;;
  prepare) shift; setup; prepare_embedded "${1:-causal_lm}" ;;
  -*) setup; launch "$DEFAULT_PRESET" "$@" ;;
  *) shift || true; setup; launch "$cmd" "$@" ;;
esac
