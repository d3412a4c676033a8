#!/usr/bin/env python3
"""SSE polling cost: N streams on one queued run of a running scheduler for S
seconds; prints the scheduler's and Postgres' CPU over that time.
Usage: tests/bench-sse.py <base URL> <streams> <seconds> <scheduler pid>
(the scheduler with LOCAL_FILES_DOCUMENT_ROOT=/tmp/ssebench, no workers)."""
import os, sys, time, json, socket, threading, subprocess, urllib.request
base = sys.argv[1]; n = int(sys.argv[2]); secs = float(sys.argv[3]); sched_pid = int(sys.argv[4])
def req(method, path, body=None):
    r = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body is not None else None, headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(r))
os.makedirs("/tmp/ssebench/data", exist_ok=True)
open("/tmp/ssebench/data/a.jpg", "w").write("x")
p = req("POST", "/api/v1/projects", {"title": "bench", "data_key": "image"})
s = req("POST", "/api/v1/storages", {"project_id": p["id"], "role": "source", "backend": "local", "config": {"path": "data"}})
run = req("POST", f"/api/v1/storages/{s['id']}/sync", {})["run"]["id"]
host, port = base.split("//")[1].split(":")
counts = [0] * n
stop = time.time() + secs
def stream(i):
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"GET /api/v1/runs/{run}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    sock.settimeout(1)
    while time.time() < stop:
        try:
            data = sock.recv(65536)
            counts[i] += data.count(b"event:")
        except socket.timeout:
            pass
    sock.close()
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def pg_cpu():
    total = 0.0
    for pid in subprocess.run(["pgrep", "-f", "postgres:"], capture_output=True, text=True).stdout.split():
        try: total += cpu(int(pid))
        except Exception: pass
    return total
c0, p0, t0 = cpu(sched_pid), pg_cpu(), time.time()
threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
[t.start() for t in threads]; [t.join() for t in threads]
if n == 0: time.sleep(secs)
el = time.time() - t0
print(f"{n} streams for {el:.1f}s: scheduler CPU {100*(cpu(sched_pid)-c0)/el:.1f}% of a core, postgres CPU {100*(pg_cpu()-p0)/el:.1f}% of a core, events received {sum(counts)} (streams with >=1 event: {sum(1 for c in counts if c)})")
