#!/usr/bin/env bash
# Downloads the peers that `python -m bench` compares against (Liger-Kernel, Cut Cross-Entropy)
# as wheels into .whl/ (git-ignored), for the GPU machine, which has no network. Run it here,
# where there is network; the GPU run then carries .whl/ and bench/gpu_check.sh installs it.
#
#   bash bench/fetch_peers.sh            # the pinned versions below
#   PEERS="liger-kernel==X cut-cross-entropy==Y" bash bench/fetch_peers.sh
#
# The wheels are for CPython 3.12 on x86-64 Linux (the GPU image); both peers are pure Python
# and need only torch and triton, which that image has. Any other requirement (without an
# extra) is fetched too, until nothing is missing. bench/providers.py calls the APIs of the
# pinned versions: re-read it when you change them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PEERS=${PEERS:-"liger-kernel==0.8.5 cut-cross-entropy==25.1.1"}
# The GPU tests' runner, in case the image lacks it (gpu_check.sh runs python -m pytest -m gpu;
# its requirements, pluggy and iniconfig, come with the round below).
TOOLS=${TOOLS:-"pytest==8.3.5"}
# What the GPU image already has (not fetched): torch, triton and what they pull in.
PRESENT=${PRESENT:-"torch triton numpy filelock typing-extensions sympy networkx jinja2 fsspec setuptools"}
DEST=.whl

download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$DEST" "$@"
}

rm -rf "$DEST"
mkdir -p "$DEST"
# shellcheck disable=SC2086
download $PEERS $TOOLS
# Requirements of the fetched wheels that the image lacks, one round at a time.
for _ in 1 2 3 4 5; do
    # shellcheck disable=SC2086
    missing=$("$PY" - "$DEST" $PRESENT <<'EOF'
import re, sys, zipfile, pathlib
dest, present = pathlib.Path(sys.argv[1]), {p.lower().replace("_", "-") for p in sys.argv[2:]}
have, need = set(), set()
for whl in dest.glob("*.whl"):
    have.add(whl.name.split("-")[0].lower().replace("_", "-"))
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                req = line.split(":", 1)[1].strip()
                need.add(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-"))
print(" ".join(sorted(need - have - present)))
EOF
)
    [ -z "$missing" ] && break
    echo "fetching requirements: $missing"
    # shellcheck disable=SC2086
    download $missing
done

echo "in $DEST/:"
for whl in "$DEST"/*.whl; do
    reqs=$(unzip -p "$whl" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' \
        | grep -v 'extra ==' | tr '\n' ',' | sed 's/,$//')
    echo "  $(basename "$whl")  (requires: ${reqs:-nothing})"
done
echo "carry it to the GPU run: run(..., carry=[\".whl\"]); bench/gpu_check.sh installs it"
