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

/// A node directory whose directory is signed by its one governance key.
fn node_dir(tag: &str) -> std::path::PathBuf {
    let dir = temp_dir(tag);
    let board = corridor::SigningKey::from_seed(&[7; 32]).unwrap();
    std::fs::write(
        dir.join("node.toml"),
        format!(
            "org_id = \"shelter-my\"\n[governance]\nkeys = [\"{}\"]\nthreshold = 1\n",
            board.verifying_key().to_base64()
        ),
    )
    .unwrap();
    let directory = "federation = \"t\"\nserial = 1\nexpires_at_ms = 4102444800000\n[[member]]\nid = \"shelter-my\"\nname = \"S\"\ncountry = \"MY\"\nroles = [\"shelter\"]\nendpoint = \"https://127.0.0.1:1\"\nsigning_key = \"A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=\"\nsealing_key = \"A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=\"\ncert_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";
    std::fs::write(dir.join("directory.toml"), directory).unwrap();
    std::fs::write(
        dir.join("directory.toml.sig"),
        corridor::directory::signature_line(directory.as_bytes(), &board),
    )
    .unwrap();
    dir
}

#[test]
fn world_readable_key_is_refused() {
    let dir = node_dir("perm");
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

/// A directory whose bytes its governance signatures do not cover is refused, in one
/// sentence that says why.
#[test]
fn a_directory_without_its_governance_signatures_is_refused() {
    let dir = node_dir("unsigned");
    let path = dir.join("directory.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("name = \"S\"", "name = \"Someone else\""),
    )
    .unwrap();
    let config = dir.join("node.toml");
    let (ok, stderr) = node(&["--config", config.to_str().unwrap(), "check-config"]);
    assert!(!ok);
    assert!(
        stderr.contains("signed by 0 governance key(s) of the 1 it needs"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    std::fs::remove_file(dir.join("directory.toml.sig")).unwrap();
    let (ok, stderr) = node(&["--config", config.to_str().unwrap(), "check-config"]);
    assert!(!ok);
    assert!(stderr.contains("cannot read its signatures"), "{stderr}");
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

#[test]
fn a_log_filter_that_does_not_parse_is_refused() {
    let dir = node_dir("log-filter");
    let config = dir.join("node.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[log]\nfilter = \"!!bad[[\"\n");
    std::fs::write(&config, text).unwrap();
    let (ok, stderr) = node(&["--config", config.to_str().unwrap(), "check-config"]);
    assert!(!ok);
    assert!(
        stderr.contains("log.filter \"!!bad[[\" is not a tracing filter"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
