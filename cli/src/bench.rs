//! `corridor bench`: how fast Corridor is on this machine, measured beside its own limits
//! in one run — the bare transport (tonic unary echo over mutual TLS, separate process),
//! the per-referral cryptography alone on one core, Corridor end to end between two node
//! processes, the audit log, and a node's footprint — printed as a table and one JSON line
//! with every figure and ratio.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use corridor::consent::ConsentScope;
use corridor::envelope::ENVELOPE_VERSION;
use corridor::{
    ConsentReceipt, Envelope, EnvelopeHeader, Field, MessageId, MessageKind, OrgId, Purpose,
    Receipt, SealingKey, SigningKey,
};
use corridor_proto::bench::EchoMessage;
use corridor_proto::bench::echo_client::EchoClient;
use corridor_proto::bench::echo_server::{Echo, EchoServer};
use corridor_proto::v1 as pb;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

use crate::client::{self, Client, explain};
use crate::devpki::{self, GeneratedOrg, OrgSpec, Ports};
use crate::files::{self, MAX_FILE_BYTES};
use crate::{errln, outln};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// A run of under a minute, for smoke tests (targets are not checked).
    #[arg(long)]
    pub quick: bool,
    /// Requests in flight at once, for the echo and end to end alike. A referral is
    /// three durable commits and two requests in series, so it takes more in flight than
    /// an echo to keep every core busy: at 32 a fifth of the CPU stayed idle.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds per measured phase (default 5, or 1 with --quick).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Referrals queued for an offline recipient (default 100000, or 2000 with --quick).
    #[arg(long)]
    pub backlog: Option<u64>,
    /// Audit-log size for the proof measurements (default 1000000, or 20000 with --quick).
    #[arg(long)]
    pub audit_entries: Option<u64>,
    /// Where to keep the run's files (default: a temporary directory, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Latency samples in microseconds.
#[derive(Default)]
struct Samples(Vec<u64>);

impl Samples {
    fn pct(&mut self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i] as f64 / 1000.0
    }
}

/// Runs `op` from `concurrency` tasks for `secs`; returns (ops/s, p50 ms, p99 ms).
async fn closed_loop<F, Fut>(
    concurrency: usize,
    secs: f64,
    op: F,
) -> Result<(f64, f64, f64), String>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (op, stop) = (op.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                op().await?;
                samples.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, String>(samples)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Samples::default();
    for t in tasks {
        all.0.extend(t.await.map_err(|e| e.to_string())??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rate = all.0.len() as f64 / elapsed;
    Ok((rate, all.pct(0.5), all.pct(0.99)))
}

/// Starts `op` at a fixed `rate` per second for `secs`; returns (p50 ms, p99 ms).
async fn open_loop<F, Fut>(rate: f64, secs: f64, op: F) -> Result<(f64, f64), String>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    while Instant::now() < end {
        ticker.tick().await;
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            op().await.map(|()| t.elapsed().as_micros() as u64)
        }));
    }
    let mut all = Samples::default();
    for t in tasks {
        all.0.push(t.await.map_err(|e| e.to_string())??);
    }
    Ok((all.pct(0.5), all.pct(0.99)))
}

// ---- transport -------------------------------------------------------------------------

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        r: tonic::Request<EchoMessage>,
    ) -> Result<tonic::Response<EchoMessage>, tonic::Status> {
        Ok(tonic::Response::new(r.into_inner()))
    }
}

/// `corridor bench-echo`: the bare mTLS echo server, run as its own process.
pub async fn echo_server(listen: std::net::SocketAddr, org_dir: &Path) -> Result<(), String> {
    let read = |p: PathBuf| files::read_file(&p, MAX_FILE_BYTES);
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(org_dir.join("tls.pem"))?,
            read(org_dir.join("tls.key"))?,
        ))
        .client_ca_root(Certificate::from_pem(read(org_dir.join("../ca.pem"))?));
    Server::builder()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .add_service(EchoServer::new(EchoService))
        .serve_with_shutdown(listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| e.to_string())
}

// ---- helpers ---------------------------------------------------------------------------

fn exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| e.to_string())
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

fn rss_kb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) a process has used so far; `None` for this process.
fn cpu_s(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| stat_cpu_s(&s))
        .unwrap_or(0.0)
}

/// CPU seconds of the threads of process `pid` whose name starts with `prefix`, such as
/// the threads on which sqlx runs SQLite (`sqlx-sqlite-worker-N`, cut to 15 bytes).
fn thread_cpu_s(pid: u32, prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter(|stat| {
            stat.split_once('(')
                .is_some_and(|(_, name)| name.starts_with(prefix))
        })
        .filter_map(|stat| stat_cpu_s(&stat))
        .sum()
}

/// User + system CPU seconds from the text of a `/proc/.../stat` file.
fn stat_cpu_s(stat: &str) -> Option<f64> {
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Context switches so far, voluntary and not, summed over the threads of a process (this
/// one if `pid` is `None`): each is a hand-off between threads, the cost that dominates
/// once the work per step is small.
fn context_switches(pid: Option<u32>) -> f64 {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/task"),
        None => "/proc/self/task".to_owned(),
    };
    let Ok(tasks) = std::fs::read_dir(dir) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Median latency of a 4 KiB write followed by `fdatasync` in `dir`, in milliseconds:
/// the cost of one durable commit on this disk.
fn fsync_ms(dir: &Path, n: usize) -> Result<f64, String> {
    use std::io::{Seek as _, Write as _};
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let block = [0x5au8; 4096];
    let mut samples = Samples::default();
    for _ in 0..n {
        let t = Instant::now();
        file.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| file.write_all(&block))
            .and_then(|_| file.sync_data())
            .map_err(|e| e.to_string())?;
        samples.0.push(t.elapsed().as_micros() as u64);
    }
    let _ = std::fs::remove_file(&path);
    Ok(samples.pct(0.5))
}

async fn kill(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn start_node(org: &GeneratedOrg) -> Result<(Child, f64), String> {
    let t = Instant::now();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(org.dir.join("node.log"))
        .map_err(|e| e.to_string())?;
    let child = Command::new(exe()?)
        .arg("node")
        .arg("--config")
        .arg(&org.config)
        // The nodes' log filter; profiling may ask for more (e.g. `sqlx=debug`).
        .env(
            "RUST_LOG",
            std::env::var("CORRIDOR_BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    let url = format!("http://127.0.0.1:{}", org.ports.local);
    loop {
        if let Ok(channel) = Endpoint::from_shared(url.clone())
            .map_err(|e| e.to_string())?
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            if health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
            {
                return Ok((child, t.elapsed().as_secs_f64() * 1000.0));
            }
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("{} did not start", org.spec.id));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn token(org: &GeneratedOrg) -> Result<String, String> {
    let out = Command::new(exe()?)
        .arg("node")
        .arg("--config")
        .arg(&org.config)
        .args(["create-token", "--user", "bench", "--role", "caseworker"])
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

const PURPOSE: &str = "reintegration";
/// How the threads on which sqlx runs SQLite are named (as cut to 15 bytes).
const SQLITE_THREADS: &str = "sqlx-sqlite-wor";

/// A realistic referral: the fields reintegration requires, about 1 KiB in all.
fn referral_fields() -> HashMap<String, String> {
    [
        ("preferred_name", "Bench Person".to_string()),
        ("age_band", "25-29".to_string()),
        ("languages", "Khmer, Malay".to_string()),
        ("needs", "x".repeat(900)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Sends a referral and waits for its verified receipt, in one call (`wait`).
async fn send_and_await(client: &mut Client, case_id: &str) -> Result<(), String> {
    let sent = client
        .send_referral(pb::SendReferralRequest {
            case_id: case_id.to_owned(),
            recipient: "bench-recipient".into(),
            purpose: PURPOSE.into(),
            fields: referral_fields(),
            consent_id: String::new(),
            wait: true,
            request_id: String::new(),
        })
        .await
        .map_err(|s| explain(&s))?
        .into_inner();
    let status = sent.status.unwrap_or_default();
    if status.state != "delivered" {
        return Err(format!(
            "referral ended {}: {}",
            status.state, status.last_error
        ));
    }
    Ok(())
}

/// One referral sent and waited for, as the operation of a load phase.
fn referral_op(
    client: Client,
    case_id: String,
) -> impl Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Clone + Send + 'static
{
    move || {
        let (mut client, case_id) = (client.clone(), case_id.clone());
        Box::pin(async move { send_and_await(&mut client, &case_id).await })
    }
}

/// Runs one phase of load on the sending node from a runtime of its own: one thread, with
/// its own connection to the node's local API.
///
/// A load generator should cost the client's work per request and little else. On the
/// bench's shared multi-thread runtime every answer, arriving tens of milliseconds after
/// its request, woke a parked worker thread and handed tasks between the two, so the
/// generator took about as much CPU per referral as a whole bare echo request (client and
/// server), and that CPU came out of the two cores the nodes share with it. The echo keeps the multi-thread runtime:
/// there both threads are always busy.
async fn generate<T, W, Fut>(url: &str, token: &str, case_id: &str, work: W) -> Result<T, String>
where
    T: Send + 'static,
    W: FnOnce(Client, String) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, String>>,
{
    let (url, token, case_id) = (url.to_owned(), token.to_owned(), case_id.to_owned());
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the load generator's runtime: {e}"))?
            .block_on(async move {
                let client = client::connect(&url, &token).await?;
                work(client, case_id).await
            })
    })
    .await
    .map_err(|e| e.to_string())?
}

// ---- crypto ----------------------------------------------------------------------------

/// The per-referral public-key work, alone, on this thread: seal, sign, verify, open,
/// receipt sign, receipt verify. Returns referrals per second, or why one failed.
fn crypto_limit(secs: f64) -> Result<f64, String> {
    let failed = |what: &str, e: &dyn std::fmt::Display| format!("crypto limit: {what}: {e}");
    let sender = SigningKey::from_seed(&[1; 32]).map_err(|e| failed("key", &e))?;
    let recipient = SigningKey::from_seed(&[2; 32]).map_err(|e| failed("key", &e))?;
    let seal_key = SealingKey::derive(&[3; 32]);
    let a = OrgId::new("bench-sender").map_err(|e| failed("org", &e))?;
    let b = OrgId::new("bench-recipient").map_err(|e| failed("org", &e))?;
    let payload = vec![0x42u8; 1024];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let header = EnvelopeHeader {
            version: ENVELOPE_VERSION,
            message_id: MessageId([n as u8; 16]),
            kind: MessageKind::Referral,
            sender: a.clone(),
            recipient: b.clone(),
            route: vec![],
            created_at_ms: 1,
            expires_at_ms: 2,
        };
        let e = Envelope::seal(header, &payload, seal_key.public_key(), &sender)
            .map_err(|e| failed("seal", &e))?;
        let digest = e.digest();
        let v = e
            .verify(&b, &a, &sender.verifying_key(), 1)
            .map_err(|e| failed("verify", &e))?;
        v.open(&seal_key).map_err(|e| failed("open", &e))?;
        let r = Receipt::sign(
            MessageId([0; 16]),
            digest,
            a.clone(),
            b.clone(),
            1,
            n,
            [0; 32],
            &recipient,
        );
        r.verify(
            MessageId([0; 16]),
            &digest,
            &a,
            &b,
            &recipient.verifying_key(),
        )
        .map_err(|e| failed("receipt", &e))?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Microseconds of one consent receipt issued and verified on this thread: the
/// signature and verification a referral needs beyond the six operations of
/// [`crypto_limit`], because its consent receipt is signed on its own (so that it can be
/// shown without the personal data it travels with).
fn consent_receipt_us(secs: f64) -> Result<f64, String> {
    let key = SigningKey::from_seed(&[1; 32]).map_err(|e| e.to_string())?;
    let a = OrgId::new("bench-sender").map_err(|e| e.to_string())?;
    let b = OrgId::new("bench-recipient").map_err(|e| e.to_string())?;
    let purpose = Purpose::parse(PURPOSE).map_err(|e| e.to_string())?;
    // Identifiers of the form a recipient accepts (`ref-` or `consent-` and 32 hex digits).
    let (consent_id, case_ref) = (format!("consent-{:032x}", 1), format!("ref-{:032x}", 1));
    let scope = ConsentScope {
        id: consent_id,
        purposes: [purpose].into(),
        recipient_orgs: [b.clone()].into(),
        recipient_roles: Default::default(),
        fields: referral_fields()
            .keys()
            .filter_map(|f| Field::parse(f).ok())
            .collect(),
        restrictions: Default::default(),
        expires_at_ms: 2,
        withdrawn_at_ms: None,
    };
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let r = ConsentReceipt::issue(
            &scope,
            scope.id.clone(),
            a.clone(),
            b.clone(),
            case_ref.clone(),
            1,
            &key,
        );
        r.verify(&a, &key.verifying_key(), &b, &case_ref)
            .map_err(|e| format!("the consent receipt measured does not verify: {e}"))?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64)
}

/// SHA-256 of 64-byte inputs per second on this thread.
fn sha256_rate(secs: f64) -> f64 {
    let mut input = [7u8; 64];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..1000 {
            let h = corridor::canonical::sha256(&input);
            input[..32].copy_from_slice(&h);
        }
        n += 1000;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

// ---- the run ---------------------------------------------------------------------------

struct Row(&'static str, String, String);

/// Bounds of the bench's options: beyond them a run measures nothing useful, or takes
/// the machine down with it.
const MAX_CONCURRENCY: usize = 10_000;
const MAX_PHASE_SECONDS: f64 = 3600.0;
const MAX_BACKLOG: u64 = 10_000_000;
const MAX_AUDIT_ENTRIES: u64 = 100_000_000;

/// Checks the options before anything is started or written.
fn check_args(
    concurrency: usize,
    secs: f64,
    backlog: u64,
    audit_entries: u64,
    dir: Option<&Path>,
) -> Result<(), String> {
    if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
        return Err(format!(
            "--concurrency must be between 1 and {MAX_CONCURRENCY}"
        ));
    }
    if !(0.1..=MAX_PHASE_SECONDS).contains(&secs) {
        return Err(format!(
            "--seconds must be between 0.1 and {MAX_PHASE_SECONDS}"
        ));
    }
    if !(1..=MAX_BACKLOG).contains(&backlog) {
        return Err(format!("--backlog must be between 1 and {MAX_BACKLOG}"));
    }
    if !(2..=MAX_AUDIT_ENTRIES).contains(&audit_entries) {
        return Err(format!(
            "--audit-entries must be between 2 and {MAX_AUDIT_ENTRIES}"
        ));
    }
    if let Some(dir) = dir
        && std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
    {
        return Err(format!(
            "--dir {} is not empty: give a new or empty directory",
            dir.display()
        ));
    }
    Ok(())
}

/// The run's directory when the bench chose it: removed however the run ends, so that
/// the keys and databases it holds do not outlive it.
struct RunDir(Option<PathBuf>);

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub async fn run(args: BenchArgs) -> Result<(), String> {
    let quick = args.quick;
    let secs = args.seconds.unwrap_or(if quick { 1.0 } else { 5.0 });
    let backlog = args.backlog.unwrap_or(if quick { 2000 } else { 100_000 });
    let audit_entries = args
        .audit_entries
        .unwrap_or(if quick { 20_000 } else { 1_000_000 });
    let c = args.concurrency;
    check_args(c, secs, backlog, audit_entries, args.dir.as_deref())?;
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("corridor-bench-{}", std::process::id()))
    });
    let _removed_after = RunDir(args.dir.is_none().then(|| dir.clone()));
    let orgs: Vec<OrgSpec> = [
        "bench-sender:MY:shelter:Bench sender",
        "bench-recipient:KH:shelter:Bench recipient",
    ]
    .iter()
    .map(|s| s.parse())
    .collect::<Result<_, _>>()?;
    let ports = [free_port()?, free_port()?, free_port()?, free_port()?];
    let generated = devpki::generate(
        &dir,
        "corridor-bench",
        &orgs,
        &[
            Ports {
                federation: ports[0],
                local: ports[1],
            },
            Ports {
                federation: ports[2],
                local: ports[3],
            },
        ],
    )?;
    // Interrupted, the measurement is dropped: every process it started is killed with
    // its handle, and the run's directory goes with `_removed_after`.
    let (rows, figures) = tokio::select! {
        result = measure(&generated, &dir, secs, backlog, audit_entries, c) => result?,
        _ = corridor_node::server::termination_signal() => {
            return Err("interrupted: the bench's processes were stopped".into());
        }
    };
    outln!(
        "\ncorridor bench — {} on this machine, {c} in flight, 1 KiB payloads{}",
        if quick { "quick run" } else { "full run" },
        if quick { " (targets not checked)" } else { "" }
    );
    outln!("{:<52} {:>16} {:>28}", "measure", "value", "target");
    for Row(name, value, target) in &rows {
        outln!("{name:<52} {value:>16} {target:>28}");
    }
    outln!("{}", Value::Object(figures));
    Ok(())
}

async fn measure(
    orgs: &[GeneratedOrg],
    dir: &Path,
    secs: f64,
    backlog: u64,
    audit_entries: u64,
    c: usize,
) -> Result<(Vec<Row>, serde_json::Map<String, Value>), String> {
    let (sender_org, recipient_org) = (&orgs[0], &orgs[1]);
    let mut f = serde_json::Map::new();
    let mut rows = Vec::new();

    // 1. Transport limit: bare echo over mTLS in a separate process.
    errln!("transport: bare tonic echo over mutual TLS ...");
    let echo_port = free_port()?;
    let mut echo = Command::new(exe()?)
        .args([
            "bench-echo",
            "--listen",
            &format!("127.0.0.1:{echo_port}"),
            "--org-dir",
        ])
        .arg(&recipient_org.dir)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    let read = |p: PathBuf| files::read_file(&p, MAX_FILE_BYTES);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(dir.join("ca.pem"))?))
        .identity(Identity::from_pem(
            read(sender_org.dir.join("tls.pem"))?,
            read(sender_org.dir.join("tls.key"))?,
        ));
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{echo_port}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?;
    let channel = loop {
        if let Ok(ch) = endpoint.connect().await {
            break ch;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let echo_client = EchoClient::new(channel);
    let payload = vec![0x42u8; 1024];
    // Client (this process) and server together; `cpu_s(None)` is this process, so an
    // unknown server pid counts nothing rather than this process twice.
    let echo_pid = echo.id();
    let echo_cpu = move || echo_pid.map(|p| cpu_s(Some(p))).unwrap_or(0.0) + cpu_s(None);
    let echo_cpu_before = echo_cpu();
    let echo_started = Instant::now();
    let (echo_rate, echo_p50, echo_p99) = closed_loop(c, secs, move || {
        let mut client = echo_client.clone();
        let payload = payload.clone();
        async move {
            client
                .echo(EchoMessage { payload })
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        }
    })
    .await?;
    let echo_cpu_us = (echo_cpu() - echo_cpu_before) * 1e6
        / (echo_rate * echo_started.elapsed().as_secs_f64()).max(1.0);
    kill(&mut echo).await;
    f.insert("transport_rps".into(), json!(echo_rate));
    f.insert("cpu_us_per_echo_request".into(), json!(echo_cpu_us));
    f.insert("transport_p50_ms".into(), json!(echo_p50));
    f.insert("transport_p99_ms".into(), json!(echo_p99));
    rows.push(Row(
        "bare mTLS echo (req/s, p50/p99 ms)",
        format!("{echo_rate:.0}"),
        format!("p50 {echo_p50:.2} p99 {echo_p99:.2}"),
    ));
    rows.push(Row(
        "  CPU per request, client + server (us)",
        format!("{echo_cpu_us:.0}"),
        String::new(),
    ));

    // 2. Crypto limit on one core.
    errln!("crypto: per-referral public-key operations on one core ...");
    let (crypto, consent_us) = tokio::task::spawn_blocking(move || {
        Ok::<_, String>((
            crypto_limit(secs)?,
            consent_receipt_us((secs / 4.0).max(0.25))?,
        ))
    })
    .await
    .map_err(|e| e.to_string())??;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    f.insert("crypto_referrals_per_s_one_core".into(), json!(crypto));
    f.insert("cores".into(), json!(cores));
    rows.push(Row(
        "crypto limit, one core (referrals/s)",
        format!("{crypto:.0}"),
        String::new(),
    ));
    f.insert("cpu_us_consent_receipt".into(), json!(consent_us));
    rows.push(Row(
        "  + consent receipt signed and verified (us)",
        format!("{consent_us:.0}"),
        String::new(),
    ));

    // 3. Corridor end to end.
    errln!(
        "end to end: two nodes, referrals through the local API until their receipts are committed ..."
    );
    let sender_token = token(sender_org).await?;
    let (mut recipient, _) = start_node(recipient_org).await?;
    let (mut sender, start_ms) = start_node(sender_org).await?;
    let sender_pid = sender.id().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_kb(sender_pid) / 1024.0;
    let url = format!("http://127.0.0.1:{}", sender_org.ports.local);
    let mut client = client::connect(&url, &sender_token).await?;
    let case_id = client
        .create_case(pb::CreateCaseRequest {
            label: String::new(),
        })
        .await
        .map_err(|s| explain(&s))?
        .into_inner()
        .case_id;
    client
        .record_consent(pb::RecordConsentRequest {
            case_id: case_id.clone(),
            scope: Some(pb::ConsentScope {
                purposes: vec![PURPOSE.into()],
                recipient_orgs: vec!["bench-recipient".into()],
                fields: referral_fields().into_keys().collect(),
                expires_at_ms: corridor_node::node::now_ms() + 30 * 86_400_000,
                ..Default::default()
            }),
            given_by: "person".into(),
            method: "written".into(),
            ..Default::default()
        })
        .await
        .map_err(|s| explain(&s))?;
    // Unloaded single referral.
    let single_secs = secs.min(2.0);
    let (_, single_p50, single_p99) =
        generate(&url, &sender_token, &case_id, move |client, case_id| {
            closed_loop(1, single_secs, referral_op(client, case_id))
        })
        .await?;
    let peak_rss = Arc::new(std::sync::Mutex::new(0f64));
    let sampler = {
        let peak = peak_rss.clone();
        tokio::spawn(async move {
            loop {
                let r = rss_kb(sender_pid) / 1024.0;
                if let Ok(mut p) = peak.lock() {
                    *p = p.max(r);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let recipient_pid = recipient.id();
    let cpu_before = (
        cpu_s(Some(sender_pid)),
        recipient_pid.map(|p| cpu_s(Some(p))).unwrap_or(0.0),
        cpu_s(None),
    );
    let switches_before = (
        context_switches(Some(sender_pid)),
        recipient_pid
            .map(|p| context_switches(Some(p)))
            .unwrap_or(0.0),
    );
    // The nodes' CPU on the threads where sqlx runs SQLite: storage's share, apart from
    // the runtime's threads (requests, crypto, the workflows).
    let sqlite_cpu = |pid: Option<u32>| pid.map(|p| thread_cpu_s(p, SQLITE_THREADS)).unwrap_or(0.0);
    let sqlite_before = (sqlite_cpu(Some(sender_pid)), sqlite_cpu(recipient_pid));
    let e2e_started = Instant::now();
    let (e2e_rate, e2e_p50, e2e_p99) =
        generate(&url, &sender_token, &case_id, move |client, case_id| {
            closed_loop(c, secs, referral_op(client, case_id))
        })
        .await?;
    let referrals = e2e_rate * e2e_started.elapsed().as_secs_f64();
    let per_referral_us = |before: f64, after: f64| (after - before) * 1e6 / referrals.max(1.0);
    let cpu_sender = per_referral_us(cpu_before.0, cpu_s(Some(sender_pid)));
    let cpu_recipient = per_referral_us(
        cpu_before.1,
        recipient_pid.map(|p| cpu_s(Some(p))).unwrap_or(0.0),
    );
    let cpu_generator = per_referral_us(cpu_before.2, cpu_s(None));
    let sqlite_sender = per_referral_us(sqlite_before.0, sqlite_cpu(Some(sender_pid)));
    let sqlite_recipient = per_referral_us(sqlite_before.1, sqlite_cpu(recipient_pid));
    let per_referral = |before: f64, after: f64| (after - before) / referrals.max(1.0);
    let switches_sender = per_referral(switches_before.0, context_switches(Some(sender_pid)));
    let switches_recipient = per_referral(
        switches_before.1,
        recipient_pid
            .map(|p| context_switches(Some(p)))
            .unwrap_or(0.0),
    );
    let cpu_total = cpu_sender + cpu_recipient + cpu_generator;
    let fsync = fsync_ms(&sender_org.dir, if secs < 2.0 { 50 } else { 200 })?;
    let (half_p50, half_p99) = generate(&url, &sender_token, &case_id, move |client, case_id| {
        open_loop(e2e_rate / 2.0, secs, referral_op(client, case_id))
    })
    .await?;
    sampler.abort();
    let load_rss = peak_rss.lock().map(|p| *p).unwrap_or(0.0);
    for (k, v) in [
        ("e2e_single_p50_ms", single_p50),
        ("e2e_single_p99_ms", single_p99),
        ("e2e_rps", e2e_rate),
        ("e2e_p50_ms", e2e_p50),
        ("e2e_p99_ms", e2e_p99),
        ("e2e_half_load_rps", e2e_rate / 2.0),
        ("e2e_half_load_p50_ms", half_p50),
        ("e2e_half_load_p99_ms", half_p99),
        ("ratio_e2e_to_transport", e2e_rate / echo_rate.max(1e-9)),
        (
            "ratio_e2e_to_crypto_times_cores",
            e2e_rate / (crypto * cores as f64).max(1e-9),
        ),
        ("cpu_us_per_referral_sender", cpu_sender),
        ("cpu_us_per_referral_recipient", cpu_recipient),
        ("cpu_us_per_referral_sender_sqlite_threads", sqlite_sender),
        (
            "cpu_us_per_referral_recipient_sqlite_threads",
            sqlite_recipient,
        ),
        ("cpu_us_per_referral_generator", cpu_generator),
        ("context_switches_per_referral_sender", switches_sender),
        (
            "context_switches_per_referral_recipient",
            switches_recipient,
        ),
        ("cpu_bound_rps", cores as f64 * 1e6 / cpu_total.max(1e-9)),
        ("cpu_us_per_referral_crypto_limit", 1e6 / crypto.max(1e-9)),
        ("fsync_p50_ms", fsync),
        ("node_start_to_serving_ms", start_ms),
        ("node_rss_idle_mb", idle_rss),
        ("node_rss_load_mb", load_rss),
    ] {
        f.insert(k.into(), json!(v));
    }
    rows.push(Row(
        "single referral, unloaded (p50 ms)",
        format!("{single_p50:.2}"),
        "<= 3".into(),
    ));
    rows.push(Row(
        "  one write + fdatasync here (p50 ms)",
        format!("{fsync:.2}"),
        "3 in series per referral".into(),
    ));
    rows.push(Row(
        "end to end, durable (referrals/s)",
        format!("{e2e_rate:.0}"),
        String::new(),
    ));
    rows.push(Row(
        "  p50 / p99 at max (ms)",
        format!("{e2e_p50:.1} / {e2e_p99:.1}"),
        String::new(),
    ));
    rows.push(Row(
        "  p50 / p99 at half of max (ms)",
        format!("{half_p50:.1} / {half_p99:.1}"),
        "p99 <= 20".into(),
    ));
    rows.push(Row(
        "  ratio to bare transport",
        format!("{:.3}", e2e_rate / echo_rate.max(1e-9)),
        ">= 0.10".into(),
    ));
    rows.push(Row(
        "  ratio to crypto limit x cores",
        format!("{:.3}", e2e_rate / (crypto * cores as f64).max(1e-9)),
        ">= 0.50".into(),
    ));
    // What end to end would reach if storage and Corridor's own logic cost nothing: the
    // public-key work the nodes do plus two requests, all cores busy.
    let floor_us = 1e6 / crypto.max(1e-9) + consent_us + 2.0 * echo_cpu_us;
    let floor_rps = cores as f64 * 1e6 / floor_us.max(1e-9);
    let floor_to_echo = floor_rps / echo_rate.max(1e-9);
    let floor_to_crypto = floor_rps / (crypto * cores as f64).max(1e-9);
    f.insert("floor_crypto_and_rpcs_rps".into(), json!(floor_rps));
    f.insert("ratio_floor_to_transport".into(), json!(floor_to_echo));
    f.insert(
        "ratio_floor_to_crypto_times_cores".into(),
        json!(floor_to_crypto),
    );
    rows.push(Row(
        "  floor: crypto + 2 requests only (ref/s, ratios)",
        format!("{floor_rps:.0}"),
        format!("{floor_to_echo:.3} / {floor_to_crypto:.3}"),
    ));
    rows.push(Row(
        "  CPU per referral: sender / recipient / load (us)",
        format!("{cpu_sender:.0} / {cpu_recipient:.0} / {cpu_generator:.0}"),
        format!("crypto alone {:.0}", 1e6 / crypto.max(1e-9)),
    ));
    rows.push(Row(
        "    of which on SQLite's threads: sender / recipient",
        format!("{sqlite_sender:.0} / {sqlite_recipient:.0}"),
        String::new(),
    ));
    rows.push(Row(
        "  context switches per referral: sender / recipient",
        format!("{switches_sender:.1} / {switches_recipient:.1}"),
        String::new(),
    ));
    rows.push(Row(
        "node start to serving (ms)",
        format!("{start_ms:.0}"),
        "<= 300".into(),
    ));
    rows.push(Row(
        "node RSS idle / under load (MB)",
        format!("{idle_rss:.1} / {load_rss:.1}"),
        "<= 20 / <= 100".into(),
    ));

    // 5. Backlog for an offline recipient, and its drain.
    errln!("backlog: {backlog} referrals for an offline recipient ...");
    kill(&mut recipient).await;
    let per_task = backlog.div_ceil(c as u64);
    let mut tasks = Vec::new();
    for _ in 0..c {
        let (mut client, case_id) = (client.clone(), case_id.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_task {
                client
                    .send_referral(pb::SendReferralRequest {
                        case_id: case_id.clone(),
                        recipient: "bench-recipient".into(),
                        purpose: PURPOSE.into(),
                        fields: referral_fields(),
                        consent_id: String::new(),
                        wait: false,
                        request_id: String::new(),
                    })
                    .await
                    .map_err(|s| explain(&s))?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let backlog_rss = rss_kb(sender_pid) / 1024.0;
    let queued = client
        .get_outbox_stats(pb::OutboxStatsRequest {})
        .await
        .map_err(|s| explain(&s))?
        .into_inner()
        .queued;
    let t = Instant::now();
    let (new_recipient, _) = start_node(recipient_org).await?;
    recipient = new_recipient;
    loop {
        let stats = client
            .get_outbox_stats(pb::OutboxStatsRequest {})
            .await
            .map_err(|s| explain(&s))?
            .into_inner();
        if stats.queued == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(1800) {
            return Err(format!(
                "backlog did not drain: {} still queued",
                stats.queued
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain = queued as f64 / t.elapsed().as_secs_f64();
    f.insert("backlog_queued".into(), json!(queued));
    f.insert("node_rss_backlog_mb".into(), json!(backlog_rss));
    f.insert("backlog_drain_per_s".into(), json!(drain));
    f.insert(
        "ratio_drain_to_e2e".into(),
        json!(drain / e2e_rate.max(1e-9)),
    );
    rows.push(Row(
        "node RSS with backlog queued (MB)",
        format!("{backlog_rss:.1} ({queued} queued)"),
        "<= 100".into(),
    ));
    rows.push(Row(
        "backlog drain (referrals/s)",
        format!("{drain:.0}"),
        ">= 0.5 x end to end".into(),
    ));
    kill(&mut sender).await;
    kill(&mut recipient).await;

    // 4. Audit log.
    errln!("audit log: {audit_entries} entries ...");
    let audit = audit_figures(&dir.join("audit-bench.db"), audit_entries, secs).await?;
    for (k, v) in &audit {
        f.insert((*k).into(), json!(v));
    }
    let get = |k: &str| {
        audit
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| *v)
            .unwrap_or(0.0)
    };
    let sha = tokio::task::spawn_blocking(move || sha256_rate(secs.min(1.0)))
        .await
        .map_err(|e| e.to_string())?;
    f.insert("sha256_64b_per_s".into(), json!(sha));
    f.insert(
        "ratio_offline_verify_to_sha256".into(),
        json!(get("audit_offline_verify_per_s") / sha.max(1e-9)),
    );
    rows.push(Row(
        "SQLite round trip through sqlx, idle (p50 ms)",
        format!("{:.3}", get("sqlite_idle_round_trip_p50_ms")),
        String::new(),
    ));
    rows.push(Row(
        "  CPU per round trip, back to back (us)",
        format!("{:.1}", get("cpu_us_per_sqlite_round_trip")),
        String::new(),
    ));
    rows.push(Row(
        "audit append (entries/s)",
        format!("{:.0}", get("audit_append_per_s")),
        ">= 50000".into(),
    ));
    rows.push(Row(
        "audit proofs at size (p50 / p99 ms)",
        format!(
            "{:.3} / {:.3}",
            get("audit_proof_p50_ms"),
            get("audit_proof_p99_ms")
        ),
        "p99 <= 1 at 1M".into(),
    ));
    rows.push(Row(
        "offline verification (entries/s)",
        format!("{:.0}", get("audit_offline_verify_per_s")),
        ">= 0.25 x SHA-256".into(),
    ));
    rows.push(Row(
        "raw SHA-256, 64-byte inputs (/s)",
        format!("{sha:.0}"),
        String::new(),
    ));
    Ok((rows, f))
}

/// Append rate, proof latency at `entries`, and offline verification rate.
async fn audit_figures(
    db: &Path,
    entries: u64,
    secs: f64,
) -> Result<Vec<(&'static str, f64)>, String> {
    use corridor::audit::{Event, encode};
    let store = corridor_node::storage::Store::open(db)
        .await
        .map_err(|e| e.to_string())?;
    let entry = |i: u64| encode(&Event::RetentionPurge { deleted: i }, i as i64);
    let t = Instant::now();
    let mut n = 0u64;
    while n < entries {
        let batch: Vec<Vec<u8>> = (n..(n + 1000).min(entries)).map(entry).collect();
        n += batch.len() as u64;
        store.append_audit(batch).await.map_err(|e| e.to_string())?;
    }
    let append_rate = n as f64 / t.elapsed().as_secs_f64();
    // A round trip to SQLite's worker thread with the machine otherwise idle (threads
    // parked between queries), as every statement on a referral's path pays it.
    let mut idle_trip = Samples::default();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t = Instant::now();
        store.ping().await.map_err(|e| e.to_string())?;
        idle_trip.0.push(t.elapsed().as_micros() as u64);
    }
    // The CPU one round trip costs, back to back: the price of every statement the
    // writer sends to SQLite's worker thread, hand-offs included.
    let trips = 2_000;
    let cpu_before = cpu_s(None);
    for _ in 0..trips {
        store.ping().await.map_err(|e| e.to_string())?;
    }
    let trip_cpu_us = (cpu_s(None) - cpu_before) * 1e6 / f64::from(trips);

    let size = store.audit_size().await.map_err(|e| e.to_string())?;
    let mut samples = Samples::default();
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed().as_secs_f64() < secs.min(2.0) {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let index = i % size;
        let old = 1 + (i >> 7) % size;
        let t = Instant::now();
        store
            .with_audit_hashes(|r| corridor::merkle::prove_record(size, index, r))
            .await
            .map_err(|e| e.to_string())?;
        samples.0.push(t.elapsed().as_micros() as u64);
        let t = Instant::now();
        store
            .with_audit_hashes(|r| corridor::merkle::prove_tree(size, old, r))
            .await
            .map_err(|e| e.to_string())?;
        samples.0.push(t.elapsed().as_micros() as u64);
    }
    // Offline verification: decode every entry, hash it, rebuild the root.
    let all = store
        .audit_entries(0, size)
        .await
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    let leaves: Vec<_> = all
        .iter()
        .map(|e| corridor::audit::decode(e).map(|_| corridor::merkle::leaf_hash(e)))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let _ = corridor::merkle::root(&leaves);
    let verify_rate = all.len() as f64 / t.elapsed().as_secs_f64();
    store.close().await;
    Ok(vec![
        ("audit_append_per_s", append_rate),
        ("sqlite_idle_round_trip_p50_ms", idle_trip.pct(0.5)),
        ("cpu_us_per_sqlite_round_trip", trip_cpu_us),
        ("audit_entries", size as f64),
        ("audit_proof_p50_ms", samples.pct(0.5)),
        ("audit_proof_p99_ms", samples.pct(0.99)),
        ("audit_offline_verify_per_s", verify_rate),
    ])
}

#[cfg(test)]
mod tests {
    use super::{consent_receipt_us, crypto_limit, stat_cpu_s, thread_cpu_s};

    /// Both loops run the protocol's real checks, so a rule they break (an identifier
    /// of the wrong form, say) fails here rather than as a zero in the bench's table.
    #[test]
    fn the_crypto_measurements_run_the_real_operations() {
        let rate = crypto_limit(0.05).expect("crypto limit");
        assert!(rate > 0.0, "{rate}");
        let us = consent_receipt_us(0.05).expect("consent receipt");
        assert!(us > 0.0, "{us}");
    }

    #[test]
    fn cpu_time_is_read_after_the_last_parenthesis_of_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime ...
        let stat = "42 (odd) name (x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0";
        assert_eq!(stat_cpu_s(stat), Some(3.0));
        assert_eq!(stat_cpu_s("42 (truncated"), None);
    }

    #[test]
    fn the_cpu_of_threads_is_summed_by_name() {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (spun_tx, spun_rx) = std::sync::mpsc::channel::<()>();
        let busy = std::thread::Builder::new()
            .name("bench-busy-test".into())
            .spawn(move || {
                // Spin until this thread's own clock shows 0.1 s of CPU (whatever else
                // the machine is doing), or give up after 20 s.
                let own = || {
                    std::fs::read_to_string("/proc/thread-self/stat")
                        .ok()
                        .and_then(|s| stat_cpu_s(&s))
                        .unwrap_or(0.0)
                };
                let started = std::time::Instant::now();
                let mut x = 0u64;
                while own() < 0.1 && started.elapsed() < std::time::Duration::from_secs(20) {
                    for _ in 0..100_000 {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                }
                let _ = spun_tx.send(());
                let _ = done_rx.recv();
            })
            .expect("spawn");
        spun_rx.recv().expect("spun");
        let pid = std::process::id();
        let busy_s = thread_cpu_s(pid, "bench-busy-tes");
        assert!(busy_s >= 0.1, "the busy thread used {busy_s} s");
        assert_eq!(thread_cpu_s(pid, "no-such-thread"), 0.0);
        let _ = done_tx.send(());
        busy.join().expect("join");
    }
}
