#!/usr/bin/env bash
# Install the JAX TPU build and zoo on a TPU VM. Run it on every worker of a pod at once:
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#     --command "git clone REPO zoo && bash zoo/tpu_setup.sh"
# Idempotent: a second run finds everything in place and changes nothing.
#   --dry-run     print what would be done, do nothing
#   --venv DIR    the virtual environment to use (default: $HOME/zoo-venv)
set -euo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0
venv="${HOME}/zoo-venv"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --venv) venv="${2:?--venv needs a directory}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "tpu_setup.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
root="$(cd "$(dirname "$0")" && pwd)"

run() {
  echo "+ $*"
  if [ "$dry_run" -eq 0 ]; then "$@"; fi
}

if [ -x "$venv/bin/python" ]; then
  echo "= virtual environment $venv exists"
else
  run python3 -m venv "$venv"
fi

python="$venv/bin/python"
if [ -x "$python" ] && "$python" -c "import zoo, gcsfs, jax; assert jax.default_backend() == 'tpu'" 2>/dev/null; then
  echo "= zoo, gcsfs and the JAX TPU build are installed in $venv"
  exit 0
fi
run "$python" -m pip install --upgrade pip
# the gcs extra (gcsfs): checkpoints and logs in a gs:// workdir that every worker shares
run "$python" -m pip install -e "$root[gcs]"
# jax[tpu] at the installed jax version brings the libtpu built for it.
if [ "$dry_run" -eq 0 ]; then
  jax_version="$("$python" -c 'import jax; print(jax.__version__)')"
else
  jax_version="<installed jax version>"
fi
run "$python" -m pip install "jax[tpu]==$jax_version"
run "$python" -c "import jax; print(jax.device_count(), 'devices:', jax.devices()[0].device_kind)"
