#!/usr/bin/env bash
# relprop supports Triton >= 3.0 (torch 2.4's); CI runs one release. This checks the others:
# each version is installed from the package index beside this checkout's torch (pip --target,
# nothing else changes) and
#
#   compile      every launch of benchmarks/triton_resources.py's quick set, compiled for sm_90
#                and sm_80 with that release's compiler and ptxas: fails on a compile error or a
#                compiler crash (spills are reported, not failed: the tiles are sized for 3.6+)
#   interpreter  the Triton kernel tests under TRITON_INTERPRET=1 with that release's
#                interpreter, beside the NumPy it can use (see the install below)
#
#   bash scripts/triton_versions.sh [VERSION ...]     default: 3.0.0 to 3.9.0, one release each
#
# No GPU is needed. Wheels are cached in ${TRITON_VERSIONS_DIR:-~/.cache/relprop/triton}; a summary
# line per version and architecture goes to stdout, logs to $OUT (default out/triton_versions).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CACHE=${TRITON_VERSIONS_DIR:-$HOME/.cache/relprop/triton}
OUT=${OUT:-out/triton_versions}
mkdir -p "$CACHE" "$OUT"
versions=("$@")
[[ ${#versions[@]} -eq 0 ]] && versions=(3.0.0 3.1.0 3.2.0 3.3.1 3.4.0 3.5.1 3.6.0 3.7.1 3.8.0 3.9.0)
failed=0
for version in "${versions[@]}"; do
    site=$CACHE/$version
    # The 3.0 and 3.1 interpreters were built against NumPy 1 and read wrong values under NumPy 2;
    # the later ones convert one-element arrays to ints, which NumPy 2.4 refuses.
    numpy="numpy<2.3"
    [[ $version == 3.0.* || $version == 3.1.* ]] && numpy="numpy<2"
    # .complete names the NumPy installed beside the release: a cache made with another remade.
    if [[ "$(cat "$site/.complete" 2>/dev/null)" != "$numpy" ]]; then
        rm -rf "$site"
        "$PY" -m pip install -q --no-deps --target "$site" "triton==$version" "$numpy" \
            && echo "$numpy" >"$site/.complete" \
            || { echo "$version: install failed"; failed=1; continue; }
    fi
    for arch in 90 80; do
        log=$OUT/compile_${version}_sm${arch}
        env -u TRITON_INTERPRET PYTHONPATH="$site" "$PY" benchmarks/triton_resources.py --quick \
            --arch "$arch" --check --allow-spills --markdown "$log.md" >"$log.log" 2>&1
        status=$?
        echo "triton $version sm_$arch compile: $(grep 'variants,' "$log.md" 2>/dev/null \
            || echo 'no table') (rc $status)"
        [[ $status -ne 0 ]] && failed=1
    done
    log=$OUT/interpreter_${version}.log
    TRITON_INTERPRET=1 PYTHONPATH="$site" "$PY" -m pytest -q -p no:cacheprovider -W ignore \
        tests/kernels/test_triton_conv.py tests/kernels/test_triton_linear.py >"$log" 2>&1
    status=$?
    echo "triton $version interpreter: $(tail -1 "$log") (rc $status)"
    [[ $status -ne 0 ]] && failed=1
done
exit $failed
