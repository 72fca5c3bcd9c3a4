#!/usr/bin/env bash
# The GPU machine's side of the "GPU runs" in benchmarks/README.md. Each device call runs one step from the
# repository root (the pieces of gpu_pack_inputs.py travel over several calls, see the README):
#
#   bash benchmarks/gpu/gpu_session.sh smoke        # after code changes: wheels + the smoke pack, every row for 2 steps
#   bash benchmarks/gpu/gpu_session.sh throughput   # first call: receive its pieces + wheels, install, throughput benchmark
#   bash benchmarks/gpu/gpu_session.sh receive      # middle calls: keep the carried pieces
#   bash benchmarks/gpu/gpu_session.sh train        # last call: receive, reassemble (hash-checked), train + evaluate
#   bash benchmarks/gpu/gpu_session.sh all          # all of it, when every piece came in this call
#
# Every step first copies what the call carried under $KDQ_CARRY to $KDQ_ROOT/pieces: the repository copy there is
# refreshed by each call, /tmp stays while the machine is warm. The wheels are installed once, into $KDQ_SITE, with
# pip --no-index (the machine reaches no registry). Results go to $OUT (what the device tool brings back):
# throughput.json and .log, train.log and rows.tar.gz (rows/<row>-gpu.json, or pending/<row>-gpu.json when scoring or
# the packed checkpoint could not be done there: finish those here with gpu_train.py --score). One archive, because a
# call brings back at most 8 files (session 5 lost three rows of ten written as separate files).
# Environment: KDQ_TRAIN_ARGS, KDQ_THROUGHPUT_ARGS: extra flags of gpu_train.py / gpu_throughput.py.
set -euo pipefail

CARRY=${KDQ_CARRY:-benchmarks/results/gpu_pieces}
ROOT=${KDQ_ROOT:-/tmp/kdq_inputs}
SITE=${KDQ_SITE:-/tmp/kdq_site}
OUT=${OUT:-/tmp/kdq_out}
PIECES=$ROOT/pieces
INPUTS=$ROOT/inputs
# Our package runs from this checkout (it is not installed there), after the carried wheels.
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export HF_WHISPER_KDQ_CACHE=${HF_WHISPER_KDQ_CACHE:-/tmp/kdq_cache}
mkdir -p "$PIECES" "$OUT"

receive() {
    if [ -d "$CARRY" ]; then
        cp -rL "$CARRY"/. "$PIECES"/
    fi
    echo "pieces so far: $(ls "$PIECES" | tr '\n' ' ')"
}

setup() {
    if [ ! -f "$SITE/.installed" ]; then
        if compgen -G "$PIECES/wheels/*.whl" >/dev/null; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                "$PIECES"/wheels/*.whl
        fi
        touch "$SITE/.installed"
    fi
    python3 -c "import torch, transformers, hf_whisper_kdq; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
}

throughput() {
    # shellcheck disable=SC2086  # the extra flags are meant to split
    python3 benchmarks/gpu/gpu_throughput.py --output "$OUT/throughput.json" ${KDQ_THROUGHPUT_ARGS:-} 2>&1 \
        | tee "$OUT/throughput.log"
}

smoke() {
    python3 benchmarks/gpu/gpu_train.py --inputs "${KDQ_SMOKE_INPUTS:-benchmarks/results/gpu_smoke/inputs}" --device cuda \
        --smoke --output "$OUT/smoke" 2>&1 | tee "$OUT/smoke.log"
}

bundle_rows() {
    # At most 8 files come back from a call: the rows travel as one archive (rows/, pending/ inside).
    if [ -d "$ROWS" ]; then
        tar czf "$OUT/rows.tar.gz" -C "$ROWS" .
    fi
}

train() {
    if [ ! -f "$INPUTS/manifest.json" ]; then
        python3 benchmarks/gpu/gpu_pack_inputs.py --reassemble "$PIECES" --into "$INPUTS"
    fi
    ROWS=$(mktemp -d "$ROOT/rows.XXXX")
    trap bundle_rows EXIT  # also when the device tool's time limit stops the run (SIGTERM)
    trap 'exit 143' TERM
    # shellcheck disable=SC2086
    python3 benchmarks/gpu/gpu_train.py --inputs "$INPUTS" --output "$ROWS" ${KDQ_TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log"
}

case "${1:-}" in
    receive) receive ;;
    smoke) receive; setup; smoke ;;
    throughput) receive; setup; throughput ;;
    train) receive; setup; train ;;
    all) receive; setup; throughput; train ;;
    *) echo "usage: bash benchmarks/gpu/gpu_session.sh receive|smoke|throughput|train|all" >&2; exit 2 ;;
esac
