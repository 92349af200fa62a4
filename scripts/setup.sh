#!/usr/bin/env bash
# One idempotent set-up: system packages (Open MPI and the Horovod build tools), the virtual environment at
# .venv, the package with torch pinned, and Horovod 0.28.1 built from its sdist with the C++17 fix.
# A second run on the same machine installs nothing new and rebuilds nothing.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv"
py="$venv/bin/python"
python=${PYTHON:-python3}
torch_pin="torch==2.13.0"
horovod_version="0.28.1"
# Built wheels are tied to the torch build and the MPI ABI, so the cache key names both.
cache_root="${ALURE_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/alure-bench}"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# --- 1. system packages --------------------------------------------------------------------------------------
apt_packages=(openmpi-bin libopenmpi-dev cmake g++ make)
missing=()
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
command -v mpicxx >/dev/null 2>&1 || missing+=(libopenmpi-dev)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
    else
        die "missing ${missing[*]}: install them (Debian: apt-get install ${apt_packages[*]}) or 'module load' an MPI, CMake and a C++17 compiler, then rerun make setup"
    fi
fi

# --- 2. virtual environment and the package --------------------------------------------------------------------
if [ ! -x "$py" ]; then
    "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || die "$("$python" -V 2>&1) found; torch 2.13.0 CPU is on this machine for Python 3.11: set PYTHON=python3.11"
    say "creating $venv"
    "$python" -m venv "$venv"
fi
# A stamp of the dependency list lets a repeated setup skip pip entirely.
stamp="$venv/.alure-bench-deps"
want=$(cat "$repo/setup.cfg" "$repo/pyproject.toml" "$0" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing $torch_pin and the package"
    "$py" -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
    "$py" -m pip install -q "$torch_pin"
    "$py" -m pip install -q -e "$repo[test]" "$torch_pin"
    echo "$want" > "$stamp"
fi

# --- 3. Horovod ------------------------------------------------------------------------------------------------
hvd_ok() { "$py" -c 'import horovod, horovod.torch' >/dev/null 2>&1 && "$py" -c "import horovod; assert horovod.__version__ == '$horovod_version'" >/dev/null 2>&1; }
if ! hvd_ok; then
    torch_tag=$("$py" -c 'import torch; print(torch.__version__.replace("+", "_"))')
    mpi_tag=$(mpirun --version 2>/dev/null | head -n1 | awk '{print $NF}')
    wheel_dir="$cache_root/wheels/horovod-$horovod_version-torch$torch_tag-ompi$mpi_tag"
    wheel=$(ls "$wheel_dir"/horovod-"$horovod_version"-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        say "building Horovod $horovod_version from its sdist (about 2 minutes; cached in $wheel_dir)"
        build=$(mktemp -d)
        trap 'rm -rf "$build"' EXIT
        "$py" -m pip download -q --no-deps --no-binary :all: "horovod==$horovod_version" -d "$build"
        tar -xzf "$build/horovod-$horovod_version.tar.gz" -C "$build"
        src="$build/horovod-$horovod_version"
        # torch >= 2.1 headers need C++17; Gloo takes the standard from the root file (horovod PR #3998).
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
        grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" || die "the C++17 fix did not apply to the Horovod sdist"
        # The build imports torch, so it must see the venv: no build isolation.
        HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
        HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI MAKEFLAGS="-j$(nproc)" \
            "$py" -m pip wheel -q --no-build-isolation --no-deps "$src" -w "$build/out" \
            > "$build/build.log" 2>&1 || { tail -n 30 "$build/build.log" >&2; die "the Horovod build failed (log above)"; }
        mkdir -p "$wheel_dir"
        # Atomic publish: a half-written wheel never sits in the cache.
        for w in "$build"/out/horovod-*.whl; do cp "$w" "$wheel_dir/.$(basename "$w").tmp" && mv "$wheel_dir/.$(basename "$w").tmp" "$wheel_dir/$(basename "$w")"; done
        wheel=$(ls "$wheel_dir"/horovod-"$horovod_version"-*.whl | head -n1)
    else
        say "installing the cached Horovod wheel $(basename "$wheel")"
    fi
    "$py" -m pip install -q "$wheel" "$torch_pin"
fi

# --- 4. verify -------------------------------------------------------------------------------------------------
"$py" - <<'PY' || die "the Horovod build is incomplete (see above): delete the cached wheel and rerun make setup"
import sys
import horovod.torch as hvd
missing = [name for name, ok in (("PyTorch extension", True), ("MPI controller", hvd.mpi_built()),
                                 ("Gloo controller", hvd.gloo_built())) if not ok]
if missing:
    sys.exit("setup: error: Horovod lacks " + ", ".join(missing))
PY
say "ready: $("$py" -c 'import torch, horovod, mpi4py; print(f"torch {torch.__version__}, horovod {horovod.__version__}, mpi4py {mpi4py.__version__}")')"
