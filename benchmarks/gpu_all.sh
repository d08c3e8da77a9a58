#!/usr/bin/env bash
# Every GPU measurement of the speed issue and the GPU tests, in one call per machine, most important first.
#
#   OUT=/tmp/gpu_results bash benchmarks/gpu_all.sh                 # everything this machine can run
#   STEPS="train scaling report" bash benchmarks/gpu_all.sh         # some steps
#
# Steps (each is skipped, saying why, when the machine or the optional packages cannot run it):
#   train    2+ GPUs: Qwen3-30B-A3B at LAYERS (48, full depth, on 4+ GPUs; 24 on 2), seq 4096 x BATCH per GPU,
#            fwd+bwd+AdamW: ours (EP=GPUs, all_to_all) against transformers v5's DistributedConfig(fsdp_size) and
#            (fsdp_size, ep_size, all_to_all)
#   scaling  2+ GPUs: ours at EP=1 (one GPU) and EP=GPUs at SCALING_LAYERS (12) layers: per-GPU tokens/s ratio
#   deepep   2+ GPUs, deep_ep importable: ours at LAYERS with the DeepEP dispatcher
#   eager    2+ GPUs: v5 FSDP with experts_implementation="eager" (slow: 2 timed steps)
#   single   1+ GPUs: one GPU, SINGLE_LAYERS (12) layers: ours (EP=1), ours with v5's norms and loss (--no-lean), and
#            v5 (grouped_mm); then ours --no-lean and v5 again with foreach AdamW (the optimizer of earlier runs)
#   normloss one GPU: the output head's loss and RMSNorm fwd+bwd, v5's against ours (chunked loss, compiled norm)
#   block    one MoE block fwd+bwd, v5 grouped_mm vs ours (and ours with the TE backend when TE imports)
#   permute  TE importable: TE's fused moe_permute/moe_unpermute vs ours
#   tests    the CUDA tests (bf16 equivalence for every family and backend, NCCL EP, DeepEP vs all_to_all)
#   report   one table of every training result (ratios against the issue's targets)
# A CPU dry run of the training steps (gloo): GPUS=2 CONFIG=tiny.json SEQ=64 STEPS="train scaling eager report".
# Random checkpoints go to CKPT_DIR (default /tmp; 61 GB at 48 layers). Results: $OUT/*.json, *.md, tests.log.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
export OUT NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
GPUS=${GPUS:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
CKPT_DIR=${CKPT_DIR:-/tmp}
LAYERS=${LAYERS:-$([ "$GPUS" -ge 4 ] && echo 48 || echo 24)}  # full depth on 4+ GPUs; on 2 every setup fits at 24
SCALING_LAYERS=${SCALING_LAYERS:-12}
SINGLE_LAYERS=${SINGLE_LAYERS:-12}
BATCH=${BATCH:-2}
STEPS=${STEPS:-train scaling deepep eager single normloss block permute tests report}

has() { python3 -c "import $1" >/dev/null 2>&1; }
multi() { [ "$GPUS" -ge 2 ] || { echo "skipped: needs 2+ GPUs, this machine has $GPUS"; return 1; }; }
train() {
    python3 benchmarks/gpu_train.py --all --gpus "$GPUS" --layers "$LAYERS" --batch "$BATCH" --ckpt-dir "$CKPT_DIR" \
        --setup-timeout 420 ${CONFIG:+--config "$CONFIG"} ${SEQ:+--seq "$SEQ"} "$@"
}

for step in $STEPS; do
    echo "=== $step start $(date -u +%T)"
    case $step in
        train) multi && train --setups ours,v5_fsdp,v5_fsdp_ep --dispatcher all_to_all --out "$OUT/train" ;;
        scaling) multi && train --setups "" --scaling-layers "$SCALING_LAYERS" --dispatcher all_to_all \
            --out "$OUT/scaling" ;;
        deepep) multi && { has deep_ep || { echo "skipped: deep_ep does not import"; false; }; } &&
            train --setups ours --dispatcher deepep --out "$OUT/deepep" ;;
        single) one() { train --gpus 1 --layers "$SINGLE_LAYERS" "$@"; }
            one --setups ours_ep1,v5_single --out "$OUT/single" &&
            one --setups ours_ep1 --no-lean --out "$OUT/single_plain" &&
            one --setups ours_ep1,v5_single --no-lean --optimizer foreach --out "$OUT/single_foreach" ;;
        eager) multi && train --setups v5_fsdp_eager --steps 2 --warmup 1 --out "$OUT/eager" ;;
        normloss) python3 benchmarks/gpu_norm_loss.py --out "$OUT/norm_loss" ;;
        block) python3 benchmarks/gpu_block.py --impls v5_grouped_mm,ours,ours_te --budget-s 300 ${BLOCK_ARGS:-} \
            --out "$OUT/block" ;;
        permute) { has transformer_engine.pytorch || { echo "skipped: transformer_engine does not import"; false; }; } &&
            python3 benchmarks/gpu_permute.py ;;
        tests) python3 -m pytest -q -p no:cacheprovider -rs tests/test_runtime_gpu.py tests/test_runtime_fastpath.py \
            2>&1 | tee "$OUT/tests.log" ;;
        report) files=()
            for f in train scaling deepep eager single single_plain single_foreach; do [ -f "$OUT/$f.json" ] && files+=("$OUT/$f.json"); done
            [ ${#files[@]} -gt 0 ] && python3 benchmarks/gpu_train.py --merge "${files[@]}" --gpus "$GPUS" \
                --layers "$LAYERS" --scaling-layers "$SCALING_LAYERS" --batch "$BATCH" --out "$OUT/train_all" ;;
        *) echo "unknown step $step" ;;
    esac
    echo "=== $step end rc=$? $(date -u +%T)"
done
