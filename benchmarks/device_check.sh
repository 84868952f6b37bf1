#!/usr/bin/env bash
# The GPU check of the encode data path, in one call of at most 8 minutes: the GPU tests, then
# `quackae bench --what train --json` and `quackae bench --what encode --json` on CUDA in bf16 and fp32;
# every output goes under $OUT (default ./device-check-out): *.txt the whole output, *.json the figures.
#
#   bash benchmarks/device_check.sh                     # on a machine with a GPU
#   bash benchmarks/device_check.sh --accelerator cpu   # the same steps on a CPU, smaller (to try the script)
#
# quackae runs from this work tree (PYTHONPATH), not installed. The GPU image this project is lent has torch,
# pytorch-lightning, pyarrow, tokenizers, pandas, pytest, pyyaml, tqdm, pillow, xxhash, fsspec and requests,
# but not `datasets` (prepare and the benches write prepared folders with it) nor its `dill` and
# `multiprocess`. They travel as wheels in .whl/ at the repository root, fetched here beforehand:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#
# (the versions this project's .venv holds: `.venv/bin/pip show datasets dill multiprocess`); the device call
# then carries `.whl` and this script installs them into /tmp/site first. Each step has its own time limit, and a
# failed step is recorded and the next one runs, so the script always reaches its end.
set -uo pipefail

accelerator=cuda
if [ "${1:-}" = "--accelerator" ]; then accelerator="$2"; fi
out="${OUT:-$PWD/device-check-out}"
mkdir -p "$out"
python="${PYTHON:-python3}"
if ls .whl/*.whl > /dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$accelerator" = cpu ]; then items=1000; train_steps=4; else items=10000; train_steps=40; fi
status=0

step() {  # step NAME SECONDS COMMAND...: output to $out/NAME.txt, its last line to $out/NAME.json when it is JSON
    local name="$1" limit="$2"
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    tail -n 1 "$out/$name.txt" | "$python" -c 'import json, sys; json.dump(json.loads(sys.stdin.read()), sys.stdout)' \
        > "$out/$name.json" 2> /dev/null || rm -f "$out/$name.json"
    echo "$name: exit $rc in $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] || status=1
}

{ nvidia-smi || true; "$python" -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } \
    > "$out/device.txt" 2>&1
step gpu-tests 100 "$python" -m pytest -q -p no:cacheprovider -m gpu tests/data/test_prepared.py -rs
step bench-train 100 "$python" -m quackae bench --what train --json --steps "$train_steps"
for precision in bf16-mixed 32-true; do
    step "bench-encode-$precision" 130 "$python" -m quackae bench --what encode --json --accelerator "$accelerator" \
        --precision "$precision" --items "$items" --rounds 3
done
echo "device check done (exit $status); outputs in $out"
exit "$status"
