//! The running node's shared state: identity, keys, directory, storage, TLS material and
//! the wake-up signal of the delivery task. Built once at start from the configuration.

use std::sync::Arc;

use corridor::{Directory, OrgId, PairwiseKey, SealingKey, SigningKey};
use tokio::sync::Notify;

use crate::config::Config;
use crate::keys;
use crate::storage::Store;
use crate::tls::TlsMaterial;

pub struct Node {
    pub org: OrgId,
    pub config: Config,
    pub directory: Arc<Directory>,
    /// Shared with the writer task, which signs receipts once an entry's place is known.
    pub signing_key: Arc<SigningKey>,
    pub sealing_key: SealingKey,
    /// Sealing keys rotated out, tried after the current one.
    pub previous_sealing_keys: Vec<SealingKey>,
    /// Derives the case and consent references each recipient knows.
    pub pairwise: PairwiseKey,
    /// Key-encryption key for personal data at rest.
    pub data_key: corridor::at_rest::KeyEncryptionKey,
    pub store: Store,
    pub tls: TlsMaterial,
    /// Woken when something is queued for delivery that the hand-off did not take.
    pub outbox_ready: Notify,
    /// Freshly queued envelopes, passed to the delivery loop in memory.
    pub handoff: crate::delivery::Handoff,
    /// Callers waiting for the end of a delivery attempt.
    pub waiters: crate::delivery::Waiters,
    /// Narrowings and withdrawals that ended queued referrals, for attempts to notice.
    pub revocations: Arc<crate::delivery::Revocations>,
    /// Turns true when the node is asked to stop: listeners drain, background tasks end,
    /// and calls that wait (for a delivery) answer with what they have.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Held while recipients are asked to purge: who was asked is read, then the requests
    /// queued, and two askers at once would both find a recipient unasked.
    pub asking_to_purge: tokio::sync::Mutex<()>,
    /// Per member, the envelopes it has in progress here, within a bound.
    pub in_progress: crate::services::InProgress,
    /// Refused envelopes each member may still cost this node.
    pub refusals: crate::refusals::RefusalBudgets,
    /// What `[metrics] listen` serves.
    pub metrics: crate::metrics::Metrics,
    /// The size of the newest checkpoint served to auditors and witnesses: what is served
    /// never goes back. The newest signed as the node starts.
    pub served_checkpoint_size: std::sync::atomic::AtomicU64,
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Key(#[from] keys::KeyFileError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    #[error(transparent)]
    Store(#[from] crate::storage::StoreError),
    #[error("cannot read directory {path}: {reason}")]
    Directory { path: String, reason: String },
    #[error("this node's org {0} is not in the directory")]
    NotInDirectory(OrgId),
    #[error("{0}")]
    Mismatch(String),
    #[error("cannot create data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error("another corridor-node is running on data directory {0} (it holds node.lock)")]
    DataDirInUse(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
}

/// Reads the configured directory and its signatures (`<directory>.sig`), and accepts it
/// only as signed by the configured governance keys and not expired.
pub fn load_directory(config: &Config) -> Result<Directory, StartError> {
    let path = &config.directory;
    let failed = |reason: String| StartError::Directory {
        path: path.display().to_string(),
        reason,
    };
    let signatures_path = corridor::directory::signatures_path(path);
    let body = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    let signatures = std::fs::read_to_string(&signatures_path).map_err(|e| {
        failed(format!(
            "cannot read its signatures {}: {e}",
            signatures_path.display()
        ))
    })?;
    let governance = config.governance.governance().map_err(failed)?;
    Directory::from_signed(&body, &signatures, &governance, now_ms())
        .map_err(|e| failed(e.to_string()))
}

/// Opens the database of a configuration (creating the data directory if needed).
///
/// The data directory is made readable by its owner only: the database holds personal
/// data (sealed, but also its metadata), and SQLite creates its files with the process's
/// umask, which outside the shipped systemd unit usually lets everyone read them.
pub async fn open_store(config: &Config) -> Result<Store, StartError> {
    let failed = |e: std::io::Error| StartError::DataDir {
        path: config.data_dir.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(&config.data_dir).map_err(failed)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&config.data_dir)
            .map_err(failed)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(
                &config.data_dir,
                std::fs::Permissions::from_mode(mode & 0o700),
            )
            .map_err(failed)?;
        }
        // The database's own files too, should the directory be opened up later: SQLite
        // gives its WAL and shared memory the database file's mode, so a new database
        // file is created owner-only before SQLite opens it.
        let db = config.database_path();
        if !db.exists() {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&db)
                .map_err(failed)?;
        }
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
            if let Ok(meta) = std::fs::metadata(&file)
                && meta.permissions().mode() & 0o077 != 0
            {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .map_err(failed)?;
            }
        }
    }
    Ok(Store::open(&config.database_path()).await?)
}

/// The files a configuration names, loaded and found consistent with each other.
struct LoadedFiles {
    directory: Directory,
    signing_key: SigningKey,
    sealing_key: SealingKey,
    previous_sealing_keys: Vec<SealingKey>,
    data_key: corridor::at_rest::KeyEncryptionKey,
    tls: TlsMaterial,
}

/// What `check-config` found besides errors.
pub struct ConfigCheck {
    /// What does not fit the directory without keeping the node from working.
    pub warnings: Vec<String>,
    /// What the next start will do to the database.
    pub notes: Vec<String>,
}

/// Checks everything a start would check, and the database, without changing anything:
/// it may run beside a running node (the shipped unit runs it before every start) and
/// before an upgrade is committed to, which a migration would make hard to undo.
pub async fn check_config(config: &Config) -> Result<ConfigCheck, StartError> {
    let files = LoadedFiles::load(config)?;
    let warnings = witness_warnings(config, &files.directory);
    let mut notes = Vec::new();
    let path = config.database_path();
    match Store::inspect(&path).await? {
        None => notes.push(format!(
            "there is no database at {} yet: the node creates it when it starts",
            path.display()
        )),
        Some(found) => {
            if let Some((case, wrapped)) = &found.some_case_key {
                check_data_key(config, &files.data_key, case, wrapped)?;
            }
            if let Some(sealed) = &found.pairwise_secret {
                open_pairwise_secret(config, &files.data_key, sealed)?;
            }
            if let Some(history) = &found.pairwise_history {
                check_pairwise_history(config, history, &files.signing_key)?;
            }
            if let Some((accepted, digest)) = found.directory_serial {
                let serial = i64::try_from(files.directory.serial).unwrap_or(i64::MAX);
                if let Some(refusal) = crate::storage::directory_refusal(
                    serial,
                    &files.directory.digest,
                    accepted,
                    digest.as_deref(),
                ) {
                    return Err(refused_directory(config, &files.directory, refusal));
                }
            }
            if found.pending_migrations > 0 {
                notes.push(format!(
                    "the node will upgrade the database at {} when it starts ({} schema migration(s)); an older corridor-node cannot open it after that, so keep a copy of the data directory, taken while the node is stopped, to go back",
                    path.display(),
                    found.pending_migrations
                ));
            }
        }
    }
    Ok(ConfigCheck { warnings, notes })
}

/// A wrong key file would let the node accept referrals (and sign receipts for them)
/// that it could never read back, nor those stored before.
fn check_data_key(
    config: &Config,
    data_key: &corridor::at_rest::KeyEncryptionKey,
    case: &str,
    wrapped: &[u8],
) -> Result<(), StartError> {
    if data_key.unwrap_data_key(case, wrapped).is_err() {
        return Err(StartError::Mismatch(format!(
            "data key {} does not open the data keys stored in {}: it is not the key this database was written with; restore that key file",
            config.keys.data_key.display(),
            config.database_path().display()
        )));
    }
    Ok(())
}

/// Stores the secret of everything this node derives pairwise, for a database that
/// keeps none yet. A database written by an earlier version keeps what that version
/// derived from the signing key; from then on a rotation of that key changes none of it.
/// A node that has never created a case gets a random secret.
///
/// The caller has checked the history first ([`check_pairwise_history`]).
async fn keep_pairwise_secret(
    config: &Config,
    store: &Store,
    data_key: &corridor::at_rest::KeyEncryptionKey,
    signing_key: &SigningKey,
) -> Result<PairwiseKey, StartError> {
    let continuing = PairwiseKey::secret_derived_from(signing_key.to_base64().as_bytes());
    let fresh = PairwiseKey::generate_secret()
        .map_err(|e| StartError::Mismatch(format!("cannot make the pairwise secret: {e}")))?;
    let sealed = store
        .keep_node_secret(
            crate::storage::PAIRWISE_SECRET,
            &seal_pairwise_secret(data_key, &fresh)?,
            &seal_pairwise_secret(data_key, &continuing)?,
            now_ms(),
        )
        .await?;
    open_pairwise_secret(config, data_key, &sealed).map(|secret| PairwiseKey::from_secret(&secret))
}

/// Refuses a signing key other than the one an earlier version derived the pairwise
/// secret from, for a database that keeps none yet and has derived with it. That key is
/// the one the audit log's last `node-started` entry names: with another key now (an
/// upgrade and a rotation in one restart) every reference would silently change.
fn check_pairwise_history(
    config: &Config,
    history: &crate::storage::PairwiseHistory,
    signing_key: &SigningKey,
) -> Result<(), StartError> {
    let current = signing_key.verifying_key().to_base64();
    match &history.last_signing_key {
        Some(last) if history.has_local_cases && *last != current => {
            Err(StartError::Mismatch(format!(
                "this database keeps no pairwise secret yet (an earlier version derived it from the signing key it ran with, {last}), and the signing key is now {current}: start once with the earlier signing key and rotate afterwards, or, if that key is lost, run `corridor-node --config {} new-pairwise-secret`, which changes the references this node's recipients know its cases by",
                config.path.display()
            )))
        }
        _ => Ok(()),
    }
}

/// Stores a new random pairwise secret for a database that keeps none yet, whatever it
/// derived before: for when the signing key an earlier version derived it from is lost.
/// Returns false if the database keeps one already (nothing changes then).
pub async fn new_pairwise_secret(config: &Config) -> Result<bool, StartError> {
    let data_key = keys::load_data_key(&config.keys.data_key)?;
    let store = open_store(config).await?;
    let kept = async {
        if store
            .node_secret(crate::storage::PAIRWISE_SECRET)
            .await?
            .is_some()
        {
            return Ok(false);
        }
        let fresh = PairwiseKey::generate_secret()
            .map_err(|e| StartError::Mismatch(format!("cannot make the pairwise secret: {e}")))?;
        let sealed = seal_pairwise_secret(&data_key, &fresh)?;
        store
            .keep_node_secret(crate::storage::PAIRWISE_SECRET, &sealed, &sealed, now_ms())
            .await?;
        Ok(true)
    }
    .await;
    store.close().await;
    kept
}

fn seal_pairwise_secret(
    data_key: &corridor::at_rest::KeyEncryptionKey,
    secret: &[u8],
) -> Result<Vec<u8>, StartError> {
    data_key
        .seal_node_secret(crate::storage::PAIRWISE_SECRET, secret)
        .map_err(|e| StartError::Mismatch(format!("cannot seal the pairwise secret: {e}")))
}

/// The stored pairwise secret, opened with the node's data key.
fn open_pairwise_secret(
    config: &Config,
    data_key: &corridor::at_rest::KeyEncryptionKey,
    sealed: &[u8],
) -> Result<[u8; corridor::caseref::PAIRWISE_SECRET_LEN], StartError> {
    let opened = data_key
        .open_node_secret(crate::storage::PAIRWISE_SECRET, sealed)
        .map_err(|_| {
            StartError::Mismatch(format!(
                "data key {} does not open the pairwise secret stored in {}: it is not the key this database was written with; restore that key file",
                config.keys.data_key.display(),
                config.database_path().display()
            ))
        })?;
    opened.as_slice().try_into().map_err(|_| {
        StartError::Store(crate::storage::StoreError::Corrupt(
            "the stored pairwise secret is not 32 bytes",
        ))
    })
}

fn refused_directory(
    config: &Config,
    directory: &Directory,
    refusal: crate::storage::DirectoryRefusal,
) -> StartError {
    let reason = match refusal {
        crate::storage::DirectoryRefusal::Older(newer) => format!(
            "its serial {} is older than serial {newer}, which this node accepted before; install the newer directory",
            directory.serial
        ),
        crate::storage::DirectoryRefusal::OtherContent => format!(
            "it differs from the directory of serial {} this node accepted before; a changed directory needs a higher serial, signed anew",
            directory.serial
        ),
    };
    StartError::Directory {
        path: config.directory.display().to_string(),
        reason,
    }
}

impl LoadedFiles {
    /// Loads everything the configuration names and checks that it is consistent: the
    /// directory lists this org with exactly these public keys and this certificate.
    fn load(config: &Config) -> Result<Self, StartError> {
        let directory = load_directory(config)?;
        let org = config.org_id.clone();
        let member = directory
            .get(&org)
            .ok_or_else(|| StartError::NotInDirectory(org.clone()))?;
        let signing_key = keys::load_signing_key(&config.keys.signing_key)?;
        let sealing_key = keys::load_sealing_key(&config.keys.sealing_key)?;
        let previous_sealing_keys = config
            .keys
            .previous_sealing_keys
            .iter()
            .map(|path| keys::load_sealing_key(path))
            .collect::<Result<Vec<_>, _>>()?;
        let data_key = keys::load_data_key(&config.keys.data_key)?;
        if signing_key.verifying_key() != member.signing_key {
            return Err(StartError::Mismatch(format!(
                "signing key does not match the directory entry of {org}"
            )));
        }
        if *sealing_key.public_key() != member.sealing_key {
            return Err(StartError::Mismatch(format!(
                "sealing key does not match the directory entry of {org}"
            )));
        }
        let f = &config.federation;
        let tls = TlsMaterial::load(&f.ca_cert, &f.cert, &f.key)?;
        let own_cert = tls
            .chain
            .first()
            .ok_or_else(|| StartError::Mismatch("certificate file holds no certificate".into()))?;
        match crate::tls::member_of_certificate(&directory, own_cert) {
            Ok(id) if id == org => {}
            Ok(id) => {
                return Err(StartError::Mismatch(format!(
                    "certificate names {id}, but this node is {org}"
                )));
            }
            Err(e) => {
                return Err(StartError::Mismatch(format!(
                    "this node's certificate is not the one the directory lists: {e}"
                )));
            }
        }
        Ok(Self {
            directory,
            signing_key,
            sealing_key,
            previous_sealing_keys,
            data_key,
            tls,
        })
    }
}

impl Node {
    /// Loads everything the configuration names, checks that it is consistent (see
    /// [`check_config`]) and opens the database, upgrading it if needed.
    pub async fn load(config: Config) -> Result<Arc<Self>, StartError> {
        let LoadedFiles {
            directory,
            signing_key,
            sealing_key,
            previous_sealing_keys,
            data_key,
            tls,
        } = LoadedFiles::load(&config)?;
        let directory = Arc::new(directory);
        let org = config.org_id.clone();
        let store = open_store(&config).await?;
        if let Some((case, wrapped)) = store.some_case_key().await? {
            check_data_key(&config, &data_key, &case, &wrapped)?;
        }
        // Before anything is written: a data key that does not open the stored secret
        // refuses the start with the database as it was.
        let stored_pairwise = match store.node_secret(crate::storage::PAIRWISE_SECRET).await? {
            Some(sealed) => Some(open_pairwise_secret(&config, &data_key, &sealed)?),
            None => {
                check_pairwise_history(&config, &store.pairwise_history().await?, &signing_key)?;
                None
            }
        };
        if let Some(refusal) = store
            .accept_directory(directory.serial, directory.digest)
            .await?
        {
            return Err(refused_directory(&config, &directory, refusal));
        }
        let pairwise = match stored_pairwise {
            Some(secret) => PairwiseKey::from_secret(&secret),
            None => keep_pairwise_secret(&config, &store, &data_key, &signing_key).await?,
        };
        let refusals = crate::refusals::RefusalBudgets::new(
            config.federation.refused_envelopes_burst,
            config.federation.refused_envelopes_per_minute,
        );
        let in_progress =
            crate::services::InProgress::new(directory.members().map(|m| m.id.clone()));
        let served_checkpoint_size = std::sync::atomic::AtomicU64::new(
            store
                .latest_checkpoint()
                .await?
                .map_or(0, |(size, _, _)| size),
        );
        Ok(Arc::new(Self {
            org,
            config,
            directory,
            signing_key: Arc::new(signing_key),
            sealing_key,
            previous_sealing_keys,
            pairwise,
            data_key,
            store,
            tls,
            outbox_ready: Notify::new(),
            handoff: crate::delivery::Handoff::new(1024),
            revocations: Default::default(),
            waiters: Default::default(),
            stopping: tokio::sync::watch::Sender::new(false),
            asking_to_purge: tokio::sync::Mutex::new(()),
            in_progress,
            refusals,
            metrics: crate::metrics::Metrics::new(),
            served_checkpoint_size,
        }))
    }
}

impl Node {
    /// What in the configuration does not fit the federation directory without keeping
    /// the node from working: witnesses that are not members. `check-config` prints them
    /// and a running node logs them, as warnings: a directory that drops a witness must
    /// not stop every node that named it.
    pub fn config_warnings(&self) -> Vec<String> {
        let mut warnings = witness_warnings(&self.config, &self.directory);
        if let Some(addr) = self.config.metrics.listen.filter(|a| !a.ip().is_loopback()) {
            warnings.push(format!(
                "metrics.listen {addr} is not a loopback address: metrics are served without authentication or TLS, so only the monitoring network should reach it"
            ));
        }
        warnings
    }
}

/// Witnesses the configuration names that are not members of the federation.
fn witness_warnings(config: &Config, directory: &Directory) -> Vec<String> {
    {
        let audit = &config.audit;
        let named = [
            ("audit.witnesses", &audit.witnesses),
            ("audit.witness_for", &audit.witness_for),
        ];
        named
            .into_iter()
            .flat_map(|(setting, orgs)| orgs.iter().map(move |org| (setting, org)))
            .filter(|(_, org)| directory.get(org).is_none())
            .map(|(setting, org)| {
                format!("{setting} names {org}, which is not a member of the federation")
            })
            .collect()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, as checkpoints and cosignatures count time.
pub fn now_s() -> u64 {
    u64::try_from(now_ms() / 1000).unwrap_or(0)
}
