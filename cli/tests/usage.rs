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
    // The same key again still counts once.
    assert!(sign("board-1.key").0);
    assert!(!check().0);
    assert!(sign("board-3.key").0);
    let (ok, stderr) = check();
    assert!(ok, "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
