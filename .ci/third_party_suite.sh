#!/usr/bin/env bash
# Runs the test suite of a real async library that is not ours (aiostream, from its PyPI
# sdist) three times and compares every test's outcome:
#
#   plain         no agent
#   agent         ASYNCDIAG_ENABLED=1 (the agent, nothing instrumented)
#   instrumented  ASYNCDIAG_ENABLED=1 ASYNCDIAG_INSTRUMENT='aiostream.*' (the whole package)
#
# The instrumentation must be invisible: "instrumented" must match "agent" test for test
# (exit 1 otherwise). "plain" vs "agent" is printed too and, with STRICT_PLAIN=1, enforced.
# Also checks that the glob really patched aiostream's classes, and prints the timings.
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
    printf '%-13s %6.2f s   %s\n' "$name" "$(echo "$ended - $started" | bc)" \
        "$(tail -n 1 "$work/$name.log")"
}

clean_env=(-u ASYNCDIAG_ENABLED -u ASYNCDIAG_INSTRUMENT ASYNCDIAG_EXPORTER=none)
run_suite plain "${clean_env[@]}"
run_suite agent "${clean_env[@]}" ASYNCDIAG_ENABLED=1
run_suite instrumented "${clean_env[@]}" ASYNCDIAG_ENABLED=1 ASYNCDIAG_INSTRUMENT='aiostream.*'

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


plain, agent, instrumented = (outcomes(n) for n in ("plain", "agent", "instrumented"))
if not plain:
    sys.exit("no test results: the suite did not run")


def differences(a, b):
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


status = 0
diff = differences(agent, instrumented)
print(f"tests: {len(plain)}; instrumented vs agent: {len(diff)} difference(s)")
for key in diff:
    print(f"  {key}: agent={agent.get(key)} instrumented={instrumented.get(key)}")
    status = 1
diff_plain = differences(plain, agent)
print(f"agent vs plain: {len(diff_plain)} difference(s)")
for key in diff_plain:
    print(f"  {key}: plain={plain.get(key)} agent={agent.get(key)}")
if diff_plain and os.environ.get("STRICT_PLAIN") == "1":
    status = 1
sys.exit(status)
EOF
