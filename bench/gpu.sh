#!/usr/bin/env bash
# GPU benchmarks, one section per call (each fits a 10-minute command limit on an H100), from the repository root:
#   bash bench/gpu.sh throughput|defaults|sweep|ttq|coldstart|pipeline|quality|frontier|large|print|print-nspt|all
# Writes JSON lines (and the sweep's plot) to $OUT if set (the lent-device tool), else docs/bench/, named after the
# GPU (h100.jsonl, h100-sweep.jsonl, h100.png, ...). `python -m bench.report FILE...` turns them into tables.
# Packages the machine lacks travel as wheels in .whl/ (see docs/performance.md, "Running on a GPU").
set -euo pipefail
section=${1:-throughput}
out=${OUT:-docs/bench}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/nst-inductor-cache}
py=python3
print_work=/tmp/nst-print-size  # bench.print_size's pictures; only its JPEGs come back (neural-style-pt's PNGs stay)
gpu=$($py -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv || true

run() {
  case $1 in
    throughput) $py -m bench.throughput --size 512 --out "$out/$gpu.jsonl" ;;
    defaults) $py -m bench.throughput --size 512 --preset none --configs reference,bf16,bf16-compile \
                --out "$out/$gpu-defaults.jsonl" ;;
    sweep) $py -m bench.throughput --size 512 --skip-throughput --plot "$out/$gpu.png" --budget-s 480 \
             --out "$out/$gpu-sweep.jsonl" ;;
    ttq) $py -m bench.throughput --size 512 --skip-throughput --ttq --history-sweep --out "$out/$gpu-ttq.jsonl" ;;
    coldstart) $py -m bench.throughput --size 512 --skip-throughput --cold-start --out "$out/$gpu-coldstart.jsonl" ;;
    pipeline) $py -m bench.pipeline --out "$out/$gpu-pipeline.jsonl" ;;
    # 512 px, 200 iterations; NSPT=/path/to/neural-style-pt adds it beside ours (docs/quality.md)
    quality) $py -m bench.quality ${NSPT:+--neural-style-pt "$NSPT"} --out "$out/quality-$gpu.jsonl" ;;
    # the two-axis frontiers at 512 px / 200 iterations (docs/quality.md section 3); NSPT adds neural-style-pt's
    frontier) $py -m bench.frontier --size 512 --iterations 200 ${NSPT:+--neural-style-pt "$NSPT"} \
                --configs defaults --weights 0.3,1,3,10,30 --out "$out/quality-frontier-$gpu.jsonl" \
                --plots "$out/frontier-$gpu" ;;
    # 1024/2048/4096 px (issue 30): peak memory against nst.engine.memory's model (one scale, 20 iterations), then the
    # time per pair of the default coarse-to-fine schedule at 500 iterations
    large) $py -m bench.memory_model --device cuda --sizes 1024,2048,4096 --iterations 20 --out "$out/$gpu-large.jsonl"
           $py -m bench.memory_model --device cuda --sizes 1024,2048,4096 --iterations 500 --schedule \
             --out "$out/$gpu-large.jsonl" ;;
    # issue 30's comparison at 1024 px (docs/quality.md section 8): our coarse-to-fine default and one scale, 500 steps,
    # style weights 1, 3, 10, the four pairs in one batch; then neural-style-pt's multires recipe (NSPT=checkout, carried)
    # judged at the schedule's time (REFERENCE=the first section's print-size.jsonl, carried in the tree)
    print) $py -m bench.print_size --workdir "$print_work" --out "$out/print-size-$gpu.jsonl"
           mkdir -p "$out/print-size" && cp "$print_work"/*.jpg "$out/print-size/" ;;
    print-nspt) if ! $py -c "import torchvision" 2>/dev/null; then  # neural_style.py imports it (bench/gpu_prepare.sh)
                  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$NSPT"/wheels/*.whl
                  export PYTHONPATH=/tmp/site:$PYTHONPATH
                fi
                $py -m bench.print_size --series nspt --neural-style-pt "$NSPT" ${REFERENCE:+--reference "$REFERENCE"} \
                  --workdir "$print_work" --out "$out/print-size-nspt-$gpu.jsonl"
                mkdir -p "$out/print-size" && cp "$print_work"/*.jpg "$out/print-size/" ;;
    *) echo "unknown section $1 (throughput|defaults|sweep|ttq|coldstart|pipeline|quality|frontier|large|print|print-nspt|all)" >&2
       exit 2 ;;
  esac
}

if [ "$section" = all ]; then
  for s in throughput defaults sweep ttq coldstart pipeline quality frontier large print; do run "$s"; done
else
  run "$section"
fi
