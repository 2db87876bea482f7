//! The `corridor` command reports mistakes in one sentence with a non-zero exit.

use std::process::Command;

fn corridor(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_corridor"))
        .args(args)
        .env_remove("CORRIDOR_TOKEN")
        .env_remove("CORRIDOR_TOKEN_FILE")
        .output()
        .expect("run corridor");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_token_is_explained() {
    let (ok, stderr) = corridor(&["inbox"]);
    assert!(!ok);
    assert_eq!(
        stderr.trim(),
        "corridor: no token: set CORRIDOR_TOKEN, or pass --token or --token-file"
    );
}

#[test]
fn unreachable_node_is_explained() {
    let (ok, stderr) = corridor(&["--node", "http://127.0.0.1:1", "--token", "x", "inbox"]);
    assert!(!ok);
    assert!(
        stderr.starts_with("corridor: cannot reach the node at http://127.0.0.1:1"),
        "{stderr}"
    );
}

/// Tokens are secrets: never sent in the clear across the network, never read from a
/// file others can read.
#[test]
fn tokens_stay_on_this_machine_and_in_private_files() {
    use std::os::unix::fs::PermissionsExt as _;
    let (ok, stderr) = corridor(&["--node", "http://10.1.2.3:7080", "--token", "x", "inbox"]);
    assert!(!ok);
    assert!(
        stderr.starts_with("corridor: http://10.1.2.3:7080 is not on this machine"),
        "{stderr}"
    );
    let file = std::env::temp_dir().join(format!("corridor-cli-token-{}", std::process::id()));
    std::fs::write(&file, "crt_x\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = file.to_str().unwrap();
    let (ok, stderr) = corridor(&["--token-file", path, "inbox"]);
    assert!(!ok);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Readable now: the token is read, and the (absent) node is what fails.
    let (ok, stderr) = corridor(&[
        "--node",
        "http://127.0.0.1:1",
        "--token-file",
        path,
        "inbox",
    ]);
    assert!(!ok);
    assert!(stderr.contains("cannot reach the node"), "{stderr}");
    // An empty file says so, not that the node does not know the token.
    std::fs::write(&file, "\n").unwrap();
    let (ok, stderr) = corridor(&["--token-file", path, "inbox"]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("the token file {path} is empty")),
        "{stderr}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn dev_pki_refuses_a_non_empty_directory_and_writes_private_keys_0600() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("corridor-cli-pki-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let (ok, stderr) = corridor(&[
        "dev-pki",
        "--out",
        out,
        "--org",
        "ngo-th:TH:ngo:Transit NGO",
    ]);
    assert!(ok, "{stderr}");
    for key in [
        "ca.key",
        "ngo-th/tls.key",
        "ngo-th/signing.key",
        "ngo-th/sealing.key",
        "governance/board-1.key",
    ] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let directory = std::fs::read_to_string(dir.join("directory.toml")).unwrap();
    assert!(corridor::Directory::from_toml(&directory).is_ok());
    let (ok, stderr) = corridor(&["dev-pki", "--out", out]);
    assert!(!ok);
    assert!(
        stderr.contains("already exists and is not empty"),
        "{stderr}"
    );
    let (ok, stderr) = corridor(&["dev-pki", "--out", "/tmp/x", "--org", "Bad:MY:shelter"]);
    assert!(!ok);
    assert!(stderr.contains("org"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A directory is published with the signatures of a threshold of governance keys, one
/// `corridor sign-directory` each; a node accepts it only once there are enough.
#[test]
fn a_directory_takes_effect_once_enough_governance_keys_signed_it() {
    let dir = std::env::temp_dir().join(format!("corridor-cli-sign-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let (ok, stderr) = corridor(&["dev-pki", "--out", out, "--org", "ngo-th:TH:ngo"]);
    assert!(ok, "{stderr}");
    std::fs::remove_file(dir.join("directory.toml.sig")).unwrap();
    let config = dir.join("ngo-th/node.toml");
    let check = || corridor(&["node", "--config", config.to_str().unwrap(), "check-config"]);
    let (ok, stderr) = check();
    assert!(
        !ok && stderr.contains("cannot read its signatures"),
        "{stderr}"
    );
    let directory = dir.join("directory.toml");
    let sign = |board: &str| {
        let key = dir.join("governance").join(board);
        corridor(&[
            "sign-directory",
            "--directory",
            directory.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ])
    };
    let (ok, stderr) = sign("board-1.key");
    assert!(ok, "{stderr}");
    let (ok, stderr) = check();
    assert!(
        !ok && stderr.contains("signed by 1 governance key(s) of the 2"),
        "{stderr}"
    );
    // The same key again still counts once, and adds no second line.
    let sigs = dir.join("directory.toml.sig");
    let before = std::fs::read_to_string(&sigs).unwrap();
    assert!(sign("board-1.key").0);
    assert_eq!(std::fs::read_to_string(&sigs).unwrap(), before);
    assert!(!check().0);
    assert!(sign("board-3.key").0);
    let (ok, stderr) = check();
    assert!(ok, "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A reader that stops early (`corridor inbox | head -3`) ends the command quietly; a
/// full disk is an error in one sentence. Neither is a panic.
#[test]
fn closed_or_full_standard_output_is_no_panic() {
    for args in [
        &["profiles"][..],
        &["profiles", "--fields"],
        &["profiles", "--format", "markdown"],
        &["--output", "json", "profiles"],
    ] {
        // Every byte written goes to a pipe whose reader is already gone.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_corridor"))
            .args(args)
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_corridor"))
        .arg("profiles")
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        stderr.trim(),
        "corridor: cannot write to standard output: No space left on device (os error 28)"
    );
}

#[test]
fn dev_pki_checks_every_org_before_writing_anything() {
    let dir = std::env::temp_dir().join(format!("corridor-cli-pki-dup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let (ok, stderr) = corridor(&[
        "dev-pki",
        "--out",
        out,
        "--org",
        "a:MY:shelter",
        "--org",
        "a:KH:ngo",
    ]);
    assert!(!ok);
    assert_eq!(
        stderr.trim(),
        "corridor: org a is given twice; each --org needs an id of its own"
    );
    assert!(!dir.exists());
    // What only the directory checks is checked first too.
    let (ok, stderr) = corridor(&["dev-pki", "--out", out, "--org", "a:my:shelter"]);
    assert!(!ok);
    assert!(stderr.contains("country must be an ISO 3166-1"), "{stderr}");
    assert!(!dir.exists());
}

/// The auditor's TLS key is a secret like a node's: readable by its owner only.
#[test]
fn audit_refuses_a_key_others_can_read() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("corridor-cli-audit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let (ok, stderr) = corridor(&[
        "dev-pki",
        "--out",
        out,
        "--org",
        "ngo-th:TH:ngo+witness",
        "--org",
        "audit-th:TH:auditor",
    ]);
    assert!(ok, "{stderr}");
    let identity = dir.join("audit-th");
    let key = identity.join("tls.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let state = dir.join("state");
    let (ok, stderr) = corridor(&[
        "audit",
        "--identity",
        identity.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "checkpoint",
        "ngo-th",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("accessible by group or others") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_node_address_that_is_not_a_url_is_explained() {
    for node in ["notaurl", "127.0.0.1:7080", "https://127.0.0.1:7080"] {
        let (ok, stderr) = corridor(&["--node", node, "--token", "x", "inbox"]);
        assert!(!ok);
        assert!(
            stderr.starts_with(&format!(
                "corridor: {node} is not a valid node address (expected http://host:port"
            )),
            "{stderr}"
        );
    }
}

/// The bench refuses options it cannot measure with, before it starts or writes anything.
#[test]
fn bench_options_out_of_range_are_refused() {
    for (args, words) in [
        (
            &["--concurrency", "0"][..],
            "--concurrency must be between 1 and",
        ),
        (
            &["--concurrency", "99999999999"][..],
            "--concurrency must be between 1 and",
        ),
        (&["--seconds", "0"][..], "--seconds must be between 0.1 and"),
        (
            &["--seconds", "NaN"][..],
            "--seconds must be between 0.1 and",
        ),
        (&["--backlog", "0"][..], "--backlog must be between 1 and"),
        (
            &["--audit-entries", "0"][..],
            "--audit-entries must be between 2 and",
        ),
    ] {
        let mut all = vec!["bench", "--quick"];
        all.extend_from_slice(args);
        let (ok, stderr) = corridor(&all);
        assert!(!ok, "{args:?}");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
    let dir = std::env::temp_dir().join(format!("corridor-bench-busy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    let (ok, stderr) = corridor(&["bench", "--quick", "--dir", dir.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("is not empty: give a new or empty directory"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("keep.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bench stopped with SIGTERM stops the processes it started and removes its files
/// (keys among them).
#[test]
fn an_interrupted_bench_leaves_nothing_behind() {
    use std::io::{BufRead as _, BufReader};
    let mut bench = Command::new(env!("CARGO_BIN_EXE_corridor"))
        .args(["bench", "--quick", "--seconds", "30"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run corridor bench");
    let dir = std::env::temp_dir().join(format!("corridor-bench-{}", bench.id()));
    let stderr = bench.stderr.take().expect("stderr");
    // The echo phase runs a server process of its own: stop the bench in it.
    for line in BufReader::new(stderr).lines() {
        if line.expect("stderr line").starts_with("transport:") {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(dir.exists(), "the run's directory");
    let killed = Command::new("kill")
        .args(["-TERM", &bench.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = bench.wait().expect("wait");
    assert!(!status.success());
    assert!(!dir.exists(), "{} was left behind", dir.display());
    // Killed processes may take a moment to go.
    let mine = dir.to_string_lossy().into_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ps = Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .expect("ps");
        let running = String::from_utf8_lossy(&ps.stdout).into_owned();
        if !running.lines().any(|l| l.contains(&mine)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a process of the bench survived it:\n{running}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn an_empty_request_id_is_refused() {
    let (ok, stderr) = corridor(&[
        "--token",
        "x",
        "referral",
        "send",
        "--case",
        "case-1",
        "--to",
        "shelter-kh",
        "--purpose",
        "reintegration",
        "--request-id",
        "",
    ]);
    assert!(!ok);
    assert!(stderr.contains("a request id cannot be empty"), "{stderr}");
}

/// A federation kept running reports a node that stops, instead of looking whole while
/// every call to that node fails, and keeps the others running until interrupted.
#[test]
fn a_demo_kept_running_reports_a_node_that_stops() {
    use std::io::{BufRead as _, BufReader};
    let dir = std::env::temp_dir().join(format!("corridor-demo-stops-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut demo = Command::new(env!("CARGO_BIN_EXE_corridor"))
        .args(["demo", "--keep-running", "--dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run corridor demo");
    let stdout = demo.stdout.take().expect("stdout");
    for line in BufReader::new(stdout).lines() {
        if line.expect("stdout line").contains("Press Ctrl-C") {
            break;
        }
    }
    let nodes = || -> Vec<String> {
        let ps = Command::new("ps")
            .args(["-eo", "pid=,args="])
            .output()
            .expect("ps");
        let mine = dir.to_string_lossy().into_owned();
        String::from_utf8_lossy(&ps.stdout)
            .lines()
            .filter(|l| l.contains(&mine) && l.contains(" node --config"))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    };
    let running = nodes();
    assert_eq!(running.len(), 3, "{running:?}");
    let kill = |signal: &str, pid: &str| {
        let killed = Command::new("kill")
            .args([signal, pid])
            .status()
            .expect("kill");
        assert!(killed.success());
    };
    kill("-KILL", &running[0]);
    let stderr = demo.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let reported = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the demo reports the stopped node");
        if line.contains("stopped") {
            break line;
        }
    };
    assert!(
        reported.contains("stopped") && reported.contains("node.log"),
        "{reported}"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(demo.try_wait().expect("wait").is_none(), "the demo ended");
    assert_eq!(nodes().len(), 2, "the other nodes keep running");

    kill("-INT", &demo.id().to_string());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = demo.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = demo.kill();
            panic!("the demo kept running after Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    assert!(nodes().is_empty(), "a node outlived the demo");
    std::fs::remove_dir_all(&dir).expect("remove the demo's directory");
}
