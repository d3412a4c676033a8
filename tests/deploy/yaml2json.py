"""YAML (one or more documents) on stdin -> one JSON array on stdout.

Used by tests/deploy.rs to read `kubectl kustomize` output and other YAML
files (the workspace has no YAML crate). Needs pyyaml: run it with
.ci/venv/bin/python (tests/deploy/tools.sh installs it). Empty documents are
dropped; anchors and merge keys are resolved by the safe loader.
"""
import json
import sys

import yaml

docs = [doc for doc in yaml.safe_load_all(sys.stdin) if doc is not None]
json.dump(docs, sys.stdout)
