#!/usr/bin/env bash
# Tools nobody here wrote that the API is checked with, from PyPI into the
# git-ignored .ci/apivenv (only when missing, so reruns are fast):
#   standardwebhooks        verifies webhook signatures (tests/webhooks/verify.py)
#   schemathesis            property-based requests from the OpenAPI document
#   openapi-spec-validator  checks the OpenAPI document itself
#   openapi-python-client   generates a Python client from the document
#                           (tests/generated_client/use_client.py drives it)
# Sourced by tests/run.sh (which calls ensure_api_tools), or run directly.
set -euo pipefail

API_TOOLS_ROOT=${API_TOOLS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
API_VENV="$API_TOOLS_ROOT/.ci/apivenv"

# Pinned, so what they check stays put.
STANDARDWEBHOOKS_VERSION=1.1.0
SCHEMATHESIS_VERSION=4.32.5
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0
OPENAPI_PYTHON_CLIENT_VERSION=0.29.1

api_tools_present() {
  "$API_VENV/bin/python" -c 'import standardwebhooks' 2>/dev/null &&
    [ -x "$API_VENV/bin/schemathesis" ] && [ -x "$API_VENV/bin/openapi-spec-validator" ] &&
    [ -x "$API_VENV/bin/openapi-python-client" ]
}

ensure_api_tools() {
  api_tools_present && return
  printf '\n==> %s\n' "installing standardwebhooks, schemathesis, openapi-spec-validator and openapi-python-client into .ci/apivenv"
  [ -x "$API_VENV/bin/python" ] || python3 -m venv "$API_VENV"
  "$API_VENV/bin/pip" install -q --disable-pip-version-check \
    "standardwebhooks==$STANDARDWEBHOOKS_VERSION" \
    "schemathesis==$SCHEMATHESIS_VERSION" \
    "openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION" \
    "openapi-python-client==$OPENAPI_PYTHON_CLIENT_VERSION"
  api_tools_present || { echo "API tools still missing from $API_VENV" >&2; exit 1; }
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_api_tools
fi
