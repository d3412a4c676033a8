//! `deploy/` validated offline: the Kubernetes overlays rendered with
//! `kubectl kustomize` and checked by `kubernetes-validate` (strict, two
//! Kubernetes versions) and by the checks below for what it cannot know (the
//! KEDA and Prometheus Operator CRDs, how the pieces refer to each other); the
//! compose file through `docker-compose config` and its health checks and
//! dependencies; the Grafana dashboard's structure, and every metric and
//! label its queries use, scraped from a real scheduler and a real
//! `labelsync-worker` process after a sync, a Tasks-mode sync with broken
//! files, a resolve and an export with a delete.
//!
//! The tools come from PyPI into the git-ignored `.ci/` folders
//! (`tests/deploy/tools.sh`, which `tests/run.sh` runs); a missing tool fails
//! the test, naming `tests/run.sh`.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use labelsync_tests::{
    AppOptions, TEST_SECRET_KEY, TestApp, binary, repo_root, spawn_app, spawn_worker,
};
use serde_json::{Map, Value, json};

/// The namespace every overlay deploys into.
const NAMESPACE: &str = "labelsync";
/// Kubernetes versions the manifests must validate against: an old one still
/// in EKS/GKE support and the newest kubernetes-validate knows.
const K8S_VERSIONS: &[&str] = &["1.30", "1.37"];
/// The worker's documented drain budget (deploy/k8s/base/worker.yaml): its
/// terminationGracePeriodSeconds must be at least this.
const WORKER_GRACE_MIN_SECS: i64 = 120;
/// Custom resources kubernetes-validate has no schema for; checked here.
const CRD_KINDS: &[&str] = &["ScaledObject", "ServiceMonitor"];
/// Labels Prometheus adds at scrape time (the app does not export them).
const TARGET_LABELS: &[&str] = &["namespace", "job", "instance", "pod", "service"];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Cloud {
    Aws,
    Gcp,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Autoscaler {
    Keda,
    Hpa,
}

const OVERLAYS: &[(&str, Cloud, Autoscaler)] = &[
    ("aws", Cloud::Aws, Autoscaler::Keda),
    ("gcp", Cloud::Gcp, Autoscaler::Keda),
    ("aws-hpa", Cloud::Aws, Autoscaler::Hpa),
    ("gcp-hpa", Cloud::Gcp, Autoscaler::Hpa),
];

// ---------------------------------------------------------------- tools

/// A tool installed by tests/deploy/tools.sh; fails (never skips) without it.
fn tool(relative: &str) -> PathBuf {
    let path = repo_root().join(relative);
    assert!(
        path.is_file(),
        "{} is missing: run tests/run.sh (or just `bash tests/deploy/tools.sh`) to install the deploy validation tools",
        path.display()
    );
    path
}

fn kubectl() -> PathBuf {
    tool(".ci/venv/bin/kubectl")
}

fn kubernetes_validate() -> PathBuf {
    tool(".ci/venv/bin/kubernetes-validate")
}

fn venv_python() -> PathBuf {
    tool(".ci/venv/bin/python")
}

fn docker_compose() -> PathBuf {
    tool(".ci/tools/bin/docker-compose")
}

/// Runs a command (feeding `stdin`), returns its stdout; panics with its
/// stderr when it fails.
fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> String {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    // Written from a thread, so a child that answers while it reads cannot
    // block on a full stdout pipe.
    let writer = stdin.map(|input| {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || pipe.write_all(&input))
    });
    let out = child.wait_with_output().unwrap();
    if let Some(writer) = writer {
        writer.join().unwrap().unwrap();
    }
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn kustomize(overlay: &str) -> String {
    let dir = repo_root().join("deploy/k8s/overlays").join(overlay);
    run(Command::new(kubectl()).arg("kustomize").arg(&dir), None)
}

fn yaml_to_json(yaml: &str) -> Vec<Value> {
    let script = repo_root().join("tests/deploy/yaml2json.py");
    let out = run(
        Command::new(venv_python()).arg(script),
        Some(yaml.as_bytes()),
    );
    serde_json::from_str::<Vec<Value>>(&out).unwrap()
}

fn rendered(overlay: &str) -> Vec<Value> {
    yaml_to_json(&kustomize(overlay))
}

// ---------------------------------------------------------------- manifest helpers

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], k: &str, n: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == k && name(d) == n)
        .unwrap_or_else(|| {
            let have: Vec<String> = docs
                .iter()
                .map(|d| format!("{}/{}", kind(d), name(d)))
                .collect();
            panic!("no {k}/{n} among {have:?}")
        })
}

fn all<'a>(docs: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| kind(d) == k)
}

fn obj(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// `selector` (matchLabels or a Service's selector) matches `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = obj(selector);
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
}

fn pod_spec(doc: &Value) -> &Value {
    &doc["spec"]["template"]["spec"]
}

fn pod_labels(doc: &Value) -> &Value {
    &doc["spec"]["template"]["metadata"]["labels"]
}

fn containers(doc: &Value) -> &Vec<Value> {
    pod_spec(doc)["containers"]
        .as_array()
        .unwrap_or_else(|| panic!("{} has no containers", name(doc)))
}

/// The container port a probe or Service names (by name or number).
fn resolve_port(container: &Value, port: &Value) -> Option<i64> {
    if let Some(n) = port.as_i64() {
        return Some(n);
    }
    let port = port.as_str()?;
    container["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == port)
        .and_then(|p| p["containerPort"].as_i64())
}

/// Env var `key` of a container: its literal value, or its
/// `(secret name, secret key)` reference.
enum Env {
    Value(String),
    Secret(String, String),
}

fn env(container: &Value, key: &str) -> Option<Env> {
    let var = container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == key)?;
    if let Some(v) = var["value"].as_str() {
        return Some(Env::Value(v.to_owned()));
    }
    let r = &var["valueFrom"]["secretKeyRef"];
    Some(Env::Secret(
        r["name"].as_str()?.to_owned(),
        r["key"].as_str()?.to_owned(),
    ))
}

/// A setting as the container sees it: its env, else the ConfigMaps it
/// imports with envFrom.
fn setting(docs: &[Value], container: &Value, key: &str) -> Option<String> {
    if let Some(Env::Value(v)) = env(container, key) {
        return Some(v);
    }
    container["envFrom"]
        .as_array()?
        .iter()
        .filter_map(|from| from["configMapRef"]["name"].as_str())
        .find_map(|cm| {
            find(docs, "ConfigMap", cm)["data"][key]
                .as_str()
                .map(str::to_owned)
        })
}

/// The uid deploy/docker/Dockerfile creates its user with.
fn dockerfile_uid() -> i64 {
    let text = std::fs::read_to_string(repo_root().join("deploy/docker/Dockerfile")).unwrap();
    let after = text
        .split("--uid")
        .nth(1)
        .expect("the Dockerfile creates its user with --uid");
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a numeric uid")
}

/// What the labelsync settings parser makes of a container's environment
/// (its ConfigMaps, its literal values, and placeholders for its Secret
/// references): the manifests must configure a process that starts.
fn container_settings(docs: &[Value], container: &Value) -> labelsync::config::Settings {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        if let Some(cm) = from["configMapRef"]["name"].as_str() {
            for (k, v) in obj(&find(docs, "ConfigMap", cm)["data"]) {
                vars.insert(k, v.as_str().unwrap().to_owned());
            }
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let key = var["name"].as_str().unwrap().to_owned();
        let value = match var["value"].as_str() {
            Some(v) => v.to_owned(),
            None => match key.as_str() {
                "DATABASE_URL" => {
                    "postgres://labelsync:x@db.example.internal:5432/labelsync".into()
                }
                "REDIS_URL" => "redis://redis.example.internal:6379".into(),
                "LABELSYNC_API_TOKENS" => "token-a,token-b".into(),
                "LABELSYNC_SECRET_KEY" | "LABELSYNC_SECRET_KEY_FALLBACKS" => TEST_SECRET_KEY.into(),
                other => panic!("no placeholder for the secret {other}"),
            },
        };
        vars.insert(key, value);
    }
    labelsync::config::Settings::from_lookup(|k| vars.get(k).cloned())
        .unwrap_or_else(|e| panic!("the settings of {} do not parse: {e}", container["name"]))
}

// ---------------------------------------------------------------- (a) kustomize

/// Every overlay renders; its stderr is the failure message otherwise.
#[test]
fn every_overlay_renders_with_kustomize() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(repo_root().join("deploy/k8s/overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let tested: BTreeSet<String> = OVERLAYS.iter().map(|(o, ..)| (*o).to_owned()).collect();
    assert_eq!(on_disk, tested, "every overlay on disk is tested here");
    for (overlay, ..) in OVERLAYS {
        let docs = rendered(overlay);
        assert!(
            docs.len() > 10,
            "{overlay} renders {} resources",
            docs.len()
        );
        for doc in &docs {
            assert_eq!(
                doc["metadata"]["namespace"],
                NAMESPACE,
                "{overlay}: {}/{} is in the overlay's namespace",
                kind(doc),
                name(doc)
            );
        }
    }
}

// ---------------------------------------------------------------- (b) schemas

/// `kubernetes-validate --strict` on each overlay's output, for each version:
/// no error, and the only resources it cannot check are the CRDs this file
/// checks itself.
#[test]
fn rendered_manifests_pass_kubernetes_validate() {
    for (overlay, ..) in OVERLAYS {
        let yaml = kustomize(overlay);
        let crds = yaml_to_json(&yaml)
            .iter()
            .filter(|d| CRD_KINDS.contains(&kind(d)))
            .count();
        for version in K8S_VERSIONS {
            let out = run(
                Command::new(kubernetes_validate())
                    .args(["--strict", "--quiet", "-k", version, "-"]),
                Some(yaml.as_bytes()),
            );
            let mut warned = 0;
            for line in out.lines().filter(|l| !l.trim().is_empty()) {
                assert!(
                    line.starts_with("WARN")
                        && CRD_KINDS
                            .iter()
                            .any(|k| line.contains(&format!("kind {k} with"))),
                    "{overlay} against Kubernetes {version}: {line}\n(all output:\n{out})"
                );
                warned += 1;
            }
            assert_eq!(
                warned, crds,
                "{overlay} {version}: one warning per CRD resource:\n{out}"
            );
        }
    }
}

/// Scheduler, worker and migration job: identity, security context,
/// resources, secrets, ports and probes, grace period.
#[test]
fn workloads_are_wired_and_locked_down() {
    let uid = dockerfile_uid();
    for (overlay, ..) in OVERLAYS {
        let docs = rendered(overlay);
        assert_eq!(
            all(&docs, "Secret").count(),
            0,
            "{overlay}: no Secret is committed; labelsync-secrets is created beforehand"
        );
        let scheduler = find(&docs, "Deployment", "labelsync-scheduler");
        let worker = find(&docs, "Deployment", "labelsync-worker");
        let job = find(&docs, "Job", "labelsync-migrate");
        let mut images = BTreeSet::new();
        for workload in [scheduler, worker, job] {
            check_workload_locked_down(overlay, workload, uid, &mut images);
        }
        assert_eq!(images.len(), 1, "{overlay}: one image for all: {images:?}");
        let account = find(&docs, "ServiceAccount", "labelsync");
        assert_eq!(
            account["automountServiceAccountToken"], false,
            "{overlay}: no Kubernetes API token in the pods"
        );
        check_scheduler_container(overlay, &docs, scheduler);
        check_worker_container(overlay, &docs, worker);
        check_settings_and_worker_grace(overlay, &docs, scheduler, worker, job);
        check_migration_job(overlay, job);
    }
}

/// `key` of container `c` comes from the Secret labelsync-secrets, under its own name.
fn assert_secret_env(overlay: &str, c: &Value, key: &str) {
    assert!(
        matches!(env(c, key), Some(Env::Secret(ref s, ref k)) if s == "labelsync-secrets" && k == key),
        "{overlay}: {key} comes from the Secret labelsync-secrets"
    );
}

/// Service account, pod and container security context, resources, a
/// registry-qualified image (collected into `images`), required secrets.
fn check_workload_locked_down(
    overlay: &str,
    workload: &Value,
    uid: i64,
    images: &mut BTreeSet<String>,
) {
    let what = format!("{overlay}: {}/{}", kind(workload), name(workload));
    let pod = pod_spec(workload);
    assert_eq!(pod["serviceAccountName"], "labelsync", "{what}");
    let sc = &pod["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true, "{what}");
    assert_eq!(sc["runAsUser"], uid, "{what}: the Dockerfile's uid");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{what}");
    for c in containers(workload) {
        let csc = &c["securityContext"];
        assert_eq!(csc["readOnlyRootFilesystem"], true, "{what}");
        assert_eq!(csc["allowPrivilegeEscalation"], false, "{what}");
        assert_eq!(csc["capabilities"]["drop"], json!(["ALL"]), "{what}");
        for part in ["requests", "limits"] {
            assert!(
                c["resources"][part]["memory"].is_string(),
                "{what}: memory {part}"
            );
        }
        assert!(c["resources"]["requests"]["cpu"].is_string(), "{what}");
        let image = c["image"].as_str().unwrap();
        assert!(
            image.contains('/') && image.contains(':'),
            "{what}: the overlay sets a registry and a tag: {image}"
        );
        images.insert(image.to_owned());
        // Every secret comes from labelsync-secrets, under its own name.
        for var in c["env"].as_array().into_iter().flatten() {
            let r = &var["valueFrom"]["secretKeyRef"];
            if r.is_object() {
                assert_eq!(r["name"], "labelsync-secrets", "{what}");
                assert_eq!(r["key"], var["name"], "{what}");
                // The fallback keys are there during a key rotation only.
                let optional = var["name"] == "LABELSYNC_SECRET_KEY_FALLBACKS";
                assert_eq!(
                    r.get("optional").is_some(),
                    optional,
                    "{what}: {}",
                    var["name"]
                );
            }
        }
    }
}

/// Scheduler: 2 replicas, the API and readiness on 8080, liveness on a
/// listener of its own (9465), migrations left to the Job.
fn check_scheduler_container(overlay: &str, docs: &[Value], scheduler: &Value) {
    let s = &containers(scheduler)[0];
    assert_eq!(scheduler["spec"]["replicas"], 2, "{overlay}");
    assert_eq!(s["args"], json!(["serve"]), "{overlay}");
    for key in [
        "DATABASE_URL",
        "REDIS_URL",
        "LABELSYNC_API_TOKENS",
        "LABELSYNC_SECRET_KEY",
    ] {
        assert_secret_env(overlay, s, key);
    }
    assert_eq!(
        setting(docs, s, "LABELSYNC_RUN_MIGRATIONS").as_deref(),
        Some("false"),
        "{overlay}: the Job migrates"
    );
    assert_eq!(
        setting(docs, s, "LABELSYNC_BIND").as_deref(),
        Some("0.0.0.0:8080")
    );
    assert_eq!(
        setting(docs, s, "LABELSYNC_PROBE_BIND").as_deref(),
        Some("0.0.0.0:9465")
    );
    let probes = [
        ("readinessProbe", "/readyz", 8080),
        ("livenessProbe", "/healthz", 9465),
    ];
    for (probe, path, port) in probes {
        assert_eq!(
            resolve_port(s, &s[probe]["httpGet"]["port"]),
            Some(port),
            "{overlay} scheduler {probe}"
        );
        assert_eq!(s[probe]["httpGet"]["path"], path, "{overlay}");
    }
}

/// Worker: the binary, probes on 9464, the autoscaler owns replicas, /tmp
/// is an emptyDir.
fn check_worker_container(overlay: &str, docs: &[Value], worker: &Value) {
    let w = &containers(worker)[0];
    assert_eq!(w["command"], json!(["labelsync-worker"]), "{overlay}");
    assert!(
        worker["spec"].get("replicas").is_none(),
        "{overlay}: no replica count on the worker, the autoscaler sets it"
    );
    for key in ["DATABASE_URL", "REDIS_URL", "LABELSYNC_SECRET_KEY"] {
        assert_secret_env(overlay, w, key);
    }
    let bind = setting(docs, w, "LABELSYNC_METRICS_BIND").unwrap_or("0.0.0.0:9464".into());
    assert!(bind.ends_with(":9464"), "{overlay}: {bind}");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(
            resolve_port(w, &w[probe]["httpGet"]["port"]),
            Some(9464),
            "{overlay} worker {probe}"
        );
        assert_eq!(
            w[probe]["httpGet"]["path"], path,
            "{overlay} worker {probe}"
        );
    }
    // Read-only root: Parquet files are spooled to /tmp, an emptyDir.
    let tmp = w["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/tmp"))
        .unwrap_or_else(|| panic!("{overlay}: the worker mounts /tmp"));
    let volume = pod_spec(worker)["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == tmp["name"]))
        .unwrap();
    assert!(
        volume["emptyDir"].is_object(),
        "{overlay}: /tmp is an emptyDir"
    );
}

/// Every container's environment parses as labelsync settings; the
/// scheduler neither migrates nor embeds workers; the worker's grace period
/// covers the drain and the heartbeat window.
fn check_settings_and_worker_grace(
    overlay: &str,
    docs: &[Value],
    scheduler: &Value,
    worker: &Value,
    job: &Value,
) {
    let s = &containers(scheduler)[0];
    let w = &containers(worker)[0];
    let grace = pod_spec(worker)["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap_or(30);
    let worker_settings = container_settings(docs, w);
    assert_eq!(
        worker_settings.worker.metrics_bind.port(),
        9464,
        "{overlay}"
    );
    let heartbeat = i64::try_from(worker_settings.worker.heartbeat.as_secs()).unwrap();
    let missed = i64::try_from(worker_settings.worker.missed_heartbeats).unwrap();
    let scheduler_settings = container_settings(docs, s);
    assert!(!scheduler_settings.run_migrations, "{overlay}");
    assert!(
        !scheduler_settings.embedded_workers,
        "{overlay}: no worker in the scheduler"
    );
    assert_eq!(scheduler_settings.bind.port(), 8080, "{overlay}");
    assert_eq!(
        scheduler_settings.probe_bind.map(|b| b.port()),
        Some(9465),
        "{overlay}"
    );
    container_settings(docs, &containers(job)[0]);
    assert!(
        grace >= WORKER_GRACE_MIN_SECS && grace > heartbeat * missed,
        "{overlay}: the worker's terminationGracePeriodSeconds ({grace}) covers the \
         documented {WORKER_GRACE_MIN_SECS} s drain and exceeds the heartbeat window \
         ({heartbeat} s x {missed})"
    );
}

/// Migration job: `labelsync-scheduler migrate` (the image's entrypoint).
fn check_migration_job(overlay: &str, job: &Value) {
    let m = &containers(job)[0];
    assert_eq!(m["args"], json!(["migrate"]), "{overlay}");
    assert!(m.get("command").is_none(), "{overlay}: the entrypoint runs");
    assert_secret_env(overlay, m, "DATABASE_URL");
    assert_ne!(pod_spec(job)["restartPolicy"], "Always");
}

/// Services select pods and name their ports; ServiceMonitors select
/// Services and name their ports; the PDB and NetworkPolicies select the
/// right pods and open only what they should.
#[test]
fn services_monitors_budgets_and_policies_match_their_pods() {
    for (overlay, ..) in OVERLAYS {
        let docs = rendered(overlay);
        let scheduler = find(&docs, "Deployment", "labelsync-scheduler");
        let worker = find(&docs, "Deployment", "labelsync-worker");
        check_services_reach_their_containers(overlay, &docs);
        check_monitors_scrape_scheduler_and_workers(overlay, &docs);
        check_worker_disruption_budget(overlay, &docs, worker);
        check_network_policy(overlay, &docs, worker, &[(9464, true)]);
        check_network_policy(overlay, &docs, scheduler, &[(8080, false), (9465, true)]);
    }
}

/// The Deployment whose pods `svc` selects.
fn service_target<'a>(docs: &'a [Value], svc: &Value) -> Option<&'a Value> {
    all(docs, "Deployment").find(|d| selects(&svc["spec"]["selector"], pod_labels(d)))
}

/// Every Service selects a Deployment's pods and its ports reach the container's.
fn check_services_reach_their_containers(overlay: &str, docs: &[Value]) {
    for svc in all(docs, "Service") {
        let what = format!("{overlay}: Service {}", name(svc));
        let target = service_target(docs, svc)
            .unwrap_or_else(|| panic!("{what} selects no Deployment's pods"));
        for port in svc["spec"]["ports"].as_array().unwrap() {
            let c = &containers(target)[0];
            assert_eq!(
                resolve_port(c, &port["targetPort"]),
                port["port"].as_i64(),
                "{what}: port {port} reaches the container port"
            );
        }
    }
}

/// Both the scheduler's and the workers' metrics are scraped.
fn check_monitors_scrape_scheduler_and_workers(overlay: &str, docs: &[Value]) {
    let mut scraped = BTreeSet::new();
    for sm in all(docs, "ServiceMonitor") {
        let what = format!("{overlay}: ServiceMonitor {}", name(sm));
        assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1", "{what}");
        let svcs: Vec<&Value> = all(docs, "Service")
            .filter(|s| {
                selects(
                    &sm["spec"]["selector"]["matchLabels"],
                    &s["metadata"]["labels"],
                )
            })
            .collect();
        assert!(!svcs.is_empty(), "{what} selects no Service's labels");
        let endpoints = sm["spec"]["endpoints"].as_array().unwrap();
        assert!(!endpoints.is_empty(), "{what}");
        for svc in svcs {
            for ep in endpoints {
                assert_eq!(ep["path"], "/metrics", "{what}");
                let port = svc["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == ep["port"])
                    .unwrap_or_else(|| {
                        panic!("{what}: Service {} has no port {}", name(svc), ep["port"])
                    });
                let target = service_target(docs, svc).unwrap();
                scraped.insert((name(target).to_owned(), port["port"].as_i64().unwrap()));
            }
        }
    }
    assert_eq!(
        scraped,
        BTreeSet::from([
            ("labelsync-scheduler".to_owned(), 9465),
            ("labelsync-worker".to_owned(), 9464)
        ]),
        "{overlay}: scraped deployments and ports"
    );
}

fn check_worker_disruption_budget(overlay: &str, docs: &[Value], worker: &Value) {
    let worker_pdb = all(docs, "PodDisruptionBudget")
        .find(|p| selects(&p["spec"]["selector"]["matchLabels"], pod_labels(worker)))
        .unwrap_or_else(|| panic!("{overlay}: a PodDisruptionBudget for the workers"));
    assert!(
        worker_pdb["spec"]["maxUnavailable"].is_number()
            || worker_pdb["spec"]["minAvailable"].is_number()
            || worker_pdb["spec"]["maxUnavailable"].is_string(),
        "{overlay}: {worker_pdb}"
    );
}

/// The NetworkPolicy of `d`'s pods opens ingress on exactly `ports`, each
/// `(port, from_required)`: a port whose rules must name where traffic
/// comes from (the monitoring namespace), or one open to all; and it leaves
/// egress open.
fn check_network_policy(overlay: &str, docs: &[Value], d: &Value, ports: &[(i64, bool)]) {
    let p = all(docs, "NetworkPolicy")
        .find(|p| selects(&p["spec"]["podSelector"]["matchLabels"], pod_labels(d)))
        .unwrap_or_else(|| panic!("{overlay}: a NetworkPolicy for {}", name(d)));
    let what = format!("{overlay}: NetworkPolicy {}", name(p));
    let types = p["spec"]["policyTypes"].as_array().unwrap();
    assert!(types.contains(&json!("Ingress")), "{what}");
    let c = &containers(d)[0];
    let ingress = p["spec"]["ingress"].as_array().unwrap();
    assert!(!ingress.is_empty(), "{what}");
    let mut opened = BTreeSet::new();
    for rule in ingress {
        let rule_ports = rule["ports"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: every ingress rule names its ports: {rule}"));
        for p in rule_ports {
            let port = resolve_port(c, &p["port"]);
            let Some(&(port, from_required)) = ports.iter().find(|(n, _)| Some(*n) == port) else {
                panic!("{what}: opens {port:?}, not one of {ports:?}: {rule}");
            };
            opened.insert(port);
            if from_required {
                assert!(
                    rule["from"].as_array().is_some_and(|f| !f.is_empty()),
                    "{what}: ingress to {port} from the monitoring namespace only: {rule}"
                );
            }
        }
    }
    let wanted: BTreeSet<i64> = ports.iter().map(|(n, _)| *n).collect();
    assert_eq!(opened, wanted, "{what}: the ports opened");
    // Egress stays open (storages are anywhere).
    if types.contains(&json!("Egress")) {
        assert!(
            p["spec"]["egress"]
                .as_array()
                .is_some_and(|e| e.contains(&json!({}))),
            "{what}: egress open"
        );
    }
}

/// aws: the IRSA role annotation; gcp: the Workload Identity one; never both.
#[test]
fn cloud_overlays_annotate_the_service_account() {
    for (overlay, cloud, _) in OVERLAYS {
        let docs = rendered(overlay);
        let sa = find(&docs, "ServiceAccount", "labelsync");
        let annotations = obj(&sa["metadata"]["annotations"]);
        let irsa = annotations
            .get("eks.amazonaws.com/role-arn")
            .and_then(Value::as_str);
        let wi = annotations
            .get("iam.gke.io/gcp-service-account")
            .and_then(Value::as_str);
        match cloud {
            Cloud::Aws => {
                let arn = irsa.unwrap_or_else(|| panic!("{overlay}: IRSA annotation: {sa}"));
                let parts: Vec<&str> = arn.split(':').collect();
                assert!(
                    parts.len() == 6
                        && parts[..3] == ["arn", "aws", "iam"]
                        && parts[4].len() == 12
                        && parts[4].bytes().all(|b| b.is_ascii_digit())
                        && parts[5].starts_with("role/"),
                    "{overlay}: an IAM role ARN: {arn}"
                );
                assert!(wi.is_none(), "{overlay}");
            }
            Cloud::Gcp => {
                let gsa =
                    wi.unwrap_or_else(|| panic!("{overlay}: Workload Identity annotation: {sa}"));
                assert!(
                    gsa.split_once('@')
                        .is_some_and(|(user, domain)| !user.is_empty()
                            && domain.ends_with(".iam.gserviceaccount.com")),
                    "{overlay}: a Google service account: {gsa}"
                );
                assert!(irsa.is_none(), "{overlay}");
            }
        }
        // Every workload runs as that account.
        for d in all(&docs, "Deployment").chain(all(&docs, "Job")) {
            assert_eq!(pod_spec(d)["serviceAccountName"], "labelsync", "{overlay}");
        }
    }
}

/// KEDA overlays carry a ScaledObject and no HPA, HPA overlays the reverse;
/// both scale the worker Deployment on the pending-jobs metric, never to zero.
#[test]
fn each_overlay_has_exactly_one_worker_autoscaler() {
    for (overlay, _, autoscaler) in OVERLAYS {
        let docs = rendered(overlay);
        let worker = find(&docs, "Deployment", "labelsync-worker");
        let scaled: Vec<&Value> = all(&docs, "ScaledObject").collect();
        let hpas: Vec<&Value> = all(&docs, "HorizontalPodAutoscaler").collect();
        match autoscaler {
            Autoscaler::Keda => {
                assert_eq!((scaled.len(), hpas.len()), (1, 0), "{overlay}");
                check_scaled_object(overlay, scaled[0], worker);
            }
            Autoscaler::Hpa => {
                assert_eq!((scaled.len(), hpas.len()), (0, 1), "{overlay}");
                check_hpa(overlay, hpas[0], worker);
            }
        }
    }
    check_prometheus_adapter_rule();
}

/// The autoscaler's scaleTargetRef `r` names the worker Deployment.
fn check_scale_target(overlay: &str, r: &Value, worker: &Value) {
    assert_eq!(r["name"], name(worker), "{overlay}: scales the worker: {r}");
    if let Some(k) = r["kind"].as_str() {
        assert_eq!(k, "Deployment", "{overlay}");
    }
    if let Some(api) = r["apiVersion"].as_str() {
        assert_eq!(api, "apps/v1", "{overlay}");
    }
}

/// KEDA: at least one replica, a Prometheus trigger on this namespace's backlog.
fn check_scaled_object(overlay: &str, so: &Value, worker: &Value) {
    assert_eq!(so["apiVersion"], "keda.sh/v1alpha1", "{overlay}");
    check_scale_target(overlay, &so["spec"]["scaleTargetRef"], worker);
    let min = so["spec"]["minReplicaCount"].as_i64().unwrap_or(0);
    let max = so["spec"]["maxReplicaCount"].as_i64().unwrap_or(100);
    assert!(min >= 1 && max >= min, "{overlay}: replicas {min}..{max}");
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "prometheus", "{overlay}");
    let meta = &trigger["metadata"];
    let server = meta["serverAddress"].as_str().unwrap_or_default();
    assert!(
        server.starts_with("http://") || server.starts_with("https://"),
        "{overlay}: serverAddress {server:?}"
    );
    let query = meta["query"].as_str().unwrap_or_default();
    check_queue_query(overlay, query);
    assert!(
        query.contains(&format!("namespace=\"{NAMESPACE}\"")),
        "{overlay}: the query counts this namespace's queues: {query}"
    );
    let threshold: f64 = meta["threshold"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{overlay}: threshold is a number string"));
    assert!(threshold > 0.0, "{overlay}");
}

/// HPA: at least one replica, on the external pending-jobs metric.
fn check_hpa(overlay: &str, hpa: &Value, worker: &Value) {
    assert_eq!(hpa["apiVersion"], "autoscaling/v2", "{overlay}");
    check_scale_target(overlay, &hpa["spec"]["scaleTargetRef"], worker);
    let min = hpa["spec"]["minReplicas"].as_i64().unwrap_or(1);
    assert!(min >= 1, "{overlay}");
    let metric = &hpa["spec"]["metrics"][0];
    assert_eq!(metric["type"], "External", "{overlay}");
    assert_eq!(
        metric["external"]["metric"]["name"], "labelsync_queue_jobs",
        "{overlay}"
    );
    assert_eq!(
        metric["external"]["metric"]["selector"]["matchLabels"]["state"], "pending",
        "{overlay}"
    );
    assert_eq!(
        metric["external"]["target"]["type"], "AverageValue",
        "{overlay}"
    );
}

/// The prometheus-adapter rule the HPA relies on serves that metric.
fn check_prometheus_adapter_rule() {
    let rules = std::fs::read_to_string(
        repo_root().join("deploy/k8s/components/hpa/prometheus-adapter-rules.yaml"),
    )
    .unwrap();
    let rules = yaml_to_json(&rules);
    let rule = &rules[0]["rules"]["external"][0];
    assert_eq!(rule["name"]["as"], "labelsync_queue_jobs");
    let series = rule["seriesQuery"].as_str().unwrap();
    assert!(series.starts_with("labelsync_queue_jobs{") && series.contains("state=\"pending\""));
    let metrics_query = rule["metricsQuery"].as_str().unwrap();
    assert!(
        metrics_query.contains("max by (queue)") && metrics_query.contains("<<.LabelMatchers>>"),
        "{metrics_query}"
    );
    assert!(rule["resources"]["overrides"]["namespace"].is_object());
}

/// The backlog query counts each queue once: every labelsync process exports
/// the same depth, so a bare sum() would multiply it by the process count.
fn check_queue_query(what: &str, query: &str) {
    let refs = promql_refs(query);
    assert_eq!(
        refs.metrics.keys().collect::<Vec<_>>(),
        ["labelsync_queue_jobs"],
        "{what}: {query}"
    );
    assert!(query.contains("state=\"pending\""), "{what}: {query}");
    assert!(
        query.contains("max by (queue)"),
        "{what}: one value per queue, not one per scraped process: {query}"
    );
}

// ---------------------------------------------------------------- migrations job

/// The migration Job's exact command migrates a fresh Postgres database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_jobs_command_migrates_a_fresh_database() {
    let docs = rendered("aws");
    let job = find(&docs, "Job", "labelsync-migrate");
    let args: Vec<String> = containers(job)[0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let url = labelsync_tests::fresh_postgres().await;
    let out = Command::new(binary("labelsync-scheduler"))
        .env_clear()
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "warn")
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "labelsync-scheduler {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = sea_orm::Database::connect(&url).await.unwrap();
    use sea_orm::ConnectionTrait;
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) AS n FROM information_schema.tables WHERE table_name IN ('tasks', 'sync_runs', 'import_links')".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    let n: i64 = row.try_get("", "n").unwrap();
    assert_eq!(n, 3, "the schema is there after {args:?}");
}

// ---------------------------------------------------------------- (c) compose

fn compose_file() -> PathBuf {
    repo_root().join("deploy/compose/docker-compose.yml")
}

/// The compose file as `docker compose config` resolves it (schema-checked,
/// anchors and defaults applied, paths absolute), with no override from the
/// environment or an .env file.
fn compose_config() -> Value {
    let out = run(
        Command::new(docker_compose())
            .env_remove("LABELSYNC_API_TOKENS")
            .env_remove("LABELSYNC_SECRET_KEY")
            .env_remove("LABELSYNC_COMPOSE_SUBNET")
            .env_remove("LABELSYNC_COMPOSE_S3_ADDRESS")
            .env_remove("LABELSYNC_COMPOSE_IP_RANGE")
            .arg("--env-file")
            .arg("/dev/null")
            .arg("-f")
            .arg(compose_file())
            .args(["config", "--format", "json"]),
        None,
    );
    serde_json::from_str(&out).unwrap()
}

fn has_healthcheck(svc: &Value) -> bool {
    let hc = &svc["healthcheck"];
    hc["disable"] != true
        && hc["test"]
            .as_array()
            .is_some_and(|t| !t.is_empty() && t[0] != "NONE")
}

fn compose_env<'a>(svc: &'a Value, key: &str) -> Option<&'a str> {
    svc["environment"][key].as_str()
}

#[test]
fn compose_file_is_valid_and_wired() {
    let config = compose_config();
    // The raw file parses too (pyyaml), with the same services.
    let raw = yaml_to_json(&std::fs::read_to_string(compose_file()).unwrap());
    let services = obj(&config["services"]);
    assert_eq!(
        obj(&raw[0]["services"]).keys().collect::<BTreeSet<_>>(),
        services.keys().collect::<BTreeSet<_>>()
    );
    check_compose_health_checks_and_dependencies(&services);
    check_compose_backing_services(&services);
    let scheduler = &services["scheduler"];
    let workers: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, s)| s["entrypoint"] == json!(["labelsync-worker"]))
        .collect();
    assert_eq!(
        workers.len(),
        2,
        "two workers (entrypoint labelsync-worker)"
    );
    check_compose_fleet_build_and_env(&config, scheduler, &workers);
    check_compose_settings_parse(scheduler, &workers);
    check_compose_scheduler_env(scheduler);
    check_compose_process_health_checks(scheduler, &workers);
    check_docker_context_ignores();
}

fn check_compose_health_checks_and_dependencies(services: &Map<String, Value>) {
    // One-shots (the bucket creation) run to completion; everything else has
    // a health check.
    let dependants = |target: &str| -> Vec<(String, String)> {
        services
            .iter()
            .filter_map(|(n, s)| {
                s["depends_on"][target]["condition"]
                    .as_str()
                    .map(|c| (n.clone(), c.to_owned()))
            })
            .collect()
    };
    for (svc_name, svc) in services {
        if has_healthcheck(svc) {
            continue;
        }
        let deps = dependants(svc_name);
        assert!(
            svc["restart"] == "no"
                && !deps.is_empty()
                && deps
                    .iter()
                    .all(|(_, c)| c == "service_completed_successfully"),
            "{svc_name} has no health check (only a one-shot that others wait to complete may go without): {svc}"
        );
    }
    for (svc_name, svc) in services {
        for (dep, how) in obj(&svc["depends_on"]) {
            let target = services
                .get(&dep)
                .unwrap_or_else(|| panic!("{svc_name} depends on an unknown service {dep}"));
            let condition = how["condition"].as_str().unwrap_or_default();
            let expected = if has_healthcheck(target) {
                "service_healthy"
            } else {
                "service_completed_successfully"
            };
            assert_eq!(condition, expected, "{svc_name} -> {dep}");
        }
    }
}

/// Postgres, Redis and an S3-compatible server.
fn check_compose_backing_services(services: &Map<String, Value>) {
    let by_image = |needle: &str| {
        services
            .iter()
            .filter(|(_, s)| s["image"].as_str().unwrap_or_default().contains(needle))
            .count()
    };
    assert!(by_image("postgres") >= 1 && by_image("redis") >= 1);
    assert!(
        by_image("moto") + by_image("minio") >= 1,
        "an S3-compatible server"
    );
}

fn check_compose_fleet_build_and_env(
    config: &Value,
    scheduler: &Value,
    workers: &[(&String, &Value)],
) {
    // All built from deploy/docker/Dockerfile with the repository as context.
    let root = repo_root().canonicalize().unwrap();
    let scheduler_name = "scheduler".to_owned();
    let fleet: Vec<(&String, &Value)> = workers
        .iter()
        .copied()
        .chain([(&scheduler_name, scheduler)])
        .collect();
    for (n, s) in fleet {
        let context = Path::new(s["build"]["context"].as_str().unwrap())
            .canonicalize()
            .unwrap();
        assert_eq!(context, root, "{n}: build context");
        assert_eq!(s["build"]["dockerfile"], "deploy/docker/Dockerfile", "{n}");
        assert_eq!(s["image"], scheduler["image"], "{n}: one image");
        for key in ["DATABASE_URL", "REDIS_URL", "LABELSYNC_SECRET_KEY"] {
            assert!(compose_env(s, key).is_some(), "{n}: {key}");
        }
        assert_eq!(
            compose_env(s, "LABELSYNC_SECRET_KEY"),
            compose_env(scheduler, "LABELSYNC_SECRET_KEY"),
            "{n}: the scheduler's secret key"
        );
        let db = compose_env(s, "DATABASE_URL").unwrap();
        assert!(
            db.starts_with("postgres://") && db.contains("@postgres:5432/"),
            "{n}: {db}"
        );
        assert_eq!(
            compose_env(s, "REDIS_URL"),
            Some("redis://redis:6379"),
            "{n}"
        );
        // The SSRF allowlist is the s3 service's pinned address alone
        // (it was the whole network: Postgres and Redis with it).
        let s3 = config["services"]["s3"]["networks"]["labelsync"]["ipv4_address"]
            .as_str()
            .unwrap();
        assert_eq!(
            compose_env(s, "LABELSYNC_ALLOW_PRIVATE_ENDPOINTS"),
            Some(format!("{s3}/32").as_str()),
            "{n}: private endpoints allowed to the s3 service only"
        );
        let subnet = config["networks"]["labelsync"]["ipam"]["config"][0]["subnet"]
            .as_str()
            .unwrap();
        let policy = labelsync::security::net::NetPolicy::parse(Some(subnet)).unwrap();
        assert!(
            policy.allows(s3.parse().unwrap()),
            "{s3} is on the compose network {subnet}"
        );
        // And outside the range Docker hands out, so no other container
        // takes it on a later `up`.
        let range = config["networks"]["labelsync"]["ipam"]["config"][0]["ip_range"]
            .as_str()
            .unwrap();
        // (A policy allows public addresses and its blocks: s3's is private.)
        let handed_out = labelsync::security::net::NetPolicy::parse(Some(range)).unwrap();
        assert!(
            !handed_out.allows(s3.parse().unwrap()),
            "{s3} is outside {range}"
        );
    }
}

fn check_compose_settings_parse(scheduler: &Value, workers: &[(&String, &Value)]) {
    // The settings parser accepts each environment.
    let parsed = |svc: &Value| {
        let vars = obj(&svc["environment"]);
        labelsync::config::Settings::from_lookup(|k| {
            vars.get(k).and_then(Value::as_str).map(str::to_owned)
        })
        .unwrap_or_else(|e| panic!("compose settings do not parse: {e}"))
    };
    let scheduler_settings = parsed(scheduler);
    assert!(scheduler_settings.run_migrations && !scheduler_settings.embedded_workers);
    assert_eq!(scheduler_settings.bind.to_string(), "0.0.0.0:8080");
    for (n, w) in workers {
        assert_eq!(parsed(w).worker.metrics_bind.port(), 9464, "{n}");
    }
}

fn check_compose_scheduler_env(scheduler: &Value) {
    let key = compose_env(scheduler, "LABELSYNC_SECRET_KEY").unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(key)
            .map(|k| k.len())
            .ok(),
        Some(32),
        "LABELSYNC_SECRET_KEY is 32 bytes of base64"
    );
    assert!(compose_env(scheduler, "LABELSYNC_API_TOKENS").is_some_and(|t| !t.is_empty()));
    assert_eq!(
        compose_env(scheduler, "LABELSYNC_BIND"),
        Some("0.0.0.0:8080")
    );
    assert_eq!(
        compose_env(scheduler, "LABELSYNC_RUN_MIGRATIONS"),
        Some("true")
    );
    // Longer than the scheduler's 20 s drain (compose's default is 10 s).
    assert_eq!(scheduler["stop_grace_period"], "30s");
}

fn check_compose_process_health_checks(scheduler: &Value, workers: &[(&String, &Value)]) {
    let hc = |s: &Value| s["healthcheck"]["test"].to_string();
    assert!(
        hc(scheduler).contains("127.0.0.1:8080/readyz"),
        "{}",
        hc(scheduler)
    );
    for (n, w) in workers {
        assert!(hc(w).contains("127.0.0.1:9464/readyz"), "{n}: {}", hc(w));
        if let Some(bind) = compose_env(w, "LABELSYNC_METRICS_BIND") {
            assert!(bind.ends_with(":9464"), "{n}: {bind}");
        }
        // Workers start on a migrated schema.
        assert_eq!(
            w["depends_on"]["scheduler"]["condition"], "service_healthy",
            "{n}"
        );
    }
    // The health checks run curl inside the image: the runtime stage has it.
    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/docker/Dockerfile")).unwrap();
    let runtime_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    if hc(scheduler).contains("\"curl\"") {
        assert!(
            runtime_stage.contains(" curl"),
            "the runtime image installs curl for the health checks"
        );
    }
}

fn check_docker_context_ignores() {
    // The context is the repository root: target/ and .ci/ stay out of it.
    let ignore =
        std::fs::read_to_string(repo_root().join("deploy/docker/Dockerfile.dockerignore")).unwrap();
    for dir in ["target", ".ci", ".git"] {
        assert!(ignore.lines().any(|l| l.trim() == dir), "{dir} ignored");
    }
}

// ---------------------------------------------------------------- (d) dashboard

fn dashboard() -> Value {
    let path = repo_root().join("deploy/grafana/labelsync.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every query (`targets[].expr`) of every panel, rows' nested panels included.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((
                        p["title"].as_str().unwrap_or_default().to_owned(),
                        e.to_owned(),
                    ));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// PromQL functions and aggregations the dashboard may call.
const PROMQL_FUNCTIONS: &[&str] = &[
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "topk",
    "bottomk",
    "quantile",
    "rate",
    "irate",
    "increase",
    "delta",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
    "abs",
    "vector",
    "scalar",
    "time",
    "avg_over_time",
    "max_over_time",
    "min_over_time",
    "label_replace",
];
const PROMQL_KEYWORDS: &[&str] = &[
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "group_left",
    "group_right",
];

/// What a PromQL expression refers to: metric names with the labels their
/// matchers name, and the labels of its by()/without()/on() clauses.
#[derive(Debug, Default)]
struct PromRefs {
    metrics: BTreeMap<String, BTreeSet<String>>,
    grouping: BTreeSet<String>,
}

fn promql_refs(expr: &str) -> PromRefs {
    let chars: Vec<char> = expr.chars().collect();
    let n = chars.len();
    let mut refs = PromRefs::default();
    // The metric name just read: a `{` right after it holds its matchers.
    let mut last_metric: Option<String> = None;
    let mut i = 0;
    while i < n {
        let c = chars[i];
        let prev = last_metric.take();
        if c == '"' || c == '\'' {
            i = skip_promql_string(&chars, i, c);
        } else if c == '[' {
            // A range (`[5m]`, `[$__rate_interval]`).
            while i < n && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            let metric =
                prev.unwrap_or_else(|| panic!("a selector without a metric name in {expr}"));
            i = read_promql_matchers(expr, &chars, i, &metric, &mut refs);
        } else if c.is_ascii_digit() || c == '.' {
            while i < n && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '$' || c.is_ascii_alphabetic() || c == '_' {
            i = read_promql_word(expr, &chars, i, &mut refs, &mut last_metric);
        } else {
            i += 1;
        }
    }
    refs
}

fn is_promql_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Index just past the closing `quote` of a string starting at `i`.
fn skip_promql_string(chars: &[char], mut i: usize, quote: char) -> usize {
    let n = chars.len();
    i += 1;
    while i < n && chars[i] != quote {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// Label matchers at `{` (index `i`): `label op "value"`, comma-separated;
/// records each label under `metric` and returns the index past the `}`.
fn read_promql_matchers(
    expr: &str,
    chars: &[char],
    mut i: usize,
    metric: &str,
    refs: &mut PromRefs,
) -> usize {
    let n = chars.len();
    i += 1;
    loop {
        while i < n && (chars[i].is_whitespace() || chars[i] == ',') {
            i += 1;
        }
        if i >= n || chars[i] == '}' {
            return i + 1;
        }
        let start = i;
        while i < n && is_promql_ident(chars[i]) {
            i += 1;
        }
        assert!(i > start, "bad matcher in {expr}");
        let label: String = chars[start..i].iter().collect();
        refs.metrics.get_mut(metric).unwrap().insert(label);
        while i < n && chars[i] != '"' && chars[i] != '\'' {
            i += 1;
        }
        assert!(i < n, "a matcher without a value in {expr}");
        i = skip_promql_string(chars, i, chars[i]);
    }
}

/// A word at `i`: a Grafana variable, a grouping clause (its labels go to
/// `refs.grouping`), a known function or keyword, or a labelsync metric
/// (recorded, and left in `last_metric` for its matchers). Returns the
/// index past it.
fn read_promql_word(
    expr: &str,
    chars: &[char],
    mut i: usize,
    refs: &mut PromRefs,
    last_metric: &mut Option<String>,
) -> usize {
    let n = chars.len();
    let start = i;
    i += 1;
    while i < n && is_promql_ident(chars[i]) {
        i += 1;
    }
    let word: String = chars[start..i].iter().collect();
    let mut j = i;
    while j < n && chars[j].is_whitespace() {
        j += 1;
    }
    let call = j < n && chars[j] == '(';
    if word.starts_with('$') {
        // A Grafana variable.
    } else if ["by", "without", "on", "ignoring"].contains(&word.as_str()) && call {
        let close = chars[j..]
            .iter()
            .position(|&c| c == ')')
            .unwrap_or_else(|| panic!("unclosed {word}( in {expr}"))
            + j;
        let inside: String = chars[j + 1..close].iter().collect();
        refs.grouping.extend(
            inside
                .split(',')
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty()),
        );
        i = close + 1;
    } else if PROMQL_FUNCTIONS.contains(&word.as_str()) || PROMQL_KEYWORDS.contains(&word.as_str())
    {
    } else {
        assert!(!call, "unknown PromQL function {word}() in {expr}");
        assert!(
            word.starts_with("labelsync_"),
            "{word} in {expr}: only labelsync's own metrics may be queried"
        );
        refs.metrics.entry(word.clone()).or_default();
        *last_metric = Some(word);
    }
    i
}

#[test]
fn promql_refs_reads_names_matchers_and_grouping() {
    let r = promql_refs(
        "histogram_quantile(0.95, sum by (le, backend) (rate(labelsync_x_bucket{outcome!=\"ok\", a=~\"b|c\"}[$__rate_interval]))) / sum(labelsync_y)",
    );
    assert_eq!(
        r.metrics,
        BTreeMap::from([
            (
                "labelsync_x_bucket".to_owned(),
                BTreeSet::from(["outcome".to_owned(), "a".to_owned()])
            ),
            ("labelsync_y".to_owned(), BTreeSet::new()),
        ])
    );
    assert_eq!(
        r.grouping,
        BTreeSet::from(["le".to_owned(), "backend".to_owned()])
    );
    let refused = std::panic::catch_unwind(|| promql_refs("sum(up)"));
    assert!(refused.is_err(), "`up` is not a labelsync metric");
}

/// Structure: schema version, the datasource variable used by every panel
/// and query, unique ids, and a panel for every required signal.
#[test]
fn dashboard_is_well_formed_and_complete() {
    let dash = dashboard();
    let schema = dash["schemaVersion"].as_i64().unwrap();
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let vars = dash["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    check_dashboard_panels(&dash);
    let all_refs: Vec<(String, String, PromRefs)> = dashboard_exprs(&dash)
        .into_iter()
        .map(|(title, e)| {
            let r = promql_refs(&e);
            (title, e, r)
        })
        .collect();
    check_dashboard_has_required_signals(&all_refs);
    check_dashboard_query_shapes(&all_refs);
}

/// Unique panel ids and grid positions, rows' nested panels included; every
/// non-row panel and query on the datasource variable, with a query.
fn check_dashboard_panels(dash: &Value) {
    let mut ids = BTreeSet::new();
    let mut walk = vec![dash["panels"].clone()];
    while let Some(panels) = walk.pop() {
        for p in panels.as_array().unwrap() {
            let id = p["id"].as_i64().unwrap();
            assert!(ids.insert(id), "panel id {id} is unique");
            for k in ["h", "w", "x", "y"] {
                assert!(p["gridPos"][k].is_i64(), "panel {id} gridPos.{k}");
            }
            if p["type"] == "row" {
                walk.push(p["panels"].clone());
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "panel {id} has queries");
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {id}");
                assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()));
                assert!(t["refId"].is_string());
            }
        }
    }
}

/// A panel for every required signal, with the aggregation it needs.
fn check_dashboard_has_required_signals(all_refs: &[(String, String, PromRefs)]) {
    let uses = |metric: &str, also: &str| {
        all_refs
            .iter()
            .any(|(_, e, r)| r.metrics.contains_key(metric) && e.contains(also))
    };
    for (metric, also) in [
        ("labelsync_jobs_finished_total", "by (kind, outcome)"),
        (
            "labelsync_job_duration_seconds_bucket",
            "histogram_quantile(0.95",
        ),
        (
            "labelsync_job_duration_seconds_bucket",
            "histogram_quantile(0.99",
        ),
        ("labelsync_objects_listed_total", "rate("),
        ("labelsync_tasks_created_total", "rate("),
        ("labelsync_annotations_exported_total", "rate("),
        ("labelsync_annotations_deleted_total", "rate("),
        ("labelsync_object_errors_total", "rate("),
        ("labelsync_storage_requests_total", "outcome!=\"ok\""),
        (
            "labelsync_storage_requests_total",
            "by (backend, operation)",
        ),
        (
            "labelsync_storage_request_duration_seconds_bucket",
            "histogram_quantile(0.95",
        ),
        ("labelsync_resolve_requests_total", "rate("),
        ("labelsync_queue_jobs", "by (queue, state)"),
        ("labelsync_worker_slots", "count(labelsync_worker_slots)"),
        ("labelsync_worker_slots", "sum(labelsync_worker_slots)"),
    ] {
        assert!(uses(metric, also), "a panel queries {metric} with {also}");
    }
}

fn check_dashboard_query_shapes(all_refs: &[(String, String, PromRefs)]) {
    for (title, e, r) in all_refs {
        // histogram_quantile needs the buckets, summed by le.
        if e.contains("histogram_quantile") {
            assert!(
                r.grouping.contains("le") && r.metrics.keys().all(|m| m.ends_with("_bucket")),
                "{title}: {e}"
            );
        }
        // The queue depth is exported by every process: never summed raw.
        if r.metrics.contains_key("labelsync_queue_jobs") {
            assert!(e.contains("max by (queue"), "{title}: {e}");
        }
    }
}

// ---------------------------------------------------------------- (d) live scrape

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// Sample names of a Prometheus text exposition, with their label names.
fn scraped_series(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_owned()).or_default();
        if line[end..].starts_with('{') {
            // name="value" pairs; values may hold escaped quotes and commas.
            let chars: Vec<char> = line[end + 1..].chars().collect();
            let mut i = 0;
            while i < chars.len() && chars[i] != '}' {
                let start = i;
                while chars[i] != '=' {
                    i += 1;
                }
                labels.insert(
                    chars[start..i]
                        .iter()
                        .collect::<String>()
                        .trim_start_matches(',')
                        .trim()
                        .to_owned(),
                );
                i += 2; // ="
                while chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                if i < chars.len() && chars[i] == ',' {
                    i += 1;
                }
            }
        }
    }
    out
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn runs_idle(app: &TestApp, storage: &Value) -> bool {
    let (_, runs) = app
        .get(&format!("/api/v1/runs?storage_id={}", storage["id"]))
        .await;
    let items = runs["items"].as_array().cloned().unwrap_or_default();
    !items.is_empty()
        && items
            .iter()
            .all(|r| r["status"] != "queued" && r["status"] != "running")
}

/// Runs a compose health check (`["CMD", ...]` or `["CMD-SHELL", "..."]`)
/// on this machine with its address pointed at a live process.
fn run_healthcheck(test: &Value, from: &str, to: &str) -> bool {
    let parts: Vec<String> = test
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().replace(from, to))
        .collect();
    let mut cmd = match parts[0].as_str() {
        "CMD" => {
            let mut c = Command::new(&parts[1]);
            c.args(&parts[2..]);
            c
        }
        "CMD-SHELL" => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(&parts[1]);
            c
        }
        other => panic!("unexpected health check form {other}"),
    };
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run the health check {parts:?} here: {e}"))
        .success()
}

/// Every metric the dashboard, the KEDA trigger and the prometheus-adapter
/// rule query exists in the scrapes of a real scheduler and a real worker
/// process, with every label the queries match or group on. The events that
/// create the metrics are caused first: a Files-mode sync, a Tasks-mode sync
/// with broken files (per-object errors), a resolve (proxied), an export of
/// an annotation and its delete. The compose health checks of the scheduler
/// and a worker pass against the same processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_metrics_exist_in_live_scrapes() {
    let app = spawn_app(AppOptions {
        workers: false,
        env: vec![
            ("LOCAL_FILES_SERVING_ENABLED", "true".into()),
            ("LABELSYNC_SECRET_KEY", TEST_SECRET_KEY.into()),
        ],
        ..AppOptions::default()
    })
    .await;
    write_scrape_fixture_files(app.doc_root.path());
    let bind = format!("127.0.0.1:{}", free_port());
    let _worker = spawn_worker(
        &app,
        "deploy-test",
        &[
            ("LABELSYNC_METRICS_BIND", &bind),
            ("LABELSYNC_SECRET_KEY", TEST_SECRET_KEY),
        ],
    );
    let client = reqwest::Client::new();
    let worker_get = |path: &str| client.get(format!("http://{bind}{path}")).send();
    wait_for("the worker's listener", || async {
        worker_get("/readyz").await.is_ok_and(|r| r.status() == 200)
    })
    .await;

    let project = app.project("deploy").await;
    sync_files_and_broken_tasks(&app, project).await;
    resolve_an_image(&app, &client, project).await;
    // Export: an annotation reaches the target, then its delete removes it.
    export_and_delete_an_annotation(&app, project).await;

    let (scheduler_text, worker_text) = scrape_scheduler_and_worker(&app, &client, &bind).await;
    let mut series = scraped_series(&scheduler_text);
    for (metric, labels) in scraped_series(&worker_text) {
        series.entry(metric).or_default().extend(labels);
    }
    let missing = queried_series_missing_from(&series);
    assert!(
        missing.is_empty(),
        "not in the scrapes (labelsync_worker_slots needs a worker binary that exports it: \
         rebuild with `cargo build --workspace --bins`):\n  {}\n\nscheduler:\n{scheduler_text}\nworker:\n{worker_text}",
        missing.join("\n  ")
    );
    check_compose_health_checks_pass(&app, &bind);
    app.stop().await;
}

/// Images for a Files-mode sync; task files, one broken and one not a task
/// file, for a Tasks-mode sync; an export directory.
fn write_scrape_fixture_files(root: &Path) {
    std::fs::create_dir_all(root.join("data")).unwrap();
    for i in 0..3 {
        std::fs::write(root.join(format!("data/img-{i}.jpg")), b"jpeg").unwrap();
    }
    std::fs::create_dir_all(root.join("tasks")).unwrap();
    std::fs::write(
        root.join("tasks/good.jsonl"),
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n",
    )
    .unwrap();
    std::fs::write(root.join("tasks/broken.json"), "[{\"text\": \"c\"}, {\"te").unwrap();
    std::fs::write(root.join("tasks/notes.txt"), "not a task file").unwrap();
    std::fs::create_dir_all(root.join("export")).unwrap();
}

/// A Files-mode sync that completes and a Tasks-mode sync with per-object errors.
async fn sync_files_and_broken_tasks(app: &TestApp, project: i64) {
    let files = app
        .local_storage(project, json!({ "presign": false }))
        .await;
    let run = app.sync(&files["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");

    let (status, tasks_storage) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "source", "backend": "local",
                "import_method": "tasks", "config": { "path": "tasks" },
            }),
        )
        .await;
    assert_eq!(status, 201, "{tasks_storage}");
    let run = app.sync(&tasks_storage["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
}

/// A resolve of an image, proxied.
async fn resolve_an_image(app: &TestApp, client: &reqwest::Client, project: i64) {
    let resolved = client
        .get(format!("{}/api/v1/resolve", app.base))
        .query(&[
            ("project_id", project.to_string()),
            ("uri", "/data/local-files/?d=data/img-0.jpg".into()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resolved.status(), 200);
    assert_eq!(resolved.bytes().await.unwrap().as_ref(), b"jpeg");
}

/// An annotation reaches the export target, then its delete removes it.
async fn export_and_delete_an_annotation(app: &TestApp, project: i64) {
    let root = app.doc_root.path();
    let (status, target) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "target", "backend": "local", "prefix": "ann",
                "can_delete_objects": true, "config": { "path": "export" },
            }),
        )
        .await;
    assert_eq!(status, 201, "{target}");
    let task = app.all_tasks(project).await[0]["id"].as_i64().unwrap();
    let (status, annotation) = app
        .post(
            &format!("/api/v1/tasks/{task}/annotations"),
            json!({ "result": [{ "type": "choices", "value": { "choices": ["cat"] } }] }),
        )
        .await;
    assert_eq!(status, 201, "{annotation}");
    let id = annotation["id"].as_i64().unwrap();
    let file = root.join(format!("export/ann/{id}.json"));
    wait_for("the export", || async { file.exists() }).await;
    wait_for("the export run's end", || runs_idle(app, &target)).await;
    let (status, _) = app.delete(&format!("/api/v1/annotations/{id}")).await;
    assert_eq!(status, 204);
    wait_for("the delete", || async { !file.exists() }).await;
    wait_for("the delete run's end", || runs_idle(app, &target)).await;
}

/// The scheduler's and the worker's `/metrics` text.
async fn scrape_scheduler_and_worker(
    app: &TestApp,
    client: &reqwest::Client,
    bind: &str,
) -> (String, String) {
    let scheduler_text = client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let worker_text = client
        .get(format!("http://{bind}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (scheduler_text, worker_text)
}

/// The queries: the dashboard's, KEDA's (rendered) and the adapter rule's.
fn queried_exprs() -> Vec<(String, String)> {
    let mut queries: Vec<(String, String)> = dashboard_exprs(&dashboard());
    let keda = rendered("aws");
    let query = find(&keda, "ScaledObject", "labelsync-worker")["spec"]["triggers"][0]["metadata"]
        ["query"]
        .as_str()
        .unwrap()
        .to_owned();
    queries.push(("KEDA ScaledObject".into(), query));
    let rules = yaml_to_json(
        &std::fs::read_to_string(
            repo_root().join("deploy/k8s/components/hpa/prometheus-adapter-rules.yaml"),
        )
        .unwrap(),
    );
    let rule = &rules[0]["rules"]["external"][0];
    queries.push((
        "prometheus-adapter seriesQuery".into(),
        rule["seriesQuery"].as_str().unwrap().to_owned(),
    ));

    queries
}

/// Every metric, matched label and grouping label of the queries that the
/// scraped `series` lack (target labels aside), one line each.
fn queried_series_missing_from(series: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let queries = queried_exprs();
    let mut missing = Vec::new();
    for (title, expr) in &queries {
        let refs = promql_refs(expr);
        let mut expr_labels = BTreeSet::new();
        for (metric, matched) in &refs.metrics {
            let Some(labels) = series.get(metric) else {
                missing.push(format!("{title}: metric {metric} (in {expr})"));
                continue;
            };
            expr_labels.extend(labels.iter().cloned());
            for label in matched {
                if !labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    missing.push(format!(
                        "{title}: label {label} on {metric} (has {labels:?})"
                    ));
                }
            }
        }
        for label in &refs.grouping {
            if !expr_labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                missing.push(format!("{title}: grouping label {label} in {expr}"));
            }
        }
    }
    missing
}

/// The compose health checks pass against the real processes.
fn check_compose_health_checks_pass(app: &TestApp, bind: &str) {
    let compose = compose_config();
    let services = &compose["services"];
    let scheduler_addr = app.base.trim_start_matches("http://").to_owned();
    assert!(
        run_healthcheck(
            &services["scheduler"]["healthcheck"]["test"],
            "127.0.0.1:8080",
            &scheduler_addr
        ),
        "the scheduler's compose health check against {scheduler_addr}"
    );
    assert!(
        run_healthcheck(
            &services["worker-1"]["healthcheck"]["test"],
            "127.0.0.1:9464",
            bind
        ),
        "the worker's compose health check against {bind}"
    );
}
