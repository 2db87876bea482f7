//! The consent gate on the sending node: a referral beyond the person's consent, the
//! purpose's profile or the consent's life never leaves, and the caseworker is told every
//! rule it broke. And what a consent may record and become: recipients who could receive
//! nothing, unassigned country codes and widenings are refused.

use std::process::Command;
use std::time::Duration;

use corridor_proto::v1 as pb;
use corridor_tests::*;

async fn refusal(s: &mut Caseworker, request: pb::SendReferralRequest) -> String {
    let status = s
        .send_referral(request)
        .await
        .expect_err("the gate must refuse");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().starts_with("referral refused"),
        "{status:?}"
    );
    status.message().to_owned()
}

fn with(mut r: pb::SendReferralRequest, field: &str, value: &str) -> pb::SendReferralRequest {
    r.fields.insert(field.into(), value.into());
    r
}

#[tokio::test]
async fn each_rule_refuses_at_the_sender_and_is_named() {
    let fed = Federation::four("gate");
    let sender = fed.start(SHELTER_MY);
    let recipient = fed.start(SHELTER_KH);
    let mut s = sender.client().await;

    let case_id = new_case(&mut s).await;
    let mut fields: Vec<String> = required_fields("reintegration").into_keys().collect();
    fields.extend(required_fields("nationality-verification").into_keys());
    fields.push("risk_flags".into());
    let consent = |case_id: &str, expires_at_ms: i64| pb::RecordConsentRequest {
        case_id: case_id.into(),
        scope: Some(pb::ConsentScope {
            purposes: vec!["reintegration".into(), "nationality-verification".into()],
            recipient_orgs: vec![SHELTER_KH.into()],
            // Everyone in Malaysia by country — which must not cover the embassy.
            recipient_roles: vec!["*@MY".into()],
            fields: fields.clone(),
            expires_at_ms,
            ..Default::default()
        }),
        given_by: "person".into(),
        method: "verbal".into(),
        ..Default::default()
    };
    s.record_consent(consent(
        &case_id,
        corridor_node::node::now_ms() + 30 * 86_400_000,
    ))
    .await
    .unwrap();

    let base = referral(&case_id, SHELTER_KH, "reintegration");
    // One field beyond consent (allowed for the purpose, but not consented).
    let m = refusal(&mut s, with(base.clone(), "dependents", "2 children")).await;
    assert!(m.contains("field dependents is not consented"), "{m}");
    // One field beyond the purpose (consented for nationality verification only).
    let m = refusal(&mut s, with(base.clone(), "date_of_birth", "1999-01-01")).await;
    assert!(
        m.contains("field date_of_birth is not allowed for reintegration"),
        "{m}"
    );
    assert!(
        !m.contains("1999"),
        "a refusal must not echo personal data: {m}"
    );
    // A value with a terminal escape: it would rewrite the recipient's screen.
    let status = s
        .send_referral(with(base.clone(), "preferred_name", "Srey\u{1b}[31mRED"))
        .await
        .expect_err("a control character must be refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("field preferred_name contains a control character"),
        "{status:?}"
    );
    assert!(!status.message().contains("Srey"), "{status:?}");
    // A missing required field.
    let mut missing = base.clone();
    missing.fields.remove("languages");
    let m = refusal(&mut s, missing).await;
    assert!(
        m.contains("field languages is required for reintegration but missing"),
        "{m}"
    );
    // A recipient out of scope.
    let m = refusal(&mut s, referral(&case_id, NGO_TH, "reintegration")).await;
    assert!(
        m.contains("recipient ngo-th is not in the consent's scope"),
        "{m}"
    );
    // A state authority in scope only by country.
    let m = refusal(
        &mut s,
        referral(&case_id, EMBASSY, "nationality-verification"),
    )
    .await;
    assert!(
        m.contains("recipient kh-embassy-kl is a state authority and the consent does not name it"),
        "{m}"
    );

    // A withdrawn consent.
    let withdrawn_case = new_case(&mut s).await;
    let withdrawn = s
        .record_consent(consent(
            &withdrawn_case,
            corridor_node::node::now_ms() + 30 * 86_400_000,
        ))
        .await
        .unwrap()
        .into_inner()
        .consent_id;
    s.withdraw_consent(pb::ConsentRequest {
        consent_id: withdrawn,
    })
    .await
    .unwrap();
    let m = refusal(
        &mut s,
        referral(&withdrawn_case, SHELTER_KH, "reintegration"),
    )
    .await;
    assert!(m.contains("the consent was withdrawn"), "{m}");

    // An expired consent. Expiries are kept to the day, so one that has passed is set
    // in the database (before anything read the consent, so no cache holds it).
    let expired_case = new_case(&mut s).await;
    let expired = s
        .record_consent(consent(
            &expired_case,
            corridor_node::node::now_ms() + 2 * 86_400_000,
        ))
        .await
        .unwrap()
        .into_inner()
        .consent_id;
    sql(
        &sender,
        &[&format!(
            "UPDATE consents SET expires_at_ms = 1000 WHERE id = '{expired}'"
        )],
    )
    .await;
    let m = refusal(&mut s, referral(&expired_case, SHELTER_KH, "reintegration")).await;
    assert!(m.contains("the consent has expired"), "{m}");
    // An expiry within today would be kept as today's start, which has passed.
    let today = s
        .record_consent(consent(&expired_case, corridor_node::node::now_ms() + 1))
        .await
        .expect_err("an expiry within today");
    assert!(
        today
            .message()
            .contains("must fall on a later UTC day than today"),
        "{today:?}"
    );

    // The same gate through the CLI: one sentence, non-zero exit.
    let out = Command::new(binary("corridor"))
        .args(["--node", &sender.local_url(), "--token", &sender.token])
        .args([
            "referral",
            "send",
            "--case",
            &case_id,
            "--to",
            NGO_TH,
            "--purpose",
            "reintegration",
        ])
        .args(["--field", "preferred_name=x", "--field", "age_band=25-29"])
        .output()
        .expect("run corridor");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("recipient ngo-th is not in the consent's scope"),
        "{stderr}"
    );
    assert!(stderr.contains("field languages is required"), "{stderr}");
    // A value mistyped without its name is not quoted back.
    let out = Command::new(binary("corridor"))
        .args(["--node", &sender.local_url(), "--token", &sender.token])
        .args(["referral", "send", "--case", &case_id, "--to", SHELTER_KH])
        .args(["--purpose", "reintegration", "--field", "+60123456789"])
        .output()
        .expect("run corridor");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must be written name=value"), "{stderr}");
    assert!(!stderr.contains("60123456789"), "{stderr}");

    // Nothing left the sender: the consented referral is the only one that arrives.
    let sent = s
        .send_referral(base)
        .await
        .expect("consented referral")
        .into_inner();
    let status = wait_final(&mut s, &sent.referral_id, Duration::from_secs(20)).await;
    assert_eq!(status.state, "delivered");
    let mut r = recipient.client().await;
    let items = inbox(&mut r).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].referral_id, sent.referral_id);
}

#[tokio::test]
async fn narrowing_is_allowed_widening_is_refused() {
    let fed = Federation::demo("narrow");
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH], &["reintegration"]).await;
    let view = s
        .get_consent(pb::ConsentRequest {
            consent_id: consent_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut scope = view.scope.unwrap();
    scope.fields.retain(|f| f != "risk_flags");
    scope.excluded_countries.push("TH".into());
    let narrowed = s
        .narrow_consent(pb::NarrowConsentRequest {
            consent_id: consent_id.clone(),
            scope: Some(scope.clone()),
            if_narrowed_at_ms: None,
        })
        .await
        .expect("narrowing")
        .into_inner();
    assert!(narrowed.narrowed_at_ms > 0);
    // Taking away every recipient is a withdrawal, and the refusal says so.
    let mut no_one = scope.clone();
    no_one.recipient_orgs.clear();
    let status = s
        .narrow_consent(pb::NarrowConsentRequest {
            consent_id: consent_id.clone(),
            scope: Some(no_one),
            if_narrowed_at_ms: None,
        })
        .await
        .expect_err("no recipient left");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("withdraw the consent"),
        "{status:?}"
    );
    // The narrowed consent now refuses what it no longer covers.
    let m = refusal(
        &mut s,
        with(
            referral(&case_id, SHELTER_KH, "reintegration"),
            "risk_flags",
            "x",
        ),
    )
    .await;
    assert!(m.contains("field risk_flags is not consented"), "{m}");
    // Ending the consent now is a withdrawal, not a narrowing: recipients would keep
    // what they hold.
    let mut ending = scope.clone();
    ending.expires_at_ms = corridor_node::node::now_ms();
    let status = s
        .narrow_consent(pb::NarrowConsentRequest {
            consent_id: consent_id.clone(),
            scope: Some(ending),
            if_narrowed_at_ms: None,
        })
        .await
        .expect_err("ending the consent now");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("withdraw it instead"),
        "{status:?}"
    );
    // Widening is refused and says what would widen.
    scope.fields.push("risk_flags".into());
    scope.purposes.push("legal-aid".into());
    let status = s
        .narrow_consent(pb::NarrowConsentRequest {
            consent_id,
            scope: Some(scope),
            if_narrowed_at_ms: None,
        })
        .await
        .expect_err("widening");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("adds purpose legal-aid"),
        "{status:?}"
    );
    assert!(
        status.message().contains("adds field risk_flags"),
        "{status:?}"
    );
}

/// A narrowing that takes nothing away (a misspelt field, say) is refused rather than
/// recorded, and the referrals queued under the consent, which a narrowing ends, stay
/// queued.
#[tokio::test]
async fn a_narrowing_that_changes_nothing_is_refused_and_ends_nothing() {
    let fed = Federation::demo("narrow-nothing");
    // The recipient is not started: the referral stays queued.
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let (case_id, consent_id) =
        case_with_consent_to(&mut s, &[SHELTER_KH], &["reintegration"]).await;
    let queued = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .expect("referral queued")
        .into_inner();
    let request = pb::ConsentRequest {
        consent_id: consent_id.clone(),
    };
    let scope = s
        .get_consent(request.clone())
        .await
        .expect("consent")
        .into_inner()
        .scope;
    let status = s
        .narrow_consent(pb::NarrowConsentRequest {
            consent_id: consent_id.clone(),
            scope,
            if_narrowed_at_ms: None,
        })
        .await
        .expect_err("a narrowing that changes nothing");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("changes nothing"), "{status:?}");
    // Through the CLI, a removal the consent has nothing for is named.
    let out = std::process::Command::new(binary("corridor"))
        .args(["--node", &sender.local_url(), "--token", &sender.token])
        .args([
            "consent",
            "narrow",
            &consent_id,
            "--remove-field",
            "prefered_name",
        ])
        .args(["--remove-field", "languages"])
        .output()
        .expect("run corridor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "consent {consent_id} has no field prefered_name (no such field"
        )),
        "{stderr}"
    );
    let view = s.get_consent(request).await.expect("consent").into_inner();
    assert_eq!(view.narrowed_at_ms, 0, "recorded as narrowed");
    let referral_status = s
        .get_referral_status(pb::GetReferralStatusRequest {
            referral_id: queued.referral_id,
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(referral_status.state, "queued");
}

/// A consent's details are one line of plain text, and it runs for at most ten years.
#[tokio::test]
async fn consent_records_are_bounded() {
    let fed = Federation::demo("consent-bounds");
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = new_case(&mut s).await;
    let consent = |expires_at_ms: i64, language: &str| pb::RecordConsentRequest {
        case_id: case_id.clone(),
        scope: Some(pb::ConsentScope {
            purposes: vec!["reintegration".into()],
            recipient_orgs: vec![SHELTER_KH.into()],
            fields: required_fields("reintegration").into_keys().collect(),
            expires_at_ms,
            ..Default::default()
        }),
        given_by: "person".into(),
        method: "interpreter".into(),
        language: language.into(),
        ..Default::default()
    };
    let now = corridor_node::node::now_ms();
    for (request, words) in [
        (consent(i64::MAX, "km"), "within ten years"),
        (
            consent(now + 30 * 86_400_000, "km\u{1b}[2J"),
            "without control characters",
        ),
    ] {
        let status = s
            .record_consent(request)
            .await
            .expect_err("must be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(words), "{status:?}");
    }
    s.record_consent(consent(now + 9 * 365 * 86_400_000, "km"))
        .await
        .expect("nine years");
    // A case's label is one line too.
    let status = s
        .create_case(pb::CreateCaseRequest {
            label: "intake\u{1b}[31m".into(),
        })
        .await
        .expect_err("a label with control characters");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("without control characters"),
        "{status:?}"
    );
}

/// Narrowings of one consent at the same time each take effect: the node refuses one
/// made against a consent narrowed since it was read (ABORTED, not "widens"), and the
/// CLI reads the consent again and retries.
#[tokio::test]
async fn concurrent_narrowings_all_take_effect() {
    let fed = Federation::demo("narrow-concurrent");
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = new_case(&mut s).await;
    let mut fields: Vec<String> = required_fields("reintegration").into_keys().collect();
    fields.extend(["sex".to_string(), "arrival_window".to_string()]);
    let consent_id = s
        .record_consent(pb::RecordConsentRequest {
            case_id,
            scope: Some(pb::ConsentScope {
                purposes: vec!["reintegration".into(), "shelter-placement".into()],
                recipient_orgs: vec![SHELTER_KH.into()],
                fields,
                expires_at_ms: corridor_node::node::now_ms() + 30 * 86_400_000,
                ..Default::default()
            }),
            given_by: "person".into(),
            method: "written".into(),
            ..Default::default()
        })
        .await
        .expect("consent")
        .into_inner()
        .consent_id;
    let read = s
        .get_consent(pb::ConsentRequest {
            consent_id: consent_id.clone(),
        })
        .await
        .expect("consent")
        .into_inner();

    let narrowings: Vec<_> = [
        ["--remove-field", "sex"],
        ["--remove-field", "arrival_window"],
        ["--remove-purpose", "shelter-placement"],
    ]
    .into_iter()
    .map(|removal| {
        std::process::Command::new(binary("corridor"))
            .args(["--node", &sender.local_url(), "--token", &sender.token])
            .args(["consent", "narrow", &consent_id])
            .args(removal)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run corridor")
    })
    .collect();
    for child in narrowings {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let view = s
        .get_consent(pb::ConsentRequest {
            consent_id: consent_id.clone(),
        })
        .await
        .expect("consent")
        .into_inner();
    let scope = view.scope.expect("scope");
    assert_eq!(scope.purposes, vec!["reintegration".to_string()]);
    assert!(
        !scope
            .fields
            .iter()
            .any(|f| f == "sex" || f == "arrival_window"),
        "{scope:?}"
    );

    // Against what it read before those, a narrowing is refused for what it is.
    let status = s
        .narrow_consent(pb::NarrowConsentRequest {
            consent_id,
            scope: read.scope,
            if_narrowed_at_ms: Some(read.narrowed_at_ms),
        })
        .await
        .expect_err("a narrowing of a stale read");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("was narrowed since it was read"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_consent_naming_recipients_who_could_receive_nothing_is_not_recorded() {
    let fed = Federation::demo("unusable");
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = new_case(&mut s).await;
    let record = |orgs: &[&str], roles: &[&str], purposes: &[&str], excluded: &[&str]| {
        consent_request(
            &case_id,
            pb::ConsentScope {
                purposes: purposes.iter().map(|p| p.to_string()).collect(),
                recipient_orgs: orgs.iter().map(|o| o.to_string()).collect(),
                recipient_roles: roles.iter().map(|r| r.to_string()).collect(),
                fields: fields_allowed_for(purposes).into_iter().collect(),
                excluded_countries: excluded.iter().map(|c| c.to_string()).collect(),
                expires_at_ms: corridor_node::node::now_ms() + 30 * 86_400_000,
                ..Default::default()
            },
        )
    };
    let cases = [
        (
            record(&[SHELTER_KH], &[], &["reintegration"], &["KH"]),
            "recipient shelter-kh could receive nothing",
        ),
        (
            record(&[], &["shelter@KH"], &["reintegration"], &["KH"]),
            "recipients shelter@KH could receive nothing under this consent: it excludes KH",
        ),
        (
            record(&[], &["embassy@MY"], &["nationality-verification"], &[]),
            "embassies and governments receive only where a consent names them",
        ),
        (
            record(&[], &["*@MY"], &["nationality-verification"], &[]),
            "only embassies or governments may receive its purposes",
        ),
        (
            record(&[SHELTER_MY], &[], &["reintegration"], &[]),
            "recipient shelter-my is the organisation recording the consent",
        ),
        (
            {
                // A purpose whose required fields it does not all list.
                let mut r = record(&[SHELTER_KH], &[], &["reintegration"], &[]);
                if let Some(scope) = r.scope.as_mut() {
                    scope.fields.retain(|f| f != "preferred_name");
                }
                r
            },
            "purpose reintegration requires preferred_name, which this consent does not list",
        ),
    ];
    for (request, expected) in cases {
        let status = s
            .record_consent(request)
            .await
            .expect_err("a consent that admits a recipient nothing");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(expected), "{status:?}");
    }
    // Nothing was recorded: the case still has no consent.
    let m = refusal(&mut s, referral(&case_id, SHELTER_KH, "reintegration")).await;
    assert!(m.contains("the case has no recorded consent"), "{m}");
    // The same recipients, where the consent leaves them something, are recorded.
    s.record_consent(record(
        &[SHELTER_KH, EMBASSY],
        &["shelter@KH", "*@MY"],
        &["reintegration", "nationality-verification"],
        &["TH"],
    ))
    .await
    .expect("a consent every recipient of which may receive something");
}

/// Countries are ISO's assigned codes, so a typo such as CB for Cambodia is not recorded
/// as an exclusion that excludes no one; a date of birth may not lie in the future.
#[tokio::test]
async fn country_codes_and_dates_of_birth_are_checked() {
    let fed = Federation::demo("codes");
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = new_case(&mut s).await;
    let record = |roles: &[&str], excluded: &[&str]| {
        consent_request(
            &case_id,
            pb::ConsentScope {
                purposes: vec!["nationality-verification".into(), "reintegration".into()],
                recipient_orgs: vec![EMBASSY.into()],
                recipient_roles: roles.iter().map(|r| r.to_string()).collect(),
                fields: fields_allowed_for(&["nationality-verification", "reintegration"])
                    .into_iter()
                    .collect(),
                excluded_countries: excluded.iter().map(|c| c.to_string()).collect(),
                expires_at_ms: corridor_node::node::now_ms() + 30 * 86_400_000,
                ..Default::default()
            },
        )
    };
    for (request, expected) in [
        (
            record(&[], &["CB"]),
            "excluded country \"CB\" is not an ISO 3166-1 alpha-2 code",
        ),
        (
            record(&["shelter@QQ"], &[]),
            "recipient role \"shelter@QQ\": QQ is not an ISO 3166-1 alpha-2 country code",
        ),
    ] {
        let status = s
            .record_consent(request)
            .await
            .expect_err("an unassigned code");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(expected), "{status:?}");
    }
    s.record_consent(record(&["shelter@XK"], &["TH"]))
        .await
        .expect("assigned codes, and XK");

    let mut future = referral(&case_id, EMBASSY, "nationality-verification");
    assert!(future.fields.contains_key("date_of_birth"), "{future:?}");
    future
        .fields
        .insert("date_of_birth".into(), "2090-02-01".into());
    let status = s
        .send_referral(future)
        .await
        .expect_err("a date of birth to come");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("field date_of_birth must be a date that is not in the future"),
        "{status:?}"
    );
    assert!(!status.message().contains("2090"), "{status:?}");
    let mut stateless = referral(&case_id, EMBASSY, "nationality-verification");
    stateless.fields.insert("nationality".into(), "XX".into());
    s.send_referral(stateless).await.expect("XX, stateless");
}

/// A consent an older version recorded naming a code ISO never assigned (it checked only
/// the form) stays readable and narrowable; a narrowing may not add such a code.
#[tokio::test]
async fn a_consent_recorded_with_an_unassigned_code_can_still_be_narrowed() {
    let fed = Federation::demo("legacy-code");
    let mut sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let (_, consent_id) = case_with_consent_to(&mut s, &[SHELTER_KH], &["reintegration"]).await;
    sender.stop();
    sql(
        &sender,
        &[&format!(
            "UPDATE consents SET excluded_countries = 'UK', recipient_roles = 'ngo@QQ' WHERE id = '{consent_id}'"
        )],
    )
    .await;
    sender.start();
    let mut s = sender.client().await;
    let narrow = |scope: pb::ConsentScope| pb::NarrowConsentRequest {
        consent_id: consent_id.clone(),
        scope: Some(scope),
        if_narrowed_at_ms: None,
    };
    // A consent with old codes is read.
    let mut scope = consent_scope(&mut s, &consent_id).await;
    assert_eq!(scope.excluded_countries, vec!["UK".to_owned()]);
    let field = scope.fields.pop().expect("a field to remove");
    s.narrow_consent(narrow(scope.clone()))
        .await
        .unwrap_or_else(|e| panic!("narrowing without {field}: {e:?}"));
    scope.excluded_countries.push("QQ".into());
    let refused = s
        .narrow_consent(narrow(scope))
        .await
        .expect_err("a new unassigned code");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("excluded country \"QQ\" is not an ISO 3166-1 alpha-2 code"),
        "{refused:?}"
    );
}

/// The restrictions the person set travel with the referral and are shown to whoever
/// reads it at the recipient, which must honour them too, with the consent's expiry.
#[tokio::test]
async fn the_recipient_reads_the_restrictions_the_person_set() {
    let fed = Federation::demo("restrictions");
    let sender = fed.start(SHELTER_MY);
    let recipient = fed.start(SHELTER_KH);
    let mut s = sender.client().await;
    let case_id = new_case(&mut s).await;
    let expires_at_ms = corridor_node::node::now_ms() + 3 * 86_400_000;
    s.record_consent(consent_request(
        &case_id,
        pb::ConsentScope {
            purposes: vec!["reintegration".into()],
            recipient_orgs: vec![SHELTER_KH.into()],
            fields: required_fields("reintegration").into_keys().collect(),
            excluded_countries: vec!["TH".into()],
            no_family_contact: true,
            expires_at_ms,
            ..Default::default()
        },
    ))
    .await
    .expect("record consent");
    let sent = send_delivered(&mut s, &case_id, SHELTER_KH, "reintegration").await;
    // The sender's log says a restriction refused a referral, not which, and names the
    // case by its pseudonym: either would tell whoever reads the log of the person.
    let m = refusal(&mut s, referral(&case_id, SHELTER_KH, "family-tracing")).await;
    assert!(m.contains("family"), "the caseworker is told: {m}");
    let log = sender.log();
    let refused = log
        .lines()
        .find(|l| l.contains("referral refused by the consent gate"))
        .unwrap_or_else(|| panic!("no refusal logged: {log}"));
    assert!(refused.contains("restricted"), "{refused}");
    assert!(!refused.contains("family-contact"), "{refused}");
    assert!(!log.contains(&case_id), "{log}");
    let out = Command::new(binary("corridor"))
        .args([
            "--node",
            &recipient.local_url(),
            "--token",
            &recipient.token,
        ])
        .args(["referral", "show", &sent.referral_id])
        .output()
        .expect("run corridor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("restrictions: never to TH; no contact with family"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "until {}",
            corridor::utc::format(corridor::consent::recorded_expiry(expires_at_ms))
        )),
        "{stdout}"
    );
}

/// A consent's details can come from standard input, off the command line, and are
/// recorded as given.
#[tokio::test]
async fn consent_details_are_read_from_a_file_off_the_command_line() {
    use std::io::Write as _;
    let fed = Federation::demo("details");
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = new_case(&mut s).await;
    let mut cmd = Command::new(binary("corridor"));
    cmd.args(["--node", &sender.local_url(), "--token", &sender.token])
        .args(["--output", "json", "consent", "record", "--case", &case_id])
        .args(["--recipient", SHELTER_KH, "--purpose", "reintegration"])
        .args(["--given-by", "guardian", "--details-file", "-"]);
    for field in required_fields("reintegration").keys() {
        cmd.args(["--field", field]);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run corridor");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"guardian_basis = \"aunt of a minor\"\nlanguage = \"Khmer\"\n")
        .expect("write details");
    let out = child.wait_with_output().expect("corridor ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recorded: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    let consent_id = recorded["consent_id"]
        .as_str()
        .expect("consent id")
        .to_owned();
    let view = s
        .get_consent(pb::ConsentRequest { consent_id })
        .await
        .expect("consent")
        .into_inner();
    assert_eq!(
        (view.guardian_basis.as_str(), view.language.as_str()),
        ("aunt of a minor", "Khmer")
    );
}
