"""Schemathesis hooks for the run in tests/upstream.rs (config.toml.in).

1. Body fields pinned in the config (`body.<field>` parameters) are set in
   every request. Schemathesis 4.32.5 applies them only to the cases its
   fuzzing phase generates; its coverage phase builds bodies without them,
   and would send storages of other backends and webhook URLs that depend
   on the deployment (see config.toml.in for why each field is pinned).

2. An Idempotency-Key sent again with another request is refused by design
   (422 idempotency_key_reused, docs/API.md "Idempotent requests"): that
   answer depends on what the server saw before, not on the request. The
   fuzzer draws keys from a small space ("0", "00", ...) and would send one
   key with many requests, so each valid key it generates is made unique
   here before the request goes out (it stays 1-255 visible ASCII
   characters, as the document says). Invalid keys are left as they are, so
   their 400 is still checked.

3. `on_missing` applies to source storages only: a target given another
   value than the default is refused (400 invalid_on_missing, docs/API.md
   "Storages"), a rule across two fields that the document does not state
   as a schema. A generated target body has its `on_missing` left out.

4. An admin token reaches every project, so `projects` with scope admin is
   refused (400 invalid_projects, docs/API.md "Tokens and scopes"): another
   rule across two fields. A generated admin token body has its `projects`
   left out.

5. On backends whose keys are paths (local, azure, databricks) a prefix
   with an empty segment is refused (400 invalid_prefix, docs/API.md
   "Storages"): a rule across two fields again. A generated prefix has its
   runs of '/' made one.
"""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"^[!-~]{1,255}$")
BODY = "body."
JSON_VALUE = (str, int, float, bool, list, dict, type(None))
PATH_BACKENDS = ("local", "azure", "databricks")
SLASHES = re.compile(r"/{2,}")


@schemathesis.hook
def before_call(context, case, kwargs):
    operation = case.operation
    pinned = operation.schema.config.operations.get_for_operation(operation).parameters
    if isinstance(case.body, dict):
        for name, value in pinned.items():
            # Fixed values only: dictionary bindings are Schemathesis's own.
            if name.startswith(BODY) and isinstance(value, JSON_VALUE):
                case.body[name[len(BODY) :]] = value
        if case.body.get("role") == "target":
            case.body.pop("on_missing", None)
        if case.body.get("scope") == "admin":
            case.body.pop("projects", None)
        prefix = case.body.get("prefix")
        if case.body.get("backend") in PATH_BACKENDS and isinstance(prefix, str):
            case.body["prefix"] = SLASHES.sub("/", prefix)
    headers = case.headers or {}
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and VALID_KEY.match(key):
        headers["Idempotency-Key"] = f"{key[:222]}-{uuid.uuid4().hex}"
