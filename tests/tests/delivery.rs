//! A referral travels between two real nodes over mutual TLS, is acknowledged with a
//! signed receipt, and survives crashes of either side without loss or duplication.

use std::collections::BTreeSet;
use std::time::Duration;

use corridor::{MessageId, OrgId};
use corridor_proto::v1 as pb;
use corridor_tests::*;

/// With `wait`, one call queues the referral and answers once its verified receipt is
/// committed at the sender, with the status a later look also gives.
#[tokio::test]
async fn send_with_wait_answers_with_the_delivered_status() {
    let fed = Federation::demo("send-wait");
    let _recipient = fed.start(SHELTER_KH);
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let request = pb::SendReferralRequest {
        wait: true,
        ..referral(&case_id, SHELTER_KH, "reintegration")
    };
    let sent = s.send_referral(request).await.expect("send").into_inner();
    let status = sent.status.expect("a status, since the call waited");
    assert_eq!(
        status.state, "delivered",
        "last error: {}",
        status.last_error
    );
    assert_eq!(sent.state, "delivered");
    assert_eq!(status.referral_id, sent.referral_id);
    assert!(
        status.receipt.is_some(),
        "a delivered referral has its receipt"
    );
    let later = s
        .get_referral_status(pb::GetReferralStatusRequest {
            referral_id: sent.referral_id.clone(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(later, status);

    // The same through the CLI: it exits zero once the referral is delivered and shows
    // the receipt.
    let mut cli = std::process::Command::new(binary("corridor"));
    cli.args(["--node", &sender.local_url(), "--token", &sender.token])
        .args([
            "--output", "json", "referral", "send", "--wait", "--case", &case_id,
        ])
        .args(["--to", SHELTER_KH, "--purpose", "reintegration"]);
    for (name, value) in required_fields("reintegration") {
        cli.args(["--field", &format!("{name}={value}")]);
    }
    let out = cli.output().expect("run corridor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(shown["state"], "delivered", "{shown}");
    assert_eq!(shown["receipt"]["recipient"], SHELTER_KH, "{shown}");
}

/// A stop does not wait for the calls that wait for a delivery (up to 30 s, as long as a
/// service manager gives a stop): they answer at once with what they have, the referral
/// still queued, and the node stops by itself instead of being killed.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_answers_the_calls_waiting_for_a_delivery() {
    let fed = Federation::demo("stop-while-waiting");
    // The recipient is not started: the referral stays queued.
    let mut sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let request = pb::SendReferralRequest {
        wait: true,
        ..referral(&case_id, SHELTER_KH, "reintegration")
    };
    let waiting = tokio::spawn(async move { s.send_referral(request).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Without an answer the stop would wait for the call, and `stop` kill the node
    // after 10 s, cutting the call off.
    tokio::task::spawn_blocking(move || sender.stop())
        .await
        .expect("stop");
    let sent = waiting
        .await
        .expect("call task")
        .expect("the waiting call is answered, not cut off")
        .into_inner();
    assert_eq!(sent.state, "queued");
}

/// A retried call with the same request id (after a timeout, say) answers with the
/// referral the first call queued: the recipient gets it once.
#[tokio::test]
async fn a_retried_send_with_its_request_id_sends_nothing_twice() {
    let fed = Federation::demo("send-retry");
    let recipient = fed.start(SHELTER_KH);
    let mut sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let request = pb::SendReferralRequest {
        wait: true,
        request_id: "caseworker-7f3a".into(),
        ..referral(&case_id, SHELTER_KH, "reintegration")
    };
    let first = s
        .send_referral(request.clone())
        .await
        .expect("send")
        .into_inner();
    assert_eq!(first.state, "delivered");
    let again = s
        .send_referral(request.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(again.referral_id, first.referral_id);
    assert_eq!(again.state, "delivered");
    let without_wait = pb::SendReferralRequest {
        wait: false,
        ..request.clone()
    };
    let again = s
        .send_referral(without_wait)
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        (again.referral_id.as_str(), again.state.as_str()),
        (first.referral_id.as_str(), "delivered")
    );
    let mut r = recipient.client().await;
    assert_eq!(inbox(&mut r).await.len(), 1, "the recipient got it once");
    // The id is not stored (a caseworker may have made it of a name): only its key.
    let stored_in_clear =
        "SELECT count(*) FROM outbox WHERE instr(request_key, 'caseworker-7f3a') > 0";
    assert_eq!(scalar(&sender, stored_in_clear).await, 0);
    // Nor does an id stored in the clear before ids were keyed stay so: the node keys it
    // as it starts, and a retry is still recognised.
    sender.stop();
    sql(
        &sender,
        &["UPDATE outbox SET request_key = substr(request_key, 1, instr(request_key, ':')) || 'caseworker-7f3a' WHERE request_key IS NOT NULL"],
    )
    .await;
    assert_eq!(scalar(&sender, stored_in_clear).await, 1);
    sender.start();
    // Keyed as it starts, before it serves the local API; its listener is bound before.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while scalar(&sender, stored_in_clear).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the id stayed in the clear"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut s = sender.client().await;
    let again = s
        .send_referral(request.clone())
        .await
        .expect("retry after a restart")
        .into_inner();
    assert_eq!(again.referral_id, first.referral_id);

    // The same id for another referral is refused, not taken for a retry.
    let other = pb::SendReferralRequest {
        purpose: "shelter-placement".into(),
        ..request.clone()
    };
    let refused = s.send_referral(other).await.expect_err("another referral");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    // So is the same id with a field corrected: the correction must not be dropped.
    let mut corrected = request.clone();
    corrected
        .fields
        .insert("preferred_name".into(), "corrected name".into());
    let refused = s
        .send_referral(corrected)
        .await
        .expect_err("a corrected referral");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("other fields or another consent"),
        "{refused:?}"
    );
    assert!(!refused.message().contains("corrected"), "{refused:?}");
    let bad = pb::SendReferralRequest {
        request_id: "has spaces".into(),
        ..request
    };
    let refused = s
        .send_referral(bad)
        .await
        .expect_err("a malformed request id");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
}

#[tokio::test]
async fn referral_is_delivered_and_its_receipt_verifies() {
    let fed = Federation::demo("deliver");
    let sender = fed.start(SHELTER_MY);
    let recipient = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let mut r = recipient.client().await;

    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let mut request = referral(&case_id, SHELTER_KH, "reintegration");
    request
        .fields
        .insert("risk_flags".into(), "threat from recruiter".into());
    let fields = request.fields.clone();
    let sent = s.send_referral(request).await.expect("send").into_inner();
    assert_eq!(sent.state, "queued");

    let status = wait_final(&mut s, &sent.referral_id, Duration::from_secs(20)).await;
    assert_eq!(
        status.state, "delivered",
        "last error: {}",
        status.last_error
    );
    let receipt = corridor_node::convert::receipt_from_pb(status.receipt.expect("receipt"))
        .expect("well-formed receipt");
    // The sender verified it already; verify again independently with the directory key.
    let kh = OrgId::new(SHELTER_KH).unwrap();
    let my = OrgId::new(SHELTER_MY).unwrap();
    receipt
        .verify(
            MessageId::from_hex(&sent.referral_id).unwrap(),
            &receipt.envelope_digest,
            &my,
            &kh,
            &fed.directory.get(&kh).unwrap().signing_key,
        )
        .expect("receipt verifies with the recipient's directory key");
    // A receipt is not valid under any other key.
    assert!(
        receipt
            .verify(
                receipt.message_id,
                &receipt.envelope_digest,
                &my,
                &kh,
                &fed.directory.get(&my).unwrap().signing_key,
            )
            .is_err()
    );

    let items = inbox(&mut r).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].referral_id, sent.referral_id);
    assert_eq!(items[0].sender, SHELTER_MY);
    let got = r
        .get_referral(pb::GetReferralRequest {
            referral_id: sent.referral_id.clone(),
            ..Default::default()
        })
        .await
        .expect("get referral")
        .into_inner();
    assert_eq!(got.fields, fields);
    assert_eq!(got.purpose, "reintegration");
    // The recipient sees a pairwise reference, never the sender's case id.
    assert!(got.case_ref.starts_with("ref-"));
}

#[tokio::test]
async fn crashes_lose_nothing_and_process_nothing_twice() {
    let fed = Federation::demo("crash");
    let mut sender = fed.start(SHELTER_MY);
    let mut recipient = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;

    let mut sent = Vec::new();
    let send = |n: usize| {
        let mut r = referral(&case_id, SHELTER_KH, "reintegration");
        r.fields.insert("needs".into(), format!("item {n}"));
        r
    };
    for n in 0..10 {
        sent.push(
            s.send_referral(send(n))
                .await
                .expect("send")
                .into_inner()
                .referral_id,
        );
    }
    // The recipient crashes while referrals are in flight; the sender keeps sending.
    recipient.kill();
    for n in 10..20 {
        sent.push(
            s.send_referral(send(n))
                .await
                .expect("send")
                .into_inner()
                .referral_id,
        );
    }
    // The sender crashes too, with undelivered referrals in its outbox.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    sender.kill();
    sender.start();
    let mut s = sender.client().await;
    for n in 20..25 {
        sent.push(
            s.send_referral(send(n))
                .await
                .expect("send")
                .into_inner()
                .referral_id,
        );
    }
    recipient.start();
    for n in 25..30 {
        sent.push(
            s.send_referral(send(n))
                .await
                .expect("send")
                .into_inner()
                .referral_id,
        );
    }

    for id in &sent {
        let status = wait_final(&mut s, id, Duration::from_secs(60)).await;
        assert_eq!(status.state, "delivered", "{id}: {}", status.last_error);
        assert!(status.receipt.is_some());
    }
    let mut r = recipient.client().await;
    let items = inbox(&mut r).await;
    let received: BTreeSet<_> = items.iter().map(|i| i.referral_id.clone()).collect();
    let expected: BTreeSet<_> = sent.iter().cloned().collect();
    assert_eq!(
        items.len(),
        sent.len(),
        "every referral is in the inbox exactly once"
    );
    assert_eq!(received, expected);
    // Every payload arrived intact.
    let mut needs = BTreeSet::new();
    for id in &sent {
        let got = r
            .get_referral(pb::GetReferralRequest {
                referral_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("get")
            .into_inner();
        needs.insert(got.fields["needs"].clone());
    }
    assert_eq!(needs.len(), 30);
}

/// A recipient that rotates its sealing key, keeping the old one in
/// `previous_sealing_keys`, still opens what was queued for it before the directory
/// listed the new key.
#[tokio::test]
async fn a_referral_sealed_before_a_key_rotation_is_delivered() {
    use std::os::unix::fs::PermissionsExt as _;
    let fed = Federation::demo("key-rotation");
    // The recipient is away: the referral waits, sealed to its current key.
    let mut sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let queued = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect("send")
        .into_inner();
    sender.stop();

    // It rotates: a new key file, the old one kept, a directory listing the new key.
    let kh = fed.org(SHELTER_KH);
    let new_key = corridor::SealingKey::derive(b"a rotated sealing key for this test");
    let new_file = kh.dir.join("sealing-2.key");
    std::fs::write(&new_file, new_key.to_base64()).expect("key file");
    std::fs::set_permissions(&new_file, std::fs::Permissions::from_mode(0o600)).expect("mode");
    let config = std::fs::read_to_string(&kh.config).expect("config");
    let config = config.replacen(
        "sealing_key = \"sealing.key\"",
        "sealing_key = \"sealing-2.key\"\nprevious_sealing_keys = [\"sealing.key\"]",
        1,
    );
    std::fs::write(&kh.config, config).expect("config");
    let old_public = fed.sealing_public_key(SHELTER_KH).to_base64();
    let directory = std::fs::read_to_string(fed.dir.join("directory.toml")).expect("directory");
    assert!(directory.contains(&old_public));
    let directory = directory.replace(&old_public, &new_key.public_key().to_base64());
    publish_directory(&fed, &with_serial(&directory, 2));

    let _kh = fed.start(SHELTER_KH);
    sender.start();
    let mut s = sender.client().await;
    let status = wait_final(&mut s, &queued.referral_id, Duration::from_secs(20)).await;
    assert_eq!(status.state, "delivered", "{}", status.last_error);
}

/// A request id sent again through the CLI answers with the referral it made first; if
/// that one ended without reaching its recipient, the command says so and fails.
#[tokio::test]
async fn a_retried_cli_send_fails_when_its_referral_will_not_be_delivered() {
    let fed = Federation::demo("send-retry-cli");
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH], &["reintegration"]).await;
    let send = || {
        let mut command = std::process::Command::new(binary("corridor"));
        command
            .args(["--node", &sender.local_url(), "--token", &sender.token])
            .args(["referral", "send", "--case", &case_id, "--to", SHELTER_KH])
            .args([
                "--purpose",
                "reintegration",
                "--request-id",
                "caseworker-81c2",
            ]);
        for (field, value) in required_fields("reintegration") {
            command.args(["--field", &format!("{field}={value}")]);
        }
        command.output().expect("run corridor")
    };
    // The recipient is not running: the referral stays queued.
    let first = send();
    let stdout = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(first.status.success(), "{stdout}");
    assert!(
        stdout.contains("queued for delivery to shelter-kh"),
        "{stdout}"
    );
    let again = send();
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout), stdout);

    // Withdrawing the consent ends it undelivered; a retry must not look like success.
    s.withdraw_consent(pb::ConsentRequest { consent_id })
        .await
        .expect("withdraw");
    let retried = send();
    let stderr = String::from_utf8_lossy(&retried.stderr);
    assert!(!retried.status.success(), "{stderr}");
    assert!(
        stderr.contains("made by this request before, was")
            && stderr.contains("it will not be delivered"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// A referral whose envelope expired while its recipient was away ends as expired,
/// without being sent: its recipient would only refuse it.
#[tokio::test]
async fn an_expired_referral_is_not_sent() {
    let fed = Federation::demo("expired-not-sent");
    let mut sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let id = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    sender.stop();
    sql(
        &sender,
        &["UPDATE outbox SET expires_at_ms = 1, next_attempt_at_ms = 0 WHERE kind = 1"],
    )
    .await;
    let kh = fed.start(SHELTER_KH);
    sender.start();
    let mut s = sender.client().await;
    let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "expired", "{}", st.last_error);
    let mut c = kh.client().await;
    assert!(inbox(&mut c).await.is_empty(), "it was sent");
}

/// The references a node's recipients know a case by outlive its signing key: a node
/// keeps the secret they are derived from with its records. A node that never created a
/// case starts with a random one; one whose records predate the stored secret keeps
/// deriving what it derived before, from the signing key it had then, and refuses to
/// start with another until told to take a new secret.
#[tokio::test]
async fn case_references_survive_a_rotation_of_the_senders_signing_key() {
    use std::process::Command;

    let fed = Federation::demo("pairwise-rotation");
    let mut my = fed.start(SHELTER_MY);
    let mut kh_node = fed.start(SHELTER_KH);
    let mut s = my.client().await;
    let mut r = kh_node.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let kh = OrgId::new(SHELTER_KH).unwrap();
    let case_ref_at_recipient = async |s: &mut Caseworker, r: &mut Caseworker| {
        let sent = s
            .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
            .await
            .expect("send")
            .into_inner();
        let status = wait_final(s, &sent.referral_id, Duration::from_secs(20)).await;
        assert_eq!(status.state, "delivered", "{status:?}");
        r.get_referral(pb::GetReferralRequest {
            referral_id: sent.referral_id,
            ..Default::default()
        })
        .await
        .expect("read at the recipient")
        .into_inner()
        .case_ref
    };
    // Runs corridor-node to its end; one that would serve is stopped after 30 s.
    let node_command = |args: &[&str]| {
        let mut child = Command::new(binary("corridor-node"))
            .arg("--config")
            .arg(&fed.org(SHELTER_MY).config)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run corridor-node");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait").is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let old_key = fed.signing_key(SHELTER_MY);
    let derived_from_old_key =
        corridor::PairwiseKey::derive(old_key.to_base64().as_bytes()).case_ref(&case_id, &kh);

    let first = case_ref_at_recipient(&mut s, &mut r).await;
    assert_ne!(
        first, derived_from_old_key,
        "a node without cases takes a random secret, not one derived from its signing key"
    );

    // A database from before the secret was stored: the node keeps what it derived.
    drop((s, r));
    my.stop();
    sql(&my, &["DELETE FROM node_secrets"]).await;
    my.start();
    let (mut s, mut r) = (my.client().await, kh_node.client().await);
    let upgraded = case_ref_at_recipient(&mut s, &mut r).await;
    assert_eq!(
        upgraded, derived_from_old_key,
        "what an earlier version derived"
    );

    // Such a database with a rotated signing key: what it derived before is out of
    // reach, so neither a check nor a start goes ahead; a new secret is taken only when
    // asked for.
    drop((s, r));
    my.stop();
    kh_node.stop();
    sql(&my, &["DELETE FROM node_secrets"]).await;
    let key = |seed| corridor::SigningKey::from_seed(&[seed; 32]).unwrap();
    rotate_signing_key(&fed, SHELTER_MY, &key(43), 2);
    for args in [&["check-config"][..], &[][..]] {
        let (ok, output) = node_command(args);
        assert!(!ok, "{args:?} succeeded: {output}");
        assert!(
            output.contains("start once with the earlier signing key"),
            "{args:?}: {output}"
        );
    }
    let (ok, output) = node_command(&["new-pairwise-secret"]);
    assert!(ok, "{output}");
    let (ok, output) = node_command(&["new-pairwise-secret"]);
    assert!(
        !ok && output.contains("keeps a pairwise secret already"),
        "{output}"
    );
    kh_node.start();
    my.start();
    let (mut s, mut r) = (my.client().await, kh_node.client().await);
    let renewed = case_ref_at_recipient(&mut s, &mut r).await;
    assert!(![&first, &upgraded].contains(&&renewed), "a new secret");

    // A rotation once the secret is stored: the recipient still links the case.
    drop((s, r));
    my.stop();
    kh_node.stop();
    rotate_signing_key(&fed, SHELTER_MY, &key(44), 3);
    kh_node.start();
    my.start();
    let (mut s, mut r) = (my.client().await, kh_node.client().await);
    let rotated = case_ref_at_recipient(&mut s, &mut r).await;
    assert_eq!(
        rotated, renewed,
        "the same case reference after the rotation"
    );
}

/// The inbox is listed newest first, a page at a time, without repeating or skipping a
/// referral between pages; a token no page gave is refused by name.
#[tokio::test]
async fn the_inbox_is_listed_a_page_at_a_time() {
    let fed = Federation::demo("inbox-pages");
    let my = fed.start(SHELTER_MY);
    let kh = fed.start(SHELTER_KH);
    let mut s = my.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let mut sent = Vec::new();
    for _ in 0..3 {
        let id = s
            .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
            .await
            .expect("send")
            .into_inner()
            .referral_id;
        let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
        assert_eq!(st.state, "delivered", "{}", st.last_error);
        sent.push(id);
    }
    let mut r = kh.client().await;
    let page = async |r: &mut Caseworker, page_token: String| {
        r.list_inbox(pb::ListInboxRequest {
            page_size: 2,
            page_token,
        })
        .await
        .map(|a| a.into_inner())
    };
    let first = page(&mut r, String::new()).await.expect("first page");
    assert_eq!(first.items.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = page(&mut r, first.next_page_token.clone())
        .await
        .expect("second page");
    assert_eq!(second.items.len(), 1);
    assert!(second.next_page_token.is_empty(), "nothing older");
    let listed: Vec<String> = first
        .items
        .iter()
        .chain(&second.items)
        .map(|i| i.referral_id.clone())
        .collect();
    let newest_first: Vec<String> = sent.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);
    assert_eq!(
        inbox(&mut r).await.len(),
        3,
        "one page of up to 1000 by default"
    );
    let refused = page(&mut r, "yesterday".into())
        .await
        .expect_err("not a token");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("page_token"), "{refused:?}");
}
