//! `corridor-node` refuses to start on bad configuration or loose key permissions, with
//! one clear sentence and a non-zero exit.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

fn node(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_corridor-node"))
        .args(args)
        .output()
        .expect("run corridor-node");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("corridor-node-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn missing_config_is_named() {
    let (ok, stderr) = node(&["--config", "/nonexistent/node.toml"]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot read configuration file /nonexistent/node.toml"),
        "{stderr}"
    );
}

#[test]
fn world_readable_key_is_refused() {
    let dir = temp_dir("perm");
    std::fs::write(dir.join("node.toml"), "org_id = \"shelter-my\"\n").unwrap();
    std::fs::write(
        dir.join("directory.toml"),
        "federation = \"t\"\nserial = 1\n[[member]]\nid = \"shelter-my\"\nname = \"S\"\ncountry = \"MY\"\nroles = [\"shelter\"]\nendpoint = \"https://127.0.0.1:1\"\nsigning_key = \"A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=\"\nsealing_key = \"A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=\"\ncert_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
    )
    .unwrap();
    let key = dir.join("signing.key");
    std::fs::write(&key, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.join("node.toml");
    let (ok, stderr) = node(&["--config", config.to_str().unwrap(), "check-config"]);
    assert!(!ok);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_setting_is_refused() {
    let dir = temp_dir("unknown");
    let config = dir.join("node.toml");
    std::fs::write(&config, "org_id = \"shelter-my\"\nlisten = \"0.0.0.0:1\"\n").unwrap();
    let (ok, stderr) = node(&["--config", config.to_str().unwrap(), "check-config"]);
    assert!(!ok);
    assert!(stderr.contains("unknown field `listen`"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
