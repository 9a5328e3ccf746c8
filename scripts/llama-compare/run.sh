#!/usr/bin/env bash
# llama.cpp on the full-width Qwen-VL-Chat decoder slice: writes random-weight GGUFs (F16, BF16,
# Q4_0 with llama.cpp's default Q6_K output, all-Q4_0) for each layer count and runs llama-bench.
# A tool for humans comparing qvc with llama.cpp (issues 11 and 12); not part of CI. See README.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: run.sh (--llama-bin DIR | --llama-src DIR | --fetch) [options]

  --llama-bin DIR   use DIR/llama-bench and DIR/llama-quantize (an existing build's bin/)
  --llama-src DIR   llama.cpp source tree: configure and build it (CPU only, -DGGML_NATIVE=ON, Release)
                    into WORK/llama-build under `nice -n 19` unless that build already exists
  --fetch           get the source offline-friendly from PyPI (sdist of llama-cpp-python, which vendors
                    llama.cpp at vendor/llama.cpp) into WORK, then build it as --llama-src does
  --work DIR        where GGUFs (and a fetched/built llama.cpp) go (default: a new mktemp -d)
  --layers "2 8"    decoder layer counts (default "2 8")
  --types "f16 bf16 q4_0 q4_0-pure"   which GGUFs to bench (default: all four)
  --threads 1,2     llama-bench -t (default 1,2)
  --reps N          llama-bench -r (default 3)
  --passes N        run every (file, threads) benchmark N times, one whole round after another, so a
                    busy spell on a shared machine spoils one pass, not the result (default 1)
  --keep            keep the GGUFs (default: delete each layer count's files after benching it)
  --wait-idle S     before each llama-bench run (one model, one thread count), wait up to S seconds
                    for the machine to be idle (no other runnable process over 5 s), because other
                    work on a small machine skews the numbers badly (default 0: don't wait)
  --nice N          run llama-bench under `nice -n N` (default 0). A negative N (root only) keeps
                    other processes on a busy shared machine from taking the benchmark's cores; with
                    kernel autogroups (sched_autogroup_enabled=1) plain nice only ranks processes of
                    one session, so llama-bench then runs in its own session (setsid) whose autogroup
                    gets the same nice value.
  PYTHON=...        python with numpy and gguf (pip install gguf numpy); default python3
USAGE
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="" src="" fetch=0 work="" layers="2 8" types="f16 bf16 q4_0 q4_0-pure" threads="1,2" reps=3 keep=0 wait_idle=0 nice_n=0 passes=1
while [ $# -gt 0 ]; do
  case "$1" in
    --llama-bin) bin="$2"; shift 2 ;;
    --llama-src) src="$2"; shift 2 ;;
    --fetch) fetch=1; shift ;;
    --work) work="$2"; shift 2 ;;
    --layers) layers="$2"; shift 2 ;;
    --types) types="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --wait-idle) wait_idle="$2"; shift 2 ;;
    --nice) nice_n="$2"; shift 2 ;;
    --passes) passes="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ] && [ -z "$src" ] && [ "$fetch" = 0 ]; then
  echo "run.sh: give --llama-bin, --llama-src or --fetch" >&2; usage >&2; exit 2
fi
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import gguf, numpy' 2>/dev/null || { echo "run.sh: $PYTHON lacks gguf/numpy: pip install gguf numpy" >&2; exit 2; }
if [ -z "$work" ]; then work="$(mktemp -d -t llama-compare.XXXXXX)"; fi
mkdir -p "$work"
work="$(cd "$work" && pwd)"
echo "work dir: $work"

if [ "$fetch" = 1 ]; then
  # --no-build-isolation: pip only needs the sdist, and isolation would build cmake from source.
  # The sdist's metadata step needs scikit-build-core in $PYTHON (pip install scikit-build-core).
  "$PYTHON" -m pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python -d "$work/sdist"
  tarball="$(ls "$work"/sdist/llama_cpp_python-*.tar.gz | head -n1)"
  tar -C "$work" -xzf "$tarball"
  # Use the real path: the vendored tree's .git file points at ../../.git, which a symlink breaks
  # (ninja then loops on "build.ninja still dirty").
  src="$work/$(basename "$tarball" .tar.gz)/vendor/llama.cpp"
fi
if [ -z "$bin" ]; then
  src="$(cd "$src" && pwd -P)"
  build="$work/llama-build"
  if [ ! -x "$build/bin/llama-bench" ] || [ ! -x "$build/bin/llama-quantize" ]; then
    gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
    nice -n 19 cmake -S "$src" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    nice -n 19 cmake --build "$build" -j "$(nproc)" --target llama-bench llama-quantize
  fi
  bin="$build/bin"
fi
for t in llama-bench llama-quantize; do
  [ -x "$bin/$t" ] || { echo "run.sh: $bin/$t not found" >&2; exit 2; }
done

# Idle = /proc/stat's procs_running (which counts this check itself) is 1 in each of 5 samples 1 s apart.
wait_for_idle() {
  local deadline=$((SECONDS + wait_idle)) quiet
  while [ "$SECONDS" -lt "$deadline" ]; do
    quiet=1
    for _ in 1 2 3 4 5; do
      [ "$(awk '/^procs_running/ {print $2}' /proc/stat)" -le 1 ] || { quiet=0; break; }
      sleep 1
    done
    [ "$quiet" = 1 ] && { echo "idle: yes"; return; }
    sleep 5
  done
  echo "idle: no (waited ${wait_idle}s)"
}

results="$work/results.md"
: > "$work/bench.jsonl"
{
  echo "# llama.cpp on the Qwen-VL-Chat decoder slice"
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'), host: $(uname -n), cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), cores: $(nproc)"
  echo "llama-bench: $("$bin/llama-bench" --version 2>&1 | tr '\n' ' ')"
} > "$results"

for L in $layers; do
  f16="$work/slice-${L}l-f16.gguf"
  declare -A file=(
    [f16]="$f16"
    [bf16]="$work/slice-${L}l-bf16.gguf"
    [q4_0]="$work/slice-${L}l-q4_0.gguf"
    [q4_0-pure]="$work/slice-${L}l-q4_0-pure.gguf"
  )
  for ty in $types; do
    out="${file[$ty]:?unknown type $ty (f16 bf16 q4_0 q4_0-pure)}"
    [ -f "$out" ] && continue
    case "$ty" in
      f16|bf16) nice -n 10 "$PYTHON" "$here/make_gguf.py" "$out" --layers "$L" --dtype "$ty" ;;
      q4_0|q4_0-pure)
        [ -f "$f16" ] || nice -n 10 "$PYTHON" "$here/make_gguf.py" "$f16" --layers "$L" --dtype f16
        # Default Q4_0 keeps output.weight in Q6_K (llama.cpp's choice); --pure makes every weight Q4_0.
        pure=(); [ "$ty" = q4_0-pure ] && pure=(--pure)
        nice -n 10 "$bin/llama-quantize" "${pure[@]}" "$f16" "$out" Q4_0 > "$out.log" 2>&1 \
          || { tail -n 20 "$out.log" >&2; exit 1; } ;;
    esac
  done
  for pass in $(seq "$passes"); do
  for ty in $types; do
    for t in ${threads//,/ }; do
      # Load is recorded because other processes on a shared machine skew the numbers.
      echo; echo "## $L layers, $ty, $t thread(s) ($(basename "${file[$ty]}")), pass $pass/$passes"
      [ "$wait_idle" -gt 0 ] && wait_for_idle
      before="$(cut -d' ' -f1-3 /proc/loadavg)"
      echo "load before: $before, $(date -u +%H:%M:%S) UTC, llama-bench nice $nice_n"
      # md for the eye on stdout; jsonl (with every repetition's tok/s) on stderr for the summary.
      setsid -w sh -c 'if [ "$1" != 0 ] && [ -w /proc/self/autogroup ]; then echo "$1" > /proc/self/autogroup; fi
        shift; exec nice -n "$0" "$@"' "$nice_n" "$nice_n" \
        "$bin/llama-bench" -m "${file[$ty]}" -p 300 -n 32 -t "$t" -r "$reps" -o md -oe jsonl 2> "$work/bench.err" \
        || { tail -n 20 "$work/bench.err" >&2; exit 1; }
      after="$(cut -d' ' -f1-3 /proc/loadavg)"
      echo "load after: $after, $(date -u +%H:%M:%S) UTC"
      grep '^{' "$work/bench.err" | SLICE="$L $ty $before / $after" "$PYTHON" -c '
import json, os, sys
layers, ty, load = os.environ["SLICE"].split(" ", 2)
for line in sys.stdin:
    r = json.loads(line)
    r.update(slice_layers=int(layers), slice_type=ty, loadavg=load)
    print(json.dumps(r))' >> "$work/bench.jsonl"
    done
  done
  done | tee -a "$results"
  if [ "$keep" = 0 ]; then
    for ty in f16 bf16 q4_0 q4_0-pure; do rm -f "${file[$ty]}" "${file[$ty]}.log"; done
  fi
  unset file
done
# One row per (layers, type, threads): llama-bench's mean (of --reps) from the fastest pass, the range of
# the passes' means, and the best single repetition. On a machine shared with other work the fastest
# pass is the closer estimate of the uncontended speed; the range shows how much the sharing moved it.
"$PYTHON" - "$work/bench.jsonl" <<'PY' | tee -a "$results"
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (r["slice_layers"], r["slice_type"], r["n_threads"])
    test = "pp" if r["n_prompt"] else "tg"
    rows.setdefault(key, {}).setdefault(test, []).append(r)
def cells(runs):
    if not runs:
        return ["-", "-", "-"]
    means = [r["avg_ts"] for r in runs]
    best_rep = max(max(r["samples_ts"]) for r in runs)
    return [f"{max(means):.1f}", f"{min(means):.1f}-{max(means):.1f}", f"{best_rep:.1f}"]
print()
print("| layers | weights | threads | pp300 | pp300 passes | pp300 best rep | tg32 | tg32 passes | tg32 best rep | load (1/5/15 min) before / after, fastest pp pass |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
for (layers, ty, t), tests in sorted(rows.items()):
    pp, tg = tests.get("pp", []), tests.get("tg", [])
    load = max(pp or tg, key=lambda r: r["avg_ts"])["loadavg"]
    print("| " + " | ".join([str(layers), ty, str(t)] + cells(pp) + cells(tg) + [load]) + " |")
PY
echo; echo "results: $results, every repetition: $work/bench.jsonl"
