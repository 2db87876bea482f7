//! `corridor demo`: a local federation of three nodes, each its own process with its own
//! SQLite file, walking a consent-gated referral from a shelter in Malaysia to a
//! reintegration shelter in Cambodia, and a nationality-verification request to the
//! Cambodian embassy in Kuala Lumpur.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use corridor::{Directory, MessageId, OrgId};
use corridor_proto::v1 as pb;
use tokio::process::{Child, Command};

use crate::client::{self, Client, explain};
use crate::commands::format_time;
use crate::devpki::{self, GeneratedOrg, Ports};
use crate::terminal::escape_controls;
use crate::{errln, out, outln};

pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub keep_running: bool,
}

struct RunningNode {
    org: GeneratedOrg,
    child: Child,
    token: String,
}

fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    // Hold every listener until all are chosen so no port is handed out twice.
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find free local ports: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find free local ports: {e}"))
}

fn exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot locate the corridor binary: {e}"))
}

async fn create_token(config: &Path) -> Result<String, String> {
    let out = Command::new(exe()?)
        .arg("node")
        .arg("--config")
        .arg(config)
        .args([
            "create-token",
            "--user",
            "demo-caseworker",
            "--role",
            "caseworker",
        ])
        // A demo stopped meanwhile must not leave it writing into a removed directory.
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run the node to create a token: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "creating a token failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn start(org: &GeneratedOrg) -> Result<Child, String> {
    let log_path = org.dir.join("node.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    Command::new(exe()?)
        .arg("node")
        .arg("--config")
        .arg(&org.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the node of {}: {e}", org.spec.id))
}

async fn wait_serving(node: &mut RunningNode) -> Result<(), String> {
    let url = format!("http://127.0.0.1:{}", node.org.ports.local);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = node.child.try_wait() {
            return Err(format!(
                "the node of {} exited ({status}); see {}",
                node.org.spec.id,
                node.org.dir.join("node.log").display()
            ));
        }
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| e.to_string())?
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            if let Ok(r) = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the node of {} did not start in time",
                node.org.spec.id
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks a node to stop (SIGTERM) and waits; kills it if it does not stop in time.
async fn stop(node: &mut RunningNode) {
    if let Some(pid) = node.child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(10), node.child.wait())
        .await
        .is_err()
    {
        let _ = node.child.kill().await;
    }
}

async fn wait_delivered(
    client: &mut Client,
    id: &str,
) -> Result<pb::GetReferralStatusResponse, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client
            .get_referral_status(pb::GetReferralStatusRequest {
                referral_id: id.to_owned(),
            })
            .await
            .map_err(|s| explain(&s))?
            .into_inner();
        match status.state.as_str() {
            "delivered" => return Ok(status),
            "queued" if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            state => {
                return Err(format!(
                    "referral {id} ended {state}: {}",
                    status.last_error
                ));
            }
        }
    }
}

const DEMO_REINTEGRATION: [(&str, &str); 5] = [
    ("preferred_name", "Srey (demo)"),
    ("age_band", "25-29"),
    ("languages", "Khmer"),
    ("needs", "safe accommodation, vocational training"),
    ("arrival_window", "next month"),
];

const NATIONALITY: [(&str, &str); 4] = [
    ("legal_given_name", "Srey Mom (demo)"),
    ("legal_family_name", "Chan (demo)"),
    ("date_of_birth", "1999-04-12"),
    ("nationality", "KH"),
];

fn fields(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Waits until every recipient of a consent has answered its withdrawal or narrowing
/// (`state` "purged" or "narrowed").
async fn wait_answered(
    client: &mut Client,
    consent_id: &str,
    state: &str,
) -> Result<pb::ConsentStatusResponse, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client
            .get_consent_status(pb::ConsentRequest {
                consent_id: consent_id.to_owned(),
            })
            .await
            .map_err(|s| explain(&s))?
            .into_inner();
        if status.recipients.iter().all(|r| r.state == state) {
            return Ok(status);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "consent {consent_id}: not every recipient has answered (expected {state})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn step(n: u32, text: &str) {
    outln!("\n{n}. {text}");
}

/// Resolves when the demo is asked to stop: Ctrl-C, SIGTERM, or its terminal closing
/// (SIGHUP). Each must stop the nodes it started, which would otherwise outlive it.
async fn asked_to_stop() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hangup) = signal(SignalKind::hangup()) {
            tokio::select! {
                _ = hangup.recv() => crate::terminal::terminal_closed(),
                _ = corridor_node::server::termination_signal() => {}
            }
            return;
        }
    }
    corridor_node::server::termination_signal().await
}

pub async fn run(options: DemoOptions) -> Result<(), String> {
    let started = Instant::now();
    // Only a directory the demo chose for itself is removed at the end: one the user
    // named holds what they asked to keep.
    let temporary = options.dir.is_none();
    let dir = match options.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("corridor-demo-{}", std::process::id())),
    };
    let orgs = devpki::demo_orgs();
    // The auditor is an identity, not a node.
    let runs_node = |o: &GeneratedOrg| !o.spec.roles.iter().all(|r| *r == corridor::Role::Auditor);
    let ports: Vec<Ports> = free_ports(orgs.len() * 2)?
        .chunks(2)
        .map(|p| Ports {
            federation: p[0],
            local: p[1],
        })
        .collect();
    outln!(
        "Corridor demo: a local federation of {} organisations",
        orgs.len()
    );
    outln!(
        "Writing a development PKI, keys, directory and configuration to {}",
        dir.display()
    );
    let generated = devpki::generate(&dir, "corridor-demo", &orgs, &ports)?;

    let auditor = generated
        .iter()
        .find(|o| !runs_node(o))
        .cloned()
        .ok_or("the demo needs an auditor")?;
    let mut nodes = Vec::new();
    let mut interrupted = false;
    // Once the federation is kept running, being asked to stop is how it ends.
    let serving = std::cell::Cell::new(false);
    let outcome = tokio::select! {
        outcome = async {
            for org in generated.into_iter().filter(runs_node) {
                let token = create_token(&org.config).await?;
                let child = start(&org).await?;
                nodes.push(RunningNode { org, child, token });
            }
            walk(&dir, &mut nodes).await?;
            audit(&dir, &auditor, &nodes).await?;
            if options.keep_running {
                serving.set(true);
                keep_running(&dir, temporary, &mut nodes).await?;
            }
            Ok(())
        } => outcome,
        _ = asked_to_stop() => {
            if serving.get() {
                Ok(())
            } else {
                interrupted = true;
                Err("the demo was stopped before it finished".to_owned())
            }
        }
    };
    for node in &mut nodes {
        stop(node).await;
    }
    // A node started again by hand, as the report of a stopped one suggests, is not the
    // demo's to stop; nor may its files go from under it.
    let started_by_hand: Vec<String> = nodes
        .iter()
        .filter(|n| accepts_connections(n.org.ports.local))
        .map(|n| n.org.spec.id.to_string())
        .collect();
    if !started_by_hand.is_empty() {
        outln!(
            "\n{} still running, started again outside the demo: stop it with Ctrl-C where you started it. Its files stay in {}.",
            started_by_hand.join(" and "),
            dir.display()
        );
    }
    let all = if started_by_hand.is_empty() {
        "All nodes stopped."
    } else {
        "Every node the demo started stopped."
    };
    match &outcome {
        Ok(()) => outln!(
            "\n{all} Demo finished in {:.1} s.",
            started.elapsed().as_secs_f64()
        ),
        Err(_) if interrupted => outln!("\n{all}"),
        Err(_) => outln!("\nNode logs are kept in {}", dir.display()),
    }
    if temporary && started_by_hand.is_empty() && (outcome.is_ok() || interrupted) {
        let _ = std::fs::remove_dir_all(&dir);
    } else if outcome.is_ok() {
        outln!(
            "Configuration, keys, databases and logs are kept in {}",
            dir.display()
        );
    }
    outcome
}

/// The auditor verifies every node's log and cross-checks every pair, with the same
/// commands an auditor runs by hand.
async fn audit(dir: &Path, auditor: &GeneratedOrg, nodes: &[RunningNode]) -> Result<(), String> {
    step(
        11,
        "An auditor, who never sees personal data, verifies every node's signed audit log and cross-checks what each says it sent against what the other logged as received:",
    );
    // Let the last events reach a checkpoint and its witnesses' cosignatures.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let state = dir.join("auditor-state");
    let args = |command: crate::audit::AuditCommand| crate::audit::AuditArgs {
        identity: Some(auditor.dir.clone()),
        ca: None,
        directory: None,
        governance: None,
        state: state.clone(),
        max_entries: crate::audit::DEFAULT_MAX_ENTRIES,
        command,
    };
    let policy = crate::audit::Policy {
        witnesses: Vec::new(),
        quorum: None,
    };
    // As an auditor's default: the quorum vouched within a day.
    let fresh = crate::audit::Freshness {
        max_age: crate::audit::MaxAge(Some(24 * 3600)),
    };
    for n in nodes {
        let org = n.org.spec.id.to_string();
        out!("   ");
        crate::audit::run(
            args(crate::audit::AuditCommand::Checkpoint {
                org: org.clone(),
                policy: policy.clone(),
                fresh: fresh.clone(),
            }),
            crate::commands::Output::Text,
        )
        .await?;
        out!("   ");
        crate::audit::run(
            args(crate::audit::AuditCommand::Verify {
                org,
                policy: policy.clone(),
                fresh: fresh.clone(),
            }),
            crate::commands::Output::Text,
        )
        .await?;
    }
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            out!("   ");
            crate::audit::run(
                args(crate::audit::AuditCommand::CrossCheck {
                    a: a.org.spec.id.to_string(),
                    b: b.org.spec.id.to_string(),
                    policy: policy.clone(),
                    fresh: fresh.clone(),
                }),
                crate::commands::Output::Text,
            )
            .await?;
        }
    }
    Ok(())
}

async fn keep_running(
    dir: &Path,
    temporary: bool,
    nodes: &mut [RunningNode],
) -> Result<(), String> {
    outln!("\nThe nodes keep running. Use the CLI against any of them, for example:");
    for n in nodes.iter() {
        outln!(
            "\n  # {} ({})\n  export CORRIDOR_NODE=http://127.0.0.1:{} CORRIDOR_TOKEN={}\n  corridor inbox",
            n.org.spec.name,
            n.org.spec.id,
            n.org.ports.local,
            n.token
        );
    }
    outln!(
        "\nConfiguration, keys and logs are in {}{}. Press Ctrl-C to stop the federation.",
        dir.display(),
        if temporary {
            " (removed when the federation stops)"
        } else {
            ""
        }
    );
    // A node that stops while the federation runs is reported at once: otherwise the
    // federation would look whole while every call to that node fails. The others keep
    // running (stopping one is how to watch delivery wait for it).
    let mut every = tokio::time::interval(Duration::from_millis(250));
    let mut stopped = vec![false; nodes.len()];
    loop {
        every.tick().await;
        for (node, stopped) in nodes.iter_mut().zip(stopped.iter_mut()) {
            if *stopped {
                continue;
            }
            let how = match node.child.try_wait() {
                Ok(None) => continue,
                Ok(Some(status)) => status.to_string(),
                Err(e) => format!("cannot be waited for: {e}"),
            };
            *stopped = true;
            errln!(
                "corridor: the node of {} stopped ({how}); its log is {}. The other nodes keep running; start it again with: corridor node --config {} (the demo does not stop a node started by hand)",
                node.org.spec.id,
                node.org.dir.join("node.log").display(),
                node.org.config.display()
            );
        }
        if stopped.iter().all(|s| *s) {
            return Err("every node of the federation stopped".into());
        }
    }
}

/// Whether something accepts connections on loopback `port`.
fn accepts_connections(port: u16) -> bool {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
}

async fn walk(dir: &Path, nodes: &mut [RunningNode]) -> Result<(), String> {
    for node in nodes.iter_mut() {
        wait_serving(node).await?;
        outln!(
            "  started {:<14} {:<48} federation 127.0.0.1:{}  local API 127.0.0.1:{}",
            node.org.spec.id,
            node.org.spec.name,
            node.org.ports.federation,
            node.org.ports.local
        );
    }
    let directory = Directory::from_toml(
        &std::fs::read_to_string(dir.join("directory.toml"))
            .map_err(|e| format!("cannot read the directory: {e}"))?,
    )
    .map_err(|e| e.to_string())?;
    let [shelter_my, shelter_kh, embassy] = nodes else {
        return Err("the demo needs exactly three nodes".into());
    };
    let url = |n: &RunningNode| format!("http://127.0.0.1:{}", n.org.ports.local);
    let mut my = client::connect(&url(shelter_my), &shelter_my.token).await?;
    let mut kh = client::connect(&url(shelter_kh), &shelter_kh.token).await?;
    let mut emb = client::connect(&url(embassy), &embassy.token).await?;
    let kh_id = shelter_kh.org.spec.id.to_string();
    let emb_id = embassy.org.spec.id.to_string();

    step(
        1,
        "A caseworker at the shelter in Malaysia opens a case for a woman who wants to go home to Cambodia.",
    );
    let case_id = my
        .create_case(pb::CreateCaseRequest {
            label: "demo case".into(),
        })
        .await
        .map_err(|s| explain(&s))?
        .into_inner()
        .case_id;
    outln!("   case {case_id}");

    step(
        2,
        "Through a Khmer interpreter she consents: the reintegration shelter in Cambodia may receive six named fields, for reintegration, for 30 days.",
    );
    let reintegration_fields = [
        "preferred_name",
        "age_band",
        "languages",
        "needs",
        "arrival_window",
        "risk_flags",
    ];
    let consent = my
        .record_consent(pb::RecordConsentRequest {
            case_id: case_id.clone(),
            scope: Some(pb::ConsentScope {
                purposes: vec!["reintegration".into()],
                recipient_orgs: vec![kh_id.clone()],
                fields: reintegration_fields.iter().map(|f| f.to_string()).collect(),
                expires_at_ms: crate::commands::now_ms() + 30 * 86_400_000,
                ..Default::default()
            }),
            given_by: "person".into(),
            method: "interpreter".into(),
            language: "Khmer".into(),
            ..Default::default()
        })
        .await
        .map_err(|s| explain(&s))?
        .into_inner();
    outln!("   consent {}", consent.consent_id);

    step(
        3,
        "The caseworker tries to send her legal names and date of birth to the embassy for nationality verification. The gate refuses, before anything leaves:",
    );
    let refused = my
        .send_referral(pb::SendReferralRequest {
            case_id: case_id.clone(),
            recipient: emb_id.clone(),
            purpose: "nationality-verification".into(),
            fields: fields(&NATIONALITY),
            ..Default::default()
        })
        .await;
    match refused {
        Err(status) => outln!("   {}", escape_controls(status.message())),
        Ok(_) => return Err("the consent gate let through a referral without consent".into()),
    }

    step(
        4,
        "Adding her date of birth to the reintegration referral is refused too: not consented, and reintegration only needs an age band.",
    );
    let mut with_dob = fields(&DEMO_REINTEGRATION);
    with_dob.insert("date_of_birth".into(), "1999-04-12".into());
    match my
        .send_referral(pb::SendReferralRequest {
            case_id: case_id.clone(),
            recipient: kh_id.clone(),
            purpose: "reintegration".into(),
            fields: with_dob,
            ..Default::default()
        })
        .await
    {
        Err(status) => outln!("   {}", escape_controls(status.message())),
        Ok(_) => return Err("the consent gate let through a field without consent".into()),
    }

    step(
        5,
        "The consented referral is sealed to the recipient's key, signed by the shelter, with a signed consent receipt inside, and queued durably.",
    );
    let sent = my
        .send_referral(pb::SendReferralRequest {
            case_id: case_id.clone(),
            recipient: kh_id.clone(),
            purpose: "reintegration".into(),
            fields: fields(&DEMO_REINTEGRATION),
            ..Default::default()
        })
        .await
        .map_err(|s| explain(&s))?
        .into_inner();
    outln!("   referral {} {}", sent.referral_id, sent.state);
    let t0 = Instant::now();
    let status = wait_delivered(&mut my, &sent.referral_id).await?;
    outln!(
        "   delivered over mutual TLS after {} attempt(s), {:.0} ms after queueing; the recipient re-ran the consent gate on arrival",
        status.attempts,
        t0.elapsed().as_secs_f64() * 1000.0
    );

    step(
        6,
        "The reintegration shelter in Cambodia finds it in its inbox (stored encrypted under a per-case key):",
    );
    let inbox = kh
        .list_inbox(pb::ListInboxRequest::default())
        .await
        .map_err(|s| explain(&s))?
        .into_inner();
    for item in &inbox.items {
        outln!(
            "   {} from {} for {}, case ref {}",
            item.referral_id,
            item.sender,
            item.purpose,
            item.case_ref
        );
    }
    let shown = kh
        .get_referral(pb::GetReferralRequest {
            referral_id: sent.referral_id.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| explain(&s))?
        .into_inner();
    let mut shown_fields: Vec<_> = shown.fields.iter().collect();
    shown_fields.sort();
    for (k, v) in shown_fields {
        outln!("     {}: {}", escape_controls(k), escape_controls(v));
    }

    step(
        7,
        "The shelter in Malaysia holds the recipient's receipt; anyone with the directory can check it:",
    );
    let receipt = status.receipt.ok_or("delivered without a receipt")?;
    let parsed =
        corridor_node::convert::receipt_from_pb(receipt.clone()).map_err(|e| e.to_string())?;
    let kh_org = OrgId::new(&kh_id).map_err(|e| e.to_string())?;
    let my_org = shelter_my.org.spec.id.clone();
    let member = directory
        .get(&kh_org)
        .ok_or("recipient missing from directory")?;
    let message_id = MessageId::from_hex(&sent.referral_id).map_err(|e| e.to_string())?;
    parsed
        .verify(
            message_id,
            &parsed.envelope_digest,
            &my_org,
            &kh_org,
            &member.signing_key,
        )
        .map_err(|e| format!("receipt does not verify: {e}"))?;
    outln!(
        "   receipt signed by {} at {} for envelope {}: signature VERIFIED with the directory's key",
        receipt.recipient,
        format_time(receipt.received_at_ms),
        hex::encode(&receipt.envelope_digest)
    );

    step(
        8,
        "She then consents to the embassy, named, verifying her nationality; that request goes out.",
    );
    my.record_consent(pb::RecordConsentRequest {
        case_id: case_id.clone(),
        scope: Some(pb::ConsentScope {
            purposes: vec!["nationality-verification".into()],
            recipient_orgs: vec![emb_id.clone()],
            fields: NATIONALITY.iter().map(|(f, _)| f.to_string()).collect(),
            expires_at_ms: crate::commands::now_ms() + 14 * 86_400_000,
            ..Default::default()
        }),
        given_by: "person".into(),
        method: "interpreter".into(),
        language: "Khmer".into(),
        ..Default::default()
    })
    .await
    .map_err(|s| explain(&s))?;
    let to_embassy = my
        .send_referral(pb::SendReferralRequest {
            case_id: case_id.clone(),
            recipient: emb_id.clone(),
            purpose: "nationality-verification".into(),
            fields: fields(&NATIONALITY),
            ..Default::default()
        })
        .await
        .map_err(|s| explain(&s))?
        .into_inner();
    wait_delivered(&mut my, &to_embassy.referral_id).await?;
    let embassy_inbox = emb
        .list_inbox(pb::ListInboxRequest::default())
        .await
        .map_err(|s| explain(&s))?
        .into_inner();
    for item in &embassy_inbox.items {
        outln!(
            "   the embassy received {} for {}, case ref {}",
            item.referral_id,
            item.purpose,
            item.case_ref
        );
    }
    let kh_ref = inbox
        .items
        .first()
        .map(|i| i.case_ref.clone())
        .unwrap_or_default();
    let emb_ref = embassy_inbox
        .items
        .first()
        .map(|i| i.case_ref.clone())
        .unwrap_or_default();
    if kh_ref == emb_ref {
        return Err("two recipients saw the same case reference".into());
    }

    step(
        9,
        "She adds a restriction: no contact with her family. The narrowing reaches the shelter in Cambodia, which has nothing to cut but must honour it:",
    );
    let mut scope = my
        .get_consent_status(pb::ConsentRequest {
            consent_id: consent.consent_id.clone(),
        })
        .await
        .map_err(|s| explain(&s))?
        .into_inner()
        .consent
        .and_then(|c| c.scope)
        .ok_or("consent without a scope")?;
    scope.no_family_contact = true;
    my.narrow_consent(pb::NarrowConsentRequest {
        consent_id: consent.consent_id.clone(),
        scope: Some(scope),
        if_narrowed_at_ms: None,
    })
    .await
    .map_err(|s| explain(&s))?;
    let narrowed = wait_answered(&mut my, &consent.consent_id, "narrowed").await?;
    let confirmed = narrowed
        .recipients
        .iter()
        .any(|p| p.recipient == kh_id && p.terms_confirmation == "as-they-stand");
    if !confirmed {
        return Err("the recipient did not confirm the restriction".into());
    }
    let reread = kh
        .get_referral(pb::GetReferralRequest {
            referral_id: sent.referral_id.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| explain(&s))?
        .into_inner();
    if !reread.consent_no_family_contact {
        return Err("the restriction did not reach the recipient".into());
    }
    outln!(
        "   the shelter in Cambodia reads the referral again: restrictions: no contact with family (as narrowed {})",
        format_time(reread.consent_narrowed_at_ms)
    );
    outln!(
        "   its signed answer, verified and kept by the shelter in Malaysia, confirms that it applies the restriction"
    );

    step(
        10,
        "Later she withdraws her consent to the reintegration referral. The withdrawal reaches the shelter in Cambodia, which destroys the data and answers with a signed purge receipt:",
    );
    my.withdraw_consent(pb::ConsentRequest {
        consent_id: consent.consent_id.clone(),
    })
    .await
    .map_err(|s| explain(&s))?;
    let purge = wait_answered(&mut my, &consent.consent_id, "purged").await?;
    for p in &purge.recipients {
        if let Some(pr) = &p.purge_receipt {
            outln!(
                "   {} purged {} referral(s) at {}; purge receipt verified and kept",
                p.recipient,
                pr.purged_referrals.len(),
                format_time(pr.purged_at_ms),
            );
        }
    }
    match kh
        .get_referral(pb::GetReferralRequest {
            referral_id: sent.referral_id.clone(),
            ..Default::default()
        })
        .await
    {
        Err(status) => outln!(
            "   the shelter in Cambodia asked for the referral again: {}",
            escape_controls(status.message())
        ),
        Ok(_) => return Err("the referral is still readable after the purge".into()),
    }

    outln!("\nWhat happened:");
    outln!(
        "  - The person's consent decided what left the shelter: requests beyond it were refused at the"
    );
    outln!("    sender, naming every rule they broke, before any data moved.");
    outln!(
        "  - Each referral travelled sealed to its recipient (HPKE) and signed by the sender (Ed25519),"
    );
    outln!("    over mutual TLS between members of the federation directory.");
    outln!(
        "  - Each recipient stored it durably and answered with a signed receipt, which the sender verified."
    );
    outln!(
        "  - The two recipients know the case under different references ({kh_ref} and {emb_ref}),"
    );
    outln!("    so their records cannot be linked by reference.");
    outln!(
        "  - A restriction she added later reached the recipient holding her data, which confirmed in a"
    );
    outln!("    signed answer that it honours it.");
    outln!(
        "  - Withdrawal reached the recipient, which destroyed the data (its per-case key is gone) and"
    );
    outln!(
        "    proved it with a signed purge receipt that the shelter in Malaysia verified and keeps."
    );
    Ok(())
}
