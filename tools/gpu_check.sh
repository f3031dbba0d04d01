#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run (a few minutes on one H100):
#   1. train.py on CUDA, a few steps: ResNet-50 at 96/48 px on demo:2048, bf16 autocast, channels_last
#   2. the same under torchrun --nproc_per_node=1 (NCCL process group of one)
#   3. eval_linear.py on the checkpoint of 1 (linear probe, 2 epochs, + kNN)
#   4. python tools/bench.py --preset r50-224 (ideal / full step ratio, joint BN, group update,
#      k-means, crops)
#   5. the input path: bench.py's input section on 3072 generated ImageNet-like JPEGs, PIL against
#      the tensor path (nvJPEG decode + crops on the GPU), both against the full ResNet-50 step's
#      img/s, and nvJPEG's pixels against libjpeg-turbo's (PIL's)
#   6. train.py on a generated JPEG folder with --augment tensor, then --augment pil (ResNet-50,
#      224/96 px, batch 256, one epoch of 8 steps): img/s in each log.jsonl
# Usage: bash tools/gpu_check.sh [OUT_DIR]   (default runs/gpu_check). Each part has its own time limit;
# a part that fails is reported and the others still run. Exit status: the number of failed parts.
set -uo pipefail
out=${1:-runs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
fails=0
part() {  # part NAME LIMIT_S CMD...: run, keep its log, time it
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$? t=$(( $(date +%s) - t0 ))
    echo "== $name: rc $rc, ${t}s: $*"
    tail -n 25 "$out/$name.log"
    [ $rc -eq 0 ] || fails=$((fails + 1))
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, torchvision, platform; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'python', platform.python_version(), torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee "$out/machine.txt"
smoke=(--data demo:2048 --arch resnet50 --image-size 96 --local-size 48 --n-local 2 --batch-size 128 --epochs 2
       --n-groups 300 --precision bf16 --channels-last --log-every 4 --no-final-eval --workers 8)
part train 120 python train.py "${smoke[@]}" --out-dir "$out/train"
part torchrun 120 torchrun --standalone --nproc_per_node=1 train.py "${smoke[@]}" --out-dir "$out/torchrun"
part eval 70 python eval_linear.py --checkpoint "$out/train/checkpoint.pth" --epochs 2 --knn --workers 8 --out-dir "$out/eval"
part bench 270 python tools/bench.py --preset r50-224 --sections step,jointbn,update,kmeans,crops \
    --out "$out/bench_r50.json"
part input 420 python tools/bench.py --preset r50-224 --sections step,input --jpegs 3072 \
    --loader-batches 10 --out "$out/bench_input.json"
part jpegs 240 python tools/bench.py --write-jpegs "$out/jpegs" --jpegs 2048
r50=(--data "imagefolder:$out/jpegs" --arch resnet50 --image-size 224 --local-size 96 --n-local 4
     --batch-size 256 --epochs 1 --n-groups 300 --precision bf16 --channels-last --log-every 2
     --knn-every 0 --no-final-eval --workers $(( $(nproc) - 1 )))
part train_jpeg_tensor 300 python train.py "${r50[@]}" --augment tensor \
    --out-dir "$out/train_jpeg_tensor"
part train_jpeg_pil 300 python train.py "${r50[@]}" --augment pil --out-dir "$out/train_jpeg_pil"
echo "failed parts: $fails"
exit $fails
