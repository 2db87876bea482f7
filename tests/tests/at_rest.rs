//! Personal data never appears in plaintext in any node's database, WAL or log — before
//! or after a purge — and after a purge it cannot be decrypted any more.

use std::path::Path;
use std::time::{Duration, Instant};

use corridor::Field;
use corridor_proto::v1 as pb;
use corridor_tests::*;

fn marker(field: &str) -> String {
    format!("MRK{field}Q7Z")
}

/// The value a referral carries in `field`: its marker, or for a field with a format of
/// its own a value of that format as unlikely to occur by chance.
fn field_value(field: Field) -> String {
    match field {
        Field::DateOfBirth => "1907-03-17".into(),
        Field::AgeBand => "101-107".into(),
        // Two letters occur by chance: this one goes unscanned (below), sealed on the same
        // path as every other field.
        Field::Nationality => "XK".into(),
        other => marker(other.as_str()),
    }
}

/// Every file of a node that could hold data: database, WAL, shared memory, log.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.join("node.log")];
    for name in ["corridor.db", "corridor.db-wal", "corridor.db-shm"] {
        out.push(dir.join("data").join(name));
    }
    out.into_iter().filter(|p| p.exists()).collect()
}

fn assert_no_markers(fed: &Federation, markers: &[String], when: &str) {
    for org in &fed.orgs {
        for file in files(&org.dir) {
            let bytes = std::fs::read(&file).expect("read file");
            for m in markers {
                assert!(
                    !bytes.windows(m.len()).any(|w| w == m.as_bytes()),
                    "{when}: marker {m} found in plaintext in {}",
                    file.display()
                );
            }
        }
    }
}

/// Exports every node's audit log as the auditor would, and scans the exports.
fn assert_no_markers_in_exports(fed: &Federation, markers: &[String], when: &str) {
    for org in [SHELTER_MY, SHELTER_KH, EMBASSY, NGO_TH] {
        let out = fed
            .dir
            .join(format!("{org}-{}.export.json", when.replace(' ', "-")));
        let status = std::process::Command::new(binary("corridor"))
            .arg("audit")
            .arg("--identity")
            .arg(fed.org("auditor-demo").dir.as_os_str())
            .arg("--state")
            .arg(fed.dir.join("auditor"))
            .args(["export", org, "--out"])
            .arg(&out)
            .output()
            .expect("run corridor audit export");
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let bytes = std::fs::read(&out).expect("export");
        // Entries are base64 in the export: check the decoded entries too.
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("export json");
        let mut decoded = Vec::new();
        for e in json["entries"].as_array().expect("entries") {
            use base64::Engine as _;
            decoded.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(e.as_str().unwrap())
                    .unwrap(),
            );
        }
        assert!(json["entries"].as_array().is_some_and(|e| !e.is_empty()));
        for m in markers {
            for haystack in [&bytes, &decoded] {
                assert!(
                    !haystack.windows(m.len()).any(|w| w == m.as_bytes()),
                    "{when}: marker {m} found in the exported log of {org}"
                );
            }
        }
    }
}

async fn count(db: &Path, sql: &str) -> i64 {
    use sqlx::Row as _;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true);
    let mut conn = sqlx::ConnectOptions::connect(&options)
        .await
        .expect("open database");
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await
        .expect("query")
        .get(0)
}

#[tokio::test]
async fn markers_in_every_field_never_appear_in_plaintext_and_purged_data_is_gone() {
    let fed = Federation::four("at-rest");
    let sender = fed.start(SHELTER_MY);
    let nodes = [fed.start(SHELTER_KH), fed.start(EMBASSY), fed.start(NGO_TH)];
    let mut s = sender.client().await;
    let plan = [
        (SHELTER_KH, "reintegration"),
        (EMBASSY, "nationality-verification"),
        (NGO_TH, "legal-aid"),
    ];
    // Three purposes that together carry every field of the catalogue.
    let mut covered = std::collections::BTreeSet::new();
    for (_, purpose) in plan {
        let p = corridor::profile::profile(corridor::Purpose::parse(purpose).unwrap());
        covered.extend(p.required.iter().chain(p.optional).copied());
    }
    assert_eq!(
        covered.len(),
        Field::ALL.len(),
        "the plan must cover the whole catalogue"
    );
    let mut markers: Vec<String> = Field::ALL
        .iter()
        .filter(|f| **f != Field::Nationality)
        .map(|f| field_value(*f))
        .collect();
    markers.extend(["label", "guardian", "language"].map(marker));

    let case_id = s
        .create_case(pb::CreateCaseRequest {
            label: marker("label"),
        })
        .await
        .unwrap()
        .into_inner()
        .case_id;
    let all_fields: Vec<String> = Field::ALL.iter().map(|f| f.as_str().to_owned()).collect();
    let consent_id = s
        .record_consent(pb::RecordConsentRequest {
            case_id: case_id.clone(),
            scope: Some(pb::ConsentScope {
                purposes: plan.iter().map(|(_, p)| p.to_string()).collect(),
                recipient_orgs: plan.iter().map(|(o, _)| o.to_string()).collect(),
                fields: all_fields,
                expires_at_ms: corridor_node::node::now_ms() + 30 * 86_400_000,
                ..Default::default()
            }),
            given_by: "guardian".into(),
            guardian_basis: marker("guardian"),
            method: "interpreter".into(),
            language: marker("language"),
        })
        .await
        .unwrap()
        .into_inner()
        .consent_id;
    let shown = s
        .get_consent(pb::ConsentRequest {
            consent_id: consent_id.clone(),
        })
        .await
        .expect("consent")
        .into_inner();
    assert_eq!(
        (shown.guardian_basis, shown.language),
        (marker("guardian"), marker("language"))
    );
    // That read is in the audit log, by the consent's id; status shows no details.
    let read = scalar(
        &sender,
        &format!(
            "SELECT COUNT(*) FROM audit_entries WHERE instr(entry, 'consent-details-read') > 0 AND instr(entry, '{consent_id}') > 0"
        ),
    )
    .await;
    assert_eq!(read, 1);
    let status = s
        .get_consent_status(pb::ConsentRequest {
            consent_id: consent_id.clone(),
        })
        .await
        .expect("status")
        .into_inner()
        .consent
        .expect("consent");
    assert_eq!(
        (status.guardian_basis, status.language),
        (String::new(), String::new())
    );
    let mut refs = Vec::new();
    for ((to, purpose), node) in plan.iter().zip(&nodes) {
        let p = corridor::profile::profile(corridor::Purpose::parse(purpose).unwrap());
        let fields = p
            .required
            .iter()
            .chain(p.optional)
            .map(|f| (f.as_str().to_owned(), field_value(*f)))
            .collect();
        let sent = s
            .send_referral(pb::SendReferralRequest {
                case_id: case_id.clone(),
                recipient: to.to_string(),
                purpose: purpose.to_string(),
                fields,
                consent_id: String::new(),
                wait: false,
                request_id: String::new(),
            })
            .await
            .expect("send")
            .into_inner();
        assert_eq!(
            wait_final(&mut s, &sent.referral_id, Duration::from_secs(20))
                .await
                .state,
            "delivered"
        );
        // The recipient can read it: the data is really there, only never in plaintext.
        let mut c = node.client().await;
        let got = c
            .get_referral(pb::GetReferralRequest {
                referral_id: sent.referral_id.clone(),
                ..Default::default()
            })
            .await
            .expect("read referral")
            .into_inner();
        assert_eq!(got.fields.len(), p.required.len() + p.optional.len());
        for (name, value) in &got.fields {
            let field = Field::parse(name).expect("a catalogue field");
            assert_eq!(*value, field_value(field), "{name}");
        }
        refs.push(got.case_ref);
    }
    // Each recipient knows the case under its own reference.
    refs.sort();
    refs.dedup();
    assert_eq!(refs.len(), 3, "recipients got linkable case references");

    assert_no_markers(&fed, &markers, "before purge");
    assert_no_markers_in_exports(&fed, &markers, "before purge");

    s.withdraw_consent(pb::ConsentRequest {
        consent_id: consent_id.clone(),
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = s
            .get_consent_status(pb::ConsentRequest {
                consent_id: consent_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if st.recipients.iter().all(|r| r.state == "purged") {
            break;
        }
        assert!(Instant::now() < deadline, "purges outstanding: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_no_markers(&fed, &markers, "after purge");
    assert_no_markers_in_exports(&fed, &markers, "after purge");

    // After the purge nothing can be decrypted: the ciphertext is gone and so is every
    // data key it was encrypted under.
    for node in &nodes {
        let db = node.org.dir.join("data").join("corridor.db");
        assert_eq!(count(&db, "SELECT COUNT(*) FROM inbox").await, 0);
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM case_keys WHERE id LIKE 'in:%'").await,
            0
        );
        let mut c = node.client().await;
        assert!(inbox(&mut c).await.is_empty());
    }
}

/// A node started with another data key than the one its database was written with would
/// accept referrals, and sign receipts for them, that it could never read back: it
/// refuses to start, and `check-config` says why. Its data directory is its owner's alone.
#[tokio::test]
async fn a_node_refuses_a_data_key_that_does_not_open_its_stored_keys() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::process::Command;

    let fed = Federation::demo("at-rest-wrong-key");
    let mut my = fed.start(SHELTER_MY);
    let mut client = my.client().await;
    case_with_consent(&mut client, SHELTER_KH, "reintegration").await;
    my.stop();
    let data_dir = my.org.dir.join("data");
    let mode = std::fs::metadata(&data_dir)
        .expect("data dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "data directory mode {mode:o}");
    for file in ["corridor.db", "corridor.db-wal", "corridor.db-shm"] {
        let path = data_dir.join(file);
        if file == "corridor.db" || path.exists() {
            let mode = std::fs::metadata(&path).expect(file).permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file} mode {mode:o}");
        }
    }

    let key_file = my.org.dir.join("data.key");
    let right_key = std::fs::read(&key_file).expect("data key");
    // Another well-formed key; the file keeps its owner-only mode.
    std::fs::write(&key_file, "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n").expect("write key");
    for args in [&["check-config"][..], &[][..]] {
        let out = Command::new(binary("corridor-node"))
            .arg("--config")
            .arg(&my.org.config)
            .args(args)
            .output()
            .expect("run corridor-node");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
        assert!(
            stderr.contains("does not open the data keys stored in"),
            "{args:?}: {stderr}"
        );
    }
    std::fs::write(&key_file, right_key).expect("restore key");
    my.start();
    let mut client = my.client().await;
    case_with_consent(&mut client, SHELTER_KH, "reintegration").await;
}

/// Consents recorded before their free-text details were sealed are sealed as the node
/// starts: the plaintext leaves the database, and the details still show.
#[tokio::test]
async fn consent_details_recorded_in_plaintext_are_sealed_at_start() {
    let fed = Federation::demo("at-rest-legacy-details");
    let mut my = fed.start(SHELTER_MY);
    let mut client = my.client().await;
    let (_, consent_id) =
        case_with_consent_to(&mut client, &[SHELTER_KH], &["reintegration"]).await;
    my.stop();
    // As an earlier version stored them.
    let markers = [marker("guardian"), marker("language")];
    sql(
        &my,
        &[&format!(
            "UPDATE consents SET guardian_basis = '{}', language = '{}', details_sealed = NULL",
            markers[0], markers[1]
        )],
    )
    .await;
    my.start();
    let mut client = my.client().await;
    let shown = client
        .get_consent(pb::ConsentRequest { consent_id })
        .await
        .expect("consent")
        .into_inner();
    assert_eq!([shown.guardian_basis, shown.language], markers);
    let plaintext = scalar(
        &my,
        "SELECT COUNT(*) FROM consents WHERE details_sealed IS NULL OR guardian_basis != ''",
    )
    .await;
    assert_eq!(plaintext, 0);
    my.stop();
    assert_no_markers(&fed, &markers, "after the start that sealed them");
}
