//! Local roles: a token stands for a local user, and the user's role decides what the
//! token reaches on the node's local API (caseworkers the cases, auditors the audit log,
//! administrators both).

use corridor_proto::v1 as pb;
use corridor_tests::*;
use tonic::Code;

fn refused<T: std::fmt::Debug>(answer: Result<T, tonic::Status>, wanted: &str) -> tonic::Status {
    let status = answer.expect_err(wanted);
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{wanted}: {status:?}"
    );
    status
}

#[tokio::test]
async fn each_local_role_reaches_only_what_it_may() {
    let fed = Federation::demo("local-roles");
    let recipient = fed.start(SHELTER_KH);
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let sent = send_delivered(&mut s, &case_id, SHELTER_KH, "reintegration").await;

    let config = &recipient.org.config;
    let caseworker = issue_token(config, "carla", "caseworker").expect("caseworker token");
    let auditor = issue_token(config, "audra", "auditor").expect("auditor token");

    // A caseworker works cases and reads what was received, not the audit log.
    let mut cw = recipient.client_with(&caseworker).await;
    let items = inbox(&mut cw).await;
    assert_eq!(items.len(), 1);
    let referral_id = items[0].referral_id.clone();
    cw.get_referral(pb::GetReferralRequest {
        referral_id: referral_id.clone(),
        ..Default::default()
    })
    .await
    .expect("a caseworker reads a received referral");
    new_case(&mut cw).await;
    cw.get_outbox_stats(pb::OutboxStatsRequest {})
        .await
        .expect("a caseworker reads the outbox's counts");
    let mut cw_log = recipient.local_audit_client(&caseworker).await;
    let status = refused(
        cw_log.get_checkpoint(pb::GetCheckpointRequest {}).await,
        "a caseworker does not read the audit log",
    );
    assert_eq!(
        status.message(),
        "reading the audit log needs a token of a local user with the role admin or \
         auditor; this token's user has the role caseworker"
    );

    // An auditor reads the audit log and nothing of any case: refused before anything is
    // read, so no read of personal data is logged either.
    let entries_before = scalar(&recipient, "SELECT COUNT(*) FROM audit_entries").await;
    let cases_before = scalar(&recipient, "SELECT COUNT(*) FROM cases").await;
    let mut au = recipient.client_with(&auditor).await;
    let status = refused(
        au.get_referral(pb::GetReferralRequest {
            referral_id: referral_id.clone(),
            ..Default::default()
        })
        .await,
        "an auditor does not read a received referral",
    );
    assert!(
        status.message().contains("role admin or caseworker")
            && status.message().ends_with("has the role auditor"),
        "{status:?}"
    );
    refused(
        au.list_inbox(pb::ListInboxRequest::default()).await,
        "an auditor does not list the inbox",
    );
    refused(
        au.create_case(pb::CreateCaseRequest {
            label: "test".into(),
        })
        .await,
        "an auditor does not open cases",
    );
    refused(
        au.get_referral_status(pb::GetReferralStatusRequest {
            referral_id: sent.referral_id.clone(),
        })
        .await,
        "an auditor does not follow referrals",
    );
    refused(
        au.get_outbox_stats(pb::OutboxStatsRequest {}).await,
        "an auditor does not read the outbox",
    );
    assert_eq!(
        scalar(&recipient, "SELECT COUNT(*) FROM audit_entries").await,
        entries_before,
        "refused requests append nothing to the log"
    );
    assert_eq!(
        scalar(&recipient, "SELECT COUNT(*) FROM cases").await,
        cases_before
    );
    let mut au_log = recipient.local_audit_client(&auditor).await;
    au_log
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .expect("an auditor reads checkpoints");
    let entries = au_log
        .get_entries(pb::GetEntriesRequest {
            start: 0,
            end: u64::try_from(entries_before).expect("size"),
        })
        .await
        .expect("an auditor reads entries")
        .into_inner()
        .entries;

    // The log says which role each token was issued for.
    let issued: Vec<String> = entries
        .iter()
        .map(|bytes| corridor::audit::decode(bytes).expect("entry"))
        .filter(|entry| entry.kind == "token-issued")
        .map(|entry| entry.get("role").expect("a role").to_owned())
        .collect();
    assert_eq!(issued, ["admin", "caseworker", "auditor"]);

    // The node's administrator reaches both.
    let mut admin_log = recipient.local_audit_client(&recipient.token).await;
    admin_log
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .expect("an admin reads the audit log");
    let mut admin = recipient.client().await;
    assert_eq!(inbox(&mut admin).await.len(), 1);
}

/// A user keeps the role it was created with: a token of another role for it is refused,
/// with a sentence that says why and a non-zero exit, and nothing is written.
#[test]
fn a_token_of_another_role_for_an_existing_user_is_refused() {
    let fed = Federation::demo("role-kept");
    let config = &fed.org(SHELTER_MY).config;
    issue_token(config, "carla", "caseworker").expect("caseworker token");
    issue_token(config, "carla", "caseworker").expect("a second token of the same role");
    let error = issue_token(config, "carla", "auditor").expect_err("another role is refused");
    assert!(
        error.contains("the local user carla has the role caseworker, not auditor"),
        "{error}"
    );
    let error = issue_token(config, "dora", "officer").expect_err("an unknown role");
    assert!(error.contains("officer"), "{error}");
    let listed = std::process::Command::new(binary("corridor-node"))
        .arg("--config")
        .arg(config)
        .arg("list-users")
        .output()
        .expect("run corridor-node list-users");
    assert!(listed.status.success(), "{listed:?}");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("carla\tcaseworker\t2\t")),
        "{listed}"
    );
    assert!(!listed.contains("dora"), "{listed}");

    let node = fed.start(SHELTER_MY);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        assert_eq!(
            scalar(&node, "SELECT COUNT(*) FROM tokens t JOIN users u ON u.id = t.user_id WHERE u.name = 'carla'").await,
            2
        );
        assert_eq!(
            scalar(&node, "SELECT COUNT(*) FROM users WHERE name = 'dora'").await,
            0
        );
    });
}

/// `set-role` changes what a user's existing tokens reach: a running node applies it
/// within the 5 seconds it trusts a looked-up token, and the log records it.
#[tokio::test]
async fn a_changed_role_applies_to_the_users_tokens() {
    let fed = Federation::demo("role-change");
    let node = fed.start(SHELTER_MY);
    let token = issue_token(&node.org.config, "carla", "caseworker").expect("token");
    let mut c = node.client_with(&token).await;
    new_case(&mut c).await;

    let set_role = |user: &str, role: &str| {
        std::process::Command::new(binary("corridor-node"))
            .arg("--config")
            .arg(&node.org.config)
            .args(["set-role", "--user", user, "--role", role])
            .output()
            .expect("run corridor-node set-role")
    };
    let out = set_role("carla", "auditor");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("carla now has the role auditor (it had caseworker)"),
        "{out:?}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let answer = c
            .create_case(pb::CreateCaseRequest {
                label: "test".into(),
            })
            .await;
        match answer {
            Err(status) if status.code() == Code::PermissionDenied => break,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => panic!("the caseworker's token still works as one: {other:?}"),
        }
    }
    let mut log = node.local_audit_client(&token).await;
    let size = log
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .expect("now an auditor, the token reads the log");
    assert!(!size.into_inner().note.is_empty());
    let entries = scalar(
        &node,
        "SELECT COUNT(*) FROM audit_entries WHERE instr(entry, 'role-changed') > 0",
    )
    .await;
    assert_eq!(entries, 1);

    let out = set_role("carla", "auditor");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing changed"));
    let out = set_role("nobody", "auditor");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no local user nobody"));
}
