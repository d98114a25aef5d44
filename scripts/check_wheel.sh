#!/usr/bin/env bash
# Wheel check: build detector's wheel, install it into a fresh virtual environment (pip resolves the dependencies
# from the wheel's metadata; torch comes from local files) and use it from a folder outside the checkout:
#   detector train --epochs 1 --img 64      (built-in dataset, generated in the user cache)
#   python -c "import detector; detector.DetectionModel('yolov5s.yaml')"      (a packaged model YAML)
#   detector val --data coco128.yaml --weights yolov5n.pt --img 320            (a packaged dataset YAML)
# It fails when the wheel lacks a YAML of detector/configs, when a command fails, when val's mAP50 is not that of
# a trained model, or when anything is written inside the installed package.
# Needs ../shared (or $DETECTOR_SHARED) with datasets/coco128 and weights/yolov5n.pt, as the tests do.
# Usage: bash scripts/check_wheel.sh      (run by .ci/run after the tests; about 3-4 minutes on 2 cores)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
shared="$(cd "${DETECTOR_SHARED:-$repo/../shared}" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/detector-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
started=$SECONDS

step() {
    echo "wheel check [$((SECONDS - started))s]: $*"
}

# 1. Build from a copy of the files git would commit (tracked and new, not ignored), so that the checkout gets no
#    build/ or egg-info, and a file that only exists locally cannot make the wheel look complete.
step "building the wheel"
mkdir "$work/src"
(
    cd "$repo"
    git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
        if [[ -e "$file" || -L "$file" ]]; then printf '%s\0' "$file"; fi # skip files deleted but not yet committed
    done | tar --null -T - -cf - | tar -C "$work/src" -xf -
)
python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src"
wheel=("$work"/dist/detector-*.whl)
python - "${wheel[0]}" "$work/src/detector/configs" <<'EOF'
import sys
import zipfile
from pathlib import Path

wheel, configs = sys.argv[1], Path(sys.argv[2])
expected = {f"detector/configs/{p.relative_to(configs).as_posix()}" for p in configs.rglob("*.yaml")}
packed = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("detector/configs/")}
if not expected or expected - packed:
    sys.exit(f"wheel check: {wheel} lacks {sorted(expected - packed) or 'every YAML'}")
print(f"wheel check: {len(packed)} YAMLs in {Path(wheel).name}")
EOF

# 2. A fresh virtual environment with nothing but the wheel and what its metadata asks for. Everything from here
#    on runs in a folder outside the checkout (python -c puts the working folder first on sys.path).
step "installing it into a fresh virtual environment"
mkdir "$work/run"
cd "$work/run"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-compile "${wheel[0]}" >"$work/pip.log" 2>&1 || {
    tail -40 "$work/pip.log" >&2
    exit 1
}
package="$("$work/venv/bin/python" -c 'import detector, pathlib; print(pathlib.Path(detector.__file__).parent)')"
case "$package" in
"$work/venv/"*) ;;
*)
    echo "wheel check: detector imports from $package, not from the fresh environment" >&2
    exit 1
    ;;
esac
list_package() { (cd "$package" && find . -path '*/__pycache__' -prune -o -print | sort); }
list_package >"$work/package-before.txt"

# 3. The three commands.
export PATH="$work/venv/bin:$PATH"
step "detector train --epochs 1 --img 64 (built-in dataset)"
detector train --epochs 1 --img 64 >"$work/train.log" 2>&1 || {
    tail -40 "$work/train.log" >&2
    exit 1
}
test -f runs/train/exp/weights/last.pt || {
    echo "wheel check: train wrote no runs/train/exp/weights/last.pt in the working folder" >&2
    exit 1
}

step "python -c \"import detector; detector.DetectionModel('yolov5s.yaml')\""
python -c "import detector; detector.DetectionModel('yolov5s.yaml')"

step "detector val --data coco128.yaml --weights $shared/weights/yolov5n.pt --img 320"
DETECTOR_DATASETS_DIR="$shared/datasets" detector val --data coco128.yaml --weights "$shared/weights/yolov5n.pt" \
    --img 320 >"$work/val.log" 2>&1 || {
    tail -40 "$work/val.log" >&2
    exit 1
}
# The summary row: "all  <images>  <instances>  P  R  mAP50  mAP50-95"; yolov5n scores about 0.45 mAP50 here.
map50="$(tr '\r' '\n' <"$work/val.log" | awk '$1 == "all" && NF == 7 {value = $6} END {print value}')"
if ! awk -v m="${map50:-0}" 'BEGIN {exit !(m > 0.3)}'; then
    tail -20 "$work/val.log" >&2
    echo "wheel check: val on coco128 gave mAP50 '${map50}', expected above 0.3" >&2
    exit 1
fi

list_package >"$work/package-after.txt"
if ! diff -u "$work/package-before.txt" "$work/package-after.txt" >&2; then
    echo "wheel check: the commands above wrote inside the installed package $package" >&2
    exit 1
fi
step "done (val mAP50 $map50)"
echo "wheel-check: 3 passed, 0 failed"
