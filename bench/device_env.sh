# Source on the GPU machine (no project install there, no network): installs the carried wheels (.whl/,
# made by ../shared/device/wheels.sh) and makes `import deltaserve.*` resolve to this checkout.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
mkdir -p /tmp/dsp/deltaserve
for part in server kernels delta_store engine; do ln -sfn "$PWD/$part" "/tmp/dsp/deltaserve/$part"; done
export PYTHONPATH=/tmp/site:/tmp/dsp:$PWD/bench:$PWD/tests PYTHONUNBUFFERED=1
