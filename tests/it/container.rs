//! The container and the compose service, checked without a Docker engine
//! (none runs on the project's machines): the compose file parses, its worker
//! service runs `migrate` then `run`, sets only variables the CLI reads, and
//! is health-checked on /readyz by a command the binary has; the Dockerfile
//! is multi-stage and runs the binary alone as a non-root user.

use crate::helpers::BIN;

fn repo_file(name: &str) -> String {
    std::fs::read_to_string(format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn help(args: &[&str]) -> String {
    let out = std::process::Command::new(BIN).args(args).arg("--help").output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every environment variable the CLI reads, as its own `--help` lists them.
fn cli_env_vars() -> Vec<String> {
    let mut vars = Vec::new();
    for args in [&[][..], &["run"], &["probe"]] {
        for part in help(args).split("[env: ").skip(1) {
            vars.push(part.chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect());
        }
    }
    vars
}

#[test]
fn the_compose_worker_migrates_then_runs_with_variables_the_cli_reads_and_a_readyz_healthcheck() {
    let compose: serde_yaml::Value = serde_yaml::from_str(&repo_file("docker-compose.yml")).expect("valid YAML");
    let services = &compose["services"];
    for name in ["postgres", "localstack", "worker"] {
        assert!(services[name].is_mapping(), "service {name}");
    }
    let worker = &services["worker"];
    assert_eq!(worker["build"].as_str(), Some("."), "built from the Dockerfile");
    let entry: Vec<&str> = worker["entrypoint"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let script = entry.last().unwrap();
    let (migrate, run) = (script.find("transfer-worker migrate").unwrap(), script.find("transfer-worker run").unwrap());
    assert!(migrate < run && script.contains("&&"), "migrate, and only if it worked, run: {script}");
    for dep in ["postgres", "localstack"] {
        assert_eq!(worker["depends_on"][dep]["condition"].as_str(), Some("service_healthy"));
    }

    let known = cli_env_vars();
    let aws = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"];
    let env = worker["environment"].as_mapping().unwrap();
    for (k, v) in env {
        let k = k.as_str().unwrap();
        assert!(known.iter().any(|e| e == k) || aws.contains(&k) || k == "RUST_LOG", "{k} is not read by the CLI");
        assert!(!v.as_str().unwrap_or("").is_empty(), "{k} has a value");
    }
    for required in ["DATABASE_URL", "SQS_QUEUE_URL", "TRANSFER_WORKER_ADMIN_ADDR"] {
        assert!(env.contains_key(required), "{required}");
    }
    let admin = env["TRANSFER_WORKER_ADMIN_ADDR"].as_str().unwrap();
    assert!(admin.starts_with("0.0.0.0:"), "reachable from outside the container: {admin}");
    // The token comes from the operator's environment: no default anywhere
    // (an empty one is no token: the console is read-only).
    let token = env["TRANSFER_WORKER_ADMIN_TOKEN"].as_str().unwrap();
    assert_eq!(token, "${TRANSFER_WORKER_ADMIN_TOKEN:-}", "no token is shipped");
    assert!(worker["ports"][0].as_str().unwrap().ends_with(&admin["0.0.0.0:".len()..]), "the admin port is published");

    let check: Vec<&str> =
        worker["healthcheck"]["test"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(check[..3], ["CMD", "transfer-worker", "probe"], "{check:?}");
    assert!(check.contains(&"/readyz"), "{check:?}");
    assert!(help(&[]).contains("  probe "), "the binary has the probe the healthcheck runs");
}

#[test]
fn the_dockerfile_is_multi_stage_and_runs_the_binary_alone_as_a_non_root_user() {
    let dockerfile = repo_file("Dockerfile");
    let instructions: Vec<&str> =
        dockerfile.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let froms: Vec<&&str> = instructions.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let last_from = instructions.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let runtime = &instructions[last_from..];
    assert!(froms.last().unwrap().contains("slim"), "a small runtime base: {froms:?}");
    let copies: Vec<&&str> = runtime.iter().filter(|l| l.starts_with("COPY")).collect();
    assert_eq!(copies.len(), 1, "the binary only: {copies:?}");
    assert!(copies[0].contains("--from=build") && copies[0].contains("target/release/transfer-worker"), "{copies:?}");
    let user = runtime.iter().find_map(|l| l.strip_prefix("USER ")).expect("a USER in the runtime stage");
    assert!(!["root", "0", "0:0"].contains(&user.trim()), "non-root: {user}");
    assert!(runtime.iter().any(|l| l.starts_with("ENTRYPOINT") && l.contains("transfer-worker")));
    assert!(runtime.iter().any(|l| l.starts_with("HEALTHCHECK") && l.contains("probe")));
    // The build stage needs the query metadata to compile offline.
    assert!(instructions.iter().any(|l| l.starts_with("COPY .sqlx")), "COPY .sqlx");
    assert!(instructions.iter().any(|l| l.contains("cargo build --release --locked")));
}
