//! A referral without matching consent never leaves the sender, and the caseworker is
//! told why in one sentence.

use std::process::Command;
use std::time::Duration;

use corridor_proto::v1 as pb;
use corridor_tests::*;

#[tokio::test]
async fn referral_without_consent_never_leaves_and_the_caseworker_is_told_why() {
    let fed = Federation::demo("consent");
    let sender = fed.start(SHELTER_MY);
    let recipient = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    // Consent covers the Cambodian shelter for reintegration only.
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;

    let corridor = |args: &[&str]| {
        Command::new(binary("corridor"))
            .args(["--node", &sender.local_url(), "--token", &sender.token])
            .args(args)
            .output()
            .expect("run corridor")
    };

    // Wrong purpose, wrong recipient: refused at the sender with the rule named.
    for (to, purpose) in [(SHELTER_KH, "legal-aid"), (EMBASSY, "reintegration")] {
        let out = corridor(&[
            "referral",
            "send",
            "--case",
            &case_id,
            "--to",
            to,
            "--purpose",
            purpose,
            "--field",
            "age_band=25-29",
        ]);
        assert!(
            !out.status.success(),
            "a referral without consent was accepted"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("referral refused"), "{stderr}");
        assert!(stderr.contains(to) && stderr.contains(purpose), "{stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "one clear sentence: {stderr}"
        );
    }

    // A case without any consent.
    let bare = s
        .create_case(pb::CreateCaseRequest {
            label: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .case_id;
    let out = corridor(&[
        "referral",
        "send",
        "--case",
        &bare,
        "--to",
        SHELTER_KH,
        "--purpose",
        "reintegration",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no recorded consent"));

    // An expired consent does not count either.
    let status = s
        .record_consent(pb::RecordConsentRequest {
            case_id: bare.clone(),
            recipients: vec![SHELTER_KH.into()],
            purposes: vec!["reintegration".into()],
            expires_at_ms: corridor_node::node::now_ms() - 1,
            given_by: "person".into(),
            method: "written".into(),
        })
        .await
        .expect_err("an already expired consent cannot be recorded");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // With matching consent the same command succeeds, proving the refusals above came
    // from the gate and not from a broken command line.
    let out = corridor(&[
        "--output",
        "json",
        "referral",
        "send",
        "--case",
        &case_id,
        "--to",
        SHELTER_KH,
        "--purpose",
        "reintegration",
        "--field",
        "age_band=25-29",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
    let id = sent["referral_id"]
        .as_str()
        .expect("referral id")
        .to_owned();
    let status = wait_final(&mut s, &id, Duration::from_secs(20)).await;
    assert_eq!(status.state, "delivered");

    // Only the consented referral reached the recipient.
    let mut r = recipient.client().await;
    let items = inbox(&mut r).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].referral_id, id);
}
