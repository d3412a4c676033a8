// labelsync ops console: the only script. Actions are calls of the public
// API (/api/v1), authenticated by the session cookie and the page's CSRF
// token; live counters come from the API's Server-Sent Events.
"use strict";

function csrf() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

function flash(text, isError) {
  const box = document.getElementById("flash");
  if (!box) return;
  box.textContent = text;
  box.className = isError ? "error" : "";
}

async function act(button) {
  const question = button.dataset.confirm;
  if (question && !window.confirm(question)) return;
  const method = button.dataset.method || "POST";
  const init = { method, headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" };
  if (method !== "DELETE") {
    init.headers["Content-Type"] = "application/json";
    init.body = "{}";
  }
  button.disabled = true;
  try {
    const resp = await fetch(button.dataset.action, init);
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      const message = body.error ? body.error.message : resp.statusText;
      flash(resp.status + ": " + message, true);
      return;
    }
    flash(button.dataset.done || "Done.", false);
    // A sync answers {run, already_running}; a retry answers the run itself.
    const run = body.run || body;
    const next = button.dataset.then === "run" && run.id ? "/ui/runs/" + run.id : null;
    setTimeout(() => { if (next) window.location.assign(next); else window.location.reload(); }, 400);
  } catch (err) {
    flash(String(err), true);
  } finally {
    button.disabled = false;
  }
}

// Rate since the run started and time left, by the rules of the server's
// console/progress.rs: the counters named in data-work measure the work,
// data-total is the size expected from the storage's history.
function showProgress(element, run) {
  const box = element.querySelector("[data-work]");
  const seconds = (Date.now() - Date.parse(run.started_at)) / 1000;
  if (!box || !run.started_at || !(seconds > 0)) return;
  const counters = run.counters || {};
  const done = box.dataset.work.split(",").reduce((n, name) => n + (counters[name] || 0), 0);
  const rate = done / seconds;
  const unit = box.dataset.unit;
  box.querySelector("[data-rate]").textContent = rate.toFixed(1) + " " + unit + " per second";
  const total = Number(box.dataset.total || 0);
  const eta = box.querySelector("[data-eta]");
  if (!total) return;
  if (done >= total) {
    eta.textContent = "past the " + total + " " + unit + " of the run it is estimated from";
  } else if (rate > 0) {
    eta.textContent = "about " + Math.ceil((total - done) / rate) + " s (of " + total + " " + unit + ")";
  } else {
    eta.textContent = "not started (" + total + " " + unit + " expected)";
  }
}

function watchRun(element) {
  const id = element.dataset.liveRun;
  const source = new EventSource("/api/v1/runs/" + encodeURIComponent(id) + "/events");
  const show = (event) => {
    const run = JSON.parse(event.data);
    for (const [name, value] of Object.entries(run.counters || {})) {
      const cell = element.querySelector('[data-counter="' + name + '"]');
      if (cell) cell.textContent = String(value);
    }
    showProgress(element, run);
    const status = element.querySelector("[data-status]");
    if (status) {
      status.textContent = run.status;
      status.className = "status-" + run.status;
    }
  };
  source.addEventListener("progress", show);
  source.addEventListener("finished", (event) => {
    show(event);
    source.close();
    flash("The run has ended; reload the page for its failed objects.", false);
  });
  source.addEventListener("gone", () => source.close());
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (button) {
    event.preventDefault();
    act(button);
  }
});
document.querySelectorAll("[data-live-run]").forEach(watchRun);
