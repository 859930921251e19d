# Source on the GPU machine, before any GPU command of BENCHMARKS.md:
#   source scripts/gpu_env.sh [DIR]     (DIR: the wheels from scripts/gpu_wheels.sh, default .whl)
# Installs the wheels, offline and without touching the machine's own packages, into
# /tmp/epd-site and puts that and this checkout on PYTHONPATH.
_epd_wheels=${1:-.whl}
_epd_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! ls "$_epd_wheels"/*.whl >/dev/null 2>&1; then
    echo "gpu_env: no wheels in $_epd_wheels (run: bash scripts/gpu_wheels.sh $_epd_wheels)" >&2
    return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/epd-site "$_epd_wheels"/*.whl || { return 1 2>/dev/null || exit 1; }
export PYTHONPATH="/tmp/epd-site:$_epd_root${PYTHONPATH:+:$PYTHONPATH}"
# Console scripts are not installed that way: `epd` runs the CLI module of this checkout.
epd() { python3 -m epd.cli "$@"; }
export -f epd
unset _epd_wheels _epd_root
