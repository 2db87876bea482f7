//! Withdrawing consent reaches every organisation that received data under it — also one
//! that is offline at the time — and each answers with a signed purge receipt.

use std::time::{Duration, Instant};

use corridor::OrgId;
use corridor_proto::v1 as pb;
use corridor_tests::*;
use prost::Message as _;

async fn consent_status(s: &mut Caseworker, consent_id: &str) -> pb::ConsentStatusResponse {
    s.get_consent_status(pb::ConsentRequest {
        consent_id: consent_id.into(),
    })
    .await
    .expect("consent status")
    .into_inner()
}

/// The state of `org` in a consent status ("" if it has none).
fn state_of(st: &pb::ConsentStatusResponse, org: &str) -> String {
    st.recipients
        .iter()
        .find(|r| r.recipient == org)
        .map(|r| r.state.clone())
        .unwrap_or_default()
}

/// Whether `org`'s answer to its latest narrowing confirmed the consent's terms.
fn terms_confirmation_of(st: &pb::ConsentStatusResponse, org: &str) -> String {
    st.recipients
        .iter()
        .find(|r| r.recipient == org)
        .map(|r| r.terms_confirmation.clone())
        .unwrap_or_default()
}

/// Waits (up to 30 s) until the consent's status meets `done`, and returns it.
async fn wait_status(
    s: &mut Caseworker,
    consent_id: &str,
    done: impl Fn(&pb::ConsentStatusResponse) -> bool,
) -> pb::ConsentStatusResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = consent_status(s, consent_id).await;
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "still outstanding: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether every recipient in a consent status has purged.
fn all_purged(st: &pb::ConsentStatusResponse) -> bool {
    st.recipients.iter().all(|r| r.state == "purged")
}

#[tokio::test]
async fn withdrawal_reaches_three_recipients_one_of_them_offline() {
    let fed = Federation::four("withdraw");
    let mut sender = fed.start(SHELTER_MY);
    let kh = fed.start(SHELTER_KH);
    let embassy = fed.start(EMBASSY);
    let mut ngo = fed.start(NGO_TH);
    let mut s = sender.client().await;
    let (case_id, consent_id) = case_with_consent_to(
        &mut s,
        &[SHELTER_KH, EMBASSY, NGO_TH],
        &[
            "reintegration",
            "nationality-verification",
            "psychosocial-support",
        ],
    )
    .await;
    let sends = [
        (SHELTER_KH, "reintegration"),
        (EMBASSY, "nationality-verification"),
        (NGO_TH, "psychosocial-support"),
    ];
    let mut ids = Vec::new();
    for (to, purpose) in sends {
        let sent = s
            .send_referral(referral(&case_id, to, purpose))
            .await
            .expect("send")
            .into_inner();
        let st = wait_final(&mut s, &sent.referral_id, Duration::from_secs(20)).await;
        assert_eq!(st.state, "delivered", "{to}: {}", st.last_error);
        ids.push(sent.referral_id);
    }
    // Each recipient knows the consent by an id of its own, so that recipients cannot
    // link their records through it.
    let mut held = std::collections::HashMap::new();
    for node in [&kh, &embassy, &ngo] {
        let mut c = node.client().await;
        assert_eq!(
            inbox(&mut c).await.len(),
            1,
            "{} has its referral",
            node.org.spec.id
        );
        let id: String = sqlx::query_scalar("SELECT consent_id FROM inbox")
            .fetch_one(&mut open_db(node, true).await)
            .await
            .expect("held consent id");
        assert!(corridor::consent::is_consent_id(&id), "{id}");
        held.insert(node.org.spec.id.to_string(), id);
    }
    let distinct: std::collections::HashSet<_> = held.values().collect();
    assert_eq!(distinct.len(), 3, "one consent id per recipient: {held:?}");
    assert!(!distinct.contains(&consent_id), "{held:?}");

    // The NGO in Thailand is offline when the person withdraws.
    ngo.kill();
    let withdrawn = s
        .withdraw_consent(pb::ConsentRequest {
            consent_id: consent_id.clone(),
        })
        .await
        .expect("withdraw")
        .into_inner();
    assert_eq!(withdrawn.recipients.len(), 3);
    // Its time, the same for every recipient, is not sent: it would link their records.
    let payloads = queued_payloads(&fed, &sender, SHELTER_KH, 2).await;
    assert_eq!(payloads.len(), 1);
    let w = pb::ConsentWithdrawal::decode(payloads[0].as_slice()).expect("withdrawal");
    assert_eq!(w.withdrawn_at_ms, 0, "{w:?}");
    assert_eq!(w.referral_ids.len(), 1, "{w:?}");
    // Nothing more leaves under a withdrawn consent.
    let refused = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect_err("withdrawn consent");
    assert!(refused.message().contains("withdrawn"), "{refused:?}");

    // The two reachable recipients purge; the offline one stays outstanding.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = consent_status(&mut s, &consent_id).await;
        let state = |org: &str| {
            st.recipients
                .iter()
                .find(|r| r.recipient == org)
                .map(|r| r.state.clone())
        };
        if state(SHELTER_KH).as_deref() == Some("purged")
            && state(EMBASSY).as_deref() == Some("purged")
        {
            assert!(state(NGO_TH).unwrap().starts_with("pending"), "{st:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reachable recipients did not purge: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in [&kh, &embassy] {
        let mut c = node.client().await;
        assert!(
            inbox(&mut c).await.is_empty(),
            "{} still holds data",
            node.org.spec.id
        );
    }

    // The NGO stays away longer than an envelope may live: the withdrawal's envelope
    // expires undelivered, and the sender renews it rather than give up.
    sender.stop();
    let ngo_withdrawal = format!("kind = 2 AND recipient = '{NGO_TH}'");
    sql(
        &sender,
        &[&format!(
            "UPDATE outbox SET expires_at_ms = 1, next_attempt_at_ms = 0 WHERE {ngo_withdrawal}"
        )],
    )
    .await;
    sender.start();
    s = sender.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let renewed = scalar(
            &sender,
            &format!("SELECT COUNT(*) FROM outbox WHERE {ngo_withdrawal} AND state = 'queued' AND expires_at_ms > 1"),
        )
        .await;
        let ended = scalar(
            &sender,
            &format!("SELECT COUNT(*) FROM outbox WHERE {ngo_withdrawal} AND state = 'expired' AND last_error = 'expired undelivered; renewed'"),
        )
        .await;
        if (renewed, ended) == (1, 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the expired withdrawal was not renewed: {renewed} queued, {ended} ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Back online, the NGO gets the withdrawal, purges and answers.
    ngo.start();
    let st = wait_status(&mut s, &consent_id, all_purged).await;
    let mut c = ngo.client().await;
    assert!(inbox(&mut c).await.is_empty(), "the NGO still holds data");

    // The sender holds three purge receipts that verify with each purger's directory key
    // and name the consent as that purger knows it and the referral it purged.
    let my = OrgId::new(SHELTER_MY).unwrap();
    assert_eq!(st.recipients.len(), 3);
    for r in &st.recipients {
        let receipt = corridor_node::convert::purge_receipt_from_pb(
            r.purge_receipt.clone().expect("purge receipt"),
        )
        .expect("well-formed purge receipt");
        let purger = OrgId::new(&r.recipient).unwrap();
        receipt
            .verify(
                receipt.withdrawal_id,
                false,
                &held[&r.recipient],
                &my,
                &purger,
                &fed.directory.get(&purger).unwrap().signing_key,
            )
            .expect("purge receipt verifies");
        assert_eq!(receipt.purged_referrals.len(), 1, "{}", r.recipient);
        assert!(ids.contains(&receipt.purged_referrals[0].to_hex()));
    }
}

/// A narrowing that takes a recipient out of the consent reaches it as a withdrawal: it
/// purges what it holds, with a signed purge receipt, while a recipient the consent
/// still admits keeps its referral and can be sent more.
#[tokio::test]
async fn a_narrowing_that_removes_a_recipient_has_it_purge() {
    let fed = Federation::four("narrow-purge");
    let sender = fed.start(SHELTER_MY);
    let kh = fed.start(SHELTER_KH);
    let ngo = fed.start(NGO_TH);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH, NGO_TH], &["reintegration"]).await;
    for to in [SHELTER_KH, NGO_TH] {
        let sent = s
            .send_referral(referral(&case_id, to, "reintegration"))
            .await
            .expect("send")
            .into_inner();
        let st = wait_final(&mut s, &sent.referral_id, Duration::from_secs(20)).await;
        assert_eq!(st.state, "delivered", "{to}: {}", st.last_error);
    }
    let mut scope = consent_scope(&mut s, &consent_id).await;
    scope.recipient_orgs.retain(|o| o != SHELTER_KH);
    s.narrow_consent(pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope),
        if_narrowed_at_ms: None,
    })
    .await
    .expect("narrowing");

    // The recipient still admitted has nothing to cut and no new terms: it is not asked.
    let st = wait_status(&mut s, &consent_id, |st| {
        state_of(st, SHELTER_KH) == "purged"
    })
    .await;
    let ngo_state = st.recipients.iter().find(|r| r.recipient == NGO_TH);
    assert_eq!(
        ngo_state.map(|r| r.state.as_str()),
        Some("not-withdrawn"),
        "{st:?}"
    );
    let mut c = kh.client().await;
    assert!(
        inbox(&mut c).await.is_empty(),
        "{SHELTER_KH} still holds data"
    );
    let mut c = ngo.client().await;
    assert_eq!(inbox(&mut c).await.len(), 1);
    // The consent itself stands for the recipient it still admits.
    let sent = s
        .send_referral(referral(&case_id, NGO_TH, "reintegration"))
        .await
        .expect("send")
        .into_inner();
    let st = wait_final(&mut s, &sent.referral_id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "delivered", "{}", st.last_error);

    // Withdrawn later, it asks the recipient that is left; the one that purged already
    // keeps the receipt of what it purged.
    s.withdraw_consent(pb::ConsentRequest {
        consent_id: consent_id.clone(),
    })
    .await
    .expect("withdraw");
    let st = wait_status(&mut s, &consent_id, all_purged).await;
    for r in &st.recipients {
        let receipt = r.purge_receipt.as_ref().expect("purge receipt");
        let expected = if r.recipient == NGO_TH { 2 } else { 1 };
        assert_eq!(receipt.purged_referrals.len(), expected, "{}", r.recipient);
    }
}

/// A narrowing that keeps a recipient but takes away a purpose and some fields reaches
/// it too: it purges the referral sent for that purpose, removes those fields from the
/// others, and keeps what the consent still covers.
#[tokio::test]
async fn a_narrowing_that_removes_a_purpose_and_fields_has_the_recipient_cut_its_data() {
    let fed = Federation::four("narrow-cut");
    let sender = fed.start(SHELTER_MY);
    let mut kh = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let (case_id, consent_id) = case_with_consent_to(
        &mut s,
        &[SHELTER_KH],
        &["reintegration", "psychosocial-support"],
    )
    .await;
    let mut with_more = referral(&case_id, SHELTER_KH, "reintegration");
    for f in [corridor::Field::RiskFlags, corridor::Field::HealthSummary] {
        with_more
            .fields
            .insert(f.as_str().to_owned(), sample_value(f));
    }
    let mut sent = Vec::new();
    for request in [
        with_more,
        referral(&case_id, SHELTER_KH, "psychosocial-support"),
        referral(&case_id, SHELTER_KH, "reintegration"),
    ] {
        let id = s
            .send_referral(request)
            .await
            .expect("send")
            .into_inner()
            .referral_id;
        let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
        assert_eq!(st.state, "delivered", "{}", st.last_error);
        sent.push(id);
    }
    let [cut, purged, untouched] = &sent[..] else {
        unreachable!()
    };
    let mut scope = consent_scope(&mut s, &consent_id).await;
    scope.purposes.retain(|p| p != "psychosocial-support");
    scope
        .fields
        .retain(|f| f != "risk_flags" && f != "health_summary");
    let received_keys = async || -> Vec<(String, Vec<u8>)> {
        sqlx::query_as("SELECT id, wrapped_key FROM case_keys WHERE id LIKE 'in:%'")
            .fetch_all(&mut open_db(&kh, true).await)
            .await
            .expect("keys")
    };
    let before = received_keys().await;
    assert_eq!(before.len(), 1, "one key for the consent's referrals");
    s.narrow_consent(pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope.clone()),
        if_narrowed_at_ms: None,
    })
    .await
    .expect("narrowing");

    let st = wait_status(&mut s, &consent_id, |st| {
        state_of(st, SHELTER_KH) == "narrowed"
    })
    .await;
    // What was cut went with the key it was sealed under: the consent's referrals kept
    // are sealed under a new one (they are read below).
    let after = received_keys().await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].0, before[0].0);
    assert_ne!(after[0].1, before[0].1, "the key was renewed");
    let receipt = st.recipients[0]
        .purge_receipt
        .as_ref()
        .expect("purge receipt");
    let purged_ids: Vec<String> = receipt.purged_referrals.iter().map(hex::encode).collect();
    assert_eq!(purged_ids, vec![purged.clone()]);
    let first_narrowing = receipt.withdrawal_id.clone();
    // The receipt is a narrowing's, naming what was cut, and signed by the recipient.
    let cut_ids: Vec<String> = receipt.cut_referrals.iter().map(hex::encode).collect();
    assert!(receipt.narrowing);
    assert_eq!(cut_ids, vec![cut.clone()]);
    let receipt = corridor_node::convert::purge_receipt_from_pb(receipt.clone())
        .expect("well-formed purge receipt");
    let kh_id = OrgId::new(SHELTER_KH).unwrap();
    let consent_ref = receipt.consent_id.clone();
    receipt
        .verify(
            receipt.withdrawal_id,
            true,
            &consent_ref,
            &OrgId::new(SHELTER_MY).unwrap(),
            &kh_id,
            &fed.directory.get(&kh_id).unwrap().signing_key,
        )
        .expect("narrowing receipt verifies");
    // The sender's status of each referral says what the recipient proved it did.
    for (id, since) in [(cut, "cut"), (purged, "purged"), (untouched, "")] {
        let status = s
            .get_referral_status(pb::GetReferralStatusRequest {
                referral_id: id.clone(),
            })
            .await
            .expect("status")
            .into_inner();
        assert_eq!(status.state, "delivered");
        assert_eq!(status.since_delivered, since, "{id}");
    }
    // Each side logs it as a narrowing, not as a withdrawal.
    let logged = |kind: &str| {
        format!("SELECT COUNT(*) FROM audit_entries WHERE instr(entry, CAST('{kind}' AS BLOB)) > 0")
    };
    assert_eq!(
        scalar(&sender, &logged("narrowing-receipt-received")).await,
        1
    );
    assert_eq!(scalar(&sender, &logged("purge-receipt-received")).await, 0);
    assert_eq!(scalar(&kh, &logged("narrowing-applied")).await, 1);
    assert_eq!(scalar(&kh, &logged("purge-done")).await, 0);

    let mut c = kh.client().await;
    let mut held: Vec<String> = inbox(&mut c)
        .await
        .into_iter()
        .map(|i| i.referral_id)
        .collect();
    held.sort();
    let mut expected = vec![cut.clone(), untouched.clone()];
    expected.sort();
    assert_eq!(
        held, expected,
        "{SHELTER_KH} holds what the consent no longer covers"
    );
    let fields_of = |r: pb::GetReferralResponse| {
        let mut names: Vec<String> = r.fields.into_keys().collect();
        names.sort();
        names
    };
    let mut required: Vec<String> = required_fields("reintegration").into_keys().collect();
    required.sort();
    for id in [cut, untouched] {
        let read = c
            .get_referral(pb::GetReferralRequest {
                referral_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("the referral it keeps")
            .into_inner();
        assert_eq!(fields_of(read), required, "{id}");
    }
    let gone = c
        .get_referral(pb::GetReferralRequest {
            referral_id: purged.clone(),
            ..Default::default()
        })
        .await
        .expect_err("the purged referral");
    assert_eq!(gone.code(), tonic::Code::NotFound);

    // The consent stands for what it still covers, and a later narrowing that takes
    // nothing more of what the recipient holds asks it for nothing.
    let id = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "delivered", "{}", st.last_error);
    scope.fields.retain(|f| f != "caseworker_note");
    s.narrow_consent(pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope.clone()),
        if_narrowed_at_ms: None,
    })
    .await
    .expect("second narrowing");
    let st = consent_status(&mut s, &consent_id).await;
    assert_eq!(state_of(&st, SHELTER_KH), "narrowed", "{st:?}");
    let last = st.recipients[0]
        .purge_receipt
        .as_ref()
        .expect("purge receipt");
    assert_eq!(last.withdrawal_id, first_narrowing, "asked again: {st:?}");
    assert_eq!(st.recipients[0].referral_ids.len(), 4, "{st:?}");
    assert_eq!(inbox(&mut c).await.len(), 3);

    // Away, the recipient is asked for a narrowing and then for the withdrawal, which
    // ends the narrowing still queued; the status shows the withdrawal pending, with no
    // earlier receipt in its place.
    kh.kill();
    scope.fields.retain(|f| f != "needs");
    s.narrow_consent(pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope),
        if_narrowed_at_ms: None,
    })
    .await
    .expect("third narrowing");
    let st = consent_status(&mut s, &consent_id).await;
    assert!(
        state_of(&st, SHELTER_KH).starts_with("pending narrowing"),
        "{st:?}"
    );
    assert!(st.recipients[0].purge_receipt.is_none(), "{st:?}");
    // The answer to the first narrowing stays as proof of what was cut then.
    let earlier: Vec<&[u8]> = st.recipients[0]
        .earlier_receipts
        .iter()
        .map(|r| r.withdrawal_id.as_slice())
        .collect();
    assert_eq!(earlier, vec![first_narrowing.as_slice()], "{st:?}");
    s.withdraw_consent(pb::ConsentRequest {
        consent_id: consent_id.clone(),
    })
    .await
    .expect("withdraw");
    let st = consent_status(&mut s, &consent_id).await;
    assert!(state_of(&st, SHELTER_KH).starts_with("pending ("), "{st:?}");
    assert!(st.recipients[0].purge_receipt.is_none(), "{st:?}");
    let queued_narrowings = scalar(
        &sender,
        "SELECT COUNT(*) FROM outbox WHERE kind = 3 AND state = 'queued'",
    )
    .await;
    assert_eq!(queued_narrowings, 0);
    kh.start();
    let st = wait_status(&mut s, &consent_id, all_purged).await;
    assert!(inbox(&mut c).await.is_empty());
    let earlier = &st.recipients[0].earlier_receipts;
    assert!(
        earlier.len() == 1 && earlier[0].narrowing && earlier[0].withdrawal_id == first_narrowing,
        "{st:?}"
    );
}

/// A consent to the Cambodian shelter, a reintegration referral carrying risk flags
/// delivered under it, and then, the shelter away, the consent narrowed to drop them.
struct NarrowedWhileAway {
    sender: TestNode,
    kh: TestNode,
    s: Caseworker,
    consent_id: String,
    referral_id: String,
    // Last, so that the nodes stop before their files go.
    _fed: Federation,
}

async fn narrowed_while_away(tag: &str) -> NarrowedWhileAway {
    let fed = Federation::four(tag);
    let sender = fed.start(SHELTER_MY);
    let mut kh = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH], &["reintegration"]).await;
    let mut request = referral(&case_id, SHELTER_KH, "reintegration");
    request.fields.insert(
        "risk_flags".into(),
        sample_value(corridor::Field::RiskFlags),
    );
    let referral_id = s
        .send_referral(request)
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    let st = wait_final(&mut s, &referral_id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "delivered", "{}", st.last_error);

    kh.kill();
    let mut scope = consent_scope(&mut s, &consent_id).await;
    scope.fields.retain(|f| f != "risk_flags");
    s.narrow_consent(pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope),
        if_narrowed_at_ms: None,
    })
    .await
    .expect("narrowing");
    NarrowedWhileAway {
        sender,
        kh,
        s,
        consent_id,
        referral_id,
        _fed: fed,
    }
}

impl NarrowedWhileAway {
    /// Restarts the sender after `change` to its stopped database, and waits (up to 20 s)
    /// until `count` answers 1 there: `what` it should have done as it started.
    async fn restart_sender(&mut self, change: &str, count: &str, what: &str) {
        self.sender.stop();
        sql(&self.sender, &[change]).await;
        self.sender.start();
        self.s = self.sender.client().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while scalar(&self.sender, count).await != 1 {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Brings the shelter back, waits until it carried out the narrowing, and returns the
    /// referral as it holds it now.
    async fn held_after_return(&mut self) -> pb::GetReferralResponse {
        self.kh.start();
        wait_status(&mut self.s, &self.consent_id, |st| {
            state_of(st, SHELTER_KH) == "narrowed"
        })
        .await;
        let mut c = self.kh.client().await;
        c.get_referral(pb::GetReferralRequest {
            referral_id: self.referral_id.clone(),
            ..Default::default()
        })
        .await
        .expect("the referral it keeps")
        .into_inner()
    }
}

/// A recipient away for longer than an envelope may live still gets the narrowing, in a
/// renewed envelope asking the same, and cuts what it holds when it returns.
#[tokio::test]
async fn a_narrowing_outlives_its_envelope_for_a_recipient_that_is_away() {
    let mut away = narrowed_while_away("narrow-renew").await;
    let st = consent_status(&mut away.s, &away.consent_id).await;
    assert!(
        state_of(&st, SHELTER_KH).starts_with("pending narrowing"),
        "{st:?}"
    );

    let narrowing = format!("kind = 3 AND recipient = '{SHELTER_KH}'");
    away.restart_sender(
        &format!("UPDATE outbox SET expires_at_ms = 1, next_attempt_at_ms = 0 WHERE {narrowing}"),
        &format!("SELECT COUNT(*) FROM outbox WHERE {narrowing} AND state = 'queued' AND expires_at_ms > 1"),
        "the expired narrowing was not renewed",
    )
    .await;

    let read = away.held_after_return().await;
    let mut names: Vec<String> = read.fields.into_keys().collect();
    names.sort();
    let mut required: Vec<String> = required_fields("reintegration").into_keys().collect();
    required.sort();
    assert_eq!(names, required);
}

/// A narrowing its recipient refused (a member on an older version, say) is asked again
/// when the node starts: what the sender records as cut is only what a recipient proved
/// it cut.
#[tokio::test]
async fn a_refused_narrowing_is_asked_again_at_start() {
    let mut away = narrowed_while_away("narrow-refused").await;
    // The node catches up as it starts, beside serving.
    away.restart_sender(
        "UPDATE outbox SET state = 'refused', last_error = 'refused for the test' WHERE kind = 3",
        "SELECT COUNT(*) FROM outbox WHERE kind = 3 AND state = 'queued'",
        "the refused narrowing was not asked again",
    )
    .await;

    let read = away.held_after_return().await;
    assert!(
        !read.fields.contains_key("risk_flags"),
        "{:?}",
        read.fields.keys()
    );
}

/// A request to purge its recipient keeps refusing is sealed anew once it is a day old:
/// the refusal may be of the envelope itself (sealed to a key the recipient rotated out,
/// signed with one the directory no longer lists; here its signature is broken).
#[tokio::test]
async fn a_refused_narrowing_a_day_old_is_sealed_anew() {
    let mut away = narrowed_while_away("narrow-reseal").await;
    let two_days = 2 * 24 * 3600 * 1000;
    away.restart_sender(
        &format!(
            "UPDATE outbox SET next_attempt_at_ms = 0,
                expires_at_ms = expires_at_ms - {two_days},
                envelope = substr(envelope, 1, length(envelope) - 1)
                    || CASE WHEN substr(envelope, -1) = x'00' THEN x'01' ELSE x'00' END
             WHERE kind = 3"
        ),
        "SELECT COUNT(*) FROM outbox WHERE kind = 3",
        "the narrowing is gone",
    )
    .await;
    let read = away.held_after_return().await;
    assert!(
        !read.fields.contains_key("risk_flags"),
        "{:?}",
        read.fields.keys()
    );
}

/// A narrowing is stored, then its recipients are asked to carry it out. When the second
/// step fails (a full disk, say), `consent restate` asks the recipients it missed.
#[tokio::test]
async fn restating_asks_the_recipients_a_narrowing_failed_to_reach() {
    let mut away = narrowed_while_away("narrow-restate").await;
    // The narrowing stored, its request never queued.
    sql(&away.sender, &["DELETE FROM outbox WHERE kind = 3"]).await;
    away.s
        .restate_consent_terms(pb::ConsentRequest {
            consent_id: away.consent_id.clone(),
        })
        .await
        .expect("restate");
    let queued = "SELECT COUNT(*) FROM outbox WHERE kind = 3 AND state = 'queued'";
    assert_eq!(scalar(&away.sender, queued).await, 1);
    let read = away.held_after_return().await;
    assert!(
        !read.fields.contains_key("risk_flags"),
        "{:?}",
        read.fields.keys()
    );
}

/// The directory's `[[member]]` block of `org` taken out of `directory`.
fn without_member(directory: &str, org: &str) -> String {
    directory
        .split("[[member]]")
        .enumerate()
        .filter(|(i, block)| *i == 0 || !block.contains(&format!("id = \"{org}\"")))
        .map(|(_, block)| block)
        .collect::<Vec<_>>()
        .join("[[member]]")
}

/// `directory` with the country of `org` set to `country`.
fn with_member_country(directory: &str, org: &str, country: &str) -> String {
    directory
        .split("[[member]]")
        .map(|block| match block.contains(&format!("id = \"{org}\"")) {
            true => block
                .lines()
                .map(|line| match line.starts_with("country = ") {
                    true => format!("country = \"{country}\""),
                    false => line.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("\n"),
            false => block.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("[[member]]")
}

/// A recipient that refused every referral under a consent holds nothing under it: once
/// the consent is withdrawn, its status says there is nothing to purge, nothing counts as
/// outstanding and no withdrawal is sent to it.
#[tokio::test]
async fn a_recipient_that_refused_every_referral_has_nothing_to_purge() {
    let fed = Federation::four("withdraw-refused");
    let mut sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = new_case(&mut s).await;
    let consent_id = s
        .record_consent(consent_request(
            &case_id,
            pb::ConsentScope {
                purposes: vec!["reintegration".into()],
                recipient_orgs: vec![NGO_TH.into()],
                fields: fields_allowed_for(&["reintegration"]).into_iter().collect(),
                excluded_countries: vec!["VN".into()],
                expires_at_ms: corridor_node::node::now_ms() + 30 * 86_400_000,
                ..Default::default()
            },
        ))
        .await
        .expect("record consent")
        .into_inner()
        .consent_id;
    // The NGO starts on a newer directory that places it in an excluded country: its own
    // gate refuses what the sender's directory still lets through.
    let original = std::fs::read_to_string(fed.dir.join("directory.toml")).expect("directory");
    let moved = with_member_country(&original, NGO_TH, "VN");
    assert_ne!(moved, original);
    publish_directory(&fed, &with_serial(&moved, 2));
    let _ngo = fed.start(NGO_TH);
    let id = s
        .send_referral(referral(&case_id, NGO_TH, "reintegration"))
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "refused", "{}", st.last_error);
    assert!(st.last_error.contains("VN"), "{}", st.last_error);

    s.withdraw_consent(pb::ConsentRequest {
        consent_id: consent_id.clone(),
    })
    .await
    .expect("withdraw");
    let st = consent_status(&mut s, &consent_id).await;
    assert_eq!(
        state_of(&st, NGO_TH),
        "nothing to purge (it refused every referral)",
        "{st:?}"
    );
    let withdrawals = "SELECT count(*) FROM outbox WHERE kind = 2";
    assert_eq!(scalar(&sender, withdrawals).await, 0);
    // Nor when the sender starts again and catches up on whom it has yet to ask.
    sender.stop();
    sender.start();
    assert_eq!(scalar(&sender, withdrawals).await, 0);
    let mut s = sender.client().await;
    let st = consent_status(&mut s, &consent_id).await;
    assert_eq!(
        state_of(&st, NGO_TH),
        "nothing to purge (it refused every referral)"
    );
    let out = std::process::Command::new(binary("corridor"))
        .args(["--node", &sender.local_url(), "--token", &sender.token])
        .args(["consent", "status", &consent_id])
        .output()
        .expect("run corridor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("nothing to purge (it refused every referral)")
            && stdout.contains("0 purge receipt(s) outstanding"),
        "{stdout}"
    );
}

/// A recipient that left the federation still holds what it received. A withdrawal then
/// cannot reach it: consent status says so, counted as outstanding, and the recipient is
/// asked to purge once a directory brings it back.
#[tokio::test]
async fn a_withdrawal_reaches_a_recipient_that_left_and_came_back() {
    let fed = Federation::four("withdraw-left");
    let mut sender = fed.start(SHELTER_MY);
    let mut ngo = fed.start(NGO_TH);
    let mut s = sender.client().await;
    let (case_id, consent_id) = case_with_consent_to(&mut s, &[NGO_TH], &["reintegration"]).await;
    let sent = s
        .send_referral(referral(&case_id, NGO_TH, "reintegration"))
        .await
        .expect("send")
        .into_inner();
    let st = wait_final(&mut s, &sent.referral_id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "delivered", "{}", st.last_error);

    // The NGO leaves the federation; the sender runs on the directory without it.
    ngo.stop();
    sender.stop();
    let original = std::fs::read_to_string(fed.dir.join("directory.toml")).expect("directory");
    publish_directory(&fed, &with_serial(&without_member(&original, NGO_TH), 2));
    sender.start();
    let mut s = sender.client().await;
    s.withdraw_consent(pb::ConsentRequest {
        consent_id: consent_id.clone(),
    })
    .await
    .expect("withdraw");
    let st = consent_status(&mut s, &consent_id).await;
    assert!(
        state_of(&st, NGO_TH).starts_with("pending (not a member"),
        "{st:?}"
    );
    let asked = st.recipients.iter().find(|r| r.recipient == NGO_TH);
    assert_eq!(
        asked.map(|r| (r.request.as_str(), r.request_state.as_str())),
        Some(("withdrawal", "not-a-member")),
        "{st:?}"
    );

    // It comes back: asked at the sender's next start, it purges.
    sender.stop();
    publish_directory(&fed, &with_serial(&original, 3));
    ngo.start();
    sender.start();
    let mut s = sender.client().await;
    wait_status(&mut s, &consent_id, |st| state_of(st, NGO_TH) == "purged").await;
    let mut c = ngo.client().await;
    assert!(inbox(&mut c).await.is_empty(), "{NGO_TH} still holds data");
}

/// Sends that keep coming do not hold a withdrawal up: it goes through at once, the
/// sends after it are refused, and the recipient purges everything it got.
#[tokio::test(flavor = "multi_thread")]
async fn a_withdrawal_goes_through_while_referrals_keep_being_sent() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let fed = Federation::demo("withdraw-under-load");
    let kh = fed.start(SHELTER_KH);
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH], &["reintegration"]).await;
    let withdrawn = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for _ in 0..4 {
        let mut c = sender.client().await;
        let (case_id, withdrawn) = (case_id.clone(), withdrawn.clone());
        senders.push(tokio::spawn(async move {
            loop {
                let after = withdrawn.load(Ordering::SeqCst);
                match c
                    .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
                    .await
                {
                    Ok(_) => assert!(!after, "a referral was queued after the withdrawal"),
                    Err(status) => {
                        assert!(status.message().contains("withdrawn"), "{status:?}");
                        return;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.withdraw_consent(pb::ConsentRequest {
        consent_id: consent_id.clone(),
    })
    .await
    .expect("a withdrawal goes through while sends keep coming");
    withdrawn.store(true, Ordering::SeqCst);
    for task in senders {
        task.await.expect("sender task");
    }
    wait_status(&mut s, &consent_id, all_purged).await;
    let mut c = kh.client().await;
    assert!(
        inbox(&mut c).await.is_empty(),
        "{SHELTER_KH} still holds data"
    );
}

/// Makes a delivered referral look as if a version that did not record the fields a
/// referral carried had sent it: stops the sender, clears them, and starts it again.
async fn forget_recorded_fields(sender: &mut TestNode, referral_id: &str) {
    sender.stop();
    sql(
        sender,
        &[&format!(
            "UPDATE outbox SET fields = NULL WHERE lower(hex(message_id)) = '{referral_id}'"
        )],
    )
    .await;
    sender.start();
}

/// A referral sent before senders recorded the fields each carries can only be kept
/// whole by a narrowing that takes fields away: the caseworker is told so by `consent
/// narrow` and `consent status`, and a withdrawal still has it purged.
#[tokio::test]
async fn a_narrowing_says_which_older_referrals_it_could_only_keep_whole() {
    let fed = Federation::four("narrow-kept-whole");
    let mut sender = fed.start(SHELTER_MY);
    let _kh = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH], &["reintegration"]).await;
    let mut sent = Vec::new();
    for _ in 0..2 {
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
    let (older, recorded) = (&sent[0], &sent[1]);
    // The first one as a version that did not record fields left it.
    forget_recorded_fields(&mut sender, older).await;
    let mut s = sender.client().await;

    // Remove a field reintegration may carry; neither referral carried it, but the
    // sender cannot know that of the older one.
    let removed = corridor::profile::profile(corridor::Purpose::Reintegration).optional[0];
    let out = std::process::Command::new(binary("corridor"))
        .args(["--node", &sender.local_url(), "--token", &sender.token])
        .args([
            "consent",
            "narrow",
            &consent_id,
            "--remove-field",
            removed.as_str(),
        ])
        .output()
        .expect("run corridor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .contains("Warning: 1 referral(s) kept whole: sent before their fields were recorded"),
        "{stdout}"
    );
    let st = consent_status(&mut s, &consent_id).await;
    let kh = st
        .recipients
        .iter()
        .find(|r| r.recipient == SHELTER_KH)
        .expect("recipient");
    assert_eq!(kh.kept_whole_referral_ids, vec![older.clone()]);
    // The one whose fields are known carried nothing the narrowing took away: the
    // recipient is not asked for anything.
    assert!(!kh.kept_whole_referral_ids.contains(recorded));
    assert_eq!(kh.state, "not-withdrawn");

    // A withdrawal purges both, and nothing is left kept whole.
    s.withdraw_consent(pb::ConsentRequest {
        consent_id: consent_id.clone(),
    })
    .await
    .expect("withdraw");
    let st = wait_status(&mut s, &consent_id, all_purged).await;
    let receipt = st.recipients[0]
        .purge_receipt
        .as_ref()
        .expect("purge receipt");
    let mut purged: Vec<String> = receipt.purged_referrals.iter().map(hex::encode).collect();
    purged.sort();
    let mut both = sent.clone();
    both.sort();
    assert_eq!(purged, both);
    assert!(st.recipients[0].kept_whole_referral_ids.is_empty());
}

/// A narrowing that takes no field away (an earlier expiry) keeps nothing whole beyond
/// the consent, even under a consent that never covered every field its purpose allows.
#[tokio::test]
async fn a_narrowing_that_removes_no_field_reports_nothing_kept_whole() {
    let fed = Federation::four("narrow-no-field");
    let mut sender = fed.start(SHELTER_MY);
    let _kh = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let case_id = new_case(&mut s).await;
    let expires_at_ms = corridor_node::node::now_ms() + 30 * 86_400_000;
    let consent_id = s
        .record_consent(consent_request(
            &case_id,
            pb::ConsentScope {
                purposes: vec!["reintegration".into()],
                recipient_orgs: vec![SHELTER_KH.into()],
                // The required fields only: the purpose allows more.
                fields: required_fields("reintegration").into_keys().collect(),
                expires_at_ms,
                ..Default::default()
            },
        ))
        .await
        .expect("record consent")
        .into_inner()
        .consent_id;
    let id = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "delivered", "{}", st.last_error);
    forget_recorded_fields(&mut sender, &id).await;
    let mut s = sender.client().await;
    let mut scope = consent_scope(&mut s, &consent_id).await;
    // Expiries are kept to the day: one day earlier.
    scope.expires_at_ms = corridor::consent::recorded_expiry(expires_at_ms) - 86_400_000;
    s.narrow_consent(pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope),
        if_narrowed_at_ms: None,
    })
    .await
    .expect("an earlier expiry");
    let st = consent_status(&mut s, &consent_id).await;
    assert!(
        st.recipients
            .iter()
            .all(|r| r.kept_whole_referral_ids.is_empty()),
        "{st:?}"
    );
}

/// A restriction the person adds later reaches a recipient that holds data under the
/// consent even when it has nothing to cut: `referral show` there shows it, with the
/// earlier expiry, and the recipient forgets the terms once it holds nothing more.
#[tokio::test]
async fn a_restriction_added_later_reaches_the_recipient() {
    let fed = Federation::four("narrow-terms");
    let mut sender = fed.start(SHELTER_MY);
    let kh = fed.start(SHELTER_KH);
    let _ngo = fed.start(NGO_TH);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH, NGO_TH], &["reintegration"]).await;
    let id = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "delivered", "{}", st.last_error);
    let mut k = kh.client().await;
    let show = |k: &mut Caseworker| {
        let mut k = k.clone();
        let id = id.clone();
        async move {
            k.get_referral(pb::GetReferralRequest {
                referral_id: id,
                ..Default::default()
            })
            .await
            .expect("referral")
            .into_inner()
        }
    };
    let before = show(&mut k).await;
    assert!(!before.consent_no_family_contact && before.consent_excluded_countries.is_empty());
    assert_eq!(before.consent_narrowed_at_ms, 0);
    // Never narrowed: every referral stated its terms, and there is nothing to restate.
    let status = s
        .restate_consent_terms(pb::ConsentRequest {
            consent_id: consent_id.clone(),
        })
        .await
        .expect_err("nothing to restate");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("was never narrowed"),
        "{status:?}"
    );

    let mut scope = consent_scope(&mut s, &consent_id).await;
    scope.no_family_contact = true;
    scope.excluded_countries = vec!["VN".into()];
    scope.expires_at_ms -= 86_400_000;
    let expires_at_ms = scope.expires_at_ms;
    s.narrow_consent(pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope),
        if_narrowed_at_ms: None,
    })
    .await
    .expect("narrowing");
    let st = wait_status(&mut s, &consent_id, |st| {
        state_of(st, SHELTER_KH) == "narrowed"
    })
    .await;
    // Its signed answer confirms the terms as the narrowing stated them.
    let kh_status = st
        .recipients
        .iter()
        .find(|r| r.recipient == SHELTER_KH)
        .expect("the recipient");
    assert_eq!(kh_status.terms_confirmation, "as-they-stand");
    assert_eq!(
        kh_status
            .purge_receipt
            .as_ref()
            .map(|r| r.terms_confirmed.len()),
        Some(32)
    );
    let out = std::process::Command::new(binary("corridor"))
        .args(["--node", &sender.local_url(), "--token", &sender.token])
        .args(["consent", "status", &consent_id])
        .output()
        .expect("run corridor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains(
                "confirmed it applies the consent's restrictions and expiry as they stand"
            ),
        "{stdout}"
    );
    // A later narrowing of a field the referral did not carry asks nothing of it, and
    // its answer stands: checked with the key its own narrowing gave it.
    let mut scope = consent_scope(&mut s, &consent_id).await;
    let unsent = corridor::profile::profile(corridor::Purpose::Reintegration).optional[0];
    scope.fields.retain(|f| f != unsent.as_str());
    s.narrow_consent(pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope),
        if_narrowed_at_ms: None,
    })
    .await
    .expect("a field");
    let st = consent_status(&mut s, &consent_id).await;
    assert_eq!(terms_confirmation_of(&st, SHELTER_KH), "as-they-stand");

    let after = show(&mut k).await;
    assert!(after.consent_no_family_contact, "{after:?}");
    assert_eq!(after.consent_excluded_countries, vec!["VN".to_owned()]);
    assert_eq!(after.consent_expires_at_ms, expires_at_ms);
    assert!(after.consent_narrowed_at_ms > 0 && after.consent_terms_restated);
    assert_eq!(after.fields, before.fields, "nothing was cut");
    let out = std::process::Command::new(binary("corridor"))
        .args(["--node", &kh.local_url(), "--token", &kh.token])
        .args(["referral", "show", &id])
        .output()
        .expect("run corridor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("restrictions: never to VN; no contact with family (as narrowed "),
        "{stdout}"
    );

    // Told once: a start asks it nothing more; nor a recipient whose first referral was
    // sealed after the narrowing (its consent receipt states the terms).
    let to_ngo = s
        .send_referral(referral(&case_id, NGO_TH, "reintegration"))
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    let st = wait_final(&mut s, &to_ngo, Duration::from_secs(20)).await;
    assert_eq!(st.state, "delivered", "{}", st.last_error);
    for _ in 0..2 {
        sender.stop();
        sender.start();
    }
    let mut s = sender.client().await;
    let narrowings =
        |org: &str| format!("SELECT count(*) FROM outbox WHERE kind = 3 AND recipient = '{org}'");
    assert_eq!(scalar(&sender, &narrowings(SHELTER_KH)).await, 1);
    assert_eq!(scalar(&sender, &narrowings(NGO_TH)).await, 0);

    // Purged on withdrawal, the recipient no longer keeps the terms either.
    s.withdraw_consent(pb::ConsentRequest {
        consent_id: consent_id.clone(),
    })
    .await
    .expect("withdraw");
    wait_status(&mut s, &consent_id, all_purged).await;
    // The sender keeps the recipient's answer to the narrowing beside the purge's.
    let out = std::process::Command::new(binary("corridor"))
        .args(["--node", &sender.local_url(), "--token", &sender.token])
        .args(["consent", "status", &consent_id])
        .output()
        .expect("run corridor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("purged at ")
            && stdout.contains("earlier: narrowed at ")
            && stdout.contains("nothing to destroy or cut, the consent's terms confirmed")
            && !stdout.contains("as they stand"),
        "{stdout}"
    );
    let out = std::process::Command::new(binary("corridor"))
        .args(["--node", &sender.local_url(), "--token", &sender.token])
        .args(["--output", "json", "consent", "status", &consent_id])
        .output()
        .expect("run corridor");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let kh_json = json["recipients"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["recipient"] == SHELTER_KH))
        .expect("the recipient");
    assert_eq!(
        kh_json["request"],
        serde_json::json!({"kind": "withdrawal", "state": "answered"})
    );
    assert_eq!(
        kh_json["referral_states"],
        serde_json::json!([{"referral_id": id, "state": "delivered"}])
    );
    assert_eq!(
        kh_json["earlier_purge_receipts"].as_array().map(Vec::len),
        Some(1)
    );
    assert!(
        kh_json["earlier_purge_receipts"][0]["terms_confirmed"].is_string(),
        "{kh_json}"
    );
    assert_eq!(kh_json["terms_confirmation"], serde_json::Value::Null);
    assert_eq!(
        scalar(
            &kh,
            "SELECT count(*) FROM narrowed_consents WHERE terms_sealed IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(&kh, "SELECT count(*) FROM narrowed_consents").await,
        1
    );
}

/// A recipient that was not a member when the person added a restriction learns it when
/// it comes back, although a later narrowing changed no restriction and has nothing for
/// it to cut. Meanwhile the sender's status says it confirmed only the terms as they were
/// before; once told, as they stand.
#[tokio::test]
async fn a_restriction_added_while_a_recipient_was_away_reaches_it_when_it_returns() {
    let fed = Federation::four("narrow-terms-away");
    let mut sender = fed.start(SHELTER_MY);
    let mut kh = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    // By role and country: a narrowing may not name an org that is not a member.
    let case_id = new_case(&mut s).await;
    let consent_id = s
        .record_consent(consent_request(
            &case_id,
            pb::ConsentScope {
                purposes: vec!["reintegration".into()],
                recipient_roles: vec!["shelter@KH".into()],
                fields: fields_allowed_for(&["reintegration"]).into_iter().collect(),
                expires_at_ms: corridor_node::node::now_ms() + 30 * 86_400_000,
                ..Default::default()
            },
        ))
        .await
        .expect("record consent")
        .into_inner()
        .consent_id;
    let id = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "delivered", "{}", st.last_error);
    let narrow = |scope: pb::ConsentScope| pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope),
        if_narrowed_at_ms: None,
    };
    // A first restriction it confirms.
    let mut scope = consent_scope(&mut s, &consent_id).await;
    scope.excluded_countries = vec!["VN".into()];
    s.narrow_consent(narrow(scope))
        .await
        .expect("a first restriction");
    let st = wait_status(&mut s, &consent_id, |st| {
        state_of(st, SHELTER_KH) == "narrowed"
    })
    .await;
    assert_eq!(terms_confirmation_of(&st, SHELTER_KH), "as-they-stand");

    kh.stop();
    sender.stop();
    let original = std::fs::read_to_string(fed.dir.join("directory.toml")).expect("directory");
    publish_directory(
        &fed,
        &with_serial(&without_member(&original, SHELTER_KH), 2),
    );
    sender.start();
    let mut s = sender.client().await;
    let mut scope = consent_scope(&mut s, &consent_id).await;
    scope.no_family_contact = true;
    s.narrow_consent(narrow(scope.clone()))
        .await
        .expect("the restriction");
    // Away, it has confirmed only the terms as they were before.
    let st = consent_status(&mut s, &consent_id).await;
    assert_eq!(terms_confirmation_of(&st, SHELTER_KH), "earlier");
    // Then a field the referral did not carry: nothing to cut, no restriction changed.
    let unsent = corridor::profile::profile(corridor::Purpose::Reintegration).optional[0];
    scope.fields.retain(|f| f != unsent.as_str());
    s.narrow_consent(narrow(scope)).await.expect("a field");

    sender.stop();
    publish_directory(&fed, &with_serial(&original, 3));
    kh.start();
    sender.start();
    let mut s = sender.client().await;
    // Told when it returns, it confirms them as they stand.
    wait_status(&mut s, &consent_id, |st| {
        terms_confirmation_of(st, SHELTER_KH) == "as-they-stand"
    })
    .await;
    let read = kh
        .client()
        .await
        .get_referral(pb::GetReferralRequest {
            referral_id: id,
            ..Default::default()
        })
        .await
        .expect("referral")
        .into_inner();
    assert!(
        read.consent_no_family_contact && read.consent_terms_restated,
        "{read:?}"
    );

    // An answer without a confirmation (from a recipient, or to a request, from before
    // confirmations: here the stored answer loses its last field, the confirmation) reads
    // as unconfirmed, and the caseworker is told what to do.
    sql(
        &sender,
        &["UPDATE receipts SET purge_receipt = substr(purge_receipt, 1, length(purge_receipt) - 34)
           WHERE message_id IN (SELECT message_id FROM outbox WHERE kind = 3)"],
    )
    .await;
    let st = consent_status(&mut s, &consent_id).await;
    assert_eq!(
        terms_confirmation_of(&st, SHELTER_KH),
        "unconfirmed",
        "{st:?}"
    );
    let out = std::process::Command::new(binary("corridor"))
        .args(["--node", &sender.local_url(), "--token", &sender.token])
        .args(["consent", "status", &consent_id])
        .output()
        .expect("run corridor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("make sure it knows them by other means"),
        "{stdout}"
    );
    // Asked again, it confirms them; then there is no one left to ask.
    let restate = || {
        std::process::Command::new(binary("corridor"))
            .args(["--node", &sender.local_url(), "--token", &sender.token])
            .args(["consent", "restate", &consent_id])
            .output()
            .expect("run corridor")
    };
    let out = restate();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with(&format!("asked {SHELTER_KH} to confirm")),
        "{stdout}"
    );
    wait_status(&mut s, &consent_id, |st| {
        terms_confirmation_of(st, SHELTER_KH) == "as-they-stand"
    })
    .await;
    let out = restate();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("nothing to ask"),
        "{stdout}"
    );
}

/// A recipient counts as told of a consent's terms by its referrals only if every
/// referral it may hold was sealed after they changed: one holding a referral from before
/// the change is told again at the next start, although a later referral carried the
/// terms, if the record of the narrowing that told it is gone.
#[tokio::test]
async fn a_referral_sealed_after_a_change_does_not_tell_a_recipient_holding_one_from_before() {
    let fed = Federation::four("terms-told-by-referrals");
    let mut sender = fed.start(SHELTER_MY);
    let _kh = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH], &["reintegration"]).await;
    let send = |s: &mut Caseworker| {
        let mut s = s.clone();
        let case_id = case_id.clone();
        async move {
            let id = s
                .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
                .await
                .expect("send")
                .into_inner()
                .referral_id;
            let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
            assert_eq!(st.state, "delivered", "{}", st.last_error);
        }
    };
    send(&mut s).await;
    let mut scope = consent_scope(&mut s, &consent_id).await;
    scope.no_family_contact = true;
    s.narrow_consent(pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope),
        if_narrowed_at_ms: None,
    })
    .await
    .expect("the restriction");
    wait_status(&mut s, &consent_id, |st| {
        state_of(st, SHELTER_KH) == "narrowed"
    })
    .await;
    send(&mut s).await;

    sender.stop();
    sql(
        &sender,
        &[
            "DELETE FROM receipts WHERE message_id IN (SELECT message_id FROM outbox WHERE kind = 3)",
            "DELETE FROM outbox WHERE kind = 3",
        ],
    )
    .await;
    sender.start();
    let mut s = sender.client().await;
    let st = wait_status(&mut s, &consent_id, |st| {
        state_of(st, SHELTER_KH) == "narrowed"
    })
    .await;
    let kh_status = st.recipients.iter().find(|r| r.recipient == SHELTER_KH);
    assert_eq!(
        kh_status.map(|r| r.terms_confirmation.as_str()),
        Some("as-they-stand")
    );
    assert_eq!(
        scalar(&sender, "SELECT count(*) FROM outbox WHERE kind = 3").await,
        1
    );
}

/// Narrowings queued while their recipient was down reach it together, and it carries
/// them out at once: where one changed what another had read (the consent's stored
/// terms, what is held under it), that one reads again. None fails as a storage error,
/// and the recipient ends up confirming the terms as they stand; while they wait,
/// status says it confirmed them only as they were before.
#[tokio::test]
async fn narrowings_that_reach_a_recipient_together_are_all_carried_out() {
    let fed = Federation::four("narrowings-together");
    let mut sender = fed.start(SHELTER_MY);
    let mut kh = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH], &["reintegration"]).await;
    let id = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "delivered", "{}", st.last_error);

    let changes: [&dyn Fn(&mut pb::ConsentScope); 4] = [
        &|scope| scope.excluded_countries.push("VN".into()),
        &|scope| scope.no_family_contact = true,
        &|scope| scope.expires_at_ms -= 86_400_000,
        &|scope| scope.expires_at_ms -= 86_400_000,
    ];
    for (i, change) in changes.into_iter().enumerate() {
        if i == 1 {
            // It answered the first; while the others wait for it, status says it
            // confirmed the terms only as they were before.
            wait_status(&mut s, &consent_id, |st| {
                terms_confirmation_of(st, SHELTER_KH) == "as-they-stand"
            })
            .await;
            kh.stop();
        }
        let mut scope = consent_scope(&mut s, &consent_id).await;
        change(&mut scope);
        s.narrow_consent(pb::NarrowConsentRequest {
            consent_id: consent_id.clone(),
            scope: Some(scope),
            if_narrowed_at_ms: None,
        })
        .await
        .expect("narrowing");
    }
    assert_eq!(
        scalar(
            &sender,
            "SELECT count(*) FROM outbox WHERE kind = 3 AND state = 'queued'"
        )
        .await,
        3
    );
    let st = consent_status(&mut s, &consent_id).await;
    assert!(
        state_of(&st, SHELTER_KH).starts_with("pending narrowing"),
        "{st:?}"
    );
    assert_eq!(terms_confirmation_of(&st, SHELTER_KH), "earlier");
    // The sender starts after the recipient: every narrowing is due at once, and they
    // leave together.
    sender.stop();
    kh.start();
    sender.start();
    let mut s = sender.client().await;
    wait_status(&mut s, &consent_id, |st| {
        terms_confirmation_of(st, SHELTER_KH) == "as-they-stand"
    })
    .await;
    let read = kh
        .client()
        .await
        .get_referral(pb::GetReferralRequest {
            referral_id: id,
            ..Default::default()
        })
        .await
        .expect("referral")
        .into_inner();
    assert!(
        read.consent_no_family_contact && read.consent_excluded_countries == ["VN"],
        "{read:?}"
    );
    for (node, log) in [("recipient", kh.log()), ("sender", sender.log())] {
        assert!(
            !log.contains("storage failed") && !log.contains("ERROR"),
            "the {node} logged a failure:\n{log}"
        );
    }
}

/// A withdrawal is two steps: the consent is marked withdrawn, then its recipients are
/// asked to purge. When the second fails (a full disk, say), withdrawing again asks them.
#[tokio::test]
async fn withdrawing_again_asks_the_recipients_a_failed_withdrawal_did_not() {
    let fed = Federation::demo("withdraw-again");
    let sender = fed.start(SHELTER_MY);
    let kh = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH], &["reintegration"]).await;
    let sent = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect("send")
        .into_inner();
    let st = wait_final(&mut s, &sent.referral_id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "delivered", "{}", st.last_error);
    // The first step, without the second.
    sql(
        &sender,
        &[&format!(
            "UPDATE consents SET withdrawn_at_ms = {} WHERE id = '{consent_id}'",
            corridor_node::node::now_ms()
        )],
    )
    .await;
    assert_eq!(
        scalar(&sender, "SELECT COUNT(*) FROM outbox WHERE kind = 2").await,
        0
    );
    s.withdraw_consent(pb::ConsentRequest {
        consent_id: consent_id.clone(),
    })
    .await
    .expect("withdraw again");
    wait_status(&mut s, &consent_id, all_purged).await;
    let mut c = kh.client().await;
    assert!(
        inbox(&mut c).await.is_empty(),
        "the recipient still holds it"
    );
}

/// A referral queued under one directory is gated again against the directory its
/// sender starts with: a recipient whose entry changed to one the consent does not admit
/// (here, moved to a country the person excluded) is not sent it, even by a recipient
/// still running on the directory before.
#[tokio::test]
async fn a_queued_referral_the_consent_no_longer_admits_under_a_new_directory_is_cancelled() {
    let fed = Federation::four("regate-queued");
    let mut sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = new_case(&mut s).await;
    s.record_consent(consent_request(
        &case_id,
        pb::ConsentScope {
            purposes: vec!["reintegration".into()],
            recipient_orgs: vec![NGO_TH.into()],
            fields: fields_allowed_for(&["reintegration"]).into_iter().collect(),
            excluded_countries: vec!["MM".into()],
            expires_at_ms: corridor_node::node::now_ms() + 30 * 86_400_000,
            ..Default::default()
        },
    ))
    .await
    .expect("record consent");
    // The NGO is away: the referral stays queued.
    let id = s
        .send_referral(referral(&case_id, NGO_TH, "reintegration"))
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    sender.stop();
    let ngo = fed.start(NGO_TH);
    let original = std::fs::read_to_string(fed.dir.join("directory.toml")).expect("directory");
    publish_directory(
        &fed,
        &with_serial(&with_member_country(&original, NGO_TH, "MM"), 2),
    );
    sender.start();
    let mut s = sender.client().await;
    let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "cancelled", "{}", st.last_error);
    assert!(
        st.last_error.contains("directory changed"),
        "{}",
        st.last_error
    );
    let mut c = ngo.client().await;
    assert!(inbox(&mut c).await.is_empty(), "{NGO_TH} was sent it");
}

/// A referral given up on after earlier attempts (here the member left the federation
/// meanwhile) may have reached its recipient in one of them, its answer lost: its status
/// says so, and a withdrawal of its consent counts the recipient as holding it. So does
/// one whose attempt the node stopped during, before it could record it.
#[tokio::test]
async fn a_referral_given_up_after_earlier_attempts_counts_as_held() {
    let fed = Federation::four("given-up");
    let mut sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let (case_id, consent_id) = case_with_consent_to(&mut s, &[NGO_TH], &["reintegration"]).await;
    // The NGO is away: attempts fail, and are tried again.
    let id = s
        .send_referral(referral(&case_id, NGO_TH, "reintegration"))
        .await
        .expect("send")
        .into_inner()
        .referral_id;
    let deadline = Instant::now() + Duration::from_secs(20);
    while scalar(&sender, "SELECT MAX(attempts) FROM outbox WHERE kind = 1").await < 1 {
        assert!(Instant::now() < deadline, "never attempted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It leaves the federation; the sender gives the referral up. It stopped before it
    // could record its attempt.
    sender.stop();
    sql(
        &sender,
        &["UPDATE outbox SET attempts = 0, last_error = NULL WHERE kind = 1"],
    )
    .await;
    let original = std::fs::read_to_string(fed.dir.join("directory.toml")).expect("directory");
    publish_directory(&fed, &with_serial(&without_member(&original, NGO_TH), 2));
    sender.start();
    let mut s = sender.client().await;
    let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
    assert_eq!(st.state, "refused", "{}", st.last_error);
    assert!(
        st.last_error
            .contains("an earlier attempt may have reached it"),
        "{}",
        st.last_error
    );
    s.withdraw_consent(pb::ConsentRequest {
        consent_id: consent_id.clone(),
    })
    .await
    .expect("withdraw");
    let st = consent_status(&mut s, &consent_id).await;
    assert!(
        state_of(&st, NGO_TH).starts_with("pending (not a member"),
        "{st:?}"
    );
}

/// A withdrawal shreds the data key of what it purged even while the recipient holds
/// referrals of the same case under another consent: two consents of one case, each with
/// a referral (one case reference, a key per consent at the recipient), withdrawn one
/// after the other.
#[tokio::test]
async fn a_withdrawal_shreds_its_consents_key_and_keeps_another_consents() {
    let fed = Federation::demo("withdraw-shared-key");
    let sender = fed.start(SHELTER_MY);
    let kh = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let case_id = new_case(&mut s).await;
    let mut consents = Vec::new();
    let mut referrals = Vec::new();
    for purpose in ["reintegration", "shelter-placement"] {
        let consent_id = consent_to(&mut s, &case_id, &[SHELTER_KH], &[purpose]).await;
        let mut request = referral(&case_id, SHELTER_KH, purpose);
        request.consent_id = consent_id.clone();
        let id = s
            .send_referral(request)
            .await
            .expect("send")
            .into_inner()
            .referral_id;
        let st = wait_final(&mut s, &id, Duration::from_secs(20)).await;
        assert_eq!(st.state, "delivered", "{}", st.last_error);
        consents.push(consent_id);
        referrals.push(id);
    }
    let received_keys = "SELECT COUNT(*) FROM case_keys WHERE id LIKE 'in:%'";
    assert_eq!(scalar(&kh, received_keys).await, 2, "a key per consent");

    let withdraw = async |s: &mut Caseworker, consent_id: &str| {
        s.withdraw_consent(pb::ConsentRequest {
            consent_id: consent_id.to_owned(),
        })
        .await
        .expect("withdraw");
        wait_status(s, consent_id, all_purged).await;
    };
    withdraw(&mut s, &consents[0]).await;
    assert_eq!(
        scalar(&kh, received_keys).await,
        1,
        "the withdrawn consent's key is shredded, the other's kept"
    );
    let mut r = kh.client().await;
    let kept = r
        .get_referral(pb::GetReferralRequest {
            referral_id: referrals[1].clone(),
            ..Default::default()
        })
        .await
        .expect("the other consent's referral still reads")
        .into_inner();
    assert_eq!(kept.purpose, "shelter-placement");

    withdraw(&mut s, &consents[1]).await;
    assert_eq!(
        scalar(&kh, received_keys).await,
        0,
        "shredded with the last"
    );
}
