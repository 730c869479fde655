#!/usr/bin/env bash
# A/B timing of two relprop source trees on one machine, interleaved so that both see the same
# machine state: the GPU machines' hosts are noisy (session 14's ResNet50 rows spread by 30 %
# between runs), so two tables taken minutes apart compare the hosts as much as the code.
#
#   bash scripts/gpu_ab.sh OLD_TREE [ROUNDS]
#
# OLD_TREE is a source tree of the version to compare against, made where git is, e.g.
#   mkdir -p .ab/old && git archive e209af3 | tar -x -C .ab/old
# and carried to the machine (.ab is git-ignored: name it in the device tool's `carry`). The
# working tree is the other side ("new"). Each tree is built into a directory of its own
# (pip --target; CUDAARCHS=90 unless set), then every round runs benchmarks/run.py once per tree
# (this tree's script against that tree's relprop), alternating which goes first. BENCH_ARGS
# adds run.py options (default: float32, relprop's default backend, no memory column); DEVICE
# (default cuda) lets a CPU smoke-test the script. Writes $OUT/ab/{old,new}_<round>.csv and
# prints each row's time as a multiple of the gradient, median over the rounds, per tree.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || ! -f $1/pyproject.toml ]]; then
    echo "usage: bash scripts/gpu_ab.sh OLD_TREE [ROUNDS]  (OLD_TREE: a relprop source tree)" >&2
    exit 2
fi
old_tree=$(cd "$1" && pwd)
rounds=${2:-3}
OUT=${OUT:-out/gpu}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS:---dtype float32 --relprop-backends default --providers relprop --no-memory}
ab=$OUT/ab
mkdir -p "$ab"
export PYTHONUNBUFFERED=1

# Zennit and Captum as wheels (benchmarks/README.md), as scripts/gpu.sh installs them.
extra=
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$ab/wheels" .whl/*.whl || exit 1
    extra=$(cd "$ab/wheels" && pwd)
fi

build() {  # build TREE into SITE, in a CMake build tree of its own (SITE.build)
    local tree=$1 site=$2 start=$SECONDS
    rm -rf "$site"
    mkdir -p "$site.build"
    CUDAARCHS=${CUDAARCHS:-90} "$PY" -m pip install -q --no-build-isolation --no-deps \
        --config-settings=build-dir="$(cd "$site.build" && pwd)" --target "$site" "$tree" \
        >"$site.log" 2>&1 || { tail -40 "$site.log"; exit 1; }
    echo "built $tree in $((SECONDS - start)) s"
}
build "$PWD" "$ab/site_new"
build "$old_tree" "$ab/site_old"

run() {  # run SIDE ROUND
    local side=$1 round=$2 site
    site=$(cd "$ab/site_$side" && pwd)
    # An editable install's import hook (a developer's .venv) wins over PYTHONPATH: the run would
    # time that tree twice. gpu.sh installs relprop plainly, which PYTHONPATH does shadow.
    if ! PYTHONPATH=$site "$PY" -c "import relprop, sys; sys.exit(not relprop.__file__.startswith('$site'))"; then
        echo "relprop does not import from $site (an editable install shadows it?): run this" \
            "where relprop is installed plainly (scripts/gpu.sh does) or not at all" >&2
        exit 1
    fi
    echo "=== round $round: $side"
    # shellcheck disable=SC2086  # BENCH_ARGS holds several words
    PYTHONPATH=$site${extra:+:$extra} "$PY" benchmarks/run.py --device "$DEVICE" \
        --csv "$ab/${side}_$round.csv" $BENCH_ARGS >"$ab/${side}_$round.log" 2>&1 \
        || { tail -30 "$ab/${side}_$round.log"; exit 1; }
}
for round in $(seq "$rounds"); do
    if ((round % 2)); then run old "$round"; run new "$round"; else run new "$round"; run old "$round"; fi
done

"$PY" - "$ab" "$rounds" <<'EOF'
import csv, statistics, sys
from pathlib import Path

ab, rounds = Path(sys.argv[1]), int(sys.argv[2])
ratios: dict[tuple, dict[str, list[float]]] = {}
for side in ("old", "new"):
    for round_ in range(1, rounds + 1):
        with open(ab / f"{side}_{round_}.csv") as f:
            for row in csv.DictReader(f):
                key = (row["model"], row["dtype"], row["method"], row["provider"])
                ratios.setdefault(key, {}).setdefault(side, []).append(float(row["ratio_to_gradient"]))
print(f"\n× gradient, median of {rounds} interleaved rounds (old: the tree given, new: this one)\n")
print("| model | dtype | method | provider | old | new | new ÷ old |")
print("| --- | --- | --- | --- | ---: | ---: | ---: |")
for key, sides in ratios.items():
    old, new = (statistics.median(sides[s]) if s in sides else float("nan") for s in ("old", "new"))
    print(f"| {' | '.join(key)} | {old:.3f} | {new:.3f} | {new / old:.3f} |")
EOF
