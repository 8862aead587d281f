#!/usr/bin/env bash
# A profile-guided release build of pgweir. Run by hand (not in CI):
#
#   benches/pgo_build.sh                      # → target/pgo/release/pgweir
#   PGWEIR=target/pgo/release/pgweir benches/pgbench_compare.sh
#
# Why: pgweir's hot paths are many small branches spread over tokio, the session's async state
# machines and the protocol code. With a profile, LLVM lays the taken paths out together and
# inlines by measured frequency: on the 2-core reference VM (docs/performance.md round 26)
# 11–15 % fewer instructions per transaction and per login, and ~30 % less user time per
# `pgbench -C` connection.
#
# How: builds pgweir instrumented (-Cprofile-generate) into target/pgo-gen, trains it with the
# pgbench harness (benches/pgbench_compare.sh: a throwaway PostgreSQL, then -S, tpcb-like and
# -C, each under -M simple, extended and prepared, at 10 and 100 clients, TRAIN_DURATION
# seconds per run; the harness's table is written to the work dir and discarded), merges the
# profile pgweir writes when it exits, and builds again with -Cprofile-use into target/pgo.
# Needs the harness's tools (PostgreSQL server binaries, pgbench, PgBouncer) and llvm-profdata
# from rustc's own LLVM: `rustup component add llvm-tools`.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
TRAIN_DURATION=${TRAIN_DURATION:-5}

# A Debian llvm-profdata reads another LLVM's format: only the toolchain's own will do.
PROFDATA=$(find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f 2>/dev/null | head -n 1)
if [[ -z $PROFDATA ]]; then
    echo "llvm-profdata not found in rustc's sysroot: run 'rustup component add llvm-tools'" >&2
    exit 1
fi

WORK=$(mktemp -d /tmp/pgweir-pgo.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/train"

echo "== instrumented build (target/pgo-gen)" >&2
# Build scripts are instrumented too and write their own profiles while building: they go to
# build-raw; pgweir's training profile goes where LLVM_PROFILE_FILE says.
RUSTFLAGS="-Cprofile-generate=$WORK/build-raw" CARGO_TARGET_DIR="$ROOT/target/pgo-gen" \
    cargo build --release

echo "== training run (benches/pgbench_compare.sh)" >&2
LLVM_PROFILE_FILE="$WORK/train/pgweir-%p.profraw" \
    PGWEIR="$ROOT/target/pgo-gen/release/pgweir" RESULTS_DIR="$WORK" \
    DURATION="$TRAIN_DURATION" MODES="select tpcb connect" PROTOCOLS="simple extended prepared" \
    CLIENTS="10 100" benches/pgbench_compare.sh >"$WORK/train.log" 2>&1 || {
    tail -n 20 "$WORK/train.log" >&2
    echo "the training run failed" >&2
    exit 1
}
shopt -s nullglob
raw=("$WORK"/train/*.profraw)
if [[ ${#raw[@]} == 0 ]]; then
    # pgweir writes its profile when it exits: a kill -9 (or a crash) leaves none.
    echo "pgweir left no profile in $WORK/train; see the harness log:" >&2
    tail -n 20 "$WORK/train.log" >&2
    exit 1
fi
"$PROFDATA" merge -o "$WORK/pgweir.profdata" "${raw[@]}"

echo "== optimised build (target/pgo)" >&2
RUSTFLAGS="-Cprofile-use=$WORK/pgweir.profdata" CARGO_TARGET_DIR="$ROOT/target/pgo" \
    cargo build --release
echo "built $ROOT/target/pgo/release/pgweir" >&2
