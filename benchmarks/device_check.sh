#!/usr/bin/env bash
# The GPU checks of issues 10 and 11 as one call on a lent GPU machine (the device tool).
#
# Here (a development machine with ../shared beside the checkout):
#     bash benchmarks/device_check.sh prepare [PORT_CLONE]
#   writes .device-carry/ (about 50 MB: the small budget's image split as a tar, and a copy of the reference port
#   BoyuanJiang/context_encoder_pytorch from PORT_CLONE, a clone or a bare git directory) and adds it to
#   .git/info/exclude, so that it travels only when named in the call's `carry`.
# There (the device tool's `run`, command `bash benchmarks/device_check.sh run`, carry [".device-carry"],
# timeout_s 600):
#   1. issue 11: benchmarks/train_throughput.py on the GPU with the port, fed from the carried JPEGs
#      (THROUGHPUT_SECONDS, default 200; it prints each target and its ratio to the port);
#   2. issue 10: benchmarks/table2.py --budget small on the carried split (SEEDS, default "0"; the rest of
#      CHECK_SECONDS, default 570, is its limit: the study is stopped with SIGTERM, keeps every finished cell in
#      results.json (SIGKILL 40 s later if it has not stopped; checkpoints are atomic), and a second call on the
#      same warm machine would resume it): the built-in rows plus `ce-region-ri` (random regions pretrained from
#      the rescaled init, the one change that lifted fine-tuning on the CPU, docs/feature-study.md), the four
#      pretrainings at once, then the fine-tuning cells first;
#   and leaves under $OUT (at most 8 files come back): env.txt, throughput.txt, table2.log, results.json,
#   table2.md, table2.png, logs.tar.gz (pretraining and cell logs, no weights).
# PHASES="table2" (or "throughput") runs one phase only.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.device-carry

prepare() {
    local port=${1:-}
    mkdir -p "$CARRY"
    grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
    local split
    split=$(mktemp -d)
    python benchmarks/table2.py --budget small --output-dir "$split" --prepare-only || return 1
    tar -chf "$CARRY/small-data.tar" -C "$split" data || return 1   # -h: the images, not the links
    rm -rf "$split"
    if [ -n "$port" ]; then
        rm -rf "$CARRY/port" && mkdir -p "$CARRY/port"
        if [ -d "$port/.git" ]; then port="$port/.git"; fi
        git --git-dir="$port" archive HEAD -- '*.py' LICENSE | tar -x -C "$CARRY/port" || return 1  # code only
    fi
    du -sh "$CARRY"
    echo "now: run(command='bash benchmarks/device_check.sh run', carry=['$CARRY'], timeout_s=600)"
}

run() {
    : "${OUT:?run on the device machine, where the device tool sets OUT}"
    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
    local start=$SECONDS budget=${CHECK_SECONDS:-570} phases=${PHASES:-throughput table2}
    local work=runs/device-check
    mkdir -p "$work"
    [ -d "$work/data" ] || tar -xf "$CARRY/small-data.tar" -C "$work"
    {
        date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        python -c "import torch, timm, accelerate, torchvision; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'torchvision',
torchvision.__version__)"
        nproc; git log -1 --format='%H %s'
    } > "$OUT/env.txt" 2>&1
    if [[ " $phases " == *" throughput "* ]]; then
        local port=()
        [ -d "$CARRY/port" ] && port=(--port-dir "$CARRY/port")
        timeout -s INT "${THROUGHPUT_SECONDS:-200}" python benchmarks/train_throughput.py --devices cuda \
            --data "$work/data/train" --workers "$(( $(nproc) > 12 ? 12 : $(nproc) ))" "${port[@]}" \
            2>&1 | tee "$OUT/throughput.txt"
    fi
    if [[ " $phases " == *" table2 "* ]]; then
        local left=$(( budget - (SECONDS - start) - 25 ))
        # shellcheck disable=SC2086
        timeout -s TERM -k 40 "$left" python benchmarks/table2.py --budget small --data "$work/data" \
            --output-dir "$work/table2" --seeds ${SEEDS:-0} --pretrain-jobs 4 --transfer-jobs 3 \
            --ablate ce-region-ri="--mask random-region --encoder-init rescale" \
            --num-workers 4 2>&1 | tr '\r' '\n' | grep -v '%|' > "$OUT/table2.log"
        for f in results.json table2.md table2.png; do cp "$work/table2/$f" "$OUT/" 2>/dev/null; done
        tar -czf "$OUT/logs.tar.gz" -C "$work/table2" --exclude='*.safetensors' --exclude='*.npy' \
            --exclude='checkpoints' --exclude='encoder-step*' --exclude='timm-encoder' pretrain cells 2>/dev/null
    fi
    echo "device check: $(( SECONDS - start )) s; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) run ;;
    *) echo "usage: bash benchmarks/device_check.sh prepare [PORT_CLONE] | run" >&2; exit 2 ;;
esac
