//! The deployment files parse and say what they must: probes on the right paths, a preStop
//! drain, a non-root user, a PodDisruptionBudget, a HEALTHCHECK, and pgweir configurations that
//! pgweir itself accepts. (No Docker or Kubernetes runs here; this keeps the files honest.)

use std::path::{Path, PathBuf};

use pgweir::config::Config;
use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, key| match key.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[key],
    })
}

/// Parses a pgweir.toml whose secret files live under /etc/pgweir/secret, with stand-ins.
fn check_pgweir_toml(text: &str) -> Config {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("admin-token"), "a-token-of-enough-length").expect("token");
    std::fs::write(dir.path().join("userlist.txt"), "\"app\" \"app-password\"\n").expect("userlist");
    let text = text.replace("/etc/pgweir/secret", &dir.path().display().to_string());
    Config::from_toml(&text, None).unwrap_or_else(|e| panic!("pgweir rejects the deployment config:\n{e}"))
}

#[test]
fn dockerfile_builds_small_runs_non_root_and_checks_health() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    assert_eq!(
        text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")),
        2,
        "multi-stage"
    );
    assert!(text.contains("FROM debian:bookworm-slim"));
    assert!(text.contains("USER 10001"), "non-root");
    assert!(
        text.contains("HEALTHCHECK") && text.contains("\"health\""),
        "HEALTHCHECK via pgweir health"
    );
    assert!(text.contains("/etc/pgweir/pgweir.toml"));
    assert!(text.contains("EXPOSE 6432 6433"));
    for copied in ["deploy/pgweir.toml", "Cargo.lock", "benches"] {
        assert!(
            Path::new(&root().join(copied)).exists(),
            "{copied} is copied by the Dockerfile"
        );
    }
}

#[test]
fn compose_has_postgres_pgweir_prometheus_and_grafana_wired_together() {
    let compose = yaml("deploy/docker-compose.yml");
    for service in ["postgres", "pgweir", "prometheus", "grafana"] {
        assert!(get(&compose, &format!("services.{service}")).is_mapping(), "{service}");
    }
    let mounts = format!("{:?}", get(&compose, "services.pgweir.volumes"));
    assert!(mounts.contains("/etc/pgweir/pgweir.toml"), "{mounts}");
    let prom = format!("{:?}", get(&compose, "services.prometheus.volumes"));
    assert!(prom.contains("config/alerts.yml"), "alert rules provisioned: {prom}");
    let grafana = format!("{:?}", get(&compose, "services.grafana.volumes"));
    assert!(
        grafana.contains("grafana-dashboard.json"),
        "dashboard provisioned: {grafana}"
    );
    // Every file compose mounts from the repository exists.
    for volume in ["pgweir", "prometheus", "grafana"].iter().flat_map(|s| {
        get(&compose, &format!("services.{s}.volumes"))
            .as_sequence()
            .cloned()
            .unwrap_or_default()
    }) {
        let source = volume
            .as_str()
            .and_then(|v| v.split(':').next())
            .expect("short volume syntax");
        assert!(root().join("deploy").join(source).exists(), "{source} is missing");
    }
    let scrape = yaml("deploy/prometheus/prometheus.yml");
    assert_eq!(
        get(&scrape, "scrape_configs.0.static_configs.0.targets.0").as_str(),
        Some("pgweir:6433")
    );
    let config = check_pgweir_toml(&std::fs::read_to_string(root().join("deploy/pgweir.toml")).expect("toml"));
    assert_eq!(config.listen.addr.port(), 6432);
    assert_eq!(config.admin.addr.map(|a| a.port()), Some(6433));
    assert!(
        config.admin.token.is_some(),
        "a non-loopback admin listener needs a token"
    );
}

#[test]
fn kubernetes_manifests_probe_drain_and_protect_availability() {
    let deployment = yaml("deploy/k8s/deployment.yaml");
    let container = get(&deployment, "spec.template.spec.containers.0");
    assert_eq!(get(container, "readinessProbe.httpGet.path").as_str(), Some("/ready"));
    assert_eq!(get(container, "livenessProbe.httpGet.path").as_str(), Some("/health"));
    let pre_stop = format!("{:?}", get(container, "lifecycle.preStop.exec.command"));
    assert!(
        pre_stop.contains("drain") && pre_stop.contains("--token-file"),
        "{pre_stop}"
    );
    assert_eq!(
        get(&deployment, "spec.template.spec.securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    let grace = get(&deployment, "spec.template.spec.terminationGracePeriodSeconds")
        .as_u64()
        .expect("grace period");

    let configmap = yaml("deploy/k8s/configmap.yaml");
    let toml = get(&configmap, "data")
        .get("pgweir.toml")
        .and_then(Value::as_str)
        .expect("pgweir.toml in the ConfigMap");
    let config = check_pgweir_toml(toml);
    assert!(
        config.listen.shutdown_timeout.as_secs() + 10 < grace,
        "terminationGracePeriodSeconds must cover the preStop wait and shutdown_timeout"
    );

    let service = yaml("deploy/k8s/service.yaml");
    assert_eq!(get(&service, "kind").as_str(), Some("Service"));
    let pdb = yaml("deploy/k8s/pdb.yaml");
    assert_eq!(get(&pdb, "kind").as_str(), Some("PodDisruptionBudget"));
    assert_eq!(get(&pdb, "spec.minAvailable").as_u64(), Some(1));
    let secret = yaml("deploy/k8s/secret.yaml");
    assert!(get(&secret, "stringData.admin-token").is_string());
}

#[test]
fn alert_rules_parse_and_every_rule_has_an_expression_and_a_summary() {
    let alerts = yaml("config/alerts.yml");
    let rules = get(&alerts, "groups.0.rules").as_sequence().expect("rules");
    assert!(rules.len() >= 8);
    for rule in rules {
        let name = get(rule, "alert").as_str().expect("alert name");
        assert!(
            get(rule, "expr").as_str().is_some_and(|e| e.contains("pgweir_")),
            "{name}"
        );
        assert!(get(rule, "annotations.summary").is_string(), "{name}");
    }
}
