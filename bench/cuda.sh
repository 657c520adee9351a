#!/usr/bin/env bash
# The CUDA figures in one go, on a machine with a GPU: run from the repository root in the project's environment.
#
#   bench/cuda.sh                      # writes bench/results/cuda-<GPU name>.md
#   DEVICE=cpu QUICK=1 bench/cuda.sh   # a short dry run of the same commands on the CPU
#
# Each bench prints medians and ratios measured side by side; this script only runs them and keeps their output,
# headed by the GPU, the commit and the date.
set -euo pipefail
cd "$(dirname "$0")/.."

device=${DEVICE:-cuda}
if [[ ${QUICK:-0} == 1 ]]; then
    size=32; small=--small-input; batch=16; repeats=3
else
    size=224; small=; batch=64; repeats=15
fi
name=$(python -c "import sys, torch; d = sys.argv[1]; print(torch.cuda.get_device_name(d) if d.startswith('cuda') \
else 'cpu')" "$device")
out=bench/results/cuda-$(echo "$name" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//').md
tmp=$(mktemp "$out.XXXX.tmp")
trap 'rm -f "$tmp"' EXIT

commands=(
    "bench/slicing.py --device $device --img-size $size $small --batch-sizes 1 32 --repeats $repeats"
    "bench/dynamic.py --device $device --img-size $size $small --repeats $repeats"
    "bench/train_step.py --device $device --batch-sizes 32 128"
    "bench/train_step.py --device $device --batch-sizes 32 128 --amp"
    "bench/train_options.py --device $device --option channels-last --img-size $size --batch-size $batch"
    "bench/train_options.py --device $device --option amp --img-size $size --batch-size $batch"
)
{
    echo "# $name: the CUDA benches"
    echo
    echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%d), torch" \
         "$(python -c 'import torch; print(torch.__version__)'), written by bench/cuda.sh."
    for command in "${commands[@]}"; do
        echo
        echo '```'
        echo "\$ python $command"
        python $command 2>&1 | grep -v -i warning
        echo '```'
    done
} > "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out"
