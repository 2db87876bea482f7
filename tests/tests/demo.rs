//! `corridor demo`: a directory the user names is kept, and however the demo is asked to
//! stop, it stops every node it started.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corridor_tests::binary;

/// A fresh, empty directory under the system's temporary directory.
fn empty_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("corridor-demo-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the demo's directory");
    dir
}

/// Processes whose command line names `dir`: the demo's nodes.
fn nodes_of(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(" node --config ") && cmdline.contains(&needle) {
            found.push(cmdline);
        }
    }
    found
}

fn demo(dir: &Path, keep_running: bool) -> Child {
    let mut command = Command::new(binary("corridor"));
    command.arg("demo").arg("--dir").arg(dir);
    if keep_running {
        command.arg("--keep-running");
    }
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo")
}

/// Reads the demo's output until a line contains `marker`.
fn read_until(child: &mut Child, marker: &str) -> String {
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.expect("demo output");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(marker) {
            // Keep draining so the demo never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return seen;
        }
    }
    panic!("the demo ended before printing {marker:?}:\n{seen}");
}

fn terminate(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait for the demo") {
            return status;
        }
        assert!(Instant::now() < deadline, "the demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_directory_the_user_names_is_kept() {
    let dir = empty_dir("kept");
    let mut child = demo(&dir, false);
    read_until(&mut child, "Demo finished");
    assert!(wait(&mut child).success());
    for org in ["shelter-my", "shelter-kh", "kh-embassy-kl"] {
        assert!(dir.join(org).join("node.toml").exists(), "{org}");
        assert!(dir.join(org).join("node.log").exists(), "{org}");
    }
    assert!(nodes_of(&dir).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_federation_stops_on_sigterm_and_sighup() {
    for signal in ["TERM", "HUP"] {
        let dir = empty_dir(&format!("keep-{signal}"));
        let mut child = demo(&dir, true);
        read_until(&mut child, "Press Ctrl-C to stop the federation");
        assert_eq!(nodes_of(&dir).len(), 3, "three nodes run");
        terminate(&child, signal);
        let status = wait(&mut child);
        // Ending a federation kept running is its usual end, not a failure.
        assert!(status.success(), "SIG{signal}: {status}");
        assert!(
            nodes_of(&dir).is_empty(),
            "SIG{signal}: {:?}",
            nodes_of(&dir)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_demo_stopped_halfway_stops_its_nodes() {
    let dir = empty_dir("halfway");
    let mut child = demo(&dir, false);
    read_until(&mut child, "started shelter-my");
    terminate(&child, "TERM");
    let status = wait(&mut child);
    assert!(!status.success(), "stopped before it finished: {status}");
    assert!(nodes_of(&dir).is_empty(), "{:?}", nodes_of(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}
