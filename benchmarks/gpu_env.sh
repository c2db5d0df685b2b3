# Sourced by the GPU benchmark scripts, from the repo root: installs the Python wheels the GPU machine lacks
# (built by the team's wheels script into ./.whl, or $LLMOPT_WHEELS) and sets the environment they run in.
wheels=${LLMOPT_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/llmopt-site "$wheels"/*.whl
  export PYTHONPATH=/tmp/llmopt-site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
