//! The Kubernetes manifests' config is one the worker accepts. `deploy/validate-kubernetes.py`
//! (run by `.ci/run`) checks the manifests themselves; only the worker's own parser can say
//! whether the ConfigMap's TOML still fits the config as the code evolves.

use std::path::Path;

use fallback_worker::config::{Config, EnvOverrides};

/// The text of the YAML block scalar `key: |` in `manifest`, without its indentation.
fn block_scalar(manifest: &str, key: &str) -> Option<String> {
    let mut lines = manifest.lines().skip_while(|line| line.trim() != format!("{key}: |"));
    let header = lines.next()?;
    let indent = header.len() - header.trim_start().len() + 2;
    let body: Vec<&str> = lines
        .take_while(|line| line.trim().is_empty() || line.len() - line.trim_start().len() >= indent)
        .map(|line| line.get(indent..).unwrap_or(""))
        .collect();
    Some(body.join("\n"))
}

#[test]
fn the_kubernetes_configmap_carries_a_config_the_worker_accepts() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/configmap.yaml");
    let manifest = std::fs::read_to_string(&path).expect("the ConfigMap exists");
    let toml = block_scalar(&manifest, "fallback.toml").expect("the ConfigMap has a fallback.toml block");
    let config = Config::parse(&toml, &path, &EnvOverrides::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.chains.contains_key("default"));
    assert!(!config.providers.is_empty());
    assert!(config.http.addr.ends_with(":9090"), "the Deployment's probes and scrape port");
}

#[test]
fn a_block_scalar_is_read_up_to_the_next_key() {
    let yaml = "data:\n  a.toml: |\n    x = 1\n\n    [s]\n    y = 2\n  b: c\n";
    assert_eq!(block_scalar(yaml, "a.toml").as_deref(), Some("x = 1\n\n[s]\ny = 2"));
    assert_eq!(block_scalar(yaml, "missing"), None);
}
