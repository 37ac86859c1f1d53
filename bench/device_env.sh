# Source on the GPU machine (no project install there, no network): installs the carried wheels (.whl/,
# made by ../shared/device/wheels.sh) and makes `import deltaserve.*` resolve to this checkout.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
mkdir -p /tmp/dsp/deltaserve
for part in server kernels delta_store engine; do ln -sfn "$PWD/$part" "/tmp/dsp/deltaserve/$part"; done
export PYTHONPATH=/tmp/site:/tmp/dsp:$PWD/bench:$PWD/tests PYTHONUNBUFFERED=1
# Fail here, naming the module, rather than minutes into a benchmark (a newer fastapi or openai wheel may need
# a dependency wheels.sh does not fetch: pass it to wheels.sh as an extra name).
python3 - <<'PY' || return 1
import importlib, sys
missing = []
for name in ("fastapi", "uvicorn", "pydantic", "gguf", "yaml", "openai"):
    try:
        importlib.import_module(name)
    except ImportError as exc:
        missing.append(f"{name} ({exc})")
try:  # the client imports its HTTP transport only when made (httpcore2 and truststore went missing that way)
    importlib.import_module("openai").AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="none")
except ImportError as exc:
    missing.append(f"the openai client's transport ({exc})")
if missing:
    sys.exit("device_env: cannot import " + "; ".join(missing) + ". Known extras: ../shared/device/wheels.sh "
             "openai distro jiter httpx2 httpcore2 truststore opentelemetry-api importlib_metadata zipp")
PY
