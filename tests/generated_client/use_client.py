"""Drives labelsync through a client generated from its OpenAPI document.

Run by `a_client_generated_from_the_document_syncs_a_storage` in
tests/upstream.rs, which generates the client with openapi-python-client
(PyPI, pinned in tests/api-tools.sh) into a temporary directory and runs

    python use_client.py <dir holding the generated package> <base URL> <token>

What it does, as an app would: create a project and a local source storage
on the document root's `data/` directory, start a sync, wait for the run's
end on its Server-Sent Events stream, and list the project's tasks. It
prints one JSON line: {"run": <the finished run>, "tasks": [<task data>]}.

The generated client has no Server-Sent Events support (the document can
only say the route answers `text/event-stream`), so the stream is read with
the httpx client underneath the generated one: same base URL, same token.
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

from labelsync_api_client import AuthenticatedClient  # noqa: E402
from labelsync_api_client.api.default import (  # noqa: E402
    create_project,
    create_storage,
    list_project_tasks,
    sync_storage,
)
from labelsync_api_client.models import (  # noqa: E402
    LocalConfig,
    Project,
    ProjectBody,
    Storage,
    StorageBody,
    StorageBodyBackend,
    StorageBodyRole,
    SyncStarted,
)


def expect(response, status, kind):
    """The parsed answer, or exit with what the server said."""
    if response.status_code != status or not isinstance(response.parsed, kind):
        sys.exit(f"expected {status} {kind.__name__}, got {response.status_code}: {response.content!r}")
    return response.parsed


def wait_for_run_end(client, run_id):
    """Reads GET /api/v1/runs/{id}/events until its `finished` event; returns that run."""
    http = client.get_httpx_client()
    with http.stream("GET", f"/api/v1/runs/{run_id}/events", timeout=120) as stream:
        if stream.status_code != 200:
            sys.exit(f"events: {stream.status_code}")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line[len("event:"):].strip()
            elif line.startswith("data:") and event == "finished":
                return json.loads(line[len("data:"):])
    sys.exit("the event stream ended without a finished event")


def main():
    base_url, token = sys.argv[2], sys.argv[3]
    client = AuthenticatedClient(base_url=base_url, token=token, raise_on_unexpected_status=True)
    project = expect(
        create_project.sync_detailed(client=client, body=ProjectBody(title="generated client")),
        201,
        Project,
    )
    body = StorageBody(
        project_id=project.id,
        role=StorageBodyRole.SOURCE,
        backend=StorageBodyBackend.LOCAL,
        config=LocalConfig(path="data"),
    )
    storage = expect(create_storage.sync_detailed(client=client, body=body), 201, Storage)
    started = expect(sync_storage.sync_detailed(storage.id, client=client), 202, SyncStarted)
    run = wait_for_run_end(client, started.run.id)
    tasks = list_project_tasks.sync(project.id, client=client, limit=1000)
    print(json.dumps({"run": run, "tasks": [task.data.to_dict() for task in tasks.items]}))


main()
