#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ under libFuzzer for a bounded time, and fails on any
# crash, panic, timeout or out-of-memory. `./test` runs it after the tests; it also runs by hand.
#
#   scripts/fuzz.sh [SECONDS]   # seconds per target: default $SPIKE_FUZZ_SECONDS, else 20;
#                               # 0 skips fuzzing (an explicit choice, said so in the output)
#
# - cargo-fuzz $CARGO_FUZZ_VERSION is installed when missing into
#   ${SPIKE_TOOLS_DIR:-$HOME/.cache/spike-tools}/cargo-fuzz.
# - It runs on the stable toolchain: RUSTC_BOOTSTRAP=1 for cargo-fuzz's flags, `-s none` (no
#   sanitizer runtime needed; the targets are safe Rust, so a bug shows as a panic).
# - fuzz/Cargo.lock is committed and checked with `cargo fetch --locked` first (cargo-fuzz has no
#   --locked); the instrumented build goes to ${SPIKE_FUZZ_TARGET_DIR:-$HOME/.cache/spike-fuzz-target},
#   outside the clone, and is reused.
# - Each run starts from the committed seeds in fuzz/corpus/<target> with an empty working
#   corpus of its own (removed afterwards): a corpus kept from run to run would spend a growing
#   share of the fixed time replaying itself (policy_pattern fell from 346k to 147k executions in
#   20 s after three runs, at 4,800 inputs).
# - A crashing input is written to fuzz/artifacts/<target>/ (ignored by git): fix the bug and add
#   the input to the seeds in tests/fuzz_smoke.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds="${1:-${SPIKE_FUZZ_SECONDS:-20}}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
  echo "fuzz.sh: seconds per target must be a whole number, not '$seconds'" >&2
  exit 2
fi
if [[ "$seconds" -eq 0 ]]; then
  echo "fuzz: skipped (SPIKE_FUZZ_SECONDS=0)"
  exit 0
fi
tools="${SPIKE_TOOLS_DIR:-$HOME/.cache/spike-tools}"
target_dir="${SPIKE_FUZZ_TARGET_DIR:-$HOME/.cache/spike-fuzz-target}"
cargo_fuzz="$tools/cargo-fuzz/bin/cargo-fuzz"

if ! "$cargo_fuzz" --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools/cargo-fuzz"
  # Without CARGO_TARGET_DIR (./test sets it): its build goes to a temporary directory.
  env -u CARGO_TARGET_DIR cargo install --locked --quiet cargo-fuzz \
    --version "$CARGO_FUZZ_VERSION" --root "$tools/cargo-fuzz"
fi

if ! cargo fetch --locked --manifest-path fuzz/Cargo.toml; then
  echo "fuzz: fuzz/Cargo.lock is out of date: run 'cargo update --manifest-path fuzz/Cargo.toml -p spike' and commit it" >&2
  exit 1
fi

# The same flags for the build and every run, so a run finds the build up to date.
fuzz() {
  "$cargo_fuzz" "$1" -s none --target-dir "$target_dir" "${@:2}"
}

started=$SECONDS
fuzz build
echo "fuzz: instrumented build ready in $((SECONDS - started))s ($target_dir)"

logs="$(mktemp -d "${TMPDIR:-/tmp}/spike-fuzz.XXXXXX")"
trap 'rm -rf "$logs"' EXIT
failed=()
for t in $("$cargo_fuzz" list); do
  corpus="$logs/corpus/$t"
  mkdir -p "$corpus"
  seeds=()
  [[ -d "fuzz/corpus/$t" ]] && seeds=("fuzz/corpus/$t")
  # New inputs go to the first directory. -timeout: an input that takes this long is a finding
  # (a decoder that can be made to spin).
  if fuzz run "$t" "$corpus" "${seeds[@]}" -- -max_total_time="$seconds" -timeout=10 \
    -print_final_stats=1 >"$logs/$t.log" 2>&1; then
    outcome=ok
  else
    outcome=FAILED
    failed+=("$t")
  fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -n 1)"
  cov="$(grep -o 'cov: [0-9]*' "$logs/$t.log" | tail -n 1 || true)"
  echo "fuzz: $t: ${runs:-?} executions in ${seconds}s, ${cov:-cov: ?}, $(find "$corpus" -type f | wc -l) new inputs: $outcome"
  if [[ "$outcome" != ok ]]; then
    # libFuzzer's report and cargo-fuzz's "Failing input" / "Reproduce with", without the
    # backtrace of cargo-fuzz itself.
    sed '/^Error: Fuzz target exited/,$d' "$logs/$t.log" | tail -n 60 >&2
  fi
done
echo "fuzz: ${#failed[@]} of $("$cargo_fuzz" list | wc -l) targets failed, $((SECONDS - started))s in all"
if [[ "${#failed[@]}" -gt 0 ]]; then
  echo "fuzz: failing targets: ${failed[*]}; the inputs are in fuzz/artifacts/<target>/ (\`cargo fuzz\` above is $cargo_fuzz); fix the bug and add the input to tests/fuzz_smoke.rs" >&2
  exit 1
fi
