#!/usr/bin/env bash
# gpu-check.sh — runs THERE (a GPU machine with the CUDA driver, python3 and
# ptxas, no Rust, no network), from the repo root, on what
# scripts/gpu-pack.sh put in .gpu/. Stages, each reported in the summary
# table; a failed stage does not stop the next; exit 1 if any failed:
#   fixture  rebuild the full-shape tiny-qwen-vl checkpoint from .gpu/fixture
#            (zeros for the wte / lm_head rows left out) and `qvc compile` it
#   device   .gpu/gpu_device (the Device contract on the emulator and CUDA)
#   kernels  `qvc selftest`: every kernel family vs its CPU reference
#   logits   the compiled fixture (and the int4 one) on the device: logits[:N] of the text
#            prompt, the image prompt and the image prompt + 2 forced greedy
#            tokens vs the reference (relative L2 <= 2e-2, bf16 weights)
#   serve    `qvc serve` on the compiled fixture: two chat completions at
#            once (one streamed) must agree, a bad request gets a 4xx
#            (scripts/serve_check.py, standard library only)
#   bench    `qvc bench --synthetic qwen-vl-chat --device cuda`, stopped after
#            QVC_GPU_CHECK_BENCH_SECONDS (330) so the table always prints
# then ONE summary table. Budget: well under 8 minutes on an H100.
# QVC_GPU_CHECK_DEVICE=emu runs the same stages on the PTX emulator with
# small settings (selftest --small, the bench on the tiny synthetic model),
# so the script can be checked end to end on a machine without a GPU.
# Every stage runs under `timeout` (QVC_GPU_CHECK_STAGE_SECONDS, 150 s), so
# a hung kernel costs one stage, not the lease. QVC_GPU_CHECK_LOGS=DIR
# keeps every stage's log as DIR/gpu-check-logs.tar.gz (one file, so it
# comes back from a device machine's $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
dev="${QVC_GPU_CHECK_DEVICE:-cuda}"
G="$(pwd)/.gpu"
QVC="$G/qvc"
work="$(mktemp -d "${TMPDIR:-/tmp}/qvc-gpu-check.XXXXXX")"
keep="${QVC_GPU_CHECK_LOGS:-}"
stage_limit="${QVC_GPU_CHECK_STAGE_SECONDS:-150}"
finish() {
    if [ -n "$keep" ]; then
        mkdir -p "$keep"
        (cd "$work" && tar czf "$keep/gpu-check-logs.tar.gz" --exclude='*.qvc' --exclude=fixture --exclude='*.safetensors' . ) || true
    fi
    rm -rf "$work"
}
trap finish EXIT
# A stage's command under the stage time limit (exit 124 when it ran out).
limited() { timeout "$stage_limit" "$@"; }
[ -x "$G/ptxas" ] && export QVC_PTXAS="$G/ptxas"
declare -a rows=()
failed=0
row() { rows+=("$(printf '%-28s %-6s %s' "$1" "$2" "$3")"); [ "$2" = ok ] || failed=1; }
log() { echo "== $*" >&2; }

# The device's name (and compile target) first.
if [ "$dev" = emu ]; then
    target=sm_80
    devname="PTX emulator (sm_80)"
    selftest_flags=(--small --cases 2)
else
    devname=$("$QVC" devices 2>&1 | grep -m1 '^cuda:0' || true)
    target=$(echo "$devname" | sed -n 's/.*compile target \(sm_[0-9]*\).*/\1/p')
    target=${target:-sm_90}
    selftest_flags=(--cases 4)
fi
row "device" "$([ -n "$devname" ] && echo ok || echo FAIL)" "${devname:-no GPU found by qvc devices}"
if [ "$dev" != emu ]; then
    { "$QVC" devices 2>&1; nvidia-smi 2>&1; } >"$work/devices.log" || true
fi

# fixture: expand + compile.
art="$work/fixture.qvc"
log "fixture: expand and compile for $target"
if python3 scripts/slim_fixture.py expand "$G/fixture" "$work/fixture" &&
    limited "$QVC" compile "$work/fixture" -o "$art" --target "$target" --max-seq 512 --force >"$work/compile.log" 2>&1; then
    row "fixture compile" ok "$target, $(grep -c . "$work/compile.log") lines of report"
else
    row "fixture compile" FAIL "see below"
    tail -n 20 "$work/compile.log" >&2 || true
fi

# (a) the Device contract.
log "device: gpu_device"
if limited "$G/gpu_device" >"$work/device.log" 2>&1; then
    row "gpu_device tests" ok "$(grep -m1 '^test result' "$work/device.log")"
else
    row "gpu_device tests" FAIL "$(grep -m1 '^test result' "$work/device.log" || tail -n 1 "$work/device.log")"
    tail -n 30 "$work/device.log" >&2
fi

# (b) every kernel family.
log "kernels: qvc selftest --device $dev"
limited "$QVC" selftest --device "$dev" "${selftest_flags[@]}" >"$work/selftest.log" 2>&1 && st=ok || st=FAIL
while read -r line; do
    fam=$(echo "$line" | sed 's/ *[0-9]* cases.*//')
    err=$(echo "$line" | sed -n 's/.*max rel err *\([^ ]*\).*/\1/p')
    res=$(echo "$line" | grep -q 'PASS$' && echo ok || echo FAIL)
    row "kernel $fam" "$res" "max rel err $err"
done < <(grep 'cases  max rel err' "$work/selftest.log" || true)
grep -q 'families, 0 failed' "$work/selftest.log" || { row "kernel selftest" FAIL "$(tail -n 1 "$work/selftest.log")"; cat "$work/selftest.log" >&2; }
[ "$st" = ok ] || failed=1

# (c) the fixture end to end: logits[:N] vs the reference slices.
log "logits: fixture on $dev"
# FIX (the slim fixture's name under .gpu and the work dir) and ART (its
# compiled artifact) say which fixture logits_check runs.
FIX=fixture
py_ids() { python3 -c "import json,sys; p=json.load(open('$G/$FIX/prompts.json'))['$1']; print(json.dumps(p['input_ids'] + p['greedy'][:$2]))"; }
logits_check() { # name case forced expected-tensor row
    local name=$1 case=$2 forced=$3 tensor=$4 r=$5 err
    py_ids "$case" "$forced" >"$work/$name.json"
    # Image paths in the prompt are relative to the fixture directory.
    if (cd "$work/$FIX" && limited "$QVC" logits "$ART" --prompt-tokens "$work/$name.json" --out "$work/$name.safetensors" \
        --device "$dev" --force) >"$work/$name.log" 2>&1; then
        if err=$(python3 scripts/slim_fixture.py compare "$work/$name.safetensors" "$G/$FIX/expected_slim.safetensors" \
            "$tensor" --row "$r" --tol 2e-2); then
            row "logits $name" ok "rel L2 $err vs reference [:N]"
        else
            row "logits $name" FAIL "rel L2 $err vs reference [:N] (tol 2e-2)"
        fi
    else
        row "logits $name" FAIL "qvc logits failed"
        tail -n 10 "$work/$name.log" >&2
    fi
}
ART="$art"
if [ -d "$art" ]; then
    logits_check text text 0 chat/text/last_logits 0
    logits_check image img1 0 chat/img1/greedy_step_logits 0
    logits_check image+2 img1 2 chat/img1/greedy_step_logits 2
else
    row "logits" FAIL "no compiled fixture"
fi
# The GPTQ int4 fixture the same way (the int4 GEMV and GEMM kernels against
# the PyTorch reference), where gpu-pack found it.
if [ -d "$G/fixture-int4" ]; then
    log "logits: int4 fixture on $dev"
    FIX=fixture-int4 ART="$work/fixture-int4.qvc"
    if python3 scripts/slim_fixture.py expand "$G/$FIX" "$work/$FIX" &&
        limited "$QVC" compile "$work/$FIX" -o "$ART" --target "$target" --max-seq 512 --force >"$work/compile-int4.log" 2>&1; then
        logits_check int4-text text 0 chat/text/last_logits 0
        logits_check int4-image img1 0 chat/img1/last_logits 0
    else
        row "int4 fixture compile" FAIL "see below"
        tail -n 20 "$work/compile-int4.log" >&2 || true
    fi
fi

# (d) serving: the compiled fixture behind `qvc serve`, two chat
# completions at once (one streamed) and a bad request (scripts/serve_check.py).
log "serve: fixture over HTTP on $dev"
if [ -d "$art" ]; then
    (cd "$work/fixture" && exec timeout "$stage_limit" "$QVC" serve "$art" --device "$dev" --port 0 --max-batch 2) \
        >"$work/serve.log" 2>&1 &
    spid=$!
    if res=$(limited python3 scripts/serve_check.py "$work/serve.log" 2>"$work/serve_client.log"); then
        row "serve" ok "$res"
    else
        row "serve" FAIL "$(tail -n 1 "$work/serve_client.log")"
        tail -n 20 "$work/serve.log" >&2
    fi
    kill "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
else
    row "serve" FAIL "no compiled fixture"
fi

# (e) the bench.
if [ "$dev" = emu ]; then
    bench=(bench --synthetic tiny --device emu --prompt-len 8 --decode-tokens 2 --batch 2 --image-sizes 224 --profile)
else
    bench=(bench --synthetic qwen-vl-chat --device "$dev" --profile)
fi
log "bench: qvc ${bench[*]}"
# The bench is the longest stage: a time limit keeps the summary table
# (printed last) within the session's budget even if it overruns.
bench_limit="${QVC_GPU_CHECK_BENCH_SECONDS:-330}"
if timeout "$bench_limit" "$QVC" "${bench[@]}" >"$work/bench.log" 2>"$work/bench.err"; then
    while read -r line; do
        what=$(echo "$line" | sed 's/  .*//')
        rest=$(echo "${line#"$what"}" | awk '{ f = "n/a"; for (i = 3; i <= 5; i++) if ($i ~ /%$/) { f = $i; break }; printf "%s %s (%s of floor)", $1, $2, f }')
        row "$what" ok "$rest"
    done < <(grep -E '^(ceiling: |vision |time to first token|prefill |decode batch |peak device memory)' "$work/bench.log")
    cat "$work/bench.log" >&2
else
    rc=$?
    row "bench" FAIL "$( [ "$rc" -eq 124 ] && echo "stopped after ${bench_limit} s" || tail -n 1 "$work/bench.err")"
    # What it measured before stopping still counts.
    grep -E '^(ceiling: |vision |time to first token|prefill |decode batch |peak device memory)' "$work/bench.log" >&2 || true
    tail -n 20 "$work/bench.err" >&2
fi

echo
echo "qvc GPU check on: $devname"
printf '%-28s %-6s %s\n' "stage" "result" "detail"
printf '%s\n' "${rows[@]}"
if [ "$failed" -ne 0 ]; then
    echo "gpu-check: FAILED"
    exit 1
fi
echo "gpu-check: all stages passed"
