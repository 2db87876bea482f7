//! The audit log, end to end: checkpoints stay consistent across crashes, tampering with
//! a node's database is caught and located, a forked log loses its witnesses, and a
//! receipt without its entry in the recipient's log is found.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use corridor_tests::*;

const AUDITOR: &str = "auditor-demo";

fn audit(fed: &Federation, state: &Path, args: &[&str]) -> Output {
    Command::new(binary("corridor"))
        .arg("audit")
        .arg("--identity")
        .arg(fed.org(AUDITOR).dir.as_os_str())
        .arg("--state")
        .arg(state)
        .args(args)
        .output()
        .expect("run corridor audit")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until the node has signed a checkpoint covering its whole log.
async fn wait_checkpointed(node: &TestNode) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let size = scalar(node, "SELECT COUNT(*) FROM audit_entries").await;
        let signed = scalar(node, "SELECT COALESCE(MAX(size), 0) FROM checkpoints").await;
        if size > 0 && signed == size {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint of size {size} (latest {signed})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `witnesses` cosignatures of the latest checkpoint are stored.
async fn wait_cosigned(node: &TestNode, witnesses: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = scalar(
            node,
            "SELECT COUNT(*) FROM cosignatures WHERE size = (SELECT MAX(size) FROM checkpoints)",
        )
        .await;
        if n >= witnesses {
            return;
        }
        assert!(Instant::now() < deadline, "only {n} cosignatures");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn some_events(node: &TestNode, n: usize) {
    let mut c = node.client().await;
    for _ in 0..n {
        case_with_consent(&mut c, SHELTER_KH, "reintegration").await;
    }
}

#[tokio::test]
async fn restarts_while_appending_never_sign_inconsistent_checkpoints() {
    let fed = Federation::demo("audit-restart");
    let state = fed.dir.join("auditor");
    let kh = fed.start(SHELTER_KH);
    let _embassy = fed.start(EMBASSY);
    let mut my = fed.start(SHELTER_MY);
    for round in 0..4 {
        some_events(&my, 3).await;
        if round % 2 == 0 {
            wait_checkpointed(&my).await;
        }
        // A crash at any point: sometimes right after appending, before the checkpoint.
        my.kill();
        my.start();
        some_events(&my, 2).await;
        wait_checkpointed(&my).await;
        // Each verification checks consistency with every checkpoint verified before.
        ok(&audit(
            &fed,
            &state,
            &["verify", SHELTER_MY, "--quorum", "0"],
        ));
    }
    wait_cosigned(&my, 2).await;
    let out = ok(&audit(&fed, &state, &["checkpoint", SHELTER_MY]));
    assert!(out.contains("quorum 2: MET"), "{out}");
    let out = ok(&audit(&fed, &state, &["verify", SHELTER_MY]));
    assert!(out.contains("quorum 2: MET"), "{out}");
    // A witness named twice counts once: one witness can never make a quorum of two.
    let kh_only = [
        "verify",
        SHELTER_MY,
        "--witness",
        SHELTER_KH,
        "--witness",
        SHELTER_KH,
        "--quorum",
        "2",
    ];
    let err = failed(&audit(&fed, &state, &kh_only));
    assert!(
        err.contains("a quorum of 2 can never be met by 1 witness(es)"),
        "{err}"
    );
    drop(kh);
}

#[tokio::test]
async fn tampering_is_detected_and_located() {
    let fed = Federation::demo("audit-tamper");
    let state = fed.dir.join("auditor");
    let my = fed.start(SHELTER_MY);
    some_events(&my, 3).await;
    wait_checkpointed(&my).await;
    // No witness runs here: the entries verify, the quorum does not, and that fails.
    let err = failed(&audit(&fed, &state, &["verify", SHELTER_MY]));
    assert!(err.contains("witnesses cosigned its checkpoint"), "{err}");
    ok(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));

    // An entry changed (one byte of it).
    let original = change_entry(&my, 2).await;
    let err = failed(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));
    assert!(err.contains("entry 2"), "{err}");
    sql(
        &my,
        &[&format!(
            "UPDATE audit_entries SET entry = x'{original}' WHERE idx = 2"
        )],
    )
    .await;
    ok(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));

    // Two entries swapped.
    sql(
        &my,
        &[
            "UPDATE audit_entries SET idx = -1 WHERE idx = 3",
            "UPDATE audit_entries SET idx = 3 WHERE idx = 4",
            "UPDATE audit_entries SET idx = 4 WHERE idx = -1",
        ],
    )
    .await;
    let err = failed(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));
    assert!(err.contains("entry 3"), "{err}");
    sql(
        &my,
        &[
            "UPDATE audit_entries SET idx = -1 WHERE idx = 3",
            "UPDATE audit_entries SET idx = 3 WHERE idx = 4",
            "UPDATE audit_entries SET idx = 4 WHERE idx = -1",
        ],
    )
    .await;
    ok(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));

    // An entry deleted.
    sql(&my, &["DELETE FROM audit_entries WHERE idx = 1"]).await;
    let err = failed(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));
    assert!(err.contains("entry 1"), "{err}");

    // A fresh auditor without earlier state still locates a change against the signed
    // checkpoint.
    let fresh = fed.dir.join("fresh-auditor");
    let third = entry_hex(&my, 3).await;
    sql(
        &my,
        &[&format!(
            "INSERT INTO audit_entries (idx, entry, leaf_hash) VALUES (1, x'{third}', x'00')"
        )],
    )
    .await;
    let err = failed(&audit(
        &fed,
        &fresh,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));
    assert!(err.contains("entry 1 does not match"), "{err}");
}

/// Flips one bit of the log entry at `idx`, as a node rewriting its log would; returns
/// the entry as it was, in hex.
async fn change_entry(node: &TestNode, idx: i64) -> String {
    let original = entry_hex(node, idx).await;
    let mut changed = hex::decode(&original).unwrap();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    sql(
        node,
        &[&format!(
            "UPDATE audit_entries SET entry = x'{}' WHERE idx = {idx}",
            hex::encode(changed)
        )],
    )
    .await;
    original
}

async fn entry_hex(node: &TestNode, idx: i64) -> String {
    use sqlx::Row as _;
    let mut conn = open_db(node, true).await;
    sqlx::query("SELECT hex(entry) FROM audit_entries WHERE idx = $1")
        .bind(idx)
        .fetch_one(&mut conn)
        .await
        .expect("entry")
        .get(0)
}

#[tokio::test]
async fn a_forked_log_is_refused_by_its_witnesses() {
    let fed = Federation::demo("audit-fork");
    let state = fed.dir.join("auditor");
    let kh = fed.start(SHELTER_KH);
    let embassy = fed.start(EMBASSY);
    let mut my = fed.start(SHELTER_MY);
    some_events(&my, 4).await;
    wait_checkpointed(&my).await;
    wait_cosigned(&my, 2).await;
    ok(&audit(&fed, &state, &["checkpoint", SHELTER_MY]));

    // The node rewrites history: it drops its log's tail and everything it signed, and
    // goes on as if the dropped entries never existed.
    my.stop();
    sql(
        &my,
        &[
            "DELETE FROM audit_entries WHERE idx >= 2",
            "DELETE FROM audit_hashes",
            "DELETE FROM checkpoints",
            "DELETE FROM cosignatures",
            "DELETE FROM witness_views",
        ],
    )
    .await;
    // Rebuild the stored hashes of the kept prefix so that the node can go on appending.
    // (A node that forks keeps a consistent-looking tree of its own.)
    rebuild_hashes(&my).await;
    my.start();
    some_events(&my, 6).await;
    wait_checkpointed(&my).await;
    // Give the witnesses time to be asked, and refuse.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cosigned = scalar(
        &my,
        "SELECT COUNT(*) FROM cosignatures WHERE size = (SELECT MAX(size) FROM checkpoints)",
    )
    .await;
    assert_eq!(cosigned, 0, "a witness cosigned a forked checkpoint");
    let err = failed(&audit(&fed, &state, &["checkpoint", SHELTER_MY]));
    assert!(err.contains("0 of the required 2"), "{err}");
    for witness in [&kh, &embassy] {
        let log = witness.log();
        assert!(
            log.contains("refused to cosign") || log.contains("conflict"),
            "{}",
            log
        );
    }
}

/// Recomputes a node's stored tree hashes from its entries, as a node that rewrote its
/// log would.
async fn rebuild_hashes(node: &TestNode) {
    use sqlx::Row as _;
    let mut conn = open_db(node, false).await;
    let rows = sqlx::query("SELECT entry FROM audit_entries ORDER BY idx")
        .fetch_all(&mut conn)
        .await
        .expect("entries");
    let mut stored: std::collections::HashMap<u64, corridor::merkle::Hash> = Default::default();
    for (n, row) in rows.iter().enumerate() {
        let entry: Vec<u8> = row.get(0);
        let leaf = corridor::merkle::leaf_hash(&entry);
        let reader = MapReader(&stored);
        let hashes =
            corridor::merkle::stored_hashes_for_record(n as u64, leaf, &reader).expect("hashes");
        let first = corridor::merkle::stored_hash_index(0, n as u64);
        for (i, h) in hashes.into_iter().enumerate() {
            stored.insert(first + i as u64, h);
        }
    }
    for (id, h) in stored {
        sqlx::query("INSERT INTO audit_hashes (id, hash) VALUES ($1, $2)")
            .bind(id as i64)
            .bind(h.to_vec())
            .execute(&mut conn)
            .await
            .expect("insert hash");
    }
}

struct MapReader<'a>(&'a std::collections::HashMap<u64, corridor::merkle::Hash>);

impl corridor::merkle::HashReader for MapReader<'_> {
    fn read_hashes(
        &self,
        indexes: &[u64],
    ) -> Result<Vec<corridor::merkle::Hash>, corridor::merkle::ReadError> {
        indexes
            .iter()
            .map(|i| {
                self.0
                    .get(i)
                    .copied()
                    .ok_or(corridor::merkle::ReadError::Missing(*i))
            })
            .collect()
    }
}

#[tokio::test]
async fn cross_check_finds_a_receipt_without_its_entry() {
    let fed = Federation::demo("audit-cross");
    let state = fed.dir.join("auditor");
    let my = fed.start(SHELTER_MY);
    let mut kh = fed.start(SHELTER_KH);
    let mut s = my.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let sent = s
        .send_referral(referral(&case_id, SHELTER_KH, "reintegration"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        wait_final(&mut s, &sent.referral_id, Duration::from_secs(20))
            .await
            .state,
        "delivered"
    );
    wait_checkpointed(&my).await;
    wait_checkpointed(&kh).await;
    // The embassy does not run here: each log has one of its two witnesses.
    wait_cosigned(&my, 1).await;
    wait_cosigned(&kh, 1).await;
    let out = ok(&audit(
        &fed,
        &state,
        &["cross-check", SHELTER_MY, SHELTER_KH, "--quorum", "1"],
    ));
    assert!(out.contains("all 1 receipts are backed"), "{out}");

    // The recipient drops the entry its receipt names, and carries on.
    let received = scalar(&kh, "SELECT MAX(idx) FROM audit_entries").await;
    kh.stop();
    sql(
        &kh,
        &[
            &format!("DELETE FROM audit_entries WHERE idx >= {received}"),
            "DELETE FROM audit_hashes",
            "DELETE FROM checkpoints",
            "DELETE FROM cosignatures",
        ],
    )
    .await;
    rebuild_hashes(&kh).await;
    kh.start();
    wait_checkpointed(&kh).await;
    // Its witness refuses the rewritten log: a cross-check against it proves nothing.
    let err = failed(&audit(
        &fed,
        &state,
        &["cross-check", SHELTER_MY, SHELTER_KH, "--quorum", "1"],
    ));
    assert!(
        err.contains("shelter-kh: only 0 of the required 1 witnesses cosigned"),
        "{err}"
    );
    // Checked regardless, its log lacks the entry the receipt names.
    let err = failed(&audit(
        &fed,
        &state,
        &["cross-check", SHELTER_MY, SHELTER_KH, "--quorum", "0"],
    ));
    assert!(
        err.contains("1 receipt(s) without a matching entry"),
        "{err}"
    );
    let out = String::from_utf8_lossy(
        &audit(
            &fed,
            &state,
            &["cross-check", SHELTER_MY, SHELTER_KH, "--quorum", "0"],
        )
        .stdout,
    )
    .into_owned();
    assert!(
        out.contains(&sent.referral_id) && out.contains("missing from shelter-kh's log"),
        "{out}"
    );

    // Entries a log serves count only if they hash to what it signed.
    change_entry(&my, 0).await;
    let err = failed(&audit(
        &fed,
        &state,
        &["cross-check", SHELTER_MY, SHELTER_KH, "--quorum", "0"],
    ));
    assert!(
        err.contains("shelter-my's entries do not hash to its signed checkpoint"),
        "{err}"
    );
}

/// An operator may issue a token while the node runs: `create-admin-token` appends its
/// entry to the node's log from another process. The node must go on writing after it,
/// and its log must stay one tree that verifies.
#[tokio::test]
async fn a_token_issued_while_the_node_runs_leaves_it_writing() {
    let fed = Federation::demo("audit-token-while-running");
    let state = fed.dir.join("auditor");
    let mut my = fed.start(SHELTER_MY);
    some_events(&my, 1).await;
    wait_checkpointed(&my).await;
    for round in 0..2 {
        my.token = issue_admin_token(&my.org.config, &format!("second-admin-{round}"));
        // Recording a consent appends to the log: with the node's frontier stale it
        // failed on the index the token's entry took, and every later append with it.
        some_events(&my, 2).await;
        wait_checkpointed(&my).await;
        ok(&audit(
            &fed,
            &state,
            &["verify", SHELTER_MY, "--quorum", "0"],
        ));
    }
    let tokens = scalar(&my, "SELECT COUNT(*) FROM tokens").await;
    assert_eq!(tokens, 3, "the tokens issued while the node ran are stored");
    assert!(
        my.log().contains("the audit log grew outside this node"),
        "{}",
        my.log()
    );
}

#[tokio::test]
async fn export_verify_and_prove_offline() {
    let fed = Federation::demo("audit-export");
    let state = fed.dir.join("auditor");
    let _witnesses = (fed.start(SHELTER_KH), fed.start(EMBASSY));
    let my = fed.start(SHELTER_MY);
    some_events(&my, 2).await;
    wait_checkpointed(&my).await;
    wait_cosigned(&my, 2).await;
    let export = fed.dir.join("my.export.json");
    ok(&audit(
        &fed,
        &state,
        &["export", SHELTER_MY, "--out", export.to_str().unwrap()],
    ));
    let out = ok(&audit(
        &fed,
        &state,
        &["verify-export", export.to_str().unwrap()],
    ));
    assert!(out.contains("verified offline"), "{out}");
    assert!(out.contains("quorum 2: MET"), "{out}");
    let err = failed(&audit(
        &fed,
        &state,
        &["cross-check", SHELTER_MY, SHELTER_MY],
    ));
    assert!(err.contains("named twice"), "{err}");
    // A policy that could never be met, or files that are not what they should be, are
    // named as such.
    for (args, words) in [
        (
            &["checkpoint", SHELTER_MY, "--witness", AUDITOR][..],
            "auditor-demo is not a witness",
        ),
        (
            &["checkpoint", SHELTER_MY, "--quorum", "5"][..],
            "a quorum of 5 can never be met by 2 witness(es)",
        ),
    ] {
        let err = failed(&audit(&fed, &state, args));
        assert!(err.contains(words), "{err}");
    }
    let err = failed(&audit(
        &fed,
        &export,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));
    assert!(err.contains("is a file: it names the directory"), "{err}");
    let empty = fed.dir.join("empty.json");
    std::fs::write(&empty, "").unwrap();
    let err = failed(&audit(
        &fed,
        &state,
        &["verify-export", empty.to_str().unwrap()],
    ));
    assert!(
        err.contains("is not an export written by `corridor audit export`"),
        "{err}"
    );
    // Without its cosignatures the export is the log's word alone: refused, unless the
    // auditor asks for the entries alone.
    let text = std::fs::read_to_string(&export).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let note = json["checkpoint"].as_str().unwrap().to_owned();
    let own_signature_only: String = note
        .split_inclusive('\n')
        .filter(|line| !line.contains("/witness/"))
        .collect();
    assert_ne!(
        own_signature_only, note,
        "the checkpoint carried cosignatures"
    );
    json["checkpoint"] = own_signature_only.into();
    let alone = fed.dir.join("my.uncosigned.json");
    std::fs::write(&alone, json.to_string()).unwrap();
    let err = failed(&audit(
        &fed,
        &state,
        &["verify-export", alone.to_str().unwrap()],
    ));
    assert!(err.contains("only 0 of the required 2 witnesses"), "{err}");
    ok(&audit(
        &fed,
        &state,
        &["verify-export", alone.to_str().unwrap(), "--quorum", "0"],
    ));
    // A tampered export fails.
    let text = std::fs::read_to_string(&export).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["entries"].as_array_mut().unwrap().swap(0, 1);
    std::fs::write(&export, json.to_string()).unwrap();
    failed(&audit(
        &fed,
        &state,
        &["verify-export", export.to_str().unwrap()],
    ));

    let proof = fed.dir.join("entry.tlog-proof");
    wait_cosigned(&my, 2).await;
    ok(&audit(
        &fed,
        &state,
        &[
            "prove",
            SHELTER_MY,
            "--index",
            "1",
            "--out",
            proof.to_str().unwrap(),
        ],
    ));
    let text = std::fs::read_to_string(&proof).unwrap();
    assert!(text.starts_with("c2sp.org/tlog-proof@v1\n"), "{text}");
    assert!(text.contains("\nindex 1\n"), "{text}");
    assert!(text.contains("corridor.network/"), "{text}");
}

#[tokio::test]
async fn proofs_are_checked_against_entries_and_only_auditors_read_entries() {
    use corridor_proto::v1 as pb;
    use corridor_proto::v1::audit_client::AuditClient;
    let fed = Federation::demo("audit-leaf");
    let my = fed.start(SHELTER_MY);
    some_events(&my, 2).await;
    wait_checkpointed(&my).await;
    let channel = fed
        .federation_channel(Some(fed.org(AUDITOR)), &fed.dir, SHELTER_MY)
        .await
        .expect("auditor connects");
    let mut audit = AuditClient::new(channel);
    let size = scalar(&my, "SELECT MAX(size) FROM checkpoints").await as u64;
    assert!(size >= 2, "log has {size} entries");
    let entries = audit
        .get_entries(pb::GetEntriesRequest { start: 0, end: 2 })
        .await
        .expect("entries")
        .into_inner()
        .entries;
    let leaf = corridor::merkle::leaf_hash(&entries[1]).to_vec();
    let ask = |leaf_hash: Vec<u8>| pb::GetInclusionProofRequest {
        tree_size: size,
        index: 1,
        leaf_hash,
    };
    let proof = audit
        .get_inclusion_proof(ask(leaf.clone()))
        .await
        .expect("proof for the right leaf hash")
        .into_inner();
    assert_eq!((proof.index, proof.tree_size), (1, size));
    let wrong = corridor::merkle::leaf_hash(&entries[0]).to_vec();
    let refused = audit
        .get_inclusion_proof(ask(wrong))
        .await
        .expect_err("another entry's leaf hash is refused");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("entry 1"), "{refused:?}");
    // Audit requests are small; an oversized one is refused before it is decoded.
    let oversized = audit
        .get_inclusion_proof(ask(vec![0; 100 * 1024]))
        .await
        .expect_err("a 100 KiB request is refused");
    assert_eq!(oversized.code(), tonic::Code::OutOfRange, "{oversized:?}");

    // A witness (here the embassy) gets checkpoints and proofs, not the entries, which
    // would tell it where else the people it knows were referred.
    let channel = fed
        .federation_channel(Some(fed.org(EMBASSY)), &fed.dir, SHELTER_MY)
        .await
        .expect("witness connects");
    let mut witness = AuditClient::new(channel);
    let refused = witness
        .get_entries(pb::GetEntriesRequest { start: 0, end: 2 })
        .await
        .expect_err("a witness does not read entries");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("auditor role"), "{refused:?}");
    witness
        .get_consistency_proof(pb::GetConsistencyProofRequest {
            old_size: 1,
            new_size: size,
        })
        .await
        .expect("a witness reads consistency proofs");
    witness
        .get_inclusion_proof(ask(Vec::new()))
        .await
        .expect("a witness reads inclusion proofs");
}

/// The keys that verify the logs come from the directory, so an auditor trusts a
/// directory only as its governance signed it: one changed after signing is refused
/// before any node is asked anything.
#[test]
fn an_auditor_refuses_a_directory_its_governance_did_not_sign() {
    let fed = Federation::demo("audit-unsigned");
    let state = fed.dir.join("auditor-state");
    let path = fed.dir.join("directory.toml");
    let text = std::fs::read_to_string(&path).expect("directory");
    std::fs::write(&path, text.replacen("(demo)", "(forged)", 1)).expect("directory");
    let err = failed(&audit(&fed, &state, &["checkpoint", SHELTER_MY]));
    assert!(
        err.contains("signed by 0 governance key(s) of the 2 it needs"),
        "{err}"
    );
}

/// An operator revokes a user's tokens while the node runs (a lost laptop): the node
/// refuses them once its token cache lets go of them, keeps everyone else's, and goes
/// on writing.
#[tokio::test]
async fn tokens_revoked_while_the_node_runs_stop_working() {
    let fed = Federation::demo("audit-token-revoked");
    let mut my = fed.start(SHELTER_MY);
    let kept = my.token.clone();
    my.token = issue_admin_token(&my.org.config, "leaver");
    some_events(&my, 1).await;
    let revoke = |user: &str| {
        Command::new(binary("corridor-node"))
            .arg("--config")
            .arg(&my.org.config)
            .args(["revoke-tokens", "--user", user])
            .output()
            .expect("run corridor-node revoke-tokens")
    };
    let out = ok(&revoke("leaver"));
    assert!(out.contains("revoked 1 token(s) of leaver"), "{out}");
    let err = failed(&revoke("nosuch"));
    assert!(err.contains("there is no local user nosuch"), "{err}");
    let mut client = my.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client
            .list_inbox(corridor_proto::v1::ListInboxRequest::default())
            .await
        {
            Err(status) if status.code() == tonic::Code::Unauthenticated => break,
            _ => assert!(Instant::now() < deadline, "the revoked token still works"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    my.token = kept;
    some_events(&my, 1).await;
    wait_checkpointed(&my).await;
}

/// A second node started on the data directory of a running one refuses to start, and
/// leaves no trace in its log: two nodes on one database would each serve a log the
/// other writes to.
#[tokio::test]
async fn a_second_node_on_the_same_data_directory_refuses_to_start() {
    let fed = Federation::demo("audit-second-node");
    let my = fed.start(SHELTER_MY);
    some_events(&my, 1).await;
    let entries = scalar(&my, "SELECT COUNT(*) FROM audit_entries").await;
    let out = Command::new(binary("corridor-node"))
        .arg("--config")
        .arg(&my.org.config)
        .output()
        .expect("run corridor-node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("another corridor-node is running on data directory"),
        "{stderr}"
    );
    assert_eq!(
        scalar(&my, "SELECT COUNT(*) FROM audit_entries").await,
        entries,
        "the refused start was logged"
    );
    some_events(&my, 1).await;
}

/// The checkpoints an auditor's state pinned are the log's signed word: a state copied
/// from another log's is refused as damaged, not taken for proof that an honest log
/// rewrote its history.
#[tokio::test]
async fn an_auditor_state_from_another_log_is_refused_not_taken_for_a_rewrite() {
    let fed = Federation::demo("audit-state-swap");
    let state = fed.dir.join("auditor");
    let my = fed.start(SHELTER_MY);
    let kh = fed.start(SHELTER_KH);
    some_events(&my, 2).await;
    let mut k = kh.client().await;
    case_with_consent(&mut k, SHELTER_MY, "reintegration").await;
    for node in [&my, &kh] {
        wait_checkpointed(node).await;
    }
    for org in [SHELTER_MY, SHELTER_KH] {
        ok(&audit(&fed, &state, &["verify", org, "--quorum", "0"]));
    }
    std::fs::copy(
        state.join(format!("{SHELTER_KH}.json")),
        state.join(format!("{SHELTER_MY}.json")),
    )
    .expect("copy the state");
    let err = failed(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));
    assert!(
        err.contains("is damaged or was edited")
            && err.contains("is not this log's signed checkpoint")
            && !err.contains("rewritten"),
        "{err}"
    );
}

/// Has `org`'s node ask its witnesses again every second while its log is quiet.
fn refresh_cosignatures_every_second(fed: &Federation, org: &str) {
    let config = &fed.org(org).config;
    let text = std::fs::read_to_string(config).unwrap().replace(
        "checkpoint_interval_ms = 200\n",
        "checkpoint_interval_ms = 200\ncosignature_refresh_s = 1\n",
    );
    std::fs::write(config, text).unwrap();
}

/// Waits (up to 30 s) until an auditor's `check` fails; returns what it said.
async fn wait_refused(fed: &Federation, state: &Path, check: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = audit(fed, state, check);
        if !out.status.success() {
            return failed(&out);
        }
        assert!(Instant::now() < deadline, "its witnesses' word never aged");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A node asks its witnesses again while its log does not grow, so an auditor can tell a
/// quiet log from a stuck one; a node whose stored log no longer matches what it signed
/// asks them for nothing more, and auditors see its witnesses' word age past their limit.
#[tokio::test]
async fn auditors_see_a_log_that_stopped_checkpointing_by_its_witnesses_age() {
    let fed = Federation::demo("audit-fresh");
    let state = fed.dir.join("auditor");
    refresh_cosignatures_every_second(&fed, SHELTER_MY);
    let _witnesses = (fed.start(SHELTER_KH), fed.start(EMBASSY));
    let mut my = fed.start(SHELTER_MY);
    some_events(&my, 2).await;
    wait_checkpointed(&my).await;
    wait_cosigned(&my, 2).await;
    let fresh = ["checkpoint", SHELTER_MY, "--max-age", "4s"];
    ok(&audit(&fed, &state, &fresh));
    // Quiet for longer than the auditor's limit: the witnesses still vouch, afresh.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let text = ok(&audit(&fed, &state, &fresh));
    assert!(text.contains("MET, "), "{text}");

    // Its stored tree no longer matches what it signed; it goes on writing.
    my.stop();
    sql(&my, &["UPDATE audit_hashes SET hash = zeroblob(32)"]).await;
    my.start();
    some_events(&my, 2).await;
    let err = wait_refused(&fed, &state, &fresh).await;
    assert!(
        err.contains("last vouched for its checkpoint") && err.contains("stopped checkpointing"),
        "{err}"
    );
    // The checkpoint itself is still the one its witnesses cosigned; without a limit on
    // age it verifies, and so do its entries.
    ok(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--max-age", "off"],
    ));
    let err = failed(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--max-age", "4s"],
    ));
    assert!(err.contains("longer than --max-age allows (4 s)"), "{err}");
    assert!(
        my.log()
            .contains("its witnesses are not asked to cosign until it is"),
        "{}",
        my.log()
    );
    for bad in ["4", "0s", "1.5h", "1w", "soon", "3651d", "h"] {
        let err = failed(&audit(
            &fed,
            &state,
            &["checkpoint", SHELTER_MY, "--max-age", bad],
        ));
        assert!(err.contains("--max-age"), "{bad}: {err}");
    }
}

/// A node whose stored log is shorter than the checkpoint it signed (its last entries
/// deleted, a database put back together wrongly) asks its witnesses for nothing more,
/// even before it has written as much again.
#[tokio::test]
async fn a_log_shorter_than_its_checkpoint_is_not_vouched_for_again() {
    let fed = Federation::demo("audit-shorter");
    let state = fed.dir.join("auditor");
    refresh_cosignatures_every_second(&fed, SHELTER_MY);
    let _witnesses = (fed.start(SHELTER_KH), fed.start(EMBASSY));
    let mut my = fed.start(SHELTER_MY);
    some_events(&my, 3).await;
    wait_checkpointed(&my).await;
    wait_cosigned(&my, 2).await;
    let size = scalar(&my, "SELECT COUNT(*) FROM audit_entries").await;
    my.stop();
    sql(
        &my,
        &[
            &format!("DELETE FROM audit_entries WHERE idx >= {}", size - 3),
            "DELETE FROM audit_hashes",
        ],
    )
    .await;
    rebuild_hashes(&my).await;
    my.start();
    let shorter = scalar(&my, "SELECT COUNT(*) FROM audit_entries").await;
    assert!(shorter < size, "{shorter} entries, {size} signed");
    let err = wait_refused(&fed, &state, &["checkpoint", SHELTER_MY, "--max-age", "4s"]).await;
    assert!(err.contains("last vouched for its checkpoint"), "{err}");
    assert!(
        my.log().contains("shorter than its last signed checkpoint"),
        "{}",
        my.log()
    );
}

/// A node serves the newest checkpoint a majority of its witnesses cosigned: one of them
/// down, its newer checkpoints lack the quorum, and auditors still verify what was.
#[tokio::test]
async fn a_node_serves_its_newest_checkpoint_its_witnesses_cosigned() {
    let fed = Federation::demo("audit-served");
    let state = fed.dir.join("auditor");
    let _kh = fed.start(SHELTER_KH);
    let mut embassy = fed.start(EMBASSY);
    let my = fed.start(SHELTER_MY);
    some_events(&my, 2).await;
    wait_checkpointed(&my).await;
    wait_cosigned(&my, 2).await;
    let cosigned = scalar(&my, "SELECT MAX(size) FROM checkpoints").await;
    embassy.stop();
    some_events(&my, 2).await;
    wait_checkpointed(&my).await;
    wait_cosigned(&my, 1).await;
    assert!(scalar(&my, "SELECT MAX(size) FROM checkpoints").await > cosigned);
    let out = ok(&audit(&fed, &state, &["checkpoint", SHELTER_MY]));
    assert!(
        out.contains(&format!("checkpoint of size {cosigned} ")),
        "{out}"
    );
}

/// The size of the checkpoint `corridor audit checkpoint` printed in `out`.
fn size_of(out: String) -> i64 {
    out.split("checkpoint of size ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<i64>().ok())
        .unwrap_or_else(|| panic!("{out}"))
}

/// The size of the checkpoint shelter-my serves, whoever cosigned it.
fn served_size(fed: &Federation, state: &Path) -> i64 {
    let out = audit(fed, state, &["checkpoint", SHELTER_MY, "--quorum", "0"]);
    size_of(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a node serves never goes back to an older checkpoint, even when the newest its
/// witnesses' majority cosigned is older than one it served (here that one's cosignatures
/// are lost from its tables): an auditor that pinned it would take the older for a fork.
#[tokio::test]
async fn a_node_never_serves_an_older_checkpoint_than_it_served() {
    let fed = Federation::demo("audit-served-floor");
    let state = fed.dir.join("auditor");
    let _witnesses = (fed.start(SHELTER_KH), fed.start(EMBASSY));
    let my = fed.start(SHELTER_MY);
    some_events(&my, 1).await;
    wait_checkpointed(&my).await;
    wait_cosigned(&my, 2).await;
    let older = size_of(ok(&audit(&fed, &state, &["checkpoint", SHELTER_MY])));
    some_events(&my, 1).await;
    wait_checkpointed(&my).await;
    wait_cosigned(&my, 2).await;
    let newer = size_of(ok(&audit(&fed, &state, &["checkpoint", SHELTER_MY])));
    assert!(newer > older);
    sql(
        &my,
        &[&format!("DELETE FROM cosignatures WHERE size >= {newer}")],
    )
    .await;
    let served = served_size(&fed, &state);
    assert_eq!(served, newer, "served {served} after {newer}");
}

/// A node whose witnesses never cosigned serves its newest checkpoint, as its log grows.
#[tokio::test]
async fn without_its_witnesses_a_node_serves_its_newest_checkpoint() {
    let fed = Federation::demo("audit-served-alone");
    let state = fed.dir.join("auditor");
    let my = fed.start(SHELTER_MY);
    let served = || served_size(&fed, &state);
    some_events(&my, 1).await;
    wait_checkpointed(&my).await;
    let first = served();
    some_events(&my, 1).await;
    wait_checkpointed(&my).await;
    let signed = scalar(&my, "SELECT MAX(size) FROM checkpoints").await;
    assert!(signed > first);
    assert_eq!(served(), signed, "the served checkpoint stayed behind");
}

/// A log's signing key may change: what an auditor pinned before still verifies under
/// the key it was signed with, and the new checkpoint, under the directory's new key,
/// must be consistent with it.
#[tokio::test]
async fn an_auditor_follows_a_log_across_a_rotation_of_its_signing_key() {
    let fed = Federation::demo("audit-rotation");
    let state = fed.dir.join("auditor");
    let mut my = fed.start(SHELTER_MY);
    some_events(&my, 2).await;
    wait_checkpointed(&my).await;
    ok(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));
    // As a state written before pins recorded their key: the next verify records it.
    let path = state.join(format!("{SHELTER_MY}.json"));
    let mut written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("state")).expect("json");
    for pin in written["checkpoints"].as_array_mut().expect("pins") {
        pin.as_object_mut()
            .expect("pin")
            .remove("key")
            .expect("a key");
    }
    std::fs::write(&path, serde_json::to_vec(&written).expect("json")).expect("state");
    ok(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));

    my.stop();
    let new_key = corridor::SigningKey::from_seed(&[43; 32]).expect("key");
    rotate_signing_key(&fed, SHELTER_MY, &new_key, 2);
    my.start();
    some_events(&my, 1).await;
    wait_checkpointed(&my).await;
    let out = ok(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));
    assert!(
        out.contains("consistent with 1 checkpoint(s) verified before"),
        "{out}"
    );
    // Pinned under the key it was signed with: the state names both keys now.
    let pinned = std::fs::read_to_string(state.join(format!("{SHELTER_MY}.json"))).expect("state");
    let keys: std::collections::BTreeSet<&str> = pinned
        .split("\"key\":\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert_eq!(keys.len(), 2, "{pinned}");
}

/// The size a checkpoint claims is the audited node's word: beyond what the auditor
/// agreed to hold in memory, nothing is fetched and the auditor says how to go on.
#[tokio::test]
async fn an_auditor_fetches_no_more_entries_than_it_agreed_to_hold() {
    let fed = Federation::demo("audit-max-entries");
    let state = fed.dir.join("auditor");
    let my = fed.start(SHELTER_MY);
    some_events(&my, 2).await;
    wait_checkpointed(&my).await;
    let err = failed(&audit(
        &fed,
        &state,
        &["--max-entries", "2", "verify", SHELTER_MY, "--quorum", "0"],
    ));
    assert!(
        err.contains("more than this auditor fetches (--max-entries 2)"),
        "{err}"
    );
    assert!(!state.join(format!("{SHELTER_MY}.json")).exists());
    ok(&audit(
        &fed,
        &state,
        &["verify", SHELTER_MY, "--quorum", "0"],
    ));
}

/// A member that works cases as well as auditing (here a shelter that is also an
/// auditor) reads checkpoints and proofs, not entries: it could follow the people it
/// received through every log it reads.
#[tokio::test]
async fn an_auditor_that_works_cases_reads_no_entries() {
    use corridor_proto::v1 as pb;
    use corridor_proto::v1::audit_client::AuditClient;
    let orgs: Vec<_> = corridor_cli::devpki::demo_orgs()
        .into_iter()
        .map(|mut spec| {
            if spec.id.as_str() == SHELTER_KH {
                spec.roles.push(corridor::Role::Auditor);
            }
            spec
        })
        .collect();
    let fed = Federation::with_orgs("audit-working", &orgs);
    let my = fed.start(SHELTER_MY);
    some_events(&my, 1).await;
    wait_checkpointed(&my).await;
    let channel = fed
        .federation_channel(Some(fed.org(SHELTER_KH)), &fed.dir, SHELTER_MY)
        .await
        .expect("the shelter connects");
    let mut audit = AuditClient::new(channel);
    audit
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .expect("checkpoints are hashes: it reads them");
    let refused = audit
        .get_entries(pb::GetEntriesRequest { start: 0, end: 1 })
        .await
        .expect_err("no entries for a member that works cases");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("works cases beside its auditor role"),
        "{refused:?}"
    );
}
