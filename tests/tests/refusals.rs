//! What a node refuses, with which gRPC status, and that nothing of a refused envelope is
//! stored. Envelopes here are built by hand, as a misbehaving member would.

use std::time::Duration;

use corridor::envelope::ENVELOPE_VERSION;
use corridor::{Envelope, EnvelopeHeader, MessageId, MessageKind, OrgId};
use corridor_node::convert::envelope_to_pb;
use corridor_proto::v1 as pb;
use corridor_tests::*;
use prost::Message as _;
use tonic::Code;

fn header(sender: &str, recipient: &str) -> EnvelopeHeader {
    let now = corridor_node::node::now_ms();
    EnvelopeHeader {
        version: ENVELOPE_VERSION,
        message_id: MessageId::new(now).unwrap(),
        kind: MessageKind::Referral,
        sender: OrgId::new(sender).unwrap(),
        recipient: OrgId::new(recipient).unwrap(),
        route: vec![],
        created_at_ms: now,
        expires_at_ms: now + 3_600_000,
    }
}

/// A referral payload with a valid consent receipt signed by `sender`.
fn payload(fed: &Federation, sender: &str, recipient: &str) -> Vec<u8> {
    valid_payload(fed, sender, recipient).encode_to_vec()
}

/// A correctly sealed and signed envelope from `sender` to `recipient`.
fn envelope(fed: &Federation, h: EnvelopeHeader) -> Envelope {
    let payload = payload(fed, h.sender.as_str(), h.recipient.as_str());
    seal_as_sender(fed, h, &payload)
}

/// `payload` sealed to the header's recipient and signed by its sender.
fn seal_as_sender(fed: &Federation, h: EnvelopeHeader, payload: &[u8]) -> Envelope {
    let recipient = h.recipient.to_string();
    let signer = fed.signing_key(h.sender.as_str());
    Envelope::seal(h, payload, &fed.sealing_public_key(&recipient), &signer).unwrap()
}

async fn assert_nothing_stored(node: &TestNode) {
    let mut c = node.client().await;
    assert!(
        inbox(&mut c).await.is_empty(),
        "a refused envelope was stored"
    );
}

async fn deliver_as(
    fed: &Federation,
    as_org: &str,
    e: &Envelope,
) -> Result<pb::DeliverResponse, tonic::Status> {
    let mut client = fed
        .federation_client(Some(fed.org(as_org)), &fed.dir, SHELTER_KH)
        .await
        .expect("connect");
    client
        .deliver(envelope_to_pb(e))
        .await
        .map(|r| r.into_inner())
}

fn assert_code(result: Result<pb::DeliverResponse, tonic::Status>, code: Code, words: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(words),
        "message {:?} should name the problem ({words})",
        status.message()
    );
}

#[tokio::test]
async fn refuses_connections_without_a_member_certificate() {
    let fed = Federation::demo("refuse-tls");
    let other = Federation::demo("refuse-tls-other");
    let recipient = fed.start(SHELTER_KH);
    let e = envelope(&fed, header(SHELTER_MY, SHELTER_KH));

    // No client certificate: the handshake fails; with TLS 1.3 the client learns it on
    // its first RPC.
    let no_cert = match fed.federation_client(None, &fed.dir, SHELTER_KH).await {
        Ok(mut c) => c.deliver(envelope_to_pb(&e)).await.map(|r| r.into_inner()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert_transport_refusal(no_cert.expect_err("no certificate"));

    // A certificate from another federation's CA, for an org id that exists here too.
    let foreign = match fed
        .federation_client(Some(other.org(SHELTER_MY)), &fed.dir, SHELTER_KH)
        .await
    {
        Ok(mut c) => c.deliver(envelope_to_pb(&e)).await.map(|r| r.into_inner()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert_transport_refusal(foreign.expect_err("foreign CA"));

    assert_nothing_stored(&recipient).await;
    // The node says why, once per connection.
    let log = recipient.log();
    assert!(log.contains("TLS handshake refused"), "{log}");
    assert!(log.contains("peer sent no certificates"), "{log}");
    assert!(log.contains("UnknownIssuer"), "{log}");
}

/// Connections that never finish their TLS handshake hold no connection slot: with two
/// slots and twenty such connections open, a member still gets in at once. (Before, each
/// took a slot for its 5 s handshake timeout, and the member waited behind them all.)
#[tokio::test]
async fn unfinished_handshakes_do_not_keep_members_out() {
    let fed = Federation::demo("handshakes");
    add_federation_settings(&fed, SHELTER_KH, "max_connections = 2\n");
    let recipient = fed.start(SHELTER_KH);
    let address = format!("127.0.0.1:{}", fed.org(SHELTER_KH).ports.federation);
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(
            tokio::net::TcpStream::connect(&address)
                .await
                .expect("tcp connect"),
        );
    }
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(4), async {
        let channel = fed
            .federation_channel(Some(fed.org(SHELTER_MY)), &fed.dir, SHELTER_KH)
            .await
            .map_err(|e| e.to_string())?;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|s| s.to_string())
    })
    .await;
    let answer = answer.unwrap_or_else(|_| {
        panic!(
            "a member waited {:?} behind connections that never handshake",
            started.elapsed()
        )
    });
    assert!(answer.is_ok(), "{answer:?}");
    drop(silent);
    drop(recipient);
}

/// The TLS handshake failed, so the RPC fails at the transport: which code the client
/// library reports depends on when it notices the closed connection.
fn assert_transport_refusal(status: tonic::Status) {
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{status:?}"
    );
}

#[tokio::test]
async fn refuses_bad_envelopes_with_the_right_status() {
    let fed = Federation::demo("refuse-envelope");
    let recipient = fed.start(SHELTER_KH);

    // Org A's valid certificate on an envelope claiming org B.
    let e = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    assert_code(
        deliver_as(&fed, EMBASSY, &e).await,
        Code::PermissionDenied,
        "authenticated as kh-embassy-kl",
    );

    // An envelope for another recipient.
    let e = envelope(&fed, header(SHELTER_MY, EMBASSY));
    assert_code(
        deliver_as(&fed, SHELTER_MY, &e).await,
        Code::InvalidArgument,
        "addressed to kh-embassy-kl",
    );

    // A tampered header (expiry moved after signing).
    let mut e = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    e.header.expires_at_ms += 1000;
    assert_code(
        deliver_as(&fed, SHELTER_MY, &e).await,
        Code::Unauthenticated,
        "signature",
    );

    // A tampered ciphertext.
    let mut e = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    let last = e.ciphertext.len() - 1;
    e.ciphertext[last] ^= 0x01;
    assert_code(
        deliver_as(&fed, SHELTER_MY, &e).await,
        Code::Unauthenticated,
        "signature",
    );

    // Signed by someone else's key.
    let mut h = header(SHELTER_MY, SHELTER_KH);
    h.sender = OrgId::new(SHELTER_MY).unwrap();
    let e = Envelope::seal(
        h,
        &payload(&fed, SHELTER_MY, SHELTER_KH),
        &fed.sealing_public_key(SHELTER_KH),
        &fed.signing_key(EMBASSY),
    )
    .unwrap();
    assert_code(
        deliver_as(&fed, SHELTER_MY, &e).await,
        Code::Unauthenticated,
        "signature",
    );

    // An expired envelope.
    let mut h = header(SHELTER_MY, SHELTER_KH);
    h.created_at_ms -= 7_200_000;
    h.expires_at_ms = h.created_at_ms + 3_600_000;
    let e = envelope(&fed, h);
    assert_code(
        deliver_as(&fed, SHELTER_MY, &e).await,
        Code::FailedPrecondition,
        "expired",
    );

    // A payload that is not a referral, correctly sealed and signed.
    let h = header(SHELTER_MY, SHELTER_KH);
    let e = Envelope::seal(
        h,
        b"\xff\xff\xff not protobuf",
        &fed.sealing_public_key(SHELTER_KH),
        &fed.signing_key(SHELTER_MY),
    )
    .unwrap();
    assert_code(
        deliver_as(&fed, SHELTER_MY, &e).await,
        Code::InvalidArgument,
        "payload",
    );

    // An oversized message is refused before it is decoded.
    let mut e = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    e.ciphertext = vec![0u8; 2 * 1024 * 1024];
    let status = deliver_as(&fed, SHELTER_MY, &e)
        .await
        .expect_err("oversized");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(status.message().contains("too large"), "{status:?}");

    assert_nothing_stored(&recipient).await;
    let log = recipient.log();
    assert!(
        !log.contains("25-29"),
        "payload content leaked into the log"
    );
}

#[tokio::test]
async fn replays_are_answered_with_the_same_receipt_and_processed_once() {
    let fed = Federation::demo("replay");
    let recipient = fed.start(SHELTER_KH);
    let e = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    let first = deliver_as(&fed, SHELTER_MY, &e)
        .await
        .expect("first delivery");
    let second = deliver_as(&fed, SHELTER_MY, &e)
        .await
        .expect("replay is acknowledged");
    assert_eq!(first, second, "a replay gets the original receipt");

    // The same message id on different content is refused.
    let mut h = e.header.clone();
    h.created_at_ms += 1;
    let other = envelope(&fed, h);
    assert_code(
        deliver_as(&fed, SHELTER_MY, &other).await,
        Code::AlreadyExists,
        "already used",
    );

    let mut c = recipient.client().await;
    assert_eq!(inbox(&mut c).await.len(), 1, "processed exactly once");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Each envelope of a batch gets the answer `Deliver` gives it alone: an accepted one its
/// own receipt, a refused one its own refusal, a replay within the batch the first answer,
/// and none is stored twice. A batch beyond the limit is refused whole.
#[tokio::test]
async fn a_batch_answers_each_envelope_as_deliver_would_alone() {
    use corridor_proto::v1::deliver_outcome::Outcome;
    let fed = Federation::demo("batch");
    let recipient = fed.start(SHELTER_KH);
    let first = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    let second = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    let mut tampered = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    tampered.header.expires_at_ms += 1000;
    let misaddressed = envelope(&fed, header(SHELTER_MY, EMBASSY));
    let encoded = |e: &Envelope| envelope_to_pb(e).encode_to_vec().into();
    let batch = vec![
        encoded(&first),
        encoded(&tampered),
        encoded(&second),
        encoded(&first),
        b"\xff\xff not an envelope".to_vec().into(),
        encoded(&misaddressed),
    ];
    let mut client = fed
        .federation_client(Some(fed.org(SHELTER_MY)), &fed.dir, SHELTER_KH)
        .await
        .expect("connect");
    let outcomes = client
        .deliver_batch(pb::DeliverBatchRequest { envelopes: batch })
        .await
        .expect("the batch is answered")
        .into_inner()
        .outcomes;
    assert_eq!(outcomes.len(), 6, "one outcome per envelope");
    let accepted = |i: usize| match &outcomes[i].outcome {
        Some(Outcome::Accepted(answer)) => answer.clone(),
        other => panic!("envelope {i} should be accepted: {other:?}"),
    };
    let refused = |i: usize| match &outcomes[i].outcome {
        Some(Outcome::Refused(r)) => (Code::from_i32(r.code), r.message.clone()),
        other => panic!("envelope {i} should be refused: {other:?}"),
    };
    let kh_key = fed.signing_key(SHELTER_KH).verifying_key();
    let (my, kh) = (
        OrgId::new(SHELTER_MY).unwrap(),
        OrgId::new(SHELTER_KH).unwrap(),
    );
    for (i, e) in [(0, &first), (2, &second)] {
        let receipt = corridor_node::convert::receipt_from_pb(accepted(i).receipt.unwrap())
            .expect("a receipt");
        receipt
            .verify(e.header.message_id, &e.digest(), &my, &kh, &kh_key)
            .expect("its receipt verifies");
    }
    assert_eq!(accepted(3), accepted(0), "a replay gets the first answer");
    assert_eq!(
        deliver_as(&fed, SHELTER_MY, &first).await.expect("replay"),
        accepted(0),
        "and so does a replay alone"
    );
    for (i, e) in [(1, &tampered), (5, &misaddressed)] {
        let alone = deliver_as(&fed, SHELTER_MY, e).await.expect_err("refused");
        assert_eq!(refused(i), (alone.code(), alone.message().to_owned()));
    }
    assert_eq!(refused(4).0, Code::InvalidArgument);
    let mut c = recipient.client().await;
    assert_eq!(inbox(&mut c).await.len(), 2, "each accepted once");

    let third = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    let limit = corridor::envelope::MAX_BATCH_ENVELOPES;
    let mut envelopes = vec![prost::bytes::Bytes::new(); limit];
    envelopes.push(encoded(&third));
    let status = client
        .deliver_batch(pb::DeliverBatchRequest { envelopes })
        .await
        .expect_err("too many envelopes");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(&format!("at most {limit}")),
        "{status:?}"
    );
    assert_eq!(inbox(&mut c).await.len(), 2, "nothing of it is stored");
}

/// A replay of an envelope accepted before gets its first answer even where the same
/// envelope would be refused now: here, the consent it carries has expired since.
#[tokio::test]
async fn a_replay_gets_its_first_answer_after_its_consent_expired() {
    use corridor::consent::{ConsentReceipt, ConsentScope, Restrictions};
    let fed = Federation::demo("replay-expired");
    let recipient = fed.start(SHELTER_KH);
    let purpose = corridor::Purpose::Reintegration;
    let now = corridor_node::node::now_ms();
    let scope = ConsentScope {
        id: "consent-000000000000000000000000000b71ef".into(),
        purposes: [purpose].into(),
        recipient_orgs: [OrgId::new(SHELTER_KH).unwrap()].into(),
        recipient_roles: Default::default(),
        fields: corridor::profile::profile(purpose)
            .required
            .iter()
            .copied()
            .collect(),
        restrictions: Restrictions::default(),
        expires_at_ms: now + 1_500,
        withdrawn_at_ms: None,
    };
    let receipt = ConsentReceipt::issue(
        &scope,
        TEST_CONSENT_ID.into(),
        OrgId::new(SHELTER_MY).unwrap(),
        OrgId::new(SHELTER_KH).unwrap(),
        TEST_CASE_REF.into(),
        now,
        &fed.signing_key(SHELTER_MY),
    );
    let mut payload = valid_payload(&fed, SHELTER_MY, SHELTER_KH);
    payload.consent_receipt = Some(corridor_node::convert::consent_receipt_to_pb(&receipt));
    let seal = || {
        seal_as_sender(
            &fed,
            header(SHELTER_MY, SHELTER_KH),
            &payload.encode_to_vec(),
        )
    };
    let e = seal();
    let first = deliver_as(&fed, SHELTER_MY, &e)
        .await
        .expect("accepted while the consent holds");
    tokio::time::sleep(Duration::from_millis(1_600)).await;

    let refused = deliver_as(&fed, SHELTER_MY, &seal()).await;
    assert_eq!(
        refused
            .expect_err("a new envelope under the expired consent")
            .code(),
        Code::PermissionDenied
    );
    assert_replay_gets(&fed, &recipient, &e, first).await;
}

/// A replay of `e` is answered with `first`, its original answer, and stores nothing new.
async fn assert_replay_gets(
    fed: &Federation,
    recipient: &TestNode,
    e: &Envelope,
    first: pb::DeliverResponse,
) {
    let replayed = deliver_as(fed, SHELTER_MY, e)
        .await
        .expect("the replay is acknowledged");
    assert_eq!(first, replayed, "a replay gets the original receipt");
    let mut c = recipient.client().await;
    assert_eq!(inbox(&mut c).await.len(), 1, "stored exactly once");
}

/// The same after the envelope itself has expired: its sender retries an attempt whose
/// answer was lost, and must learn that the referral arrived, not that it was refused
/// (it would then send that recipient no withdrawal).
#[tokio::test]
async fn a_replay_gets_its_first_answer_after_its_envelope_expired() {
    let fed = Federation::demo("replay-envelope-expired");
    let recipient = fed.start(SHELTER_KH);
    let short_lived = || {
        let mut h = header(SHELTER_MY, SHELTER_KH);
        h.expires_at_ms = h.created_at_ms + 1_000;
        envelope(&fed, h)
    };
    let (e, never_sent) = (short_lived(), short_lived());
    let first = deliver_as(&fed, SHELTER_MY, &e)
        .await
        .expect("accepted before it expires");
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let refused = deliver_as(&fed, SHELTER_MY, &never_sent).await;
    assert_eq!(
        refused.expect_err("an expired envelope never seen").code(),
        Code::FailedPrecondition
    );
    assert_replay_gets(&fed, &recipient, &e, first).await;
}

/// A member that bypasses its own gate — signing a referral with more than the consent
/// it carries allows — is refused by the recipient, and nothing of it is stored.
#[tokio::test]
async fn recipient_reruns_the_gate_and_stores_nothing_of_a_referral_beyond_consent() {
    let fed = Federation::demo("bypass");
    let recipient = fed.start(SHELTER_KH);
    let seal = |payload: pb::ReferralPayload| {
        seal_as_sender(
            &fed,
            header(SHELTER_MY, SHELTER_KH),
            &payload.encode_to_vec(),
        )
    };
    let field = |f: corridor::Field, v: &str| pb::FieldValue {
        field: corridor_node::convert::field_to_pb(f),
        value: v.into(),
    };

    // An extra field the consent receipt does not list.
    let mut p = valid_payload(&fed, SHELTER_MY, SHELTER_KH);
    p.fields
        .push(field(corridor::Field::Phone, "+60 12 345 6789"));
    let e = seal(p);
    assert_code(
        deliver_as(&fed, SHELTER_MY, &e).await,
        Code::PermissionDenied,
        "field phone is not consented",
    );

    // A consent receipt widened after signing.
    let mut p = valid_payload(&fed, SHELTER_MY, SHELTER_KH);
    p.fields
        .push(field(corridor::Field::Phone, "+60 12 345 6789"));
    if let Some(r) = p.consent_receipt.as_mut() {
        r.fields
            .push(corridor_node::convert::field_to_pb(corridor::Field::Phone));
    }
    assert_code(
        deliver_as(&fed, SHELTER_MY, &seal(p)).await,
        Code::PermissionDenied,
        "consent receipt signature does not verify",
    );

    // A field the purpose does not allow, even though the (signed) receipt lists it.
    let mut p = valid_payload(&fed, SHELTER_MY, SHELTER_KH);
    let mut receipt =
        corridor_node::convert::consent_receipt_from_pb(p.consent_receipt.take().unwrap()).unwrap();
    receipt.fields.insert(corridor::Field::DateOfBirth);
    receipt.signature = fed
        .signing_key(SHELTER_MY)
        .sign(&receipt.signed_bytes())
        .to_vec();
    p.consent_receipt = Some(corridor_node::convert::consent_receipt_to_pb(&receipt));
    p.fields
        .push(field(corridor::Field::DateOfBirth, "1999-01-01"));
    assert_code(
        deliver_as(&fed, SHELTER_MY, &seal(p)).await,
        Code::PermissionDenied,
        "field date_of_birth is not allowed for reintegration",
    );

    // A consent receipt signed by another org.
    let mut p = valid_payload(&fed, SHELTER_MY, SHELTER_KH);
    let mut receipt =
        corridor_node::convert::consent_receipt_from_pb(p.consent_receipt.take().unwrap()).unwrap();
    receipt.signature = fed
        .signing_key(EMBASSY)
        .sign(&receipt.signed_bytes())
        .to_vec();
    p.consent_receipt = Some(corridor_node::convert::consent_receipt_to_pb(&receipt));
    assert_code(
        deliver_as(&fed, SHELTER_MY, &seal(p)).await,
        Code::PermissionDenied,
        "consent receipt signature does not verify",
    );

    // A value with a terminal escape, which the sender's own check would have refused.
    let mut p = valid_payload(&fed, SHELTER_MY, SHELTER_KH);
    p.fields[0].value = "Srey\u{1b}[31mRED +60 12".into();
    assert_code(
        deliver_as(&fed, SHELTER_MY, &seal(p)).await,
        Code::InvalidArgument,
        "contains a control character",
    );

    // No consent receipt at all.
    let mut p = valid_payload(&fed, SHELTER_MY, SHELTER_KH);
    p.consent_receipt = None;
    assert_code(
        deliver_as(&fed, SHELTER_MY, &seal(p)).await,
        Code::FailedPrecondition,
        "no consent receipt",
    );

    assert_nothing_stored(&recipient).await;
    let log = recipient.log();
    assert!(
        !log.contains("+60 12"),
        "payload content leaked into the log"
    );
    // The honest version of the same referral is accepted, so the refusals above came
    // from the gate.
    let e = seal(valid_payload(&fed, SHELTER_MY, SHELTER_KH));
    deliver_as(&fed, SHELTER_MY, &e)
        .await
        .expect("honest referral");
}

/// A certificate the federation CA issued is still not enough: its org must be a member,
/// and it must be the very certificate the directory lists for that org.
#[tokio::test]
async fn refuses_federation_certificates_the_directory_does_not_list() {
    let fed = Federation::demo("refuse-nonmember");
    let recipient = fed.start(SHELTER_KH);
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(fed.dir.join("ca.key")).unwrap())
            .unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "refuse-nonmember federation CA (development)",
    );
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let e = {
        let h = corridor::EnvelopeHeader {
            version: ENVELOPE_VERSION,
            message_id: MessageId::new(corridor_node::node::now_ms()).unwrap(),
            kind: MessageKind::Referral,
            sender: OrgId::new(SHELTER_MY).unwrap(),
            recipient: OrgId::new(SHELTER_KH).unwrap(),
            route: vec![],
            created_at_ms: corridor_node::node::now_ms(),
            expires_at_ms: corridor_node::node::now_ms() + 60_000,
        };
        envelope(&fed, h)
    };
    for org in ["intruder", SHELTER_MY] {
        // A fresh key and certificate, properly issued by the federation CA.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            format!("urn:corridor:org:{org}").try_into().unwrap(),
        ));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let dir = fed.dir.join(format!("forged-{org}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tls.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        let ca = std::fs::read(fed.dir.join("ca.pem")).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .identity(tonic::transport::Identity::from_pem(
                cert.pem(),
                key.serialize_pem(),
            ));
        let result = async {
            let channel = tonic::transport::Endpoint::from_shared(format!(
                "https://127.0.0.1:{}",
                fed.org(SHELTER_KH).ports.federation
            ))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            corridor_proto::v1::federation_client::FederationClient::new(channel)
                .deliver(envelope_to_pb(&e))
                .await
                .map(|r| r.into_inner())
        }
        .await;
        assert_transport_refusal(result.expect_err(org));
    }
    assert_nothing_stored(&recipient).await;
    let log = recipient.log();
    assert!(log.contains("org intruder is not a member"), "{log}");
    assert!(
        log.contains("certificate of shelter-my does not match the directory"),
        "{log}"
    );
}

#[tokio::test]
async fn a_referral_under_a_consent_its_sender_withdrew_is_refused_on_arrival() {
    let fed = Federation::demo("refuse-withdrawn");
    let recipient = fed.start(SHELTER_KH);
    // The sender withdraws the consent `valid_payload` travels under.
    let mut h = header(SHELTER_MY, SHELTER_KH);
    h.kind = MessageKind::ConsentWithdrawal;
    let withdrawal = pb::ConsentWithdrawal {
        consent_id: TEST_CONSENT_ID.into(),
        case_ref: TEST_CASE_REF.into(),
        referral_ids: vec![],
        withdrawn_at_ms: corridor_node::node::now_ms(),
    }
    .encode_to_vec();
    let w = Envelope::seal(
        h,
        &withdrawal,
        &fed.sealing_public_key(SHELTER_KH),
        &fed.signing_key(SHELTER_MY),
    )
    .unwrap();
    let answer = deliver_as(&fed, SHELTER_MY, &w)
        .await
        .expect("withdrawal accepted");
    assert!(answer.purge_receipt.is_some(), "{answer:?}");
    // A referral under it that arrives afterwards is refused and leaves nothing behind.
    let e = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    assert_code(
        deliver_as(&fed, SHELTER_MY, &e).await,
        Code::FailedPrecondition,
        &format!("consent {TEST_CONSENT_ID} was withdrawn"),
    );
    assert_nothing_stored(&recipient).await;
    // Nor a data key for its case.
    let keys = scalar(
        &recipient,
        "SELECT COUNT(*) FROM case_keys WHERE id LIKE 'in:%'",
    )
    .await;
    assert_eq!(keys, 0, "a key made for a refused referral stayed");
}

/// What narrowings restate of a consent binds the recipient, combined: a sender on an
/// older version restates nothing (the recipient says so), a narrowing that arrives late
/// loosens nothing, and terms of the wrong form are refused with what is wrong.
#[tokio::test]
async fn narrowings_restate_the_terms_and_none_loosens_them() {
    let fed = Federation::demo("narrowing-terms");
    let recipient = fed.start(SHELTER_KH);
    let h = header(SHELTER_MY, SHELTER_KH);
    let referral_id = h.message_id.to_hex();
    deliver_as(&fed, SHELTER_MY, &envelope(&fed, h))
        .await
        .expect("referral accepted");
    // A narrowing made `age_ms` ago, giving `terms_key` to confirm its terms with.
    let narrowing_keyed = |terms: Option<pb::ConsentTerms>, age_ms: i64, terms_key: &[u8]| {
        let mut h = header(SHELTER_MY, SHELTER_KH);
        h.kind = MessageKind::ConsentNarrowing;
        let payload = pb::ConsentNarrowing {
            consent_id: TEST_CONSENT_ID.into(),
            case_ref: TEST_CASE_REF.into(),
            kept: vec![],
            purged_referral_ids: vec![],
            narrowed_at_ms: corridor_node::node::now_ms() - age_ms,
            terms,
            terms_key: terms_key.to_vec(),
        }
        .encode_to_vec();
        seal_as_sender(&fed, h, &payload)
    };
    let narrowing = |terms, age_ms| narrowing_keyed(terms, age_ms, &[]);
    let terms = |countries: &[&str], no_family_contact: bool, expires_in_ms: i64| {
        Some(pb::ConsentTerms {
            excluded_countries: countries.iter().map(|c| c.to_string()).collect(),
            no_family_contact,
            expires_at_ms: corridor_node::node::now_ms() + expires_in_ms,
        })
    };
    let mut c = recipient.client().await;
    let mut read = async || {
        c.get_referral(pb::GetReferralRequest {
            referral_id: referral_id.clone(),
            ..Default::default()
        })
        .await
        .expect("referral")
        .into_inner()
    };
    let sent = read().await;

    // As an older sender narrows: the recipient knows a narrowing came, not its terms.
    deliver_as(&fed, SHELTER_MY, &narrowing(None, 0))
        .await
        .expect("narrowing without terms");
    let r = read().await;
    assert!(
        r.consent_narrowed_at_ms > 0 && !r.consent_terms_restated,
        "{r:?}"
    );
    assert!(!r.consent_no_family_contact && r.consent_excluded_countries.is_empty());
    // A referral sealed after it carries the terms as they stand in its receipt.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let h = header(SHELTER_MY, SHELTER_KH);
    let later_id = h.message_id.to_hex();
    deliver_as(&fed, SHELTER_MY, &envelope(&fed, h))
        .await
        .expect("a later referral");
    let later = recipient
        .client()
        .await
        .get_referral(pb::GetReferralRequest {
            referral_id: later_id,
            ..Default::default()
        })
        .await
        .expect("later referral")
        .into_inner();
    assert!(later.consent_terms_restated, "{later:?}");

    // Restated terms bind, with the earlier expiry. The answer confirms them, keyed with
    // what the narrowing gave; without a key (a sender that could not check it) it
    // confirms nothing.
    let stated = terms(&["TH"], true, 60_000);
    let key = [9u8; 32];
    let answer = deliver_as(&fed, SHELTER_MY, &narrowing_keyed(stated.clone(), 0, &key))
        .await
        .expect("narrowing with terms");
    let stated = stated
        .map(corridor_node::convert::consent_terms_from_pb)
        .and_then(Result::ok)
        .expect("terms");
    assert_eq!(
        answer.purge_receipt.map(|r| r.terms_confirmed),
        Some(stated.confirmation_digest(&key).to_vec())
    );
    let r = read().await;
    assert!(
        r.consent_terms_restated && r.consent_no_family_contact,
        "{r:?}"
    );
    assert_eq!(r.consent_excluded_countries, vec!["TH".to_owned()]);
    assert!(r.consent_expires_at_ms < sent.consent_expires_at_ms);
    let expires_at_ms = r.consent_expires_at_ms;

    // One made earlier that arrives late, stating less, loosens nothing; what it adds
    // binds too.
    let answer = deliver_as(
        &fed,
        SHELTER_MY,
        &narrowing(terms(&["MY"], false, 120_000), 30_000),
    )
    .await
    .expect("a late narrowing");
    assert_eq!(
        answer.purge_receipt.map(|r| r.terms_confirmed),
        Some(Vec::new())
    );
    let r = read().await;
    assert!(r.consent_no_family_contact, "{r:?}");
    assert_eq!(
        r.consent_excluded_countries,
        vec!["MY".to_owned(), "TH".to_owned()]
    );
    assert_eq!(r.consent_expires_at_ms, expires_at_ms);

    for (bad, words) in [
        (
            terms(&["kh"], false, 60_000),
            "not an ISO 3166-1 alpha-2 code",
        ),
        (terms(&[], false, i64::MIN / 2), "no expiry"),
    ] {
        assert_code(
            deliver_as(&fed, SHELTER_MY, &narrowing(bad, 0)).await,
            Code::InvalidArgument,
            words,
        );
    }
    // A key of the wrong length, or one without terms, is answered all the same, without
    // a confirmation: what the narrowing takes away is carried out.
    for (stated, key) in [
        (terms(&["TH"], true, 60_000), &[1u8; 31][..]),
        (None, &[1u8; 32][..]),
    ] {
        let answer = deliver_as(&fed, SHELTER_MY, &narrowing_keyed(stated, 0, key))
            .await
            .expect("narrowing answered");
        assert_eq!(
            answer.purge_receipt.map(|r| r.terms_confirmed),
            Some(Vec::new())
        );
    }
    // The terms are stored sealed: not their encoding in the clear (an excluded TH).
    assert_eq!(
        scalar(
            &recipient,
            "SELECT count(*) FROM narrowed_consents
             WHERE terms_sealed IS NOT NULL AND instr(terms_sealed, X'0A025448') = 0"
        )
        .await,
        1
    );
}

/// A recipient keeps what it read and gated, nothing more: a field its version does not
/// know, riding in an otherwise valid payload, is not stored with it.
#[tokio::test]
async fn a_recipient_stores_only_what_it_gated() {
    let fed = Federation::demo("unknown-fields");
    let kh = fed.start(SHELTER_KH);
    let honest = payload(&fed, SHELTER_MY, SHELTER_KH);
    let mut smuggling = honest.clone();
    // Field 99 (a string no version of ReferralPayload has), 200 bytes long.
    smuggling.extend_from_slice(&[0x9a, 0x06, 0xc8, 0x01]);
    smuggling.extend(std::iter::repeat_n(b'x', 200));
    for p in [&honest, &smuggling] {
        let e = seal_as_sender(&fed, header(SHELTER_MY, SHELTER_KH), p);
        deliver_as(&fed, SHELTER_MY, &e).await.expect("accepted");
    }
    assert_eq!(scalar(&kh, "SELECT COUNT(*) FROM inbox").await, 2);
    assert_eq!(
        scalar(
            &kh,
            "SELECT COUNT(DISTINCT length(payload_sealed)) FROM inbox"
        )
        .await,
        1,
        "the unknown field was stored"
    );
}

/// One member cannot hold every connection slot: past its own bound its connections are
/// closed, while another member still connects, and a slot it gives up is its again.
#[tokio::test]
async fn one_member_cannot_take_every_connection() {
    use corridor_node::tls::MAX_CONNECTIONS_PER_MEMBER;
    let fed = Federation::demo("conn-per-member");
    let _kh = fed.start(SHELTER_KH);
    let connect = |org: &'static str| {
        let fed = &fed;
        async move {
            let mut client = fed
                .federation_client(Some(fed.org(org)), &fed.dir, SHELTER_KH)
                .await
                .ok()?;
            // An empty envelope is refused by the service: the connection was served.
            let answer = client.deliver(pb::Envelope::default()).await;
            let served = answer.is_err_and(|s| s.code() == Code::InvalidArgument);
            served.then_some(client)
        }
    };
    let mut held = Vec::new();
    for n in 0..MAX_CONNECTIONS_PER_MEMBER {
        held.push(
            connect(SHELTER_MY)
                .await
                .unwrap_or_else(|| panic!("connection {n}")),
        );
    }
    assert!(
        connect(SHELTER_MY).await.is_none(),
        "one connection too many was served"
    );
    assert!(
        connect(EMBASSY).await.is_some(),
        "another member was kept out"
    );
    held.pop();
    // The node notices the closed connection in its own time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connect(SHELTER_MY).await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "a slot given up stayed taken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An envelope sent again after its answer was lost gets its first answer, signed with
/// the recipient's key as the directory lists it now: after a rotation of that key, the
/// stored answer's old signature could never be verified.
#[tokio::test]
async fn a_replay_after_the_recipient_rotated_its_signing_key_is_answered_with_the_new_key() {
    let fed = Federation::demo("replay-rotated");
    let mut kh = fed.start(SHELTER_KH);
    let e = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    let first = deliver_as(&fed, SHELTER_MY, &e).await.expect("accepted");
    let verify = |answer: &pb::DeliverResponse, key: &corridor::VerifyingKey| {
        corridor_node::convert::receipt_from_pb(answer.receipt.clone().expect("receipt"))
            .expect("receipt")
            .verify(
                e.header.message_id,
                &e.digest(),
                &OrgId::new(SHELTER_MY).unwrap(),
                &OrgId::new(SHELTER_KH).unwrap(),
                key,
            )
    };
    let old_key = fed.signing_key(SHELTER_KH);
    verify(&first, &old_key.verifying_key()).expect("signed with the key listed then");

    // The shelter rotates its signing key; the directory lists the new one.
    kh.stop();
    let new_key = corridor::SigningKey::from_seed(&[42; 32]).unwrap();
    rotate_signing_key(&fed, SHELTER_KH, &new_key, 2);
    kh.start();

    let again = deliver_as(&fed, SHELTER_MY, &e)
        .await
        .expect("answered again");
    verify(&again, &new_key.verifying_key()).expect("signed with the key listed now");
    let (a, b) = (
        corridor_node::convert::receipt_from_pb(first.receipt.unwrap()).unwrap(),
        corridor_node::convert::receipt_from_pb(again.receipt.unwrap()).unwrap(),
    );
    assert_eq!(
        (a.log_index, a.leaf_hash, a.received_at_ms),
        (b.log_index, b.leaf_hash, b.received_at_ms),
        "the same answer"
    );
}

/// A member whose envelopes keep being refused costs this node a bounded number of audit
/// entries: once its budget is spent (3 refusals here, refilling by one a second) its
/// envelopes are turned away unexamined and unrecorded, valid ones too, until it
/// refills. Other members' budgets are their own.
#[tokio::test]
async fn a_member_whose_envelopes_keep_failing_is_turned_away_once_its_budget_is_spent() {
    let fed = Federation::demo("refusal-budget");
    add_federation_settings(
        &fed,
        SHELTER_KH,
        "refused_envelopes_burst = 3\nrefused_envelopes_per_minute = 60\n",
    );
    let kh = fed.start(SHELTER_KH);
    let recorded = async || {
        scalar(
            &kh,
            "SELECT COUNT(*) FROM audit_entries WHERE instr(entry, 'envelope-refused') > 0",
        )
        .await
    };
    // Signed by the sender, but for another recipient.
    let junk = |from: &str| envelope(&fed, header(from, EMBASSY));
    for _ in 0..3 {
        let status = deliver_as(&fed, SHELTER_MY, &junk(SHELTER_MY))
            .await
            .expect_err("misaddressed");
        assert_ne!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    assert_eq!(recorded().await, 3);
    for e in [
        junk(SHELTER_MY),
        envelope(&fed, header(SHELTER_MY, SHELTER_KH)),
    ] {
        assert_code(
            deliver_as(&fed, SHELTER_MY, &e).await,
            Code::ResourceExhausted,
            "refused recently",
        );
    }
    assert_eq!(recorded().await, 3, "turned away, not recorded");
    assert!(kh.log().contains("turned away unexamined"), "{}", kh.log());
    let status = deliver_as(&fed, EMBASSY, &junk(EMBASSY))
        .await
        .expect_err("misaddressed");
    assert_ne!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(recorded().await, 4);

    // The budget refills: the member's next envelope is examined again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    deliver_as(
        &fed,
        SHELTER_MY,
        &envelope(&fed, header(SHELTER_MY, SHELTER_KH)),
    )
    .await
    .expect("accepted once the budget refilled");
    assert_eq!(inbox(&mut kh.client().await).await.len(), 1);
}

/// Message ids are their senders'. A member that learnt another member's message id
/// before its delivery (an auditor reading the sender's log, say) and sends an envelope
/// of its own under it first does not take the id from its sender: the real referral is
/// still stored, each is answered and replayed as its own, and reading one by its id
/// alone asks which sender is meant.
#[tokio::test]
async fn another_members_envelope_under_a_message_id_does_not_take_it_from_its_sender() {
    let fed = Federation::demo("id-per-sender");
    let recipient = fed.start(SHELTER_KH);
    let real = envelope(&fed, header(SHELTER_MY, SHELTER_KH));
    let mut h = header(EMBASSY, SHELTER_KH);
    h.message_id = real.header.message_id;
    let squatter = envelope(&fed, h);
    let theirs = deliver_as(&fed, EMBASSY, &squatter)
        .await
        .expect("the other member's envelope is accepted");
    let ours = deliver_as(&fed, SHELTER_MY, &real)
        .await
        .expect("the real referral is still accepted");
    assert_ne!(ours, theirs, "each has its own receipt");
    assert_eq!(
        deliver_as(&fed, SHELTER_MY, &real).await.expect("replay"),
        ours,
        "a replay gets its own sender's answer"
    );

    let mut c = recipient.client().await;
    let items = inbox(&mut c).await;
    assert_eq!(items.len(), 2, "both stored, once each");
    let id = real.header.message_id.to_hex();
    assert!(items.iter().all(|item| item.referral_id == id));
    let ambiguous = c
        .get_referral(pb::GetReferralRequest {
            referral_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("two senders used the id");
    assert_eq!(ambiguous.code(), Code::FailedPrecondition, "{ambiguous:?}");
    assert!(
        ambiguous.message().contains("name the sender"),
        "{ambiguous:?}"
    );
    for sender in [SHELTER_MY, EMBASSY] {
        let read = c
            .get_referral(pb::GetReferralRequest {
                referral_id: id.clone(),
                sender: sender.into(),
            })
            .await
            .expect("read with its sender named")
            .into_inner();
        assert_eq!(read.sender, sender);
    }
    let missing = c
        .get_referral(pb::GetReferralRequest {
            referral_id: id.clone(),
            sender: "shelter-th".into(),
        })
        .await
        .expect_err("no referral of that sender");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
}
