#!/usr/bin/env bash
# gpu-pack.sh — runs HERE (the machine with Rust): builds what a GPU machine
# without Rust or network needs for scripts/gpu-check.sh, into .gpu/:
#   .gpu/qvc            the release binary
#   .gpu/gpu_device     the runtime's Device-contract test binary (harness = false)
#   .gpu/ptxas          .tools/bin/ptxas, only if it fits the carry budget
#                       (the GPU machine has its own ptxas)
#   .gpu/fixture/       the slim tiny-qwen-vl fixture (scripts/slim_fixture.py)
#   .gpu/fixture-int4/  the slim tiny-qwen-vl-int4 fixture (16384 lm_head rows)
# Everything stays under 60 MiB (the carry limit is 64 MiB for all paths).
# Workflow: scripts/gpu-pack.sh here; carry `.gpu` to the GPU machine; run
# scripts/gpu-check.sh there from the repo root.
# Env: CARGO_TARGET_DIR (default target), QVC_FIXTURE (default
# ../shared/fixtures/tiny-qwen-vl), QVC_SLIM_ROWS (lm_head rows kept, 65536),
# QVC_FIXTURE_INT4 (default tiny-qwen-vl-int4 beside QVC_FIXTURE).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
fixture="${QVC_FIXTURE:-../shared/fixtures/tiny-qwen-vl}"
budget=$((60 * 1024 * 1024))

cargo build --release --bin qvc
# The newest gpu_device executable the test build reports.
gpu_device=$(cargo test --release -p qvc-runtime --test gpu_device --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu_device" and m.get("executable"):
        print(m["executable"])' | tail -n 1)
[ -x "$gpu_device" ] || { echo "gpu-pack: no gpu_device test binary found" >&2; exit 1; }

rm -rf .gpu
mkdir -p .gpu
cp "$target/release/qvc" .gpu/qvc
cp "$gpu_device" .gpu/gpu_device
python3 scripts/slim_fixture.py slim "$fixture" .gpu/fixture --rows "${QVC_SLIM_ROWS:-65536}"
fixture_int4="${QVC_FIXTURE_INT4:-$(dirname "$fixture")/tiny-qwen-vl-int4}"
if [ -d "$fixture_int4" ]; then
    python3 scripts/slim_fixture.py slim "$fixture_int4" .gpu/fixture-int4 --rows 16384
fi
used=$(du -sb .gpu | cut -f1)
if [ -x .tools/bin/ptxas ]; then
    size=$(stat -c %s .tools/bin/ptxas)
    if [ $((used + size)) -le $budget ]; then
        cp .tools/bin/ptxas .gpu/ptxas
    else
        echo "gpu-pack: ptxas left out ($((size >> 20)) MiB would exceed the budget; the GPU machine has its own)"
    fi
fi
used=$(du -sb .gpu | cut -f1)
[ "$used" -le $budget ] || { echo "gpu-pack: .gpu is $((used >> 20)) MiB, over the budget" >&2; exit 1; }
echo "gpu-pack: .gpu ready ($((used >> 20)) MiB):"
ls -la .gpu .gpu/fixture
