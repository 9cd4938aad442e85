#!/usr/bin/env bash
# The GPU proof, one command: bash benchmarks/gpu_proof.sh
#
#   1. build    pip install --no-build-isolation . (the GPU machine has no package registry)
#   2. tests    the CUDA tests (tests/test_cuda.py) and the emulated ones, on the GPU's torch
#   3. sanitize compute-sanitizer memcheck, racecheck, synccheck over tests/cuda_sanitizer_driver.py
#   4. bench    cell and sequence against nn.LSTMCell / nn.LSTM (cuDNN), CUDA events after
#               warm-up, medians; includes B=16, T=1024, H=768 bf16
#
# Every log and table goes to benchmarks/results/<gpu name>/. After each part a status line says
# where the run stands, so a run cut off still tells; summary.txt holds the same lines. Budgeted
# for under 8 minutes on an H100/H200 (each part has its own timeout below).
#
#   bash benchmarks/gpu_proof.sh --dry-run   checks this script's plumbing on a machine without a
#                                            GPU: no install, CPU driver, tiny CPU benchmark
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
fi

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"

if [[ $DRY_RUN == 1 ]]; then
  GPU_NAME="dry-run-$(hostname)"
  DEVICE=cpu
else
  if ! GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) || [[ -z $GPU_NAME ]]; then
    echo "gpu_proof: no GPU visible (nvidia-smi failed); use --dry-run to check the script" >&2
    exit 2
  fi
  DEVICE=cuda
fi
SAFE_NAME=$(printf '%s' "$GPU_NAME" | tr -c 'A-Za-z0-9._-' '_')
OUT="$ROOT/benchmarks/results/$SAFE_NAME"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
STARTED=$SECONDS
FAILED=0

status() {
  local line
  line="[gpu_proof $(date +%H:%M:%S) +$((SECONDS - STARTED))s] $*"
  echo "$line"
  echo "$line" >>"$SUMMARY"
}

# run_part NAME TIMEOUT_SECONDS COMMAND...: runs COMMAND with its output in $OUT/NAME.log.
run_part() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/$name.log" began=$SECONDS rc
  status "$name: started (limit ${limit}s), log $log"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  if [[ $rc == 0 ]]; then
    status "$name: PASS in $((SECONDS - began))s"
  else
    FAILED=$((FAILED + 1))
    if [[ $rc == 124 || $rc == 137 ]]; then
      status "$name: TIMEOUT after $((SECONDS - began))s (rc $rc); tail of its log:"
    else
      status "$name: FAIL (rc $rc) in $((SECONDS - began))s; tail of its log:"
    fi
    tail -n 15 "$log" | sed 's/^/    /' | tee -a "$SUMMARY"
  fi
  return 0
}

status "GPU: $GPU_NAME; results in $OUT"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} >"$OUT/environment.txt" 2>&1

# 1. Build. Only the visible GPU's architecture (torch picks it when TORCH_CUDA_ARCH_LIST is
# unset and a GPU is visible): a quarter of the four-architecture CI build's time.
if [[ $DRY_RUN == 1 ]]; then
  status "build: skipped (dry run: uses the in-place build of this worktree)"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  run_part build 150 env LSTM_FUSED_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    python -m pip install --no-build-isolation --no-deps --force-reinstall --disable-pip-version-check .
fi

# Tests import the installed package, and compute-sanitizer runs outside the source tree, where
# the unbuilt sources cannot shadow it.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# 2. Tests on the GPU: the CUDA tests, then the emulated ones (the same kernels on the CPU, as CI
# runs them: a difference between the two passes would point at the emulation).
if [[ $DRY_RUN == 1 ]]; then
  run_part tests 300 pytest -q -p no:cacheprovider -m emulated_cuda tests/test_emulated_cuda.py
else
  run_part tests 120 pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_emulated_cuda.py
fi

# 3. The sanitizers, each over the driver's small shapes.
DRIVER="$ROOT/tests/cuda_sanitizer_driver.py"
if [[ $DRY_RUN == 1 ]]; then
  # A loaded CPU runs the driver in 1-2 minutes (hidden 4096 on the loop).
  run_part sanitizer-driver-cpu 300 env -C "$WORK" python "$DRIVER" cpu
else
  for tool in memcheck racecheck synccheck; do
    run_part "sanitizer-$tool" 60 env -C "$WORK" compute-sanitizer --tool "$tool" --error-exitcode 2 python "$DRIVER"
  done
fi

# 4. The benchmark.
cat >"$WORK/bench.py" <<'PYTHON'
"""Cell and sequence: lstm_fused against nn.LSTMCell and nn.LSTM (cuDNN on the GPU)."""
import json
import statistics
import sys
import time

import torch
from torch import nn

import lstm_fused

device, out_dir = sys.argv[1], sys.argv[2]
on_gpu = device == "cuda"
# Exact float32 products, as the fused kernel computes them; cuDNN's own RNN TF32 default off too.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def timed(fn, warmup, repeats):
    """Median milliseconds of fn(), by CUDA events on the GPU (perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
rows = []

if on_gpu:
    cell_shapes = [(b, h) for b in (1, 8, 16, 64, 256) for h in (256, 768, 2048)]
    cell_dtypes = ["fp32", "bf16"]
    # FlashRNN's condition first (B16 T1024 H768 bf16, against cuDNN's nn.LSTM), then the batch
    # sizes of the issue's sequence targets (<= 64, and <= 8).
    seq_cases = [(16, 1024, 768, "bf16"), (64, 100, 512, "fp32"), (16, 1024, 768, "fp32"), (8, 256, 256, "bf16"),
                 (4, 512, 512, "fp32")]
    warmup, repeats, seq_repeats = 10, 50, 5
else:
    cell_shapes = [(1, 64), (16, 64)]
    cell_dtypes = ["fp32"]
    seq_cases = [(4, 8, 32, "fp32")]
    warmup, repeats, seq_repeats = 1, 3, 2

for dtype_name in cell_dtypes:
    dtype = DTYPES[dtype_name]
    for batch, hidden in cell_shapes:
        ref = nn.LSTMCell(hidden, hidden, device=device, dtype=dtype)
        fused = lstm_fused.LSTMCell(hidden, hidden, device=device, dtype=dtype)
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(batch, hidden, device=device, dtype=dtype, requires_grad=True)
        state = (torch.randn(batch, hidden, device=device, dtype=dtype), torch.randn(batch, hidden, device=device, dtype=dtype))
        for kind in ("forward", "forward+backward"):
            for name, cell in (("lstm_fused", fused), ("nn.LSTMCell", ref)):
                if kind == "forward":
                    def run(cell=cell):
                        with torch.no_grad():
                            cell(x, state)
                else:
                    def run(cell=cell):
                        h, c = cell(x, state)
                        (h.sum() + c.sum()).backward()
                ms = timed(run, warmup, repeats)
                rows.append(dict(part="cell", impl=name, dtype=dtype_name, batch=batch, hidden=hidden, T=1, kind=kind, ms=ms))
        print(f"cell {dtype_name} B={batch} H={hidden} done", flush=True)

for batch, steps, hidden, dtype_name in seq_cases:
    dtype = DTYPES[dtype_name]
    ref = nn.LSTM(hidden, hidden, device=device, dtype=dtype)
    fused = lstm_fused.LSTM(hidden, hidden, device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype, requires_grad=True)
    for kind in ("forward", "forward+backward"):
        for name, model in (("lstm_fused", fused), ("nn.LSTM", ref)):
            if kind == "forward":
                def run(model=model):
                    with torch.no_grad():
                        model(x)
            else:
                def run(model=model):
                    out, _ = model(x)
                    out.sum().backward()
            ms = timed(run, 2, seq_repeats)
            rows.append(dict(part="sequence", impl=name, dtype=dtype_name, batch=batch, hidden=hidden, T=steps, kind=kind, ms=ms))
    # Which path lf.LSTM took (its sequence ops choose per call): the persistent kernels where the
    # shape fits, the loop of per-step GEMMs and pointwise launches elsewhere.
    path = "-"
    if on_gpu:
        from torch.profiler import ProfilerActivity, profile

        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                out, _ = fused(x)
                out.sum().backward()
                torch.cuda.synchronize()
            names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        except (AssertionError, RuntimeError):  # no CUPTI: the path stays unknown
            names = []
        if names:
            forward = any("sequence_forward_persistent" in n for n in names)
            backward = any("sequence_backward_persistent" in n for n in names)
            path = f"fwd {'persistent' if forward else 'loop'}, bwd {'persistent' if backward else 'loop'}"
    for r in rows:
        if r["part"] == "sequence" and (r["dtype"], r["batch"], r["T"], r["hidden"]) == (dtype_name, batch, steps, hidden):
            r["path"] = path
    print(f"sequence {dtype_name} B={batch} T={steps} H={hidden} done", flush=True)

with open(f"{out_dir}/benchmark.json", "w") as f:
    json.dump(dict(device=torch.cuda.get_device_name() if on_gpu else "cpu", torch=torch.__version__, rows=rows), f, indent=1)
with open(f"{out_dir}/benchmark.md", "w") as f:
    f.write("| part | dtype | B | T | H | kind | lstm_fused ms | torch ms | torch / lstm_fused | lstm_fused path |\n|---|---|---|---|---|---|---|---|---|---|\n")
    keyed, paths = {}, {}
    for r in rows:
        key = (r["part"], r["dtype"], r["batch"], r["T"], r["hidden"], r["kind"])
        keyed.setdefault(key, {})[r["impl"]] = r["ms"]
        paths[key] = r.get("path", "-")
    for (part, dtype_name, batch, steps, hidden, kind), impls in keyed.items():
        ours = impls["lstm_fused"]
        theirs = impls.get("nn.LSTMCell", impls.get("nn.LSTM"))
        path = paths[(part, dtype_name, batch, steps, hidden, kind)]
        f.write(f"| {part} | {dtype_name} | {batch} | {steps} | {hidden} | {kind} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.2f}x | {path} |\n")
print(open(f"{out_dir}/benchmark.md").read())
PYTHON
run_part benchmark 120 env -C "$WORK" python bench.py "$DEVICE" "$OUT"

if [[ $FAILED == 0 ]]; then
  status "done: every part passed in $((SECONDS - STARTED))s; tables in $OUT/benchmark.md"
else
  status "done: $FAILED part(s) failed in $((SECONDS - STARTED))s; see $SUMMARY"
fi
exit $((FAILED > 0 ? 1 : 0))
