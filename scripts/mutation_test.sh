#!/usr/bin/env bash
# Mutation testing of one module against the tests that should catch its bugs (mutmut 3).
#
#   bash scripts/mutation_test.sh improved_diffusion/sampling/noise_schedules.py \
#       improved_diffusion/sampling/test_noise_schedules.py
#
# Copies the working tree to a scratch folder (the checkout is never touched), mutates only the
# given module, runs only the given tests against each mutant, and prints the survivors and the
# score: killed / (killed + survived), where mutants no test reaches count as survived. Needs the
# `mutation` extra: pip install -e '.[test,mutation]'. Inspect a survivor with
# `cd <scratch folder> && mutmut show <name>` (the folder is printed and kept).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/mutation_test.sh MODULE.py TEST_FILE.py [MORE_TESTS...]" >&2
  exit 2
fi
module=$1; shift
cd "$(dirname "$0")/.."
for path in "$module" "$@"; do
  [ -f "$path" ] || { echo "mutation_test.sh: error: $path is not a file in this checkout." >&2; exit 2; }
done
command -v mutmut > /dev/null || { echo "mutation_test.sh: error: mutmut is not installed; pip install -e '.[test,mutation]'." >&2; exit 2; }

scratch=$(mktemp -d "${TMPDIR:-/tmp}/mutation.XXXXXX")
work="$scratch/checkout"
mkdir "$work"
git ls-files -co --exclude-standard -- improved_diffusion scripts pytest.ini setup.py | tar -cf - -T - | tar -xf - -C "$work"
# The tests may read ../shared/reference (fixtures), which sits beside the checkout.
if [ -d ../shared ]; then ln -s "$(cd ../shared && pwd)" "$scratch/shared"; fi
{
  echo "[mutmut]"
  echo "source_paths = $module"
  echo "pytest_add_cli_args_test_selection ="
  for test in "$@"; do echo "    $test"; done
  echo "also_copy ="
  echo "    improved_diffusion"
  echo "    scripts"
  echo "    pytest.ini"
} > "$work/setup.cfg"
cd "$work"
export HYPOTHESIS_PROFILE=mutation  # 20 examples per property test (improved_diffusion/conftest.py)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # mutmut runs one child per core; tiny tests are fastest on one thread
echo "mutating $module against $*, in $work" >&2
mutmut run > mutmut.log 2>&1 || { tail -20 mutmut.log >&2; exit 1; }
mutmut results > results.txt 2>&1 || true
survived=$(grep -c ": survived" results.txt || true)
no_tests=$(grep -c ": no tests" results.txt || true)
total=$(python - <<'PY'
import glob, json
n = 0
for path in glob.glob("mutants/**/*.meta", recursive=True):
    n += len(json.load(open(path)).get("exit_code_by_key", {}))
print(n)
PY
)
grep -E ": (survived|no tests)" results.txt | sed 's/^ *//' || true
killed=$((total - survived - no_tests))
echo "$module: $killed of $total mutants killed ($survived survived, $no_tests reached by no test): $(python -c "print(f'{100 * $killed / max($total, 1):.1f}')") %"
