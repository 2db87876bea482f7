//! The federation directory a node runs on is one its governance signed, and never one
//! older than it accepted before: a rollback could bring back a member since removed.
//! Once it expires, the node sends nothing and says so.

use std::process::Command;

use corridor_proto::v1 as pb;
use corridor_tests::*;

/// Rewrites the federation's directory with `serial` and signs it.
fn publish(fed: &Federation, serial: u64) {
    let text = std::fs::read_to_string(fed.dir.join("directory.toml")).expect("directory");
    publish_directory(fed, &with_serial(&text, serial));
}

#[tokio::test]
async fn a_node_refuses_a_directory_older_than_one_it_accepted() {
    let fed = Federation::demo("rollback");
    publish(&fed, 2);
    let mut node = fed.start(SHELTER_MY);
    node.stop();

    // Serial 1, well signed, but older than the 2 the node ran on.
    publish(&fed, 1);
    let out = Command::new(binary("corridor-node"))
        .arg("--config")
        .arg(&fed.org(SHELTER_MY).config)
        .output()
        .expect("run corridor-node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("its serial 1 is older than serial 2, which this node accepted before"),
        "{stderr}"
    );

    // The newer one again, or a newer still, is fine.
    publish(&fed, 3);
    node.start();
    node.stop();

    // Serial 3 again, well signed, but with other content: members could otherwise
    // come to run different directories under one serial. Refused, and so says
    // check-config; a higher serial is fine.
    let text = std::fs::read_to_string(fed.dir.join("directory.toml")).expect("directory");
    let renamed = text.replacen("name = \"", "name = \"Renamed ", 1);
    assert_ne!(renamed, text);
    publish_directory(&fed, &renamed);
    for args in [&["check-config"][..], &[][..]] {
        let out = Command::new(binary("corridor-node"))
            .arg("--config")
            .arg(&fed.org(SHELTER_MY).config)
            .args(args)
            .output()
            .expect("run corridor-node");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("it differs from the directory of serial 3 this node accepted before"),
            "{args:?}: {stderr}"
        );
    }
    publish_directory(&fed, &with_serial(&renamed, 4));
    node.start();
}

/// A witness that is not a member of the federation is reported by `check-config` and
/// logged by a running node, as a warning: the shipped unit runs `check-config` before
/// every start, and a directory dropping a witness must not stop the nodes that named it.
#[tokio::test]
async fn witnesses_that_are_not_members_are_reported() {
    let fed = Federation::demo("witness-not-member");
    let config = &fed.org(SHELTER_MY).config;
    let text = std::fs::read_to_string(config).expect("config");
    let start = text.find("witnesses = ").expect("witnesses line");
    let end = start + text[start..].find('\n').expect("end of line");
    let text = format!("{}witnesses = [\"nosuch\"]{}", &text[..start], &text[end..]);
    std::fs::write(config, text).expect("config");
    let out = Command::new(binary("corridor-node"))
        .arg("--config")
        .arg(config)
        .arg("check-config")
        .output()
        .expect("run corridor-node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "warning: audit.witnesses names nosuch, which is not a member of the federation"
        ),
        "{stderr}"
    );
    let node = fed.start(SHELTER_MY);
    let mut client = node.client().await;
    case_with_consent(&mut client, SHELTER_KH, "reintegration").await;
    assert!(
        node.log().contains("audit.witnesses names nosuch"),
        "{}",
        node.log()
    );
}

/// `check-config` changes nothing, even where the next start would upgrade the database
/// (which an older version could not open after that), and runs beside a running node; a
/// database written by a newer version is refused, by the check and by a start, in one
/// sentence.
#[tokio::test]
async fn check_config_changes_nothing_and_names_a_newer_database() {
    let fed = Federation::demo("check-changes-nothing");
    let mut node = fed.start(SHELTER_MY);
    let check = || {
        Command::new(binary("corridor-node"))
            .arg("--config")
            .arg(&fed.org(SHELTER_MY).config)
            .arg("check-config")
            .output()
            .expect("run corridor-node")
    };
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.stop();

    // As if the last migration were still to come.
    let latest = scalar(&node, "SELECT MAX(version) FROM _sqlx_migrations").await;
    sql(
        &node,
        &[&format!(
            "DELETE FROM _sqlx_migrations WHERE version = {latest}"
        )],
    )
    .await;
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("note: the node will upgrade the database"),
        "{stderr}"
    );
    assert!(stderr.contains("(1 schema migration(s))"), "{stderr}");
    let applied = scalar(&node, "SELECT MAX(version) FROM _sqlx_migrations").await;
    assert_eq!(applied, latest - 1, "check-config migrated the database");

    // Written by a newer version.
    sql(
        &node,
        &["INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time)
           VALUES (9999, 'from the future', CURRENT_TIMESTAMP, 1, x'00', 0)"],
    )
    .await;
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("written by a newer corridor-node (its schema has migration 9999"),
        "{stderr}"
    );
}

/// Once its directory expires a node sends nothing: a caseworker's new referral is
/// refused at once, saying why and since when, rather than queued to wait unseen; and
/// `check-config` gives the expiry as a date.
#[tokio::test]
async fn a_node_whose_directory_expired_refuses_new_referrals_and_says_when() {
    let fed = Federation::demo("expired");
    let text = std::fs::read_to_string(fed.dir.join("directory.toml")).expect("directory");
    let start = text.find("expires_at_ms = ").expect("expiry line");
    let end = start + text[start..].find('\n').expect("end of line");
    // Room for the set-up below on a slow machine, which must all happen before it.
    let expires_at_ms = corridor_node::node::now_ms() + 8_000;
    let expiring = format!(
        "{}expires_at_ms = {expires_at_ms}{}",
        &text[..start],
        &text[end..]
    );
    publish_directory(&fed, &with_serial(&expiring, 2));
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    // Queued before the expiry (the recipient is not running).
    let with_request_id = pb::SendReferralRequest {
        request_id: "before-expiry".into(),
        ..referral(&case_id, SHELTER_KH, "reintegration")
    };
    let queued = s
        .send_referral(with_request_id.clone())
        .await
        .expect("a referral before the expiry")
        .into_inner();
    // An auditor connected before the expiry.
    let mut auditor = corridor_proto::v1::audit_client::AuditClient::new(
        fed.federation_channel(Some(fed.org("auditor-demo")), &fed.dir, SHELTER_MY)
            .await
            .expect("auditor connects"),
    );
    let entries = pb::GetEntriesRequest { start: 0, end: 1 };
    auditor
        .get_entries(entries)
        .await
        .expect("entries before the expiry");
    let wait = expires_at_ms - corridor_node::node::now_ms() + 100;
    tokio::time::sleep(std::time::Duration::from_millis(wait.max(0) as u64)).await;
    // Its connection stays open, and is served nothing more.
    let refused = auditor
        .get_entries(entries)
        .await
        .expect_err("entries after the expiry");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("directory has expired"),
        "{refused:?}"
    );

    let refused = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect_err("a referral after the directory expired");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let when = corridor::utc::format(expires_at_ms);
    assert!(
        refused
            .message()
            .contains(&format!("federation directory expired at {when}")),
        "{refused:?}"
    );

    // The node says once that it has stopped sending, in a log without colour codes.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let log = sender.log();
    assert_eq!(
        log.matches("the federation directory has expired: this node sends")
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
    // A retry of a request made before still learns what became of its referral.
    let retried = s
        .send_referral(with_request_id)
        .await
        .expect("a retry after the expiry")
        .into_inner();
    assert_eq!(retried.referral_id, queued.referral_id);

    let out = Command::new(binary("corridor-node"))
        .arg("--config")
        .arg(&fed.org(SHELTER_MY).config)
        .arg("check-config")
        .output()
        .expect("run corridor-node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("directory serial 2 expired at {when}")),
        "{stderr}"
    );
}

/// `corridor sign-directory` adds its key's signature once, and drops signatures over an
/// earlier version of the file, so that the signatures file holds what counts for this one.
#[test]
fn signing_a_directory_keeps_only_signatures_over_its_bytes() {
    let fed = Federation::demo("sign");
    let directory = fed.dir.join("directory.toml");
    let sign = |board: u32| {
        let out = Command::new(binary("corridor"))
            .args(["sign-directory", "--directory"])
            .arg(&directory)
            .arg("--key")
            .arg(
                fed.dir
                    .join("governance")
                    .join(format!("board-{board}.key")),
            )
            .output()
            .expect("run corridor");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let signatures = || {
        std::fs::read_to_string(fed.dir.join("directory.toml.sig"))
            .expect("signatures")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    };
    let before = signatures();
    assert!(sign(1).contains("already signed"));
    assert_eq!(signatures(), before);

    // A new serial: the old signatures are over other bytes.
    let text = std::fs::read_to_string(&directory).expect("directory");
    std::fs::write(&directory, with_serial(&text, 9)).expect("write");
    let out = sign(1);
    assert!(
        out.contains(&format!("dropped {before} signature(s) over other content")),
        "{out}"
    );
    assert_eq!(signatures(), 1);
    sign(2);
    assert_eq!(signatures(), 2);
}
