#!/usr/bin/env bash
# What is coming: a fresh virtual environment (temp folder) with torch==2.13.0, then the newest
# releases pyproject.toml's ranges allow, pre-releases included (--pre) and without the upper bounds
# on hydra-core and omegaconf; prints the key versions and runs the tests there.
# Usage: scripts/check-latest.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)"
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
py="$venv/bin/python"
mapfile -t reqs < <("$py" - <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name = re.match(r"[A-Za-z0-9_.-]+", req).group()
    if name in ("hydra-core", "omegaconf"):
        req = name + ",".join(s for s in req[len(name):].split(",") if not s.startswith("<"))
    print(req)
PY
)
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet torch==2.13.0
# torch==2.13.0 again so that no newer release can pull in another (CUDA) build of torch.
"$py" -m pip install --quiet --pre torch==2.13.0 "${reqs[@]}"
"$py" -m pip install --quiet --no-deps -e .
"$py" - torch lightning hydra-core omegaconf albumentations datasets torchmetrics transformers wandb <<'PY'
import sys
from importlib.metadata import version

for name in sys.argv[1:]:
    print(f"{name:15} {version(name)}")
PY
"$py" -m pytest -q "$@"
