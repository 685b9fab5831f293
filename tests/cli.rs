//! The CLI as a user runs it: `serve --dev` in one process, client commands
//! in others, exit codes checked.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM for a clean shutdown, then make sure it is gone.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Start `serve --dev` and return once it says it is ready (read from its
/// output, no sleeping).
fn serve(dir: &Path) -> Server {
    serve_logging(dir, "warn").0
}

/// [`serve`] with `RUST_LOG=log`; what it wrote until it was ready.
fn serve_logging(dir: &Path, log: &str) -> (Server, Vec<String>) {
    serve_with(dir, log, &[])
}

/// [`serve_logging`] with more flags.
fn serve_with(dir: &Path, log: &str, flags: &[&str]) -> (Server, Vec<String>) {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .args(flags)
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(l)) => {
                let ready = l.contains("dev broker ready");
                seen.push(l);
                if ready {
                    break;
                }
            }
            _ => panic!("server exited before it was ready: {seen:#?}"),
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Server { child }, seen)
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("PORTCULLIS_DEV_DIR", dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_readme_tour_works_with_the_documented_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);
    for f in [
        "ca.pem",
        "server.pem",
        "workload.pem",
        "approver.pem",
        "admin.pem",
        "policy.toml",
        "kek",
        "endpoints.json",
    ] {
        assert!(dir.join(f).exists(), "{f} missing from the dev dir");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["kek", "ca-key.pem", "workload-key.pem"] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f} must be private");
        }
    }

    // Request: the token alone on stdout.
    let o = run(
        &dir,
        &[
            "token",
            "request",
            "--scope",
            "orders.read",
            "--reason",
            "tour",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let token = stdout(&o).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");

    // Inspect.
    let o = run(&dir, &["token", "inspect", &token, "--output", "json"]);
    assert_eq!(code(&o), 0, "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["active"], true);
    assert_eq!(v["scope"], "orders.read");
    let jti = v["jti"].as_str().unwrap().to_owned();

    // List and show.
    let o = run(&dir, &["lease", "list", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["leases"][0]["id"], jti.as_str());
    let o = run(&dir, &["lease", "show", &jti]);
    assert!(stdout(&o).contains("active"), "{o:?}");

    // Renew: a fresh token for the same lease.
    let o = run(
        &dir,
        &["lease", "renew", &jti, "--ttl", "10m", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["lease"]["id"], jti.as_str());
    assert_eq!(v["lease"]["renewals"], 1);

    // Someone else cannot revoke it; the owner can; then it is inactive.
    let o = run(&dir, &["lease", "revoke", &jti, "--as", "approver"]);
    assert_eq!(code(&o), 2, "{o:?}");
    let o = run(&dir, &["lease", "revoke", &jti, "--reason", "tour over"]);
    assert_eq!(code(&o), 0, "{o:?}");
    let o = run(&dir, &["token", "inspect", &token]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).contains("active     false"));

    // Approval scope without --wait: parked, exit 3.
    let o = run(
        &dir,
        &[
            "token",
            "request",
            "--scope",
            "orders.admin",
            "--reason",
            "fix row 7",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 3, "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rid = v["pending"]["id"].as_str().unwrap().to_owned();
    let o = run(&dir, &["requests", "withdraw", &rid]);
    assert_eq!(code(&o), 0, "{o:?}");
    let o = run(
        &dir,
        &[
            "token",
            "request",
            "--scope",
            "orders.admin",
            "--reason",
            "fix row 8",
            "--wait",
            "--timeout",
            "1ms",
        ],
    );
    assert_eq!(code(&o), 3, "timed out waiting: {o:?}");

    // Denied by policy: exit 2. Bad input: 64. Usage error: 64.
    let o = run(&dir, &["token", "request", "--scope", "payroll.read"]);
    assert_eq!(code(&o), 2, "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("payroll.read"));
    let o = run(
        &dir,
        &["token", "request", "--scope", "orders.read", "--ttl", "48h"],
    );
    assert_eq!(code(&o), 64, "{o:?}");
    let o = run(&dir, &["token", "request"]);
    assert_eq!(code(&o), 64, "{o:?}");

    // Bulk revocation as admin.
    for _ in 0..3 {
        assert_eq!(
            code(&run(&dir, &["token", "request", "--scope", "orders.read"])),
            0
        );
    }
    let o = run(
        &dir,
        &[
            "lease",
            "revoke-all",
            "--subject",
            portcullis::dev::WORKLOAD,
            "--as",
            "admin",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["revoked"], 3);
    assert_eq!(v["descendants_revoked"], 0);

    // Offline policy commands.
    let policy = dir.join("policy.toml");
    let o = run(&dir, &["policy", "check", policy.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{o:?}");
    let o = run(
        &dir,
        &[
            "policy",
            "explain",
            "--identity",
            portcullis::dev::WORKLOAD,
            "--scope",
            "orders.admin",
        ],
    );
    // Issue 8: "would be parked" is an answer (exit 0), not a pending request.
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(stdout(&o).contains("approvers"), "{o:?}");
    let o = run(
        &dir,
        &[
            "policy",
            "explain",
            "--identity",
            portcullis::dev::APPROVER,
            "--scope",
            "orders.read",
        ],
    );
    assert_eq!(code(&o), 2, "{o:?}");
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[scope]]\nname = \"a b\"\ntier = \"auto\"\nworkloads = [\"x\"]\n",
    )
    .unwrap();
    let o = run(&dir, &["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 2") && err.contains("line 4"), "{err}");

    // Keys.
    let o = run(&dir, &["keys", "jwks"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["keys"][0]["alg"], "ES256");
}

#[test]
fn client_errors_are_clear_without_a_server() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(tmp.path(), &["lease", "list"]);
    assert_eq!(code(&o), 64, "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("serve --dev"),
        "{o:?}"
    );
}

/// Start `token request --wait` and return the child and its request id,
/// read from its live status line.
fn waiting_request(dir: &Path, scope: &str) -> (Child, String, std::thread::JoinHandle<()>) {
    let mut child = Command::new(BIN)
        .args([
            "token",
            "request",
            "--scope",
            scope,
            "--reason",
            "cli approval",
            "--wait",
            "--timeout",
            "5m",
        ])
        .env("PORTCULLIS_DEV_DIR", dir)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let id = loop {
        let line = lines.next().expect("requester exited early").unwrap();
        if line.contains("pending:") {
            let start = line.find('[').unwrap() + 1;
            let end = line.find(']').unwrap();
            break line[start..end].to_owned();
        }
    };
    let drain = std::thread::spawn(move || for _ in lines {});
    (child, id, drain)
}

#[test]
fn a_requester_waits_while_an_approver_decides_from_another_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);

    let (child, id, drain) = waiting_request(&dir, "orders.admin");
    let o = run(&dir, &["requests", "list", "--as", "approver"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(stdout(&o).contains(&id), "{o:?}");
    // The requester finds their own request again (e.g. after Ctrl-C).
    let o = run(&dir, &["requests", "list", "--mine"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(
        stdout(&o).contains(&id) && stdout(&o).contains("pending"),
        "{o:?}"
    );
    let o = run(&dir, &["requests", "list", "--mine", "--as", "approver"]);
    assert!(!stdout(&o).contains(&id), "not the approver's own: {o:?}");
    let o = run(&dir, &["requests", "show", &id, "--as", "approver"]);
    assert!(
        stdout(&o).contains("digest") && stdout(&o).contains("cli approval"),
        "{o:?}"
    );
    let o = run(
        &dir,
        &[
            "requests",
            "approve",
            &id,
            "--as",
            "approver",
            "--reason",
            "looks right",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let out = child.wait_with_output().unwrap();
    drain.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let o = run(&dir, &["token", "inspect", &token, "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["scope"], "orders.admin");

    // Denied while waiting: exit 2.
    let (child, id, drain) = waiting_request(&dir, "orders.admin");
    let o = run(
        &dir,
        &[
            "requests",
            "deny",
            &id,
            "--as",
            "approver",
            "--reason",
            "not today",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let out = child.wait_with_output().unwrap();
    drain.join().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "no token on deny");
}

#[test]
fn the_agent_keeps_a_valid_token_file_across_renewals_and_a_broker_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let server = serve(&dir);
    let out = tmp.path().join("token");
    let mut agent = Command::new(BIN)
        .args(["agent", "--scope", "orders.read", "--ttl", "4s", "--out"])
        .arg(&out)
        .env("PORTCULLIS_DEV_DIR", &dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(agent.stdout.take().unwrap()).lines();
    let mut next_write = || loop {
        let l = lines.next().expect("agent exited").unwrap();
        if l.starts_with("token written") {
            return l;
        }
    };
    let active = |dir: &Path| {
        let token = std::fs::read_to_string(&out).unwrap();
        let o = run(dir, &["token", "inspect", token.trim(), "--output", "json"]);
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()["active"] == true
    };
    let first = next_write();
    assert!(first.contains("renewals 0"), "{first}");
    assert!(active(&dir));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    for n in 1..=2 {
        let l = next_write();
        assert!(l.contains(&format!("renewals {n}")), "{l}");
        assert!(active(&dir));
    }
    // Restart the broker (new port, same data): the agent finds it again and
    // keeps renewing the same lease.
    drop(server);
    let _server = serve(&dir);
    // Renewal of the same lease, or a new lease if it ran out meanwhile:
    // either way the file holds a live token.
    next_write();
    assert!(active(&dir));
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Issue 27, item 10: an agent that cannot write its file takes no lease;
/// one whose parent token is gone (and not replaced) stops, saying so.
#[test]
fn the_agent_checks_its_file_first_and_stops_when_its_parent_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);
    let leases = |dir: &Path| {
        let o = run(dir, &["lease", "list", "--output", "json"]);
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()["leases"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let o = Command::new(BIN)
        .args(["agent", "--scope", "orders.read", "--out"])
        .arg(tmp.path().join("no-such-dir/token"))
        .env("PORTCULLIS_DEV_DIR", &dir)
        .output()
        .unwrap();
    assert_eq!(code(&o), 1, "{o:?}");
    assert!(stderr(&o).contains("is not a directory"), "{}", stderr(&o));
    assert_eq!(leases(&dir), 0, "no lease taken for a file it cannot write");
    // An approval scope with no reason for its approvers: the broker
    // refuses the request, and the agent says so and stops.
    let o = Command::new(BIN)
        .args(["agent", "--scope", "orders.admin", "--out"])
        .arg(tmp.path().join("admin.jwt"))
        .env("PORTCULLIS_DEV_DIR", &dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(code(&o), 1, "{o:?}");
    assert!(
        stderr(&o).contains("refused the agent's request") && stderr(&o).contains("--reason"),
        "{}",
        stderr(&o)
    );

    // A parent token, revoked: the agent gives up once it is clear that
    // nothing replaces it.
    let parent = tmp.path().join("parent.jwt");
    let o = run(&dir, &["token", "request", "--scope", "orders.read"]);
    std::fs::write(&parent, stdout(&o)).unwrap();
    let jti = {
        let t = std::fs::read_to_string(&parent).unwrap();
        let o = run(&dir, &["token", "inspect", t.trim(), "--output", "json"]);
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()["jti"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(code(&run(&dir, &["lease", "revoke", &jti])), 0);
    let started = std::time::Instant::now();
    let o = Command::new(BIN)
        .args(["agent", "--scope", "orders.read", "--from-token"])
        .arg(&parent)
        .arg("--out")
        .arg(tmp.path().join("child.jwt"))
        .env("PORTCULLIS_DEV_DIR", &dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(code(&o), 1, "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains("no longer active") && err.contains("stopping"),
        "{err}"
    );
    assert!(err.contains("no token yet"), "it never had one: {err}");
    assert!(!err.contains("keeping the last good token"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn the_deploy_policies_pass_policy_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let example = root.join("deploy/config/policy.example.toml");
    let o = run(tmp.path(), &["policy", "check", example.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{o:?}");
    // The policy embedded in the Kubernetes ConfigMap.
    let cm = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml")).unwrap();
    let body: String = cm
        .split("policy.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let file = tmp.path().join("cm-policy.toml");
    std::fs::write(&file, body).unwrap();
    let o = run(tmp.path(), &["policy", "check", file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{o:?}");
}

/// Issue 24: an `[[issuer]]` is checked, and `policy check` says where
/// its tokens are used.
#[test]
fn an_issuer_is_checked_and_said_where_its_tokens_sign_in() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("policy.toml");
    let issuer = r#"[[issuer]]
name = "github"
kind = "github"
issuer = "https://token.actions.githubusercontent.com"
discovery = true
audience = "https://broker.example.org"
require = { repository_owner_id = "1234567" }
identity = "spiffe://github.example.org/{repository_owner_id}/{repository_id}"
"#;
    std::fs::write(&file, issuer).unwrap();
    let o = run(tmp.path(), &["policy", "check", file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(
        stdout(&o)
            .contains("1 issuer whose tokens workloads sign in with on the federation listener"),
        "{o:?}"
    );
    std::fs::write(&file, issuer.replace("discovery = true\n", "")).unwrap();
    let o = run(tmp.path(), &["policy", "check", file.to_str().unwrap()]);
    assert_ne!(code(&o), 0, "{o:?}");
    assert!(
        stderr(&o).contains("line 2: issuer `github`: give exactly one key source"),
        "{o:?}"
    );
    // Policy text reaches the terminal with its control characters escaped.
    std::fs::write(&file, "[[issuer]]\nname = \"x\\u001b[31m\"\n").unwrap();
    let o = run(tmp.path(), &["policy", "check", file.to_str().unwrap()]);
    assert!(stderr(&o).contains("issuer `x\\u{1b}[31m`"), "{o:?}");
    assert!(!stderr(&o).contains('\u{1b}'), "{o:?}");
}

/// Run without `PORTCULLIS_DEV_DIR`: the flags alone say where to go.
fn run_bare(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("PORTCULLIS_DEV_DIR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn connection_and_output_flags_go_before_or_after_the_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);
    let d = dir.to_str().unwrap();

    let o = run_bare(&[
        "--dev-dir",
        d,
        "token",
        "request",
        "--scope",
        "orders.admin",
        "--reason",
        "flags",
    ]);
    assert_eq!(code(&o), 3, "{o:?}");
    let rid = stderr(&o)
        .lines()
        .find_map(|l| l.strip_prefix("request    "))
        .unwrap()
        .trim()
        .to_owned();
    // Before the subcommand, after it, and mixed: all act as the approver.
    for args in [
        vec!["--dev-dir", d, "--as", "approver", "requests", "list"],
        vec!["requests", "list", "--dev-dir", d, "--as", "approver"],
        vec!["--as", "approver", "requests", "list", "--dev-dir", d],
    ] {
        let o = run_bare(&args);
        assert_eq!(code(&o), 0, "{args:?}: {o:?}");
        assert!(stdout(&o).contains(&rid), "{args:?}: {o:?}");
    }
    for args in [
        vec!["--output", "json", "--dev-dir", d, "lease", "list"],
        vec!["lease", "list", "--dev-dir", d, "--output", "json"],
    ] {
        let o = run_bare(&args);
        assert_eq!(code(&o), 0, "{args:?}: {o:?}");
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert!(v["leases"].is_array(), "{args:?}: {v}");
    }
    // The environment still works when no flag is given.
    let o = run(&dir, &["requests", "list", "--as", "approver"]);
    assert!(stdout(&o).contains(&rid), "{o:?}");
}

#[test]
fn requests_and_leases_read_well() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);
    let park = |reason: &str| {
        let o = run(
            &dir,
            &[
                "token",
                "request",
                "--scope",
                "orders.admin",
                "--reason",
                reason,
                "--output",
                "json",
            ],
        );
        assert_eq!(code(&o), 3, "{o:?}");
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["pending"]["id"].as_str().unwrap().to_owned()
    };

    // The creation is not an "unknown" state.
    let rid = park("first");
    let o = run(&dir, &["requests", "show", &rid, "--as", "approver"]);
    assert!(stdout(&o).contains("created -> pending"), "{o:?}");
    assert!(!stdout(&o).contains("unknown"), "{o:?}");
    assert!(stdout(&o).contains("waits for  0 of 1 approvals"), "{o:?}");

    // Once approved: what was received, and that nothing more is needed.
    let o = run(
        &dir,
        &[
            "requests", "approve", &rid, "--as", "approver", "--reason", "ok",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let o = run(&dir, &["requests", "show", &rid, "--as", "approver"]);
    let text = stdout(&o);
    assert!(
        text.contains("1 of 1 approvals") && text.contains("complete"),
        "{text}"
    );
    assert!(text.contains("nothing more needed"), "{text}");
    assert!(!text.contains("waits for"), "{text}");

    // A denied requester learns who denied it and why (exit 2).
    let rid = park("second");
    let o = run(
        &dir,
        &[
            "requests",
            "deny",
            &rid,
            "--as",
            "approver",
            "--reason",
            "not today",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let o = run(&dir, &["requests", "watch", &rid]);
    assert_eq!(code(&o), 2, "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains("denied")
            && err.contains(portcullis::dev::APPROVER)
            && err.contains("not today"),
        "{err}"
    );

    // Lease columns line up whatever the scope names' lengths.
    for scope in ["orders.read", "orders.write"] {
        assert_eq!(code(&run(&dir, &["token", "request", "--scope", scope])), 0);
    }
    let o = run(&dir, &["lease", "list"]);
    let cols: Vec<usize> = stdout(&o)
        .lines()
        .map(|l| l.find("expires").unwrap())
        .collect();
    assert_eq!(cols.len(), 2, "{o:?}");
    assert_eq!(cols[0], cols[1], "{o:?}");

    // A second broker on the same directory says so, with the holder's pid.
    let o = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(code(&o), 1, "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains("another broker is already running on") && err.contains("(pid "),
        "{err}"
    );
}

#[test]
fn a_refused_connection_and_a_failed_handshake_are_told_apart() {
    let tmp = tempfile::tempdir().unwrap();
    // A port nobody listens on: bind one, then let it go.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let other = portcullis::dev::DevDir::new(tmp.path().join("other"));
    other.prepare().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let o = run(&other.root, &["lease", "list", "--server", &addr]);
    assert_eq!(code(&o), 1, "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains(&format!("no broker answering at {addr}")) && err.contains("portcullis serve"),
        "{err}"
    );
    assert!(!err.contains("TLS") && !err.contains("--cert"), "{err}");

    // A broker whose certificate another CA signed: the handshake fails.
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);
    let foreign_ca = other.path("ca.pem");
    let o = run(
        &dir,
        &["lease", "list", "--ca", foreign_ca.to_str().unwrap()],
    );
    assert_eq!(code(&o), 1, "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains("TLS handshake failed") && err.contains("--ca"),
        "{err}"
    );
    assert!(!err.contains("no broker answering"), "{err}");

    // A client certificate from another CA: the broker refuses it (seen as
    // an alert or a closed connection on the first call).
    let (cert, key) = other.identity_files(portcullis::dev::As::Workload);
    let o = run(
        &dir,
        &[
            "lease",
            "list",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 1, "{o:?}");
    assert!(stderr(&o).contains("--cert/--key"), "{o:?}");
}

/// `bench` is a tool users run against their broker: every mode must work
/// and report what it did. Nothing here is about speed.
#[test]
fn every_bench_mode_runs_against_a_real_broker_and_reports_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    // Without the per-identity exchange rate: the bench measures the broker.
    let (_server, _) = serve_with(&dir, "warn", &["--max-exchanges-per-second", "0"]);
    for rpc in ["grant", "introspect", "renew", "mixed", "exchange"] {
        let o = run(
            &dir,
            &[
                "bench",
                "--scope",
                "orders.read",
                "--rpc",
                rpc,
                "--clients",
                "2",
                "--duration",
                "300ms",
                "--ttl",
                "2m",
                "--leases",
                "40",
                "--output",
                "json",
            ],
        );
        assert_eq!(code(&o), 0, "{rpc}: {}", stderr(&o));
        let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(r["rpc"], rpc);
        assert_eq!(r["errors"], 0, "{rpc}: {r}");
        assert!(r["calls"].as_u64().unwrap() > 0, "{rpc}: {r}");
        // The fill grants at least what was asked (introspection also
        // needs a pool of live tokens).
        assert!(r["filled"].as_u64().unwrap() >= 40, "{rpc}: {r}");
        let grants = r["grants"].as_u64().unwrap();
        // Each RPC the run made has its own figures, and they add up.
        let per: Vec<(String, u64)> = r["per_rpc"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["rpc"].as_str().unwrap().to_owned(),
                    l["calls"].as_u64().unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = per.iter().map(|(n, _)| n.as_str()).collect();
        match rpc {
            "mixed" => assert_eq!(names, ["grant", "introspect", "renew"], "{r}"),
            one => assert_eq!(names, [one], "{r}"),
        }
        assert_eq!(
            per.iter().map(|(_, c)| c).sum::<u64>(),
            r["calls"].as_u64().unwrap()
        );
        match rpc {
            "grant" => assert_eq!(grants, r["calls"].as_u64().unwrap()),
            "mixed" => assert!(grants > 0 && grants < r["calls"].as_u64().unwrap()),
            _ => assert_eq!(grants, 0, "{rpc}: {r}"),
        }
        for p in ["p50_ms", "p99_ms", "p999_ms", "max_ms"] {
            assert!(r[p].as_f64().unwrap() > 0.0, "{rpc} {p}: {r}");
        }
        assert!(r["p50_ms"].as_f64() <= r["p999_ms"].as_f64());
    }
    // A disk probe needs a directory that exists.
    let o = run(
        &dir,
        &[
            "bench",
            "--scope",
            "orders.read",
            "--duration",
            "100ms",
            "--disk-probe",
            "/nonexistent/dir",
        ],
    );
    assert_eq!(code(&o), 64, "{}", stderr(&o));
    assert!(stderr(&o).contains("--disk-probe"), "{}", stderr(&o));
}

/// Issue 21, finding 3: against a broker with its per-identity exchange
/// rate (here 5 a second), the bench says its figure measures the limit.
#[test]
fn the_bench_says_when_the_brokers_limits_refused_its_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let (_server, _) = serve_with(&dir, "warn", &["--max-exchanges-per-second", "5"]);
    let o = run(
        &dir,
        &[
            "bench",
            "--scope",
            "orders.read",
            "--rpc",
            "exchange",
            "--clients",
            "2",
            "--duration",
            "500ms",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(r["errors"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("--max-exchanges-per-second")),
        "{r}"
    );
}

#[test]
fn a_token_is_exchanged_shown_as_a_tree_and_kept_fresh_from_a_parent_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);
    let json = |o: &Output| serde_json::from_str::<serde_json::Value>(&stdout(o)).unwrap();
    // orders.write binds: the parent carries the workload's thumbprint.
    let o = run(
        &dir,
        &[
            "token",
            "request",
            "--scope",
            "orders.read",
            "--scope",
            "orders.write",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let parent = stdout(&o).trim().to_owned();
    let parent_file = tmp.path().join("parent");
    std::fs::write(&parent_file, &parent).unwrap();
    let mine = dir.join("workload.pem");
    let theirs = dir.join("approver.pem");
    let o = run(&dir, &["token", "inspect", &parent, "--presented-cert"]);
    assert_ne!(code(&o), 0, "no certificate file given");
    let o = run(
        &dir,
        &[
            "token",
            "inspect",
            &parent,
            "--presented-cert",
            mine.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(stdout(&o).contains("(matches)"), "{}", stdout(&o));
    let o = run(
        &dir,
        &[
            "token",
            "inspect",
            &parent,
            "--presented-cert",
            theirs.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 1, "bound to another certificate: {o:?}");
    assert_eq!(
        stdout(&o),
        "active     false\nwhy        not accepted with the certificate presented (bound to another), or not its lease's current token (superseded by a renewal, altered, or signed by a withdrawn key)\n",
        "an answer, not a failed call, with why (issue 27, item 8)"
    );

    // Narrow it for myself, read-only, from the file.
    let at_file = format!("@{}", parent_file.display());
    let o = run(
        &dir,
        &[
            "token",
            "exchange",
            "--token",
            &at_file,
            "--scope",
            "orders.read",
            "--ttl",
            "2m",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let child = stdout(&o).trim().to_owned();
    let o = run(&dir, &["token", "inspect", &child, "--output", "json"]);
    let seen = json(&o);
    assert_eq!(seen["scope"], "orders.read");
    assert_eq!(seen["act"][0], portcullis::dev::WORKLOAD);
    // Widening is refused, naming the field.
    let o = run(
        &dir,
        &[
            "token",
            "exchange",
            "--token",
            &at_file,
            "--scope",
            "orders.admin",
        ],
    );
    assert_ne!(code(&o), 0);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("scopes"),
        "{o:?}"
    );

    // The agent keeps a delegated token from the parent file.
    let out = tmp.path().join("child");
    let mut agent = Command::new(BIN)
        .args(["agent", "--from-token"])
        .arg(&parent_file)
        .args(["--scope", "orders.read", "--ttl", "1m", "--out"])
        .arg(&out)
        .env("PORTCULLIS_DEV_DIR", &dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(agent.stdout.take().unwrap()).lines();
    let written = loop {
        let l = lines.next().expect("agent exited").unwrap();
        if l.starts_with("token written") {
            break l;
        }
    };
    let _ = agent.kill();
    let _ = agent.wait();
    let kept = std::fs::read_to_string(&out).unwrap();
    let o = run(&dir, &["token", "inspect", kept.trim(), "--output", "json"]);
    assert_eq!(json(&o)["act"][0], portcullis::dev::WORKLOAD, "{written}");

    // The tree below the parent: both children, one line each.
    let root = json(&run(
        &dir,
        &["token", "inspect", &parent, "--output", "json"],
    ))["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    let o = run(&dir, &["lease", "tree", &root]);
    assert_eq!(code(&o), 0, "{o:?}");
    let text = stdout(&o);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.lines().skip(1).all(|l| l.starts_with("  l_")),
        "{text}"
    );
    let o = run(&dir, &["lease", "show", &root, "--output", "json"]);
    assert_eq!(json(&o)["children"].as_array().unwrap().len(), 2);
    // Revoking the parent ends the children.
    assert_eq!(code(&run(&dir, &["lease", "revoke", &root])), 0);
    let o = run(&dir, &["token", "inspect", &child]);
    assert_eq!(code(&o), 1, "{o:?}");
}

/// Issue 21, item 10: a broker whose log goes to a file or a pipe writes
/// plain text, not terminal colour codes.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, seen) = serve_logging(dir.path(), "info");
    assert!(seen.iter().any(|l| l.contains(" INFO ")), "{seen:#?}");
    assert!(!seen.iter().any(|l| l.contains('\u{1b}')), "{seen:#?}");
}

/// Issue 21, item 10: `audit export --output json` prints JSON (one record
/// per line, as `--format jsonl`), not text.
#[test]
fn audit_export_honours_output_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);
    let o = run(
        &dir,
        &["--as", "admin", "--output", "json", "audit", "export"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.trim().is_empty(), "no records");
    for line in out.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("seq").is_some() || v.get("checkpoint").is_some(),
            "{line}"
        );
    }
    // Two flags that disagree are refused, naming both, rather than one
    // of them ignored.
    let o = run(
        &dir,
        &[
            "--as", "admin", "--output", "json", "audit", "export", "--format", "text",
        ],
    );
    assert_eq!(code(&o), 64, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--output json and --format text"),
        "{}",
        stderr(&o)
    );
}

/// Issue 21, item 10: every `--reason` says what it is for.
#[test]
fn every_reason_flag_says_where_the_reason_goes() {
    for cmd in [
        &["requests", "approve"][..],
        &["requests", "deny"],
        &["requests", "ack"],
        &["requests", "withdraw"],
        &["lease", "revoke"],
        &["lease", "revoke-all"],
        &["ui", "end-sessions"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let o = run_bare(&args);
        let help = stdout(&o);
        assert!(help.contains("recorded in the trail"), "{cmd:?}: {help}");
    }
}

/// Issue 21, item 10: a broker started without `--dev` says where it
/// listens as addresses (it printed `HTTP Some(127.0.0.1:…)`).
#[test]
fn a_production_start_line_names_its_addresses() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = portcullis::dev::DevDir::new(tmp.path().join("dev"));
    dev.prepare().unwrap();
    let file = |name: &str| dev.root.join(name);
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(file("server.pem"))
        .arg("--tls-key")
        .arg(file("server-key.pem"))
        .arg("--client-ca")
        .arg(file("ca.pem"))
        .arg("--policy")
        .arg(file("policy.toml"))
        .arg("--kek-file")
        .arg(file("kek"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = BufReader::new(stderr)
        .lines()
        .map(Result::unwrap)
        .find(|l| l.starts_with("portcullis listening"));
    child.kill().unwrap();
    child.wait().unwrap();
    let line = line.expect("no start line");
    let addrs: Vec<&str> = line
        .split([' ', ','])
        .filter(|w| w.starts_with("127.0.0.1:"))
        .collect();
    assert_eq!(addrs.len(), 2, "{line}");
    assert!(
        addrs
            .iter()
            .all(|a| a.parse::<std::net::SocketAddr>().is_ok()),
        "{line}"
    );
}

/// Issue 21, finding 6: the embedded store's page cache has an upper bound
/// (half of the machine's memory); a typo of units is refused at start.
#[test]
fn a_page_cache_larger_than_the_machine_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--cache-capacity",
            "100000GiB",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("--cache-capacity"), "{err}");
}

/// Issue 21, item 10: a subcommand's `--help` lists its own options first,
/// and the flags every command takes under headings of their own.
#[test]
fn help_puts_a_commands_own_options_before_the_global_ones() {
    let help = stdout(&run_bare(&["token", "request", "--help"]));
    let own = help.find("--scope").unwrap_or_else(|| panic!("{help}"));
    let connection = help
        .find("Connection (every command):")
        .unwrap_or_else(|| panic!("{help}"));
    let server = help.find("--server").unwrap_or_else(|| panic!("{help}"));
    assert!(own < connection && connection < server, "{help}");
    assert!(help.contains("Output (every command):"), "{help}");
}

/// Issue 21, item 10: `ui login` says what the link is before the link, and
/// the link alone is on stdout (`xdg-open "$(portcullis ui login)"`).
#[test]
fn ui_login_says_what_the_link_is_before_the_link() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);
    // Both streams into one pipe, in the order they were written.
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("'{BIN}' --as admin ui login 2>&1"))
        .env("PORTCULLIS_DEV_DIR", &dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let both = stdout(&o);
    let lines: Vec<&str> = both.lines().collect();
    assert_eq!(lines.len(), 2, "{both}");
    assert!(lines[0].starts_with("works once, until "), "{both}");
    assert!(lines[1].contains("/ui/login/link?t="), "{both}");
    let alone = run(&dir, &["--as", "admin", "ui", "login"]);
    assert_eq!(code(&alone), 0, "{}", stderr(&alone));
    assert_eq!(stdout(&alone).lines().count(), 1, "{}", stdout(&alone));
}

/// Issue 27, item 2: destructive admin commands need a reason where it
/// matters, ask on a terminal, and say what they did.
#[test]
fn emergency_rotation_and_bulk_revocation_say_what_they_did() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);
    assert_eq!(
        code(&run(&dir, &["token", "request", "--scope", "orders.read"])),
        0
    );
    // No reason: refused before anything is sent.
    let o = run(&dir, &["keys", "rotate", "--emergency", "--as", "admin"]);
    assert_eq!(code(&o), 64, "{o:?}");
    assert!(stderr(&o).contains("--reason"), "{}", stderr(&o));

    // On a terminal, anything but `yes` does nothing.
    let asked = on_a_terminal(
        &dir,
        "no",
        "keys rotate --emergency --reason leaked --as admin",
    );
    assert!(asked.contains("Type `yes` to go on"), "{asked}");
    assert!(asked.contains("not confirmed: nothing was done"), "{asked}");
    let o = run(&dir, &["lease", "list", "--state", "active"]);
    assert_eq!(stdout(&o).lines().count(), 1, "{o:?}");

    // Confirmed (no terminal: a script): what it withdrew and revoked.
    let o = run(
        &dir,
        &[
            "keys",
            "rotate",
            "--emergency",
            "--reason",
            "leaked",
            "--as",
            "admin",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let out = stdout(&o);
    assert!(out.contains("withdrew 1 key: "), "{out}");
    assert!(
        out.contains("revoked 1 active lease they signed, and 0 leases delegated from those"),
        "{out}"
    );
    assert!(out.contains("signing with "), "{out}");

    // Bulk revocation asks too, and answers with its counts.
    let asked = on_a_terminal(
        &dir,
        "nope",
        &format!(
            "lease revoke-all --subject {} --as admin",
            portcullis::dev::WORKLOAD
        ),
    );
    assert!(asked.contains("revokes every active lease of"), "{asked}");
    assert!(asked.contains("nothing was done"), "{asked}");
}

/// Run `args` (split on spaces) with a terminal on stdin (util-linux
/// `script`), typing `answer`: what the terminal showed.
fn on_a_terminal(dir: &Path, answer: &str, args: &str) -> String {
    use std::io::Write as _;
    let command = format!("PORTCULLIS_DEV_DIR={} {BIN} {args}", dir.display());
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux `script`");
    // Typed once the prompt is up.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{answer}").unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Issue 24, end to end on the command line: a CI job without a
/// certificate signs in with its platform's token (the dev CI issuer
/// stands in for GitHub Actions), once; an approval scope parks and the
/// job collects the token with its claim secret; `policy explain` says
/// what a token signs in as.
#[test]
fn a_ci_job_signs_in_with_its_id_token_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _server = serve(&dir);
    let jwt = tmp.path().join("ci.jwt");
    let o = run(&dir, &["dev", "id-token"]);
    assert_eq!(code(&o), 0, "{o:?}");
    std::fs::write(&jwt, stdout(&o)).unwrap();
    let at_jwt = format!("@{}", jwt.display());
    let o = run(
        &dir,
        &["policy", "explain", "--id-token", jwt.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let text = stdout(&o);
    assert!(
        text.contains(
            "signed in: issuer `dev_ci` (policy line 56), key `dev-ci-1` (ES256), identity spiffe://ci.portcullis.dev/1001/4242/env/prod"
        ),
        "{text}"
    );
    assert!(
        text.contains("orders.read (auto: granted at once)"),
        "{text}"
    );
    let request = ["token", "request", "--scope", "orders.read", "--id-token"];
    let o = run(&dir, &[&request[..], &[at_jwt.as_str()]].concat());
    assert_eq!(code(&o), 0, "{o:?}");
    assert_eq!(stdout(&o).trim().split('.').count(), 3, "{o:?}");
    assert!(stderr(&o).contains("granted lease"), "{o:?}");
    // The same token twice: refused.
    let o = run(&dir, &[&request[..], &[at_jwt.as_str()]].concat());
    assert_eq!(code(&o), 1, "{o:?}");
    assert!(stderr(&o).contains("not signed in"), "{o:?}");
    // Another owner's repository: refused, and explained offline.
    let o = run(
        &dir,
        &["dev", "id-token", "--claim", "repository_owner_id=7"],
    );
    std::fs::write(&jwt, stdout(&o)).unwrap();
    let o = run(
        &dir,
        &["policy", "explain", "--id-token", jwt.to_str().unwrap()],
    );
    assert_eq!(code(&o), 2, "{o:?}");
    assert!(
        stdout(&o).contains("bound claim repository_owner_id"),
        "{o:?}"
    );
    // An approval scope: parked, the claim secret on stdout.
    let o = run(&dir, &["dev", "id-token"]);
    std::fs::write(&jwt, stdout(&o)).unwrap();
    let o = run(
        &dir,
        &[
            "token",
            "request",
            "--scope",
            "orders.admin",
            "--reason",
            "migrate",
            "--id-token",
            &at_jwt,
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 3, "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rid = v["pending"]["id"].as_str().unwrap().to_owned();
    let secret = tmp.path().join("claim-secret");
    std::fs::write(&secret, v["claim_secret"].as_str().unwrap()).unwrap();
    let o = run(&dir, &["requests", "show", &rid, "--as", "approver"]);
    assert!(
        stdout(&o).contains("signed in  with a token of issuer `dev_ci`"),
        "{o:?}"
    );
    assert!(stdout(&o).contains("repository=\"acme/deploy\""), "{o:?}");
    let o = run(
        &dir,
        &[
            "requests", "approve", &rid, "--as", "approver", "--reason", "ok",
        ],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    let at_secret = format!("@{}", secret.display());
    let o = run(
        &dir,
        &["requests", "watch", &rid, "--claim-secret", &at_secret],
    );
    assert_eq!(code(&o), 0, "{o:?}");
    assert_eq!(stdout(&o).trim().split('.').count(), 3, "{o:?}");
}
