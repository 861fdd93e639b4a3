#!/usr/bin/env bash
# Everything issue 4 measures on one GPU host, in one go (the lent GPU machines have a Python with torch but
# no deepspeed / megatron-core and no package index: carry a wheelhouse built with
# ../shared/offline-wheelhouse.sh .whl).
#
#   bash benchmarks/gpu_session.sh OUT_DIR [tests|profile|layer|step|recipe ...]   # default: all but recipe
#
# recipe: the widenet_smoke and switch_smoke presets through the real recipes on one GPU (bf16 ds_config
# chosen by 'auto', ZeRO-1), with and without recompute; needs the embedded corpus (carry cache/).
#
# Writes OUT_DIR/{env,tests,profile,moe_layer,train_step}.log.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR [tests|profile|layer|step|recipe ...]}; shift
parts=${*:-tests profile layer step}
mkdir -p "$out"
if [[ -d .whl ]] && ! python3 -c "import deepspeed, megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, deepspeed, megatron.core as m; print('torch', torch.__version__, '| deepspeed',
deepspeed.__version__, '| megatron-core', m.__version__, '| cuda', torch.version.cuda)"
  git rev-parse --short HEAD 2>/dev/null || true; } 2>&1 | tee "$out/env.log"
for part in $parts; do
  case $part in
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_moe_kernels.py 2>&1 | tee "$out/tests.log" ;;
    profile) python3 benchmarks/moe_profile.py 2>&1 | grep -v USDT | tee "$out/profile.log" ;;
    layer) python3 benchmarks/moe_layer.py 2>&1 | tee "$out/moe_layer.log" ;;
    step) python3 benchmarks/train_step.py 2>&1 | tee "$out/train_step.log" ;;
    recipe)
      for run in "widenet --preset widenet_smoke" "widenet --preset widenet_smoke --recompute full --train-iters 100" \
                 "gpt_moe --preset switch_smoke"; do
        set -- $run
        python3 recipes/pretrain_$1.py "${@:2}" --run-dir "/tmp/runs/${run// /_}" 2>&1 | tail -22
      done 2>&1 | tee "$out/recipe.log" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
