//! Test harness: a development federation on loopback with real `corridor-node`
//! processes, clients for their local and federation APIs, and helpers to build
//! envelopes by hand (as a misbehaving or malicious member would).
//!
//! The node binary is the one cargo built for this workspace (`target/<profile>/
//! corridor-node`); `cargo test --workspace` builds it before any test runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corridor::{Directory, OrgId, SealingPublicKey, SigningKey};
use corridor_cli::devpki::{self, GeneratedOrg, OrgSpec, Ports};
use corridor_proto::v1 as pb;
use corridor_proto::v1::audit_client::AuditClient;
use corridor_proto::v1::caseworker_client::CaseworkerClient;
use corridor_proto::v1::federation_client::FederationClient;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A workspace binary built by cargo next to this test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace` (or `cargo build --workspace`) first",
        path.display()
    );
    path
}

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn unique_dir(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!(
        "corridor-test-{tag}-{}-{n}-{}",
        std::process::id(),
        corridor_node::node::now_ms()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A development federation: PKI, directory and node configurations on disk.
pub struct Federation {
    pub dir: PathBuf,
    pub orgs: Vec<GeneratedOrg>,
    pub directory: Directory,
}

pub const SHELTER_MY: &str = "shelter-my";
pub const SHELTER_KH: &str = "shelter-kh";
pub const EMBASSY: &str = "kh-embassy-kl";

impl Federation {
    /// The demo's three orgs, with fresh ports.
    pub fn demo(tag: &str) -> Self {
        Self::with_orgs(tag, &devpki::demo_orgs())
    }

    pub fn with_orgs(tag: &str, orgs: &[OrgSpec]) -> Self {
        let dir = unique_dir(tag);
        let ports: Vec<Ports> = free_ports(orgs.len() * 2)
            .chunks(2)
            .map(|p| Ports {
                federation: p[0],
                local: p[1],
            })
            .collect();
        let orgs = devpki::generate(&dir, tag, orgs, &ports).expect("dev PKI");
        let directory = Directory::from_toml(
            &std::fs::read_to_string(dir.join("directory.toml")).expect("directory file"),
        )
        .expect("valid directory");
        Self {
            dir,
            orgs,
            directory,
        }
    }

    pub fn org(&self, id: &str) -> &GeneratedOrg {
        self.orgs
            .iter()
            .find(|o| o.spec.id.as_str() == id)
            .unwrap_or_else(|| panic!("no org {id}"))
    }

    /// Starts the node of `id` and waits until it serves.
    pub fn start(&self, id: &str) -> TestNode {
        let org = self.org(id).clone();
        let token = admin_token(&org.config);
        let mut node = TestNode {
            org,
            token,
            child: None,
        };
        node.start();
        node
    }

    pub fn signing_key(&self, id: &str) -> SigningKey {
        corridor_node::keys::load_signing_key(&self.org(id).dir.join("signing.key"))
            .expect("signing key")
    }

    pub fn sealing_public_key(&self, id: &str) -> SealingPublicKey {
        self.directory
            .get(&OrgId::new(id).expect("org id"))
            .expect("member")
            .sealing_key
            .clone()
    }

    /// A federation client that presents `as_org`'s certificate (or none) to `to`'s node.
    pub async fn federation_client(
        &self,
        as_org: Option<&GeneratedOrg>,
        ca_dir: &Path,
        to: &str,
    ) -> Result<FederationClient<Channel>, tonic::transport::Error> {
        let channel = self.federation_channel(as_org, ca_dir, to).await?;
        Ok(FederationClient::new(channel).max_encoding_message_size(64 * 1024 * 1024))
    }

    /// A mutual-TLS channel to `to`'s federation listener presenting `as_org`'s
    /// certificate (or none), for any service served there.
    pub async fn federation_channel(
        &self,
        as_org: Option<&GeneratedOrg>,
        ca_dir: &Path,
        to: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        let ca = std::fs::read(ca_dir.join("ca.pem")).expect("CA file");
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(org) = as_org {
            let cert = std::fs::read(org.dir.join("tls.pem")).expect("cert");
            let key = std::fs::read(org.dir.join("tls.key")).expect("key");
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!(
            "https://127.0.0.1:{}",
            self.org(to).ports.federation
        ))?
        .tls_config(tls)?
        .connect()
        .await
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn admin_token(config: &Path) -> String {
    issue_admin_token(config, "test-caseworker")
}

/// Runs `corridor-node create-admin-token` for `user` (the node may be running) and
/// returns the token.
pub fn issue_admin_token(config: &Path, user: &str) -> String {
    issue_token(config, user, "admin").unwrap_or_else(|e| panic!("create-admin-token: {e}"))
}

/// Runs `corridor-node create-token` for `user` with `role` (the node may be running):
/// the token, or what the command wrote to standard error.
pub fn issue_token(config: &Path, user: &str, role: &str) -> Result<String, String> {
    let out = Command::new(binary("corridor-node"))
        .arg("--config")
        .arg(config)
        .args(["create-token", "--user", user, "--role", role])
        .output()
        .expect("run corridor-node create-token");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout)
        .expect("token")
        .trim()
        .to_owned())
}

/// A running `corridor-node` process.
pub struct TestNode {
    pub org: GeneratedOrg,
    pub token: String,
    child: Option<Child>,
}

impl TestNode {
    pub fn log_path(&self) -> PathBuf {
        self.org.dir.join("node.log")
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let logged_before = log.metadata().map_or(0, |m| m.len());
        let child = Command::new(binary("corridor-node"))
            .arg("--config")
            .arg(&self.org.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn corridor-node");
        self.child = Some(child);
        self.wait_serving(logged_before);
    }

    /// Waits until this start of the node says it serves (in its log, after
    /// `logged_before` bytes) and its local port answers. The port alone could be
    /// another process's: ports are picked free, then released until the node binds them.
    fn wait_serving(&mut self, logged_before: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = format!("127.0.0.1:{}", self.org.ports.local);
        let log_path = self.log_path();
        let says_serving = || {
            std::fs::read(&log_path).is_ok_and(|log| {
                let this_start = log.get(logged_before as usize..).unwrap_or_default();
                String::from_utf8_lossy(this_start).contains("corridor-node serving")
            })
        };
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "node {} exited at start ({status}):\n{}",
                    self.org.spec.id,
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            // The local listener is bound only after everything else has loaded.
            if says_serving() && std::net::TcpStream::connect(&addr).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not start",
                self.org.spec.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process without warning (SIGKILL), as a crash or power cut would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the process to stop (SIGTERM) and waits for it; fails the test if it has not
    /// stopped within 10 s (its grace for open connections is 5 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "node {} did not stop within 10 s of SIGTERM:\n{}",
                self.org.spec.id,
                self.log()
            );
        }
    }

    pub fn local_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.org.ports.local)
    }

    pub async fn client(&self) -> Caseworker {
        self.client_with(&self.token).await
    }

    /// A client of the local API that presents `token`.
    pub async fn client_with(&self, token: &str) -> Caseworker {
        CaseworkerClient::with_interceptor(self.local_channel().await, bearer(token))
    }

    /// A client of the audit log on the local API that presents `token`.
    pub async fn local_audit_client(&self, token: &str) -> LocalAudit {
        AuditClient::with_interceptor(self.local_channel().await, bearer(token))
    }

    async fn local_channel(&self) -> Channel {
        Endpoint::from_shared(self.local_url())
            .expect("url")
            .connect()
            .await
            .expect("connect to local API")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

fn bearer(token: &str) -> Bearer {
    Bearer(format!("Bearer {token}").parse().expect("token"))
}

pub type Caseworker =
    CaseworkerClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

pub type LocalAudit = AuditClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// Opens a case with no consent yet; returns its id.
pub async fn new_case(client: &mut Caseworker) -> String {
    client
        .create_case(pb::CreateCaseRequest {
            label: "test".into(),
        })
        .await
        .expect("create case")
        .into_inner()
        .case_id
}

/// Opens a case with consent for `recipients` and `purposes`, covering every field the
/// purposes allow; returns (case id, consent id).
pub async fn case_with_consent_to(
    client: &mut Caseworker,
    recipients: &[&str],
    purposes: &[&str],
) -> (String, String) {
    let case_id = new_case(client).await;
    let consent_id = consent_to(client, &case_id, recipients, purposes).await;
    (case_id, consent_id)
}

/// Records consent for case `case_id`, `recipients` and `purposes`, covering every field
/// the purposes allow, for a day; returns the consent id.
pub async fn consent_to(
    client: &mut Caseworker,
    case_id: &str,
    recipients: &[&str],
    purposes: &[&str],
) -> String {
    client
        .record_consent(consent_request(
            case_id,
            pb::ConsentScope {
                purposes: purposes.iter().map(|p| p.to_string()).collect(),
                recipient_orgs: recipients.iter().map(|r| r.to_string()).collect(),
                fields: fields_allowed_for(purposes).into_iter().collect(),
                expires_at_ms: corridor_node::node::now_ms() + 30 * 86_400_000,
                ..Default::default()
            },
        ))
        .await
        .expect("record consent")
        .into_inner()
        .consent_id
}

/// Adds `settings` (lines of `key = value`) to the `[federation]` section of `org`'s
/// configuration, for its next start.
pub fn add_federation_settings(fed: &Federation, org: &str, settings: &str) {
    let config = &fed.org(org).config;
    let text = std::fs::read_to_string(config).expect("config");
    let changed = text.replacen(
        "key = \"tls.key\"\n",
        &format!("key = \"tls.key\"\n{settings}"),
        1,
    );
    assert!(
        changed.contains(settings),
        "no [federation] key line: {text}"
    );
    std::fs::write(config, changed).expect("config");
}

/// Every field `purposes` allow, by name.
pub fn fields_allowed_for(purposes: &[&str]) -> std::collections::BTreeSet<String> {
    let mut fields = std::collections::BTreeSet::new();
    for p in purposes {
        let profile = corridor::profile::profile(corridor::Purpose::parse(p).expect("purpose"));
        fields.extend(
            profile
                .required
                .iter()
                .chain(profile.optional)
                .map(|f| f.as_str().to_owned()),
        );
    }
    fields
}

/// A request to record `scope` for a case, as the person gave it, in writing.
pub fn consent_request(case_id: &str, scope: pb::ConsentScope) -> pb::RecordConsentRequest {
    pb::RecordConsentRequest {
        case_id: case_id.to_owned(),
        scope: Some(scope),
        given_by: "person".into(),
        method: "written".into(),
        ..Default::default()
    }
}

/// The scope of a consent as its node holds it now.
pub async fn consent_scope(client: &mut Caseworker, consent_id: &str) -> pb::ConsentScope {
    client
        .get_consent_status(pb::ConsentRequest {
            consent_id: consent_id.to_owned(),
        })
        .await
        .expect("consent")
        .into_inner()
        .consent
        .and_then(|c| c.scope)
        .expect("scope")
}

/// Opens a case with consent for one recipient and purpose; returns the case id.
pub async fn case_with_consent(client: &mut Caseworker, recipient: &str, purpose: &str) -> String {
    case_with_consent_to(client, &[recipient], &[purpose])
        .await
        .0
}

/// The fields a purpose requires, with test values.
pub fn required_fields(purpose: &str) -> std::collections::HashMap<String, String> {
    corridor::profile::profile(corridor::Purpose::parse(purpose).expect("purpose"))
        .required
        .iter()
        .map(|f| (f.as_str().to_owned(), sample_value(*f)))
        .collect()
}

/// A value of `field` that its format allows.
pub fn sample_value(field: corridor::Field) -> String {
    use corridor::Field;
    match field {
        Field::AgeBand => "25-29".into(),
        Field::DateOfBirth => "1999-04-12".into(),
        Field::Nationality => "KH".into(),
        other => format!("test {other}"),
    }
}

/// A referral request carrying exactly the fields `purpose` requires.
pub fn referral(case_id: &str, to: &str, purpose: &str) -> pb::SendReferralRequest {
    pb::SendReferralRequest {
        case_id: case_id.into(),
        recipient: to.into(),
        purpose: purpose.into(),
        fields: required_fields(purpose),
        consent_id: String::new(),
        wait: false,
        request_id: String::new(),
    }
}

/// An org for tests that need a fourth member: a transit NGO in Thailand.
pub const NGO_TH: &str = "ngo-th";

impl Federation {
    /// The demo's three orgs and a transit NGO in Thailand.
    pub fn four(tag: &str) -> Self {
        let mut orgs = devpki::demo_orgs();
        orgs.push(
            "ngo-th:TH:ngo:Transit NGO, Bangkok (test)"
                .parse()
                .expect("org spec"),
        );
        Self::with_orgs(tag, &orgs)
    }
}

/// Polls until the sent referral leaves the `queued` state, and returns its status.
pub async fn wait_final(
    client: &mut Caseworker,
    referral_id: &str,
    timeout: Duration,
) -> pb::GetReferralStatusResponse {
    let deadline = Instant::now() + timeout;
    loop {
        let status = client
            .get_referral_status(pb::GetReferralStatusRequest {
                referral_id: referral_id.into(),
            })
            .await
            .expect("status")
            .into_inner();
        if status.state != "queued" {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "referral {referral_id} still queued after {timeout:?} (attempts {}, last error {})",
            status.attempts,
            status.last_error
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends a referral of `case_id` to `to` for `purpose` and waits for its receipt;
/// asserts that it was delivered and returns the answer.
pub async fn send_delivered(
    client: &mut Caseworker,
    case_id: &str,
    to: &str,
    purpose: &str,
) -> pb::SendReferralResponse {
    let sent = client
        .send_referral(pb::SendReferralRequest {
            wait: true,
            ..referral(case_id, to, purpose)
        })
        .await
        .expect("send")
        .into_inner();
    assert_eq!(sent.state, "delivered");
    sent
}

pub async fn inbox(client: &mut Caseworker) -> Vec<pb::InboxItem> {
    client
        .list_inbox(pb::ListInboxRequest::default())
        .await
        .expect("inbox")
        .into_inner()
        .items
}

/// The consent and case reference `valid_payload` travels under.
pub const TEST_CONSENT_ID: &str = "consent-00000000000000000000000000000e57";
pub const TEST_CASE_REF: &str = "ref-00000000000000000000000000000e57";

/// A referral payload for `recipient` carrying exactly the fields reintegration
/// requires, with a consent receipt for them signed by `sender` — what an honest sender
/// would seal. Tests change it to play a dishonest one.
pub fn valid_payload(fed: &Federation, sender: &str, recipient: &str) -> pb::ReferralPayload {
    use corridor::consent::{ConsentReceipt, ConsentScope, Restrictions};
    let purpose = corridor::Purpose::Reintegration;
    let required = corridor::profile::profile(purpose).required;
    let now = corridor_node::node::now_ms();
    let scope = ConsentScope {
        id: TEST_CONSENT_ID.into(),
        purposes: [purpose].into(),
        recipient_orgs: [OrgId::new(recipient).expect("org")].into(),
        recipient_roles: Default::default(),
        fields: required.iter().copied().collect(),
        restrictions: Restrictions::default(),
        expires_at_ms: now + 3_600_000,
        withdrawn_at_ms: None,
    };
    let receipt = ConsentReceipt::issue(
        &scope,
        TEST_CONSENT_ID.into(),
        OrgId::new(sender).expect("org"),
        OrgId::new(recipient).expect("org"),
        TEST_CASE_REF.into(),
        now,
        &fed.signing_key(sender),
    );
    pb::ReferralPayload {
        case_ref: TEST_CASE_REF.into(),
        purpose: purpose.as_str().into(),
        fields: required
            .iter()
            .map(|f| pb::FieldValue {
                field: corridor_node::convert::field_to_pb(*f),
                value: sample_value(*f),
            })
            .collect(),
        consent_receipt: Some(corridor_node::convert::consent_receipt_to_pb(&receipt)),
    }
}

/// A connection to a node's database, for tests that look at or change what it stored.
pub async fn open_db(node: &TestNode, read_only: bool) -> sqlx::SqliteConnection {
    use sqlx::ConnectOptions as _;
    sqlx::sqlite::SqliteConnectOptions::new()
        .filename(node.org.dir.join("data").join("corridor.db"))
        .read_only(read_only)
        .connect()
        .await
        .expect("open database")
}

/// The payloads of what `sender` queued for `recipient` of `kind` (outbox kind number),
/// opened with the recipient's sealing key as the recipient would: what it is told.
pub async fn queued_payloads(
    fed: &Federation,
    sender: &TestNode,
    recipient: &str,
    kind: i64,
) -> Vec<Vec<u8>> {
    use prost::Message as _;
    let envelopes: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT envelope FROM outbox WHERE recipient = $1 AND kind = $2 ORDER BY created_at_ms",
    )
    .bind(recipient)
    .bind(kind)
    .fetch_all(&mut open_db(sender, true).await)
    .await
    .expect("queued envelopes");
    let key = corridor_node::keys::load_sealing_key(&fed.org(recipient).dir.join("sealing.key"))
        .expect("sealing key");
    envelopes
        .iter()
        .map(|bytes| {
            let envelope = pb::Envelope::decode(bytes.as_slice()).expect("stored envelope");
            let envelope = corridor_node::convert::envelope_from_pb(envelope).expect("envelope");
            let sender_id = envelope.header.sender.clone();
            let sender_key = fed.directory.get(&sender_id).expect("sender").signing_key;
            envelope
                .verify(
                    &OrgId::new(recipient).expect("org id"),
                    &sender_id,
                    &sender_key,
                    corridor_node::node::now_ms(),
                )
                .expect("verifies")
                .open(&key)
                .expect("opens")
                .payload
        })
        .collect()
}

/// Runs `statements` on a node's database (stopped, or between its own writes).
pub async fn sql(node: &TestNode, statements: &[&str]) {
    let mut conn = open_db(node, false).await;
    for s in statements {
        sqlx::query(sqlx::AssertSqlSafe(s.to_string()))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

/// The first column of the first row `query` gives on a node's database.
pub async fn scalar(node: &TestNode, query: &str) -> i64 {
    use sqlx::Row as _;
    let mut conn = open_db(node, true).await;
    sqlx::query(sqlx::AssertSqlSafe(query.to_string()))
        .fetch_one(&mut conn)
        .await
        .expect("query")
        .get(0)
}

/// `directory` (the text of a `directory.toml`) with its serial set to `serial`.
pub fn with_serial(directory: &str, serial: u64) -> String {
    let start = directory.find("serial = ").expect("serial line");
    let end = start + directory[start..].find('\n').expect("end of line");
    format!(
        "{}serial = {serial}{}",
        &directory[..start],
        &directory[end..]
    )
}

/// Installs `directory` as the federation's directory, signed with two of the governance
/// board's three keys. Nodes take it when they start.
pub fn publish_directory(fed: &Federation, directory: &str) {
    std::fs::write(fed.dir.join("directory.toml"), directory).expect("directory");
    let signatures: String = [1, 2]
        .iter()
        .map(|i| {
            let key = corridor_node::keys::load_signing_key(
                &fed.dir.join("governance").join(format!("board-{i}.key")),
            )
            .expect("board key");
            corridor::directory::signature_line(directory.as_bytes(), &key) + "\n"
        })
        .collect();
    std::fs::write(fed.dir.join("directory.toml.sig"), signatures).expect("signatures");
}

/// Gives `org` a new signing key: its key file replaced, and the directory listing the
/// new key, published with `serial`. Nodes take both when they start.
pub fn rotate_signing_key(fed: &Federation, org: &str, new_key: &SigningKey, serial: u64) {
    let old_key = fed.signing_key(org);
    let key_file = fed.org(org).dir.join("signing.key");
    std::fs::remove_file(&key_file).expect("old key file");
    corridor_node::keys::write_secret_file(&key_file, new_key.to_base64().as_bytes())
        .expect("new key file");
    let directory = std::fs::read_to_string(fed.dir.join("directory.toml")).expect("directory");
    let rotated = directory.replace(
        &old_key.verifying_key().to_base64(),
        &new_key.verifying_key().to_base64(),
    );
    assert_ne!(rotated, directory, "the directory lists the old key");
    publish_directory(fed, &with_serial(&rotated, serial));
}
