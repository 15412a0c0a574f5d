#!/usr/bin/env bash
# Runs the test suite of a real async library that is not ours (aiostream, from its PyPI
# sdist) four times and compares every test's outcome:
#
#   plain              no agent
#   instrumented       ASYNCDIAG_ENABLED=1 ASYNCDIAG_INSTRUMENT='aiostream.*' (the whole
#                      package), ASYNCDIAG_TRACK_ASYNCGENS=0
#   agent              ASYNCDIAG_ENABLED=1 (every component, nothing instrumented)
#   agent+instrumented ASYNCDIAG_ENABLED=1 ASYNCDIAG_INSTRUMENT='aiostream.*'
#
# The instrumentation must be invisible: "instrumented" must match "plain", and
# "agent+instrumented" must match "agent", test for test (exit 1 otherwise). "agent" vs
# "plain" is printed too and, with STRICT_PLAIN=1, enforced (aiostream's virtual-time test
# loop counts the loop's timer steps, which the orphaned-generator tracker's periodic tick
# changes). Also checks that the glob really patched aiostream's classes; prints timings.
#
#   bash .ci/third_party_suite.sh [python]     # default: python3; a venv is made in
#                                              # .venv-thirdparty-<version>
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

AIOSTREAM_VERSION="${AIOSTREAM_VERSION:-0.8.1}"
python="${1:-python3}"
label="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
venv="$repo/.venv-thirdparty-$label"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pip_quiet() {
    # Local mirror entries in the machine's pip configuration warn when absent; noise only.
    "$venv/bin/python" -m pip "$@" -q 2> >(grep -v "is ignored: it is neither" >&2)
}

[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip_quiet install --upgrade pip
pip_quiet install "$repo" pytest pytest-asyncio typing-extensions
pip_quiet download --no-binary :all: --no-deps -d "$work" "aiostream==$AIOSTREAM_VERSION"
tar -xzf "$work"/aiostream-*.tar.gz -C "$work"
src="$(echo "$work"/aiostream-*/)"
# The package under test is the sdist's own source tree (what its tests import).
pip_quiet install --no-deps "$src"

echo "=== aiostream $AIOSTREAM_VERSION test suite, Python $label ==="
(cd "$src" && "$venv/bin/python" - <<'EOF'
import sys
import asyncdiag
asyncdiag.install(instrument="aiostream.*", exporter="none")
import aiostream  # noqa: F401  imported after install: patched by the import hooks
import aiostream.test_utils  # noqa: F401
from asyncdiag import _proxies
patched = []
for name, module in list(sys.modules.items()):
    if name == "aiostream" or name.startswith("aiostream."):
        for attr, value in list(vars(module).items()):
            if isinstance(value, type) and value.__module__ == name and any(
                getattr(vars(value).get(d), "__asyncdiag_instrumented__", False)
                for d in ("__aenter__", "__anext__")
            ):
                patched.append(f"{name}.{attr}")
            elif isinstance(value, _proxies.InstrumentedFunction):
                patched.append(f"{name}.{attr}")
asyncdiag.uninstall()
print(f"instrumented by 'aiostream.*': {', '.join(sorted(patched))}")
if len(patched) < 4:
    sys.exit("the glob instrumented too little of aiostream")
EOF
)

run_suite() {
    local name="$1"
    shift
    local started ended
    started=$(date +%s.%N)
    (cd "$src" && env "$@" "$venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts="" \
        --junitxml="$work/$name.xml" tests >"$work/$name.log" 2>&1) || true
    ended=$(date +%s.%N)
    printf '%-13s %6.2f s   %s\n' "$name" "$("$venv/bin/python" -c "print($ended - $started)")" \
        "$(tail -n 1 "$work/$name.log")"
}

clean_env=(-u ASYNCDIAG_ENABLED -u ASYNCDIAG_INSTRUMENT -u ASYNCDIAG_TRACK_ASYNCGENS
           ASYNCDIAG_EXPORTER=none)
run_suite plain "${clean_env[@]}"
run_suite instrumented "${clean_env[@]}" ASYNCDIAG_ENABLED=1 ASYNCDIAG_INSTRUMENT='aiostream.*' \
    ASYNCDIAG_TRACK_ASYNCGENS=0
run_suite agent "${clean_env[@]}" ASYNCDIAG_ENABLED=1
run_suite agent+instr "${clean_env[@]}" ASYNCDIAG_ENABLED=1 ASYNCDIAG_INSTRUMENT='aiostream.*'

"$venv/bin/python" - "$work" <<'EOF'
import os
import sys
import xml.etree.ElementTree as ET

work = sys.argv[1]


def outcomes(name):
    tree = ET.parse(os.path.join(work, f"{name}.xml"))
    result = {}
    for case in tree.iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[key] = kinds[0] if kinds else "passed"
    return result


runs = {n: outcomes(n) for n in ("plain", "instrumented", "agent", "agent+instr")}
if not runs["plain"]:
    sys.exit("no test results: the suite did not run")
print(f"tests: {len(runs['plain'])}, passed plainly: "
      f"{sum(v == 'passed' for v in runs['plain'].values())}")


def compare(a, b, strict):
    diff = sorted(k for k in set(runs[a]) | set(runs[b]) if runs[a].get(k) != runs[b].get(k))
    print(f"{b} vs {a}: {len(diff)} difference(s)" + ("" if strict else " (informational)"))
    for key in diff:
        print(f"  {key}: {a}={runs[a].get(key)} {b}={runs[b].get(key)}")
    return 1 if diff and strict else 0


status = compare("plain", "instrumented", True)
status |= compare("agent", "agent+instr", True)
status |= compare("plain", "agent", os.environ.get("STRICT_PLAIN") == "1")
sys.exit(status)
EOF
