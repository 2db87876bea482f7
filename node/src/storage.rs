//! Durable state in SQLite through sqlx (WAL, `synchronous = FULL`, embedded migrations).
//!
//! Every function that changes state does so in one transaction, so a crash leaves either
//! all of a change or none of it; callers acknowledge only after the function returns.
//! Every change is a job for the group-commit writer ([`crate::writer`]), which may
//! commit several callers' changes in one transaction but returns to each only after that
//! commit; being the only writer, it never waits for SQLite's write lock. Reads use a
//! small pool (and, for consents and case keys, a cache that writes check against).
//! Values that are protocol objects (envelopes, receipts, payloads) are stored as their
//! protobuf encodings.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use corridor::{MessageId, OrgId};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions as _, Row as _, SqliteConnection, SqlitePool};

use crate::cache::GuessCache;
use crate::writer::{self, LogAppender, RowWrite, Rows, Step, Tx, Writer};

/// Why a storage operation failed. Messages never contain stored values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "the database was written by a newer corridor-node (its schema has migration {0}, which this version does not know): run that version or a newer one, or restore the copy of the data directory taken before the upgrade"
    )]
    NewerSchema(i64),
    #[error("stored data is corrupt: {0}")]
    Corrupt(&'static str),
    /// What a write was prepared from changed before it was stored (another request on
    /// the same records, processed at once): nothing was written, and the caller reads
    /// again.
    #[error("{0} changed while the write was prepared; nothing was written")]
    ReadAgain(&'static str),
    #[error("audit entry {0} is missing from the log")]
    MissingEntry(u64),
    #[error("storage is closed")]
    Closed,
    /// A row write's answer named a place in the log that an earlier row of its group,
    /// not stored after all, left to another entry; the group runs again job by job.
    #[error("an answer named the wrong place in the audit log")]
    PlaceMoved,
    #[error("the WAL could not be emptied: a reader still holds an older snapshot")]
    CheckpointBusy,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct Store {
    /// Reads only: every write goes through the writer.
    pool: SqlitePool,
    /// Every write goes through here (group commit).
    writer: Writer,
    /// Recently looked-up tokens, so that a burst of requests costs one lookup.
    tokens: std::sync::Arc<std::sync::Mutex<TokenCache>>,
    /// Wrapped data keys of received cases, so that a referral for a known case reads
    /// nothing before it is stored. A cached key is only a guess: the transaction that
    /// stores a referral checks that it is still the case's key (see [`AcceptOutcome`]).
    case_keys: GuessCache<Vec<u8>>,
    /// Consents by case, so that sending a referral reads nothing before it is queued.
    /// Also only a guess: the transaction that queues a referral checks that its consent
    /// is neither withdrawn nor narrowed since (see [`Enqueued`]). Every consent write
    /// clears it once committed.
    consents: GuessCache<Vec<ConsentRow>>,
    /// Whether a checkpoint asked for after a purge has not succeeded yet
    /// ([`Store::checkpoint_if_owed`]).
    checkpoint_owed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// How an owed checkpoint connects: with a short busy timeout, for while readers
    /// hold it up it blocks every writer (see [`Store::checkpoint_if_owed`]).
    owed_checkpoint_options: SqliteConnectOptions,
}

/// What became of a consent handed to [`Store::withdraw_consent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Withdrawal {
    /// Withdrawn now; the referrals it cancelled.
    Withdrawn(Vec<MessageId>),
    /// It was withdrawn already; nothing changed.
    AlreadyWithdrawn,
}

/// What became of a referral handed to [`Store::enqueue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// Not queued: its consent was withdrawn.
    ConsentWithdrawn,
    /// Not queued: its consent was narrowed after it was read; gate it again.
    ConsentChanged,
    /// Not queued: its request key was used before, for this referral.
    AlreadyQueued(RequestedReferral),
}

/// The referral queued under a request key: what the caller asked for, as far as it is
/// not personal data, so that a retry can be told apart from a reuse of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedReferral {
    pub message_id: MessageId,
    pub case_id: String,
    pub recipient: String,
    pub purpose: String,
    /// What the request asked to send ([`corridor::PairwiseKey::request_digest`]);
    /// `None` for a referral queued before requests had digests.
    pub request_digest: Option<Vec<u8>>,
}

/// Users by token hash, each with when it was looked up.
type TokenCache = std::collections::HashMap<[u8; 32], (User, std::time::Instant)>;

/// How long a looked-up token is trusted without asking the database again: a token
/// revoked in the database stops working within this time.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);
/// Most tokens remembered at once.
const TOKEN_CACHE_MAX: usize = 1024;
/// Most case keys remembered at once (wrapped keys: about 100 bytes each).
const CASE_KEY_CACHE_MAX: usize = 4096;
/// Most cases whose consents are remembered at once.
const CONSENT_CACHE_MAX: usize = 4096;

/// Index and leaf hash of an appended audit entry.
pub type Appended = (u64, corridor::merkle::Hash);

/// A local user authenticated by a bearer token.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub role: corridor::LocalRole,
}

/// A consent row, as stored.
#[derive(Debug, Clone)]
pub struct ConsentRow {
    pub id: String,
    pub case_id: String,
    pub given_by: String,
    /// The guardian's basis and the language, sealed under the case's data key
    /// ([`ConsentDetails`]); `None` only for a row written before they were sealed.
    pub details_sealed: Option<Vec<u8>>,
    /// Those details in plaintext: empty, but for a row written before they were sealed.
    pub legacy_details: ConsentDetails,
    pub method: String,
    pub recorded_by: String,
    pub recorded_at_ms: i64,
    pub purposes: Vec<String>,
    pub recipient_orgs: Vec<String>,
    pub recipient_roles: Vec<String>,
    pub fields: Vec<String>,
    pub excluded_countries: Vec<String>,
    pub no_family_contact: bool,
    pub expires_at_ms: i64,
    pub withdrawn_at_ms: Option<i64>,
    pub narrowed_at_ms: Option<i64>,
    /// The fields its narrowings took away; `None` if never narrowed, or narrowed before
    /// they were recorded.
    pub removed_fields: Option<Vec<String>>,
    /// The `narrowed_at_ms` of the last narrowing that changed its restrictions or expiry
    /// (every recipient holding data under it is to learn them); `None` if none did, or
    /// only before this was recorded.
    pub terms_narrowed_at_ms: Option<i64>,
}

/// The scope columns of a consent, as space-separated lists.
pub struct ScopeColumns {
    pub purposes: String,
    pub recipient_orgs: String,
    pub recipient_roles: String,
    pub fields: String,
    pub excluded_countries: String,
    pub no_family_contact: bool,
    pub expires_at_ms: i64,
}

/// The free-text details of a consent: personal data, so stored sealed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsentDetails {
    pub guardian_basis: String,
    pub language: String,
}

/// A new consent to record.
pub struct NewConsent {
    pub id: String,
    pub case_id: String,
    pub given_by: String,
    /// [`ConsentDetails`], sealed under the case's data key.
    pub details_sealed: Vec<u8>,
    pub method: String,
    pub recorded_by: i64,
    pub recorded_at_ms: i64,
    pub scope: ScopeColumns,
}

/// `outbox.kind` of a consent withdrawal (`MessageKind::ConsentWithdrawal`).
const KIND_WITHDRAWAL: i64 = 2;

/// A sealed envelope to queue for delivery.
pub struct NewOutboxItem {
    pub message_id: MessageId,
    pub kind: i64,
    pub case_id: String,
    pub consent_id: String,
    /// The id under which the recipient knows the consent.
    pub consent_ref: String,
    pub recipient: OrgId,
    pub purpose: String,
    pub case_ref: String,
    pub envelope: Vec<u8>,
    pub envelope_digest: [u8; 32],
    pub created_by: i64,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// The caller's user id and request id, if it gave one (`user:request`).
    pub request_key: Option<String>,
    /// With a request key: what the request asked to send (see [`RequestedReferral`]).
    pub request_digest: Option<Vec<u8>>,
    /// For a referral: the names of the fields it discloses, space-separated.
    pub fields: Option<String>,
    /// For a consent narrowing: the consent's `narrowed_at_ms` it carries out.
    pub narrowed_at_ms: Option<i64>,
}

impl NewOutboxItem {
    /// The item as the delivery loop sees it before its first attempt.
    pub fn due(&self) -> DueItem {
        DueItem {
            message_id: self.message_id,
            kind: self.kind,
            recipient: self.recipient.to_string(),
            consent_id: self.consent_id.clone(),
            consent_ref: self.consent_ref.clone(),
            envelope: self.envelope.clone(),
            envelope_digest: self.envelope_digest.to_vec(),
            attempts: 0,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// An outbox row due for a delivery attempt.
#[derive(Debug, Clone)]
pub struct DueItem {
    pub message_id: MessageId,
    pub kind: i64,
    pub recipient: String,
    pub consent_id: String,
    /// The id under which the recipient knows the consent.
    pub consent_ref: String,
    pub envelope: Vec<u8>,
    pub envelope_digest: Vec<u8>,
    pub attempts: i64,
    pub expires_at_ms: i64,
}

/// A queued withdrawal or narrowing, as its renewal needs it.
#[derive(Debug, Clone)]
pub struct QueuedWithdrawal {
    pub kind: i64,
    pub case_id: String,
    pub consent_id: String,
    pub consent_ref: String,
    pub recipient: String,
    pub case_ref: String,
    pub created_by: i64,
    /// For a narrowing: what it asks, as stored (see `NarrowingOf` in the workflows).
    pub fields: Option<String>,
    /// For a narrowing: the consent's `narrowed_at_ms` it carries out.
    pub narrowed_at_ms: Option<i64>,
}

/// A referral sent (or on its way) under a consent, as a withdrawal needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentReferral {
    /// The user who sent it.
    pub created_by: i64,
    pub recipient: String,
    /// The case's reference at the recipient.
    pub case_ref: String,
    /// The consent's id at the recipient.
    pub consent_ref: String,
    pub message_id: MessageId,
    pub purpose: String,
    /// The names of the fields it disclosed, space-separated (`None` if sent before
    /// they were recorded).
    pub fields: Option<String>,
}

/// SQL, over the outbox as `o`: a row whose envelope the recipient may hold — every one
/// but those it refused at the first attempt (`mark_final` counts the refused attempt).
/// An envelope given up on after an earlier attempt (whose answer was lost, say, before
/// the member left the directory or a proxy answered for it) may have been stored there;
/// a withdrawal asks for it too, since asking for what a recipient never got costs
/// nothing. [`OutboxStatus::may_be_held`] says the same of one row. A macro, for
/// `concat!`: statements stay static strings.
macro_rules! may_be_held {
    () => {
        "(o.state != 'refused' OR o.attempts > 1)"
    };
}

/// Why a queued withdrawal or narrowing is sealed anew in a new envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Its envelope is at the end of its life, its recipient away.
    Expired,
    /// Its recipient kept refusing it: perhaps the envelope itself.
    Refused,
}

/// What the sender knows about an envelope it sent.
#[derive(Debug, Clone)]
pub struct OutboxStatus {
    pub message_id: MessageId,
    pub kind: i64,
    pub recipient: String,
    pub purpose: String,
    pub case_ref: String,
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub receipt: Option<Vec<u8>>,
    pub purge_receipt: Option<Vec<u8>>,
    /// For a consent narrowing: the consent's `narrowed_at_ms` it carries out.
    pub narrowed_at_ms: Option<i64>,
    /// The id under which the recipient knows the consent.
    pub consent_ref: String,
}

impl OutboxStatus {
    /// Whether the recipient may hold this envelope, as `may_be_held!` says in SQL.
    pub fn may_be_held(&self) -> bool {
        self.state != "refused" || self.attempts > 1
    }
}

/// A referral received, still encrypted.
#[derive(Debug, Clone)]
pub struct InboxRow {
    pub message_id: MessageId,
    pub sender: String,
    pub purpose: String,
    pub case_ref: String,
    pub case_key_id: String,
    pub consent_id: String,
    pub consent_expires_at_ms: i64,
    pub payload_sealed: Vec<u8>,
    pub received_at_ms: i64,
}

/// An envelope accepted before.
#[derive(Debug, Clone)]
pub struct SeenMessage {
    pub sender: String,
    pub envelope_digest: Vec<u8>,
    pub response: Vec<u8>,
}

/// What the receiving side stores for an accepted referral.
pub struct AcceptedReferral {
    pub message_id: MessageId,
    pub sender: OrgId,
    pub envelope_digest: [u8; 32],
    pub purpose: String,
    pub case_ref: String,
    pub case_key_id: String,
    /// The wrapped key `payload_sealed` is sealed under: it must still be the case's.
    pub wrapped_case_key: Vec<u8>,
    pub consent_id: String,
    pub consent_expires_at_ms: i64,
    pub payload_sealed: Vec<u8>,
    pub received_at_ms: i64,
    pub retain_until_ms: i64,
    /// When the sender sealed it (its envelope's `created_at_ms`, the sender's clock).
    pub sealed_at_ms: i64,
    /// Builds the answer (with the signed receipt) from the entry's place in the log.
    pub respond: Respond,
}

/// Builds the answer to an accepted envelope from its audit entry's index and leaf hash;
/// the answer is stored with it, so a replay gets the same one.
pub type Respond = Box<dyn Fn(Appended) -> Vec<u8> + Send + Sync>;

/// What the receiving side records for an accepted consent withdrawal.
pub struct AcceptedWithdrawal {
    pub request: PurgeRequest,
    pub consent_id: String,
    /// The referrals the purge receipt names; the purge must delete exactly these.
    pub expected: Vec<MessageId>,
}

/// A withdrawal or narrowing a peer sent, as its answer is recorded: exactly once per
/// message id, a replay getting the first answer.
pub struct PurgeRequest {
    pub message_id: MessageId,
    pub sender: OrgId,
    pub envelope_digest: [u8; 32],
    pub received_at_ms: i64,
    /// Builds the answer (receipt and purge receipt) from the entry's place in the log.
    pub respond: Respond,
}

/// How long an owed checkpoint waits for readers (and the writer) before it is owed again.
const OWED_CHECKPOINT_PATIENCE: Duration = Duration::from_millis(250);

/// Most referrals one narrowing has remembered as on their way (see
/// [`AcceptedNarrowing::named`]).
pub const MAX_NARROWED_REFERRALS: usize = 1024;

/// A narrowing a peer sent, ready to apply.
pub struct AcceptedNarrowing {
    pub request: PurgeRequest,
    pub consent_id: String,
    /// Every referral the narrowing names, and those of them stored under the consent
    /// when it was read: one stored since (it was on its way) makes the job fail, to be
    /// read again, rather than be left whole. Those not stored (the newest
    /// [`MAX_NARROWED_REFERRALS`]) are refused when they come.
    pub named: Vec<MessageId>,
    pub held: Vec<MessageId>,
    /// The referrals to delete: exactly those the purge receipt names.
    pub purged: Vec<MessageId>,
    /// The referrals whose fields are cut: the payload as read, and as it is to be.
    pub redacted: Vec<(MessageId, Vec<u8>, Vec<u8>)>,
    /// When the sender narrowed the consent (its clock): a referral under it sealed at
    /// or before then that arrives later is refused.
    pub narrowed_at_ms: i64,
    /// The consent's terms to store, as the narrowing restates them combined with those
    /// stored before, and those as read (`None` if none were): `None` from a sender that
    /// predates them, or if nothing under the consent is left to hold.
    pub terms: Option<(SealedTerms, Option<SealedTerms>)>,
    /// The consent's own data key, renewed: every referral stored under it is among
    /// `redacted`, sealed again under the new key.
    pub renewed: Option<RenewedKey>,
    /// The wrapped keys of the referrals under the consent as read (`None`: gone): what
    /// was cut, renewed or sealed was so under these, so another stored now (a
    /// concurrent narrowing renewed it) has the job read again.
    pub keys_read: Vec<(String, Option<Vec<u8>>)>,
}

/// A received case's data key replaced by a new one (see [`AcceptedNarrowing::renewed`]).
pub struct RenewedKey {
    pub case_key_id: String,
    /// The wrapped key as read: if another is stored now, the job is read again.
    pub read: Vec<u8>,
    pub wrapped: Vec<u8>,
}

/// A consent's terms sealed under the data key of a received case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedTerms {
    pub case_key_id: String,
    pub sealed: Vec<u8>,
}

/// How far narrowings of a consent another org narrowed reached this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarrowedConsent {
    pub narrowed_at_ms: i64,
    /// The terms they restated, while this node holds referrals under the consent.
    pub terms: Option<SealedTerms>,
}

/// Outcome of storing an accepted envelope.
pub enum AcceptOutcome {
    /// Stored now; answer with this new response.
    Stored(Vec<u8>),
    /// Already stored (a replay or a concurrent duplicate); answer with this.
    AlreadySeen(SeenMessage),
    /// Refused: the sender withdrew the consent the referral travels under.
    ConsentWithdrawn,
    /// Refused: the sender narrowed the consent the referral travels under after it
    /// sealed the referral (and cancelled it; it was already on its way): the referral
    /// was sealed at or before the narrowing, or the narrowing named it.
    ConsentNarrowed,
    /// Not stored: the data key the payload was sealed under is no longer the case's key
    /// (it was shredded meanwhile). Seal it again under [`Store::case_key`]'s answer.
    CaseKeyChanged,
}

/// Queued items due by `$1`, oldest first, at most `$2`: read along the index
/// `outbox_due`, never by scanning the outbox (see the test of their query plans).
const DUE_IDS_SQL: &str =
    "SELECT message_id FROM outbox WHERE state = 'queued' AND next_attempt_at_ms <= $1
     ORDER BY next_attempt_at_ms LIMIT $2";
/// When the earliest queued item is due.
const NEXT_DUE_SQL: &str = "SELECT MIN(next_attempt_at_ms) FROM outbox WHERE state = 'queued'";

fn message_id(bytes: Vec<u8>) -> Result<MessageId> {
    MessageId::from_bytes(&bytes).map_err(|_| StoreError::Corrupt("message id"))
}

/// Whether a directory of `serial` and `digest` may replace the one accepted before, of
/// `accepted` and `stored` (its digest, if recorded).
pub fn directory_refusal(
    serial: i64,
    digest: &[u8; 32],
    accepted: i64,
    stored: Option<&[u8]>,
) -> Option<DirectoryRefusal> {
    if accepted > serial {
        Some(DirectoryRefusal::Older(
            u64::try_from(accepted).unwrap_or(0),
        ))
    } else if accepted == serial && stored.is_some_and(|stored| stored != &digest[..]) {
        Some(DirectoryRefusal::OtherContent)
    } else {
        None
    }
}

fn split_list(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

/// The name under which the pairwise secret is stored ([`Store::keep_node_secret`]).
pub const PAIRWISE_SECRET: &str = "pairwise";

/// The schema migrations this version applies, in order.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What [`Store::inspect`] finds in a database, without changing it.
#[derive(Debug)]
pub struct Inspection {
    /// Schema migrations this version would apply at start.
    pub pending_migrations: usize,
    /// One stored case key (id, wrapped key), to check the data key against.
    pub some_case_key: Option<(String, Vec<u8>)>,
    /// The highest directory serial the node accepted, and the digest of that directory
    /// (if recorded).
    pub directory_serial: Option<(i64, Option<Vec<u8>>)>,
    /// The sealed pairwise secret, to check the data key against.
    pub pairwise_secret: Option<Vec<u8>>,
    /// Without one, how it was derived before.
    pub pairwise_history: Option<PairwiseHistory>,
}

/// What a database says of how its pairwise secret was derived before it kept one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairwiseHistory {
    /// Whether the node has ever created a case of its own (cases are never deleted),
    /// and so derived anything pairwise.
    pub has_local_cases: bool,
    /// The signing key (base64) it last started with, as its audit log records it.
    pub last_signing_key: Option<String>,
}

async fn pairwise_history(conn: &mut SqliteConnection) -> Result<PairwiseHistory> {
    let has_local_cases = sqlx::query("SELECT 1 FROM cases LIMIT 1")
        .fetch_optional(&mut *conn)
        .await?
        .is_some();
    // The newest entries first; the kind is looked for in the bytes, then decoded.
    let entries: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT entry FROM audit_entries WHERE instr(entry, 'node-started') > 0
         ORDER BY idx DESC LIMIT 16",
    )
    .fetch_all(&mut *conn)
    .await?;
    let last_signing_key = entries
        .iter()
        .filter_map(|bytes| corridor::audit::decode(bytes).ok())
        .find(|entry| entry.kind == "node-started")
        .and_then(|entry| {
            entry
                .attributes
                .into_iter()
                .find(|(name, _)| name == "signing_key")
                .map(|(_, key)| key)
        });
    Ok(PairwiseHistory {
        has_local_cases,
        last_signing_key,
    })
}

/// Why a directory is not the one to run on, by what this node accepted before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryRefusal {
    /// It accepted this newer serial.
    Older(u64),
    /// It accepted another directory of the same serial.
    OtherContent,
}

impl Store {
    /// Looks at the database at `path` without migrating or writing anything, so that
    /// a check may run beside a running node and before an upgrade is committed to.
    /// `None` if there is no database yet.
    pub async fn inspect(path: &Path) -> Result<Option<Inspection>> {
        if !path.exists() {
            return Ok(None);
        }
        let mut conn = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(false)
            .busy_timeout(Duration::from_secs(10))
            .connect()
            .await?;
        let table = async |conn: &mut SqliteConnection, name: &str| -> Result<bool> {
            Ok(
                sqlx::query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1")
                    .bind(name)
                    .fetch_optional(&mut *conn)
                    .await?
                    .is_some(),
            )
        };
        let column = async |conn: &mut SqliteConnection, table: &str, name: &str| -> Result<bool> {
            Ok(
                sqlx::query("SELECT 1 FROM pragma_table_info($1) WHERE name = $2")
                    .bind(table)
                    .bind(name)
                    .fetch_optional(&mut *conn)
                    .await?
                    .is_some(),
            )
        };
        let applied: Vec<i64> = if table(&mut conn, "_sqlx_migrations").await? {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&mut conn)
                .await?
        } else {
            Vec::new()
        };
        if let Some(newer) = applied
            .iter()
            .find(|v| !MIGRATOR.iter().any(|m| m.version == **v))
        {
            return Err(StoreError::NewerSchema(*newer));
        }
        let some_case_key = if table(&mut conn, "case_keys").await? {
            sqlx::query("SELECT id, wrapped_key FROM case_keys LIMIT 1")
                .fetch_optional(&mut conn)
                .await?
                .map(|r| (r.get(0), r.get(1)))
        } else {
            None
        };
        let directory_serial = if !table(&mut conn, "directory_state").await? {
            None
        } else if column(&mut conn, "directory_state", "digest").await? {
            sqlx::query_as("SELECT serial, digest FROM directory_state WHERE id = 1")
                .fetch_optional(&mut conn)
                .await?
        } else {
            sqlx::query_scalar("SELECT serial FROM directory_state WHERE id = 1")
                .fetch_optional(&mut conn)
                .await?
                .map(|serial: i64| (serial, None))
        };
        let pairwise_secret = if table(&mut conn, "node_secrets").await? {
            sqlx::query_scalar("SELECT sealed FROM node_secrets WHERE name = $1")
                .bind(PAIRWISE_SECRET)
                .fetch_optional(&mut conn)
                .await?
        } else {
            None
        };
        let pairwise_history = if pairwise_secret.is_none()
            && table(&mut conn, "cases").await?
            && table(&mut conn, "audit_entries").await?
        {
            Some(pairwise_history(&mut conn).await?)
        } else {
            None
        };
        Ok(Some(Inspection {
            pending_migrations: MIGRATOR
                .iter()
                .filter(|m| !applied.contains(&m.version))
                .count(),
            some_case_key,
            directory_serial,
            pairwise_secret,
            pairwise_history,
        }))
    }

    /// Opens (creating if needed) the database file and applies migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before we acknowledge anything it records.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // Deleted content is overwritten, so purged ciphertext and shredded keys do
            // not linger in free pages.
            .pragma("secure_delete", "ON")
            // Journals of savepoints and statements, and sorts, in memory: no temporary
            // file keeps old copies of pages (wrapped keys, sealed payloads) on disk.
            .pragma("temp_store", "MEMORY")
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // A local file needs no liveness ping before each use; the ping doubled the
            // cost of every read.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(version) => {
                StoreError::NewerSchema(version)
            }
            other => other.into(),
        })?;
        let writer = Writer::start(options.connect().await?).await?;
        Ok(Self {
            pool,
            writer,
            tokens: Default::default(),
            case_keys: GuessCache::new(CASE_KEY_CACHE_MAX),
            consents: GuessCache::new(CONSENT_CACHE_MAX),
            checkpoint_owed: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
            owed_checkpoint_options: options.busy_timeout(OWED_CHECKPOINT_PATIENCE),
        })
    }

    // ---- users and tokens -------------------------------------------------------------

    /// Issues a token for the user `name` of `role`, creating the user if there is none;
    /// `audit` makes the log entry from the user's id. A user keeps the role it was
    /// created with: if `name` holds another, nothing is written and its role is
    /// returned.
    pub async fn issue_token(
        &self,
        name: &str,
        role: corridor::LocalRole,
        token_hash: &[u8; 32],
        now_ms: i64,
        audit: Box<dyn Fn(i64) -> Vec<u8> + Send + Sync>,
    ) -> Result<Result<(), String>> {
        let data = (name.to_owned(), role, *token_hash, now_ms, audit);
        self.writer
            .run(data, |(name, role, token_hash, now_ms, audit), tx, log| {
                Box::pin(async move {
                    let conn = tx.conn().await?;
                    let held: Option<String> =
                        sqlx::query_scalar("SELECT role FROM users WHERE name = $1")
                            .bind(name)
                            .fetch_optional(&mut *conn)
                            .await?;
                    match held {
                        Some(held) if held != role.as_str() => return Ok(Err(held)),
                        Some(_) => {}
                        None => {
                            sqlx::query(
                                "INSERT INTO users (name, role, created_at_ms) VALUES ($1, $2, $3)",
                            )
                            .bind(name)
                            .bind(role.as_str())
                            .bind(now_ms)
                            .execute(&mut *conn)
                            .await?;
                        }
                    }
                    let user: i64 = sqlx::query_scalar(
                        "INSERT INTO tokens (token_hash, user_id, created_at_ms)
                         SELECT $1, id, $2 FROM users WHERE name = $3
                         RETURNING user_id",
                    )
                    .bind(&token_hash[..])
                    .bind(now_ms)
                    .bind(name)
                    .fetch_one(&mut *conn)
                    .await?;
                    log.append(audit(user))?;
                    Ok(Ok(()))
                })
            })
            .await
    }

    /// Every local user: name, role, live tokens, when created.
    pub async fn users(&self) -> Result<Vec<(String, String, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT u.name, u.role,
                    (SELECT COUNT(*) FROM tokens t
                     WHERE t.user_id = u.id AND t.revoked_at_ms IS NULL),
                    u.created_at_ms
             FROM users u ORDER BY u.name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Gives the user `name` the role `role`; `audit` makes the log entry from the user's
    /// id. Returns the role it held, or `None` if there is no such user; nothing is
    /// written if it held `role` already.
    pub async fn set_role(
        &self,
        name: &str,
        role: corridor::LocalRole,
        audit: Box<dyn Fn(i64) -> Vec<u8> + Send + Sync>,
    ) -> Result<Option<String>> {
        let data = (name.to_owned(), role, audit);
        self.writer
            .run(data, |(name, role, audit), tx, log| {
                Box::pin(async move {
                    let conn = tx.conn().await?;
                    let held: Option<(i64, String)> =
                        sqlx::query_as("SELECT id, role FROM users WHERE name = $1")
                            .bind(name)
                            .fetch_optional(&mut *conn)
                            .await?;
                    let Some((user, held)) = held else {
                        return Ok(None);
                    };
                    if held != role.as_str() {
                        sqlx::query("UPDATE users SET role = $2 WHERE id = $1")
                            .bind(user)
                            .bind(role.as_str())
                            .execute(&mut *conn)
                            .await?;
                        log.append(audit(user))?;
                    }
                    Ok(Some(held))
                })
            })
            .await
    }

    /// Revokes every live token of the user `name`; `audit` makes the log entry from the
    /// user's id. Returns how many were revoked, or `None` if there is no such user.
    pub async fn revoke_tokens(
        &self,
        name: &str,
        now_ms: i64,
        audit: Box<dyn Fn(i64) -> Vec<u8> + Send + Sync>,
    ) -> Result<Option<u64>> {
        let data = (name.to_owned(), now_ms, audit);
        self.writer
            .run(data, |(name, now_ms, audit), tx, log| {
                Box::pin(async move {
                    let conn = tx.conn().await?;
                    let user: Option<i64> =
                        sqlx::query_scalar("SELECT id FROM users WHERE name = $1")
                            .bind(name)
                            .fetch_optional(&mut *conn)
                            .await?;
                    let Some(user) = user else {
                        return Ok(None);
                    };
                    let revoked = sqlx::query(
                        "UPDATE tokens SET revoked_at_ms = $2
                         WHERE user_id = $1 AND revoked_at_ms IS NULL",
                    )
                    .bind(user)
                    .bind(*now_ms)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    log.append(audit(user))?;
                    Ok(Some(revoked))
                })
            })
            .await
    }

    pub async fn user_for_token(&self, token_hash: &[u8; 32]) -> Result<Option<User>> {
        if let Ok(cache) = self.tokens.lock()
            && let Some((user, at)) = cache.get(token_hash)
            && at.elapsed() < TOKEN_CACHE_TTL
        {
            return Ok(Some(user.clone()));
        }
        // Stamped before the read: a revocation or a change of role committed while it
        // runs then takes effect within the documented 5 s, not 5 s after the answer.
        let read_at = std::time::Instant::now();
        let user = self.lookup_token(token_hash).await?;
        if let (Some(user), Ok(mut cache)) = (&user, self.tokens.lock()) {
            if cache.len() >= TOKEN_CACHE_MAX {
                cache.retain(|_, (_, at)| at.elapsed() < TOKEN_CACHE_TTL);
                if cache.len() >= TOKEN_CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(*token_hash, (user.clone(), read_at));
        }
        Ok(user)
    }

    async fn lookup_token(&self, token_hash: &[u8; 32]) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT u.id, u.name, u.role FROM tokens t JOIN users u ON u.id = t.user_id
             WHERE t.token_hash = $1 AND t.revoked_at_ms IS NULL",
        )
        .bind(&token_hash[..])
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        let role: String = r.get(2);
        Ok(Some(User {
            id: r.get(0),
            name: r.get(1),
            role: role.parse().map_err(|_| {
                StoreError::Corrupt("a local user's role is not one this version knows")
            })?,
        }))
    }

    // ---- data keys and cases ----------------------------------------------------------

    /// The wrapped data key of a case, if it still exists (as far as the cache knows).
    pub async fn case_key(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let read_at = match self.case_keys.get(id) {
            Ok(wrapped) => return Ok(Some(wrapped)),
            Err(generation) => generation,
        };
        let row = sqlx::query("SELECT wrapped_key FROM case_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let wrapped: Option<Vec<u8>> = row.map(|r| r.get(0));
        if let Some(wrapped) = &wrapped {
            self.case_keys.fill(id, wrapped.clone(), read_at);
        }
        Ok(wrapped)
    }

    /// Any one stored data key, with its id: enough to check that the node's key file is
    /// the one they were wrapped with.
    pub async fn some_case_key(&self) -> Result<Option<(String, Vec<u8>)>> {
        let row = sqlx::query("SELECT id, wrapped_key FROM case_keys LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Transactions the writer has committed since the store was opened.
    pub fn commits(&self) -> u64 {
        self.writer.commits()
    }

    /// The node secret stored under `name`, sealed under the data key.
    pub async fn node_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT sealed FROM node_secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Whether this node has ever created a case of its own, and the signing key it last
    /// started with: what deciding how to keep its pairwise secret needs.
    pub async fn pairwise_history(&self) -> Result<PairwiseHistory> {
        pairwise_history(&mut *self.pool.acquire().await?).await
    }

    /// Stores a node secret under `name` unless one is stored, and returns the one stored
    /// now: `fresh` if this node has never created a case, so has derived nothing from
    /// any secret yet; `continuing` otherwise, the secret it derived with until now. The
    /// choice is made in the storing transaction, so no case created meanwhile is missed.
    pub async fn keep_node_secret(
        &self,
        name: &str,
        fresh: &[u8],
        continuing: &[u8],
        now_ms: i64,
    ) -> Result<Vec<u8>> {
        let data = (name.to_owned(), fresh.to_vec(), continuing.to_vec(), now_ms);
        self.writer
            .run(data, |(name, fresh, continuing, now_ms), tx, _| {
                Box::pin(async move {
                    let conn = tx.conn().await?;
                    // SQLite needs the WHERE to read ON CONFLICT as the upsert's.
                    sqlx::query(
                        "INSERT INTO node_secrets (name, sealed, created_at_ms)
                         SELECT $1, CASE WHEN EXISTS (SELECT 1 FROM cases) THEN $3 ELSE $2 END, $4
                         WHERE true
                         ON CONFLICT(name) DO NOTHING",
                    )
                    .bind(name)
                    .bind(fresh)
                    .bind(continuing)
                    .bind(now_ms)
                    .execute(&mut *conn)
                    .await?;
                    Ok(
                        sqlx::query_scalar("SELECT sealed FROM node_secrets WHERE name = $1")
                            .bind(name)
                            .fetch_one(&mut *conn)
                            .await?,
                    )
                })
            })
            .await
    }

    /// Stores `wrapped` as the data key of `id` unless one exists; returns the key that
    /// is stored now (the existing one wins a race).
    pub async fn ensure_case_key(&self, id: &str, wrapped: &[u8], now_ms: i64) -> Result<Vec<u8>> {
        // A key shredded after this write commits must not be cached by it.
        let read_at = self.case_keys.generation();
        let data = (id.to_owned(), wrapped.to_vec(), now_ms);
        self.writer
            .run(data, |(id, wrapped, now_ms), tx, _| {
                Box::pin(async move {
                    let conn = tx.conn().await?;
                    sqlx::query(
                        "INSERT INTO case_keys (id, wrapped_key, created_at_ms) VALUES ($1, $2, $3)
                         ON CONFLICT(id) DO NOTHING",
                    )
                    .bind(id)
                    .bind(wrapped)
                    .bind(now_ms)
                    .execute(&mut *conn)
                    .await?;
                    Ok(
                        sqlx::query("SELECT wrapped_key FROM case_keys WHERE id = $1")
                            .bind(id)
                            .fetch_one(&mut *conn)
                            .await?
                            .get(0),
                    )
                })
            })
            .await
            .inspect(|wrapped: &Vec<u8>| self.case_keys.fill(id, wrapped.clone(), read_at))
    }

    /// Shreds the data key of received case `id` unless a stored referral needs it: for a
    /// key made for a referral that was then refused, which must not outlive it.
    pub async fn drop_unused_received_key(&self, id: &str) -> Result<bool> {
        self.writer
            .run_then(
                id.to_owned(),
                |id, tx, _| {
                    Box::pin(async move {
                        let dropped = sqlx::query(tx.sql(
                            "DELETE FROM case_keys WHERE id = $1 AND id LIKE 'in:%'
                               AND NOT EXISTS (SELECT 1 FROM inbox WHERE case_key_id = $1)
                             RETURNING 1",
                        ))
                        .bind(id)
                        .fetch_optional(tx.conn().await?)
                        .await?;
                        Ok(dropped.is_some())
                    })
                },
                Some(self.case_keys.clearer()),
            )
            .await
    }

    /// Creates a case with its data key and encrypted label, in one transaction.
    pub async fn create_case(
        &self,
        id: &str,
        wrapped_key: &[u8],
        label_sealed: &[u8],
        user: i64,
        now_ms: i64,
    ) -> Result<()> {
        let data = (
            id.to_owned(),
            wrapped_key.to_vec(),
            label_sealed.to_vec(),
            user,
            now_ms,
        );
        self.writer
            .run(data, |(id, wrapped_key, label_sealed, user, now_ms), tx, _| {
                Box::pin(async move {
                    let conn = tx.conn().await?;
                    sqlx::query(
                        "INSERT INTO case_keys (id, wrapped_key, created_at_ms) VALUES ($1, $2, $3)",
                    )
                    .bind(id)
                    .bind(wrapped_key)
                    .bind(now_ms)
                    .execute(&mut *conn)
                    .await?;
                    sqlx::query(
                        "INSERT INTO cases (id, label_sealed, created_by, created_at_ms)
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(id)
                    .bind(label_sealed)
                    .bind(user)
                    .bind(now_ms)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    pub async fn case_exists(&self, id: &str) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM cases WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    // ---- consents ---------------------------------------------------------------------

    pub async fn record_consent(&self, c: NewConsent, audit: Vec<u8>) -> Result<()> {
        self.writer
            .run_then(
                (c, audit),
                |(c, audit), tx, log| {
                    Box::pin(async move {
                        let conn = tx.conn().await?;
                        let s = &c.scope;
                        sqlx::query(
                            "INSERT INTO consents (id, case_id, given_by, guardian_basis, method,
                            language, recorded_by, recorded_at_ms, purposes, recipient_orgs,
                            recipient_roles, fields, excluded_countries, no_family_contact,
                            expires_at_ms, details_sealed)
                         VALUES ($1, $2, $3, '', $4, '', $5, $6, $7, $8, $9, $10, $11, $12, $13,
                            $14)",
                        )
                        .bind(&c.id)
                        .bind(&c.case_id)
                        .bind(&c.given_by)
                        .bind(&c.method)
                        .bind(c.recorded_by)
                        .bind(c.recorded_at_ms)
                        .bind(&s.purposes)
                        .bind(&s.recipient_orgs)
                        .bind(&s.recipient_roles)
                        .bind(&s.fields)
                        .bind(&s.excluded_countries)
                        .bind(i64::from(s.no_family_contact))
                        .bind(s.expires_at_ms)
                        .bind(&c.details_sealed)
                        .execute(&mut *conn)
                        .await?;
                        log.append(audit.clone())?;
                        Ok(())
                    })
                },
                Some(self.consents.clearer()),
            )
            .await
    }

    const CONSENT_COLUMNS: &'static str = "c.id, c.case_id, c.given_by, c.guardian_basis, c.method,
        c.language, COALESCE(u.name, ''), c.recorded_at_ms, c.purposes, c.recipient_orgs,
        c.recipient_roles, c.fields, c.excluded_countries, c.no_family_contact, c.expires_at_ms,
        c.withdrawn_at_ms, c.narrowed_at_ms, c.details_sealed, c.removed_fields,
        c.terms_narrowed_at_ms";

    fn consent_row(r: sqlx::sqlite::SqliteRow) -> ConsentRow {
        ConsentRow {
            id: r.get(0),
            case_id: r.get(1),
            given_by: r.get(2),
            legacy_details: ConsentDetails {
                guardian_basis: r.get(3),
                language: r.get(5),
            },
            details_sealed: r.get(17),
            method: r.get(4),
            recorded_by: r.get(6),
            recorded_at_ms: r.get(7),
            purposes: split_list(r.get(8)),
            recipient_orgs: split_list(r.get(9)),
            recipient_roles: split_list(r.get(10)),
            fields: split_list(r.get(11)),
            excluded_countries: split_list(r.get(12)),
            no_family_contact: r.get::<i64, _>(13) != 0,
            expires_at_ms: r.get(14),
            withdrawn_at_ms: r.get(15),
            narrowed_at_ms: r.get(16),
            removed_fields: r
                .get::<Option<String>, _>(18)
                .map(|names| split_list(&names)),
            terms_narrowed_at_ms: r.get(19),
        }
    }

    /// Consents written before their details were sealed: (id, case id, details).
    pub async fn consents_with_plaintext_details(
        &self,
    ) -> Result<Vec<(String, String, ConsentDetails)>> {
        let rows = sqlx::query(
            "SELECT id, case_id, guardian_basis, language FROM consents
             WHERE details_sealed IS NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let details = ConsentDetails {
                    guardian_basis: r.get(2),
                    language: r.get(3),
                };
                (r.get(0), r.get(1), details)
            })
            .collect())
    }

    /// Request keys stored before request ids were keyed: `user:` and the id itself.
    pub async fn legacy_request_keys(&self) -> Result<Vec<String>> {
        let keys: Vec<String> =
            sqlx::query_scalar("SELECT request_key FROM outbox WHERE request_key IS NOT NULL")
                .fetch_all(&self.pool)
                .await?;
        Ok(keys
            .into_iter()
            .filter(|k| !corridor::PairwiseKey::is_request_key(k))
            .collect())
    }

    /// Replaces a request key stored before request ids were keyed with its key.
    pub async fn replace_request_key(&self, stored: &str, keyed: &str) -> Result<()> {
        self.writer
            .run_then(
                (stored.to_owned(), keyed.to_owned()),
                |(stored, keyed), tx, _log| {
                    Box::pin(async move {
                        sqlx::query("UPDATE outbox SET request_key = $1 WHERE request_key = $2")
                            .bind(keyed)
                            .bind(stored)
                            .execute(tx.conn().await?)
                            .await?;
                        Ok(())
                    })
                },
                None,
            )
            .await
    }

    /// Replaces the plaintext details of a consent written before they were sealed.
    pub async fn seal_consent_details(&self, id: &str, sealed: Vec<u8>) -> Result<()> {
        self.writer
            .run_then(
                (id.to_owned(), sealed),
                |(id, sealed), tx, _log| {
                    Box::pin(async move {
                        sqlx::query(
                            "UPDATE consents SET details_sealed = $1, guardian_basis = '',
                                language = ''
                             WHERE id = $2 AND details_sealed IS NULL",
                        )
                        .bind(sealed)
                        .bind(id)
                        .execute(tx.conn().await?)
                        .await?;
                        Ok(())
                    })
                },
                Some(self.consents.clearer()),
            )
            .await
    }

    /// The consents of a case, newest first; `fresh` reads past the cache.
    pub async fn consents_for_case(&self, case_id: &str, fresh: bool) -> Result<Vec<ConsentRow>> {
        let read_at = match self.consents.get(case_id) {
            Ok(rows) if !fresh => return Ok(rows),
            Ok(_) => self.consents.generation(),
            Err(generation) => generation,
        };
        let rows = self.read_consents_for_case(case_id).await?;
        self.consents.fill(case_id, rows.clone(), read_at);
        Ok(rows)
    }

    async fn read_consents_for_case(&self, case_id: &str) -> Result<Vec<ConsentRow>> {
        let sql = format!(
            "SELECT {} FROM consents c LEFT JOIN users u ON u.id = c.recorded_by
             WHERE c.case_id = $1 ORDER BY c.recorded_at_ms DESC, c.rowid DESC",
            Self::CONSENT_COLUMNS
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(case_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Self::consent_row).collect())
    }

    pub async fn consent(&self, id: &str) -> Result<Option<ConsentRow>> {
        let sql = format!(
            "SELECT {} FROM consents c LEFT JOIN users u ON u.id = c.recorded_by WHERE c.id = $1",
            Self::CONSENT_COLUMNS
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Self::consent_row))
    }

    /// Replaces a consent's scope with a narrower one (the caller has checked it is
    /// narrower than the scope it read), unless the consent was withdrawn or narrowed
    /// since (its `narrowed_at_ms` no longer `as_read`): a narrowing checked against a
    /// stale scope could widen the current one.
    ///
    /// In the same transaction, referrals still queued under the consent are cancelled
    /// (state `cancelled`, envelope dropped): they were sealed under the wider scope, and
    /// the sender cannot open them to gate them again. The recipients the narrowed
    /// consent no longer admits are asked to purge after it. `terms_changed` says whether
    /// the narrowing changes the restrictions or the expiry. Returns the cancelled ids,
    /// or `None` if the consent was not narrowed.
    ///
    /// The narrowing's time is later than every referral sealed under the consent, even
    /// with this node's clock stepped back: recipients refuse a referral sealed before a
    /// narrowing they carried out, which one still on its way when it was cancelled must be.
    #[allow(clippy::too_many_arguments)]
    pub async fn narrow_consent(
        &self,
        id: &str,
        scope: ScopeColumns,
        as_read: Option<i64>,
        removed_fields: Option<String>,
        terms_changed: bool,
        now_ms: i64,
        audit: Vec<u8>,
    ) -> Result<Option<Vec<MessageId>>> {
        let data = (
            id.to_owned(),
            scope,
            as_read,
            (removed_fields, terms_changed),
            now_ms,
            audit,
        );
        self.writer
            .run_then(
                data,
                |(id, s, as_read, (removed_fields, terms_changed), now_ms, audit), tx, log| {
                    Box::pin(async move {
                        let conn = tx.conn().await?;
                        let updated = sqlx::query(
                            "UPDATE consents SET purposes = $2, recipient_orgs = $3,
                            recipient_roles = $4, fields = $5, excluded_countries = $6,
                            no_family_contact = $7, expires_at_ms = $8,
                            narrowed_at_ms = MAX($9, COALESCE(narrowed_at_ms, 0) + 1,
                                (SELECT COALESCE(MAX(created_at_ms), 0) + 1 FROM outbox
                                 WHERE consent_id = $1 AND kind = 1)),
                            removed_fields = $11
                         WHERE id = $1 AND withdrawn_at_ms IS NULL AND narrowed_at_ms IS $10
                         RETURNING 1",
                        )
                        .bind(id)
                        .bind(&s.purposes)
                        .bind(&s.recipient_orgs)
                        .bind(&s.recipient_roles)
                        .bind(&s.fields)
                        .bind(&s.excluded_countries)
                        .bind(i64::from(s.no_family_contact))
                        .bind(s.expires_at_ms)
                        .bind(*now_ms)
                        .bind(*as_read)
                        .bind(removed_fields.as_deref())
                        .fetch_optional(&mut *conn)
                        .await?;
                        if updated.is_none() {
                            return Ok(None);
                        }
                        if *terms_changed {
                            sqlx::query(
                                "UPDATE consents SET terms_narrowed_at_ms = narrowed_at_ms
                                 WHERE id = $1",
                            )
                            .bind(&*id)
                            .execute(&mut *conn)
                            .await?;
                        }
                        let cancelled = sqlx::query(
                            "UPDATE outbox SET state = 'cancelled', envelope = NULL,
                                last_error = 'consent narrowed before delivery; send it again'
                             WHERE consent_id = $1 AND kind = 1 AND state = 'queued'
                             RETURNING message_id",
                        )
                        .bind(id)
                        .fetch_all(&mut *conn)
                        .await?
                        .into_iter()
                        .map(|r| message_id(r.get(0)))
                        .collect::<Result<Vec<_>>>()?;
                        log.append(audit.clone())?;
                        Ok(Some(cancelled))
                    })
                },
                Some(self.consents.clearer()),
            )
            .await
    }

    /// Referrals sent under a consent that may have reached (or may still reach) their
    /// recipient: all but the refused. An expired, cancelled or withdrawn one too: an
    /// attempt whose answer was lost, or one in flight when it ended, may have been
    /// stored.
    pub async fn referrals_under_consent(&self, consent_id: &str) -> Result<Vec<SentReferral>> {
        Self::select_referrals_under_consent(&self.pool, consent_id).await
    }

    async fn select_referrals_under_consent<'e, E>(
        executor: E,
        consent_id: &str,
    ) -> Result<Vec<SentReferral>>
    where
        E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
    {
        let rows = sqlx::query(concat!(
            "SELECT recipient, case_ref, consent_ref, message_id, created_by, purpose, fields
             FROM outbox o
             WHERE consent_id = $1 AND kind = 1 AND ",
            may_be_held!(),
            " ORDER BY recipient, created_at_ms"
        ))
        .bind(consent_id)
        .fetch_all(executor)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(SentReferral {
                    created_by: r.get(4),
                    recipient: r.get(0),
                    case_ref: r.get(1),
                    consent_ref: r.get(2),
                    message_id: message_id(r.get(3))?,
                    purpose: r.get(5),
                    fields: r.get(6),
                })
            })
            .collect()
    }

    /// Withdraws a consent in one transaction: marks it withdrawn, which keeps any more
    /// referrals from being queued under it, and cancels those still queued. `audit`
    /// makes the log entry from the number of recipients that may hold data under it
    /// (fixed from now on). The withdrawals those recipients are sent are queued after
    /// ([`Store::queue_withdrawals`]); one that a crash in between lost is queued when
    /// the node starts again ([`Store::withdrawals_missing`]). Returns the cancelled
    /// referrals.
    pub async fn withdraw_consent(
        &self,
        consent_id: &str,
        now_ms: i64,
        audit: Box<dyn Fn(u64) -> Vec<u8> + Send + Sync>,
    ) -> Result<Withdrawal> {
        let data = (consent_id.to_owned(), now_ms, audit);
        self.writer
            .run_then(
                data,
                |(consent_id, now_ms, audit), tx, log| {
                    Box::pin(async move {
                        let conn = tx.conn().await?;
                        let changed = sqlx::query(
                            "UPDATE consents SET withdrawn_at_ms = $2
                         WHERE id = $1 AND withdrawn_at_ms IS NULL",
                        )
                        .bind(&*consent_id)
                        .bind(*now_ms)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                        if changed == 0 {
                            return Ok(Withdrawal::AlreadyWithdrawn);
                        }
                        let cancelled = sqlx::query(
                            "UPDATE outbox SET state = 'withdrawn', envelope = NULL,
                            last_error = 'consent withdrawn before delivery'
                         WHERE consent_id = $1 AND kind = 1 AND state = 'queued'
                         RETURNING message_id",
                        )
                        .bind(&*consent_id)
                        .fetch_all(&mut *conn)
                        .await?
                        .into_iter()
                        .map(|r| message_id(r.get(0)))
                        .collect::<Result<Vec<_>>>()?;
                        let recipients: i64 = sqlx::query_scalar(concat!(
                            "SELECT COUNT(DISTINCT recipient) FROM outbox o
                             WHERE consent_id = $1 AND kind = 1 AND ",
                            may_be_held!()
                        ))
                        .bind(&*consent_id)
                        .fetch_one(&mut *conn)
                        .await?;
                        log.append(audit(u64::try_from(recipients).unwrap_or(0)))?;
                        Ok(Withdrawal::Withdrawn(cancelled))
                    })
                },
                Some(self.consents.clearer()),
            )
            .await
    }

    /// (consent id, recipient) of each recipient that may hold data under a withdrawn or
    /// narrowed consent (as [`Store::referrals_under_consent`] counts) and has no
    /// withdrawal of it queued or delivered.
    pub async fn withdrawals_missing(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(concat!(
            "SELECT DISTINCT o.consent_id, o.recipient FROM outbox o
                JOIN consents c ON c.id = o.consent_id
             WHERE (c.withdrawn_at_ms IS NOT NULL OR c.narrowed_at_ms IS NOT NULL)
               AND o.kind = 1 AND ",
            may_be_held!(),
            " AND NOT EXISTS (SELECT 1 FROM outbox w
                   WHERE w.consent_id = o.consent_id AND w.recipient = o.recipient
                     AND w.kind = 2 AND w.state IN ('queued', 'delivered'))"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Counts an attempt for every referral still queued that has none recorded: an
    /// attempt's outcome is written after its answer, so one the node stopped during may
    /// have reached its recipient without a trace here (see `may_be_held!`). Runs as the
    /// node starts, before anything is delivered; returns how many it marked.
    pub async fn count_attempts_cut_short(&self) -> Result<u64> {
        let marked = self
            .writer
            .run((), |(), tx, _| {
                Box::pin(async move {
                    let rows = sqlx::query(tx.sql(
                        "UPDATE outbox SET attempts = 1,
                            last_error = 'the node stopped while it may have been on its way'
                         WHERE kind = 1 AND state = 'queued' AND attempts = 0
                         RETURNING 1",
                    ))
                    .fetch_all(tx.conn().await?)
                    .await?;
                    Ok(rows.len() as u64)
                })
            })
            .await?;
        Ok(marked)
    }

    /// (message id, consent id, recipient, purpose) of every referral still queued.
    pub async fn queued_referrals(&self) -> Result<Vec<(MessageId, String, String, String)>> {
        let rows = sqlx::query(
            "SELECT message_id, consent_id, recipient, purpose FROM outbox
             WHERE kind = 1 AND state = 'queued'",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| Ok((message_id(r.get(0))?, r.get(1), r.get(2), r.get(3))))
            .collect()
    }

    /// Queues withdrawals and narrowings in one transaction. A withdrawal ends any
    /// narrowing still queued for its recipient under the same consent: it asks more.
    pub async fn queue_withdrawals(&self, withdrawals: Vec<NewOutboxItem>) -> Result<()> {
        self.writer
            .run(withdrawals, |withdrawals, tx, _log| {
                Box::pin(async move {
                    for item in withdrawals.iter() {
                        Self::insert_outbox(tx, item, None).await?;
                        if item.kind == KIND_WITHDRAWAL {
                            sqlx::query(tx.sql(
                                "UPDATE outbox SET state = 'withdrawn', envelope = NULL,
                                    last_error = 'superseded by a withdrawal'
                                 WHERE consent_id = $1 AND recipient = $2 AND kind = 3
                                   AND state = 'queued'",
                            ))
                            .bind(&item.consent_id)
                            .bind(item.recipient.as_str())
                            .execute(tx.conn().await?)
                            .await?;
                        }
                    }
                    Ok(())
                })
            })
            .await
    }

    /// The purge receipts (protobuf `PurgeReceipt`) the recipient of referral `id` gave
    /// for withdrawals and narrowings of the consent it was sent under.
    pub async fn purge_receipts_covering(&self, id: MessageId) -> Result<Vec<Vec<u8>>> {
        Ok(sqlx::query_scalar(
            "SELECT r.purge_receipt FROM outbox sent
                JOIN outbox asked ON asked.consent_id = sent.consent_id
                                 AND asked.recipient = sent.recipient AND asked.kind IN (2, 3)
                JOIN receipts r ON r.message_id = asked.message_id
             WHERE sent.message_id = $1 AND sent.kind = 1 AND r.purge_receipt IS NOT NULL",
        )
        .bind(&id.0[..])
        .fetch_all(&self.pool)
        .await?)
    }

    /// What the narrowing `id` asks, as stored with it.
    pub async fn narrowing_request(&self, id: MessageId) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT fields FROM outbox WHERE message_id = $1 AND kind = 3")
                .bind(&id.0[..])
                .fetch_optional(&self.pool)
                .await?
                .flatten(),
        )
    }

    /// Records what referrals disclose now (message id, field names; empty once purged).
    pub async fn record_disclosed(&self, disclosed: Vec<(MessageId, String)>) -> Result<()> {
        self.writer
            .run(disclosed, |disclosed, tx, _log| {
                Box::pin(async move {
                    for (id, fields) in disclosed.iter() {
                        sqlx::query(tx.sql(
                            "UPDATE outbox SET fields = $2 WHERE message_id = $1 AND kind = 1",
                        ))
                        .bind(&id.0[..])
                        .bind(fields)
                        .execute(tx.conn().await?)
                        .await?;
                    }
                    Ok(())
                })
            })
            .await
    }

    /// Every envelope sent under a consent, with its answers.
    pub async fn outbox_for_consent(&self, consent_id: &str) -> Result<Vec<OutboxStatus>> {
        let rows = sqlx::query(
            "SELECT o.message_id, o.kind, o.recipient, o.purpose, o.case_ref, o.state, o.attempts,
                o.last_error, o.created_at_ms, r.receipt, r.purge_receipt, o.narrowed_at_ms,
                o.consent_ref
             FROM outbox o LEFT JOIN receipts r ON r.message_id = o.message_id
             WHERE o.consent_id = $1 ORDER BY o.recipient, o.created_at_ms",
        )
        .bind(consent_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(outbox_status).collect()
    }

    // ---- outbox (sending side) --------------------------------------------------------

    /// Inserts an outbox row; with `consent_as_read`, only while its consent is neither
    /// withdrawn nor narrowed since it was read (its `narrowed_at_ms` unchanged): one
    /// statement, so a concurrent change cannot slip in between. Returns whether the row
    /// was inserted.
    async fn insert_outbox(
        tx: &mut Tx,
        item: &NewOutboxItem,
        consent_as_read: Option<Option<i64>>,
    ) -> Result<bool> {
        let mut rows = Rows::default();
        rows.row(|row| outbox_row(item, consent_as_read, row))?;
        Ok(!writer::run_rows(tx, QUEUE_SQL, rows).await?.is_empty())
    }

    /// Queues a referral, unless its consent was withdrawn or narrowed since it was read
    /// (`consent_narrowed_at_ms` is its last narrowing as read).
    pub async fn enqueue(
        &self,
        item: NewOutboxItem,
        consent_narrowed_at_ms: Option<i64>,
        audit: Vec<u8>,
    ) -> Result<Enqueued> {
        self.writer
            .write_row(QueueReferral {
                item,
                consent_narrowed_at_ms,
                audit,
            })
            .await
    }

    /// The referral queued under `request_key` (`user:request`), if any.
    pub async fn requested_referral(&self, request_key: &str) -> Result<Option<RequestedReferral>> {
        Self::select_requested(&self.pool, request_key).await
    }

    async fn select_requested<'e, E>(executor: E, key: &str) -> Result<Option<RequestedReferral>>
    where
        E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
    {
        let row = sqlx::query(
            "SELECT message_id, case_id, recipient, purpose, request_digest FROM outbox
             WHERE request_key = $1",
        )
        .bind(key)
        .fetch_optional(executor)
        .await?;
        row.map(|r| {
            Ok(RequestedReferral {
                message_id: message_id(r.get(0))?,
                case_id: r.get(1),
                recipient: r.get(2),
                purpose: r.get(3),
                request_digest: r.get(4),
            })
        })
        .transpose()
    }

    /// Ids of queued items whose next attempt is due, oldest first (cheap: no envelopes).
    pub async fn due_ids(&self, now_ms: i64, limit: i64) -> Result<Vec<MessageId>> {
        let rows = sqlx::query(DUE_IDS_SQL)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|r| message_id(r.get(0))).collect()
    }

    /// The queued item `id`, with its envelope, if it is still queued.
    pub async fn due_item(&self, id: MessageId) -> Result<Option<DueItem>> {
        let row = sqlx::query(
            "SELECT message_id, kind, recipient, consent_id, envelope, envelope_digest, attempts,
                expires_at_ms, consent_ref
             FROM outbox WHERE message_id = $1 AND state = 'queued'",
        )
        .bind(&id.0[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(DueItem {
                message_id: message_id(r.get(0))?,
                kind: r.get(1),
                recipient: r.get(2),
                consent_id: r.get(3),
                consent_ref: r.get(8),
                envelope: r
                    .get::<Option<Vec<u8>>, _>(4)
                    .ok_or(StoreError::Corrupt("queued envelope missing"))?,
                envelope_digest: r.get(5),
                attempts: r.get(6),
                expires_at_ms: r.get(7),
            })
        })
        .transpose()
    }

    /// When the earliest queued item is due, if any.
    pub async fn next_due_at(&self) -> Result<Option<i64>> {
        let row = sqlx::query(NEXT_DUE_SQL).fetch_one(&self.pool).await?;
        Ok(row.get(0))
    }

    /// Records the verified answer and marks the item delivered, in one transaction. The
    /// sealed envelope is no longer needed and is dropped.
    pub async fn mark_delivered(
        &self,
        id: MessageId,
        receipt: Vec<u8>,
        purge_receipt: Option<Vec<u8>>,
        now_ms: i64,
        audit: Vec<u8>,
    ) -> Result<()> {
        self.writer
            .write_row(Delivered {
                id,
                receipt,
                purge_receipt,
                now_ms,
                audit,
            })
            .await
    }

    /// The queued withdrawal or narrowing `id`, as a renewal needs it.
    pub async fn withdrawal_to_renew(&self, id: MessageId) -> Result<Option<QueuedWithdrawal>> {
        let row = sqlx::query(
            "SELECT case_id, consent_id, recipient, case_ref, created_by, consent_ref, kind,
                fields, narrowed_at_ms
             FROM outbox WHERE message_id = $1 AND kind IN (2, 3) AND state = 'queued'",
        )
        .bind(&id.0[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| QueuedWithdrawal {
            kind: r.get(6),
            fields: r.get(7),
            narrowed_at_ms: r.get(8),
            case_id: r.get(0),
            consent_id: r.get(1),
            recipient: r.get(2),
            case_ref: r.get(3),
            created_by: r.get(4),
            consent_ref: r.get(5),
        }))
    }

    /// Ends the queued withdrawal or narrowing `old` as `why` says, and queues `renewal`
    /// in its place, in one transaction. False if `old` was no longer queued.
    pub async fn renew_withdrawal(
        &self,
        old: MessageId,
        renewal: NewOutboxItem,
        why: Renewal,
    ) -> Result<bool> {
        let (state, reason) = match why {
            Renewal::Expired => ("expired", "expired undelivered; renewed"),
            Renewal::Refused => ("refused", "refused by the recipient; sealed anew"),
        };
        self.writer
            .run(
                (old, renewal, state, reason),
                |(old, renewal, state, reason), tx, _| {
                    Box::pin(async move {
                        let ended = sqlx::query(tx.sql(
                            "UPDATE outbox SET state = $2, attempts = attempts + 1,
                            envelope = NULL, last_error = $3
                         WHERE message_id = $1 AND kind IN (2, 3) AND state = 'queued'
                         RETURNING 1",
                        ))
                        .bind(&old.0[..])
                        .bind(*state)
                        .bind(*reason)
                        .fetch_optional(tx.conn().await?)
                        .await?;
                        if ended.is_none() {
                            return Ok(false);
                        }
                        Self::insert_outbox(tx, renewal, None).await?;
                        Ok(true)
                    })
                },
            )
            .await
    }

    /// Records a failed attempt and when to try again.
    pub async fn mark_retry(
        &self,
        id: MessageId,
        error: &str,
        next_attempt_at_ms: i64,
    ) -> Result<()> {
        let data = (id, error.to_owned(), next_attempt_at_ms);
        self.writer
            .run(data, |(id, error, next_attempt_at_ms), tx, _| {
                Box::pin(async move {
                    let conn = tx.conn().await?;
                    sqlx::query(
                        "UPDATE outbox SET attempts = attempts + 1, last_error = $2,
                            next_attempt_at_ms = $3
                         WHERE message_id = $1 AND state = 'queued'",
                    )
                    .bind(&id.0[..])
                    .bind(error)
                    .bind(*next_attempt_at_ms)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    /// Ends delivery of an item for good (`refused` or `expired`).
    pub async fn mark_final(&self, id: MessageId, state: &'static str, error: &str) -> Result<()> {
        let data = (id, state, error.to_owned());
        self.writer
            .run(data, |(id, state, error), tx, _| {
                Box::pin(async move {
                    let conn = tx.conn().await?;
                    sqlx::query(
                        "UPDATE outbox SET state = $2, attempts = attempts + 1, last_error = $3,
                            envelope = NULL
                         WHERE message_id = $1 AND state = 'queued'",
                    )
                    .bind(&id.0[..])
                    .bind(*state)
                    .bind(error)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    pub async fn outbox_status(&self, id: MessageId) -> Result<Option<OutboxStatus>> {
        let row = sqlx::query(
            "SELECT o.message_id, o.kind, o.recipient, o.purpose, o.case_ref, o.state, o.attempts,
                o.last_error, o.created_at_ms, r.receipt, r.purge_receipt, o.narrowed_at_ms,
                o.consent_ref
             FROM outbox o LEFT JOIN receipts r ON r.message_id = o.message_id
             WHERE o.message_id = $1",
        )
        .bind(&id.0[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(outbox_status).transpose()
    }

    /// (queued, delivered, other) counts of the outbox.
    pub async fn outbox_stats(&self) -> Result<(u64, u64, u64)> {
        let rows = sqlx::query("SELECT state, COUNT(*) FROM outbox GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let mut stats = (0, 0, 0);
        for r in rows {
            let state: String = r.get(0);
            let n = r.get::<i64, _>(1) as u64;
            match state.as_str() {
                "queued" => stats.0 += n,
                "delivered" => stats.1 += n,
                _ => stats.2 += n,
            }
        }
        Ok(stats)
    }

    // ---- inbox (receiving side) -------------------------------------------------------

    /// The envelope `sender` sent under `id`, if this node accepted it. Ids are the
    /// sender's: another member's envelope under the same id is another envelope.
    pub async fn seen(&self, sender: &OrgId, id: MessageId) -> Result<Option<SeenMessage>> {
        let row = sqlx::query(
            "SELECT sender, envelope_digest, response FROM seen_messages
             WHERE message_id = $1 AND sender = $2",
        )
        .bind(&id.0[..])
        .bind(sender.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| SeenMessage {
            sender: r.get(0),
            envelope_digest: r.get(1),
            response: r.get(2),
        }))
    }

    /// Records an accepted withdrawal with its answer; returns the outcome if nothing
    /// was inserted.
    /// Records `request` as seen with the answer built for the place its audit entry
    /// `audit` gets; `Err` with the outcome if its id was seen before (a replay).
    async fn answer_once(
        conn: &mut SqliteConnection,
        log: &LogAppender,
        audit: &[u8],
        request: &PurgeRequest,
    ) -> Result<std::result::Result<Vec<u8>, AcceptOutcome>> {
        let response = (request.respond)(log.next(audit));
        match Self::insert_seen(
            conn,
            request.message_id,
            &request.sender,
            &request.envelope_digest,
            &response,
            request.received_at_ms,
        )
        .await?
        {
            Some(seen) => Ok(Err(seen)),
            None => Ok(Ok(response)),
        }
    }

    async fn insert_seen(
        conn: &mut SqliteConnection,
        id: MessageId,
        sender: &OrgId,
        digest: &[u8; 32],
        response: &[u8],
        now_ms: i64,
    ) -> Result<Option<AcceptOutcome>> {
        let inserted = sqlx::query(
            "INSERT INTO seen_messages (message_id, sender, envelope_digest, response, received_at_ms)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT(message_id, sender) DO NOTHING",
        )
        .bind(&id.0[..])
        .bind(sender.as_str())
        .bind(&digest[..])
        .bind(response)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(None);
        }
        Self::not_accepted(conn, sender.as_str(), id, None)
            .await
            .map(Some)
    }

    /// Why an envelope was not recorded as seen: the id was seen before (a replay or a
    /// concurrent duplicate), or else (for a referral, whose sender, consent and sealing
    /// time are given) the consent it travels under is withdrawn or was narrowed after
    /// it was sealed, or else its data key is stale.
    async fn not_accepted(
        conn: &mut SqliteConnection,
        sender: &str,
        id: MessageId,
        consent: Option<(&str, i64)>,
    ) -> Result<AcceptOutcome> {
        let seen = sqlx::query(
            "SELECT sender, envelope_digest, response FROM seen_messages
             WHERE message_id = $1 AND sender = $2",
        )
        .bind(&id.0[..])
        .bind(sender)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(match seen {
            Some(r) => AcceptOutcome::AlreadySeen(SeenMessage {
                sender: r.get(0),
                envelope_digest: r.get(1),
                response: r.get(2),
            }),
            None => {
                let Some((consent_id, sealed_at_ms)) = consent else {
                    return Err(StoreError::Corrupt("an unseen envelope was not recorded"));
                };
                let withdrawn = sqlx::query(
                    "SELECT 1 FROM withdrawn_consents WHERE sender = $1 AND consent_id = $2",
                )
                .bind(sender)
                .bind(consent_id)
                .fetch_optional(&mut *conn)
                .await?;
                let narrowed = sqlx::query(
                    "SELECT 1 FROM narrowed_consents
                     WHERE sender = $1 AND consent_id = $2 AND narrowed_at_ms >= $3
                     UNION ALL
                     SELECT 1 FROM narrowed_referrals WHERE message_id = $4 AND sender = $1",
                )
                .bind(sender)
                .bind(consent_id)
                .bind(sealed_at_ms)
                .bind(&id.0[..])
                .fetch_optional(&mut *conn)
                .await?;
                if withdrawn.is_some() {
                    AcceptOutcome::ConsentWithdrawn
                } else if narrowed.is_some() {
                    AcceptOutcome::ConsentNarrowed
                } else {
                    AcceptOutcome::CaseKeyChanged
                }
            }
        })
    }

    /// Stores an accepted referral and the answer that acknowledges it, exactly once per
    /// message id, unless the sender has withdrawn its consent or the case's data key is
    /// no longer the one it is sealed under (both checked in the same transaction, so a
    /// concurrent withdrawal or key shredding cannot slip in between).
    pub async fn accept_referral(
        &self,
        referral: AcceptedReferral,
        audit: Vec<u8>,
    ) -> Result<AcceptOutcome> {
        self.writer
            .write_row(Accept {
                key: accept_key(&referral.sender, &referral.message_id),
                referral,
                audit,
                response: Vec::new(),
                place: 0,
            })
            .await
            .inspect(|outcome| {
                if matches!(outcome, AcceptOutcome::CaseKeyChanged) {
                    self.case_keys.clear();
                }
            })
    }

    /// The referrals a withdrawal from `sender` for `consent_id` would purge.
    pub async fn inbox_under_consent(
        &self,
        sender: &OrgId,
        consent_id: &str,
    ) -> Result<Vec<MessageId>> {
        let rows =
            sqlx::query("SELECT message_id FROM inbox WHERE sender = $1 AND consent_id = $2")
                .bind(sender.as_str())
                .bind(consent_id)
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(|r| message_id(r.get(0))).collect()
    }

    /// The referrals from `sender` under `consent_id`, still encrypted, for a narrowing.
    pub async fn inbox_rows_under_consent(
        &self,
        sender: &OrgId,
        consent_id: &str,
    ) -> Result<Vec<InboxRow>> {
        let rows = sqlx::query(
            "SELECT message_id, sender, purpose, case_ref, case_key_id, consent_id,
                consent_expires_at_ms, payload_sealed, received_at_ms
             FROM inbox WHERE sender = $1 AND consent_id = $2",
        )
        .bind(sender.as_str())
        .bind(consent_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(inbox_row).collect()
    }

    /// Applies a narrowing in one transaction: records that the envelope was seen with
    /// its answer, deletes the referrals it purges, replaces the payloads it redacts and
    /// destroys the data keys no referral needs any more. Each of those referrals must
    /// still be stored as read (under the consent, its payload unchanged), or the job
    /// fails whole and the sender's retry reads again: the purge receipt names exactly
    /// what was purged.
    pub async fn apply_narrowing(
        &self,
        n: AcceptedNarrowing,
        audit: Vec<u8>,
    ) -> Result<AcceptOutcome> {
        self.writer
            .run_then(
                (n, audit),
                |(n, audit), tx, log| {
                    Box::pin(async move {
                        let conn = tx.conn().await?;
                        let response = match Self::answer_once(conn, log, audit, &n.request).await?
                        {
                            Ok(response) => response,
                            Err(seen) => return Ok(seen),
                        };
                        let sender = &n.request.sender;
                        if let Some((_, as_read)) = &n.terms {
                            // The terms were combined with those stored when read: if
                            // another narrowing stored some since, read again.
                            let stored: Option<Vec<u8>> = sqlx::query_scalar(
                                "SELECT terms_sealed FROM narrowed_consents
                                 WHERE sender = $1 AND consent_id = $2",
                            )
                            .bind(sender.as_str())
                            .bind(&n.consent_id)
                            .fetch_optional(&mut *conn)
                            .await?
                            .flatten();
                            if stored.as_ref() != as_read.as_ref().map(|t| &t.sealed) {
                                return Err(StoreError::ReadAgain("the consent's stored terms"));
                            }
                        }
                        let terms = n.terms.as_ref().map(|(t, _)| t);
                        sqlx::query(
                            "INSERT INTO narrowed_consents (sender, consent_id, narrowed_at_ms,
                                 terms_case_key_id, terms_sealed)
                             VALUES ($1, $2, $3, $4, $5) ON CONFLICT(sender, consent_id) DO UPDATE
                             SET narrowed_at_ms = max(narrowed_at_ms, excluded.narrowed_at_ms),
                                 terms_case_key_id =
                                     COALESCE(excluded.terms_case_key_id, terms_case_key_id),
                                 terms_sealed = COALESCE(excluded.terms_sealed, terms_sealed)",
                        )
                        .bind(sender.as_str())
                        .bind(&n.consent_id)
                        .bind(n.narrowed_at_ms)
                        .bind(terms.map(|t| t.case_key_id.as_str()))
                        .bind(terms.map(|t| t.sealed.as_slice()))
                        .execute(&mut *conn)
                        .await?;
                        let named: std::collections::HashSet<&MessageId> = n.named.iter().collect();
                        let mut held = sqlx::query(
                            "SELECT message_id FROM inbox WHERE sender = $1 AND consent_id = $2",
                        )
                        .bind(sender.as_str())
                        .bind(&n.consent_id)
                        .fetch_all(&mut *conn)
                        .await?
                        .into_iter()
                        .map(|r| message_id(r.get(0)))
                        .collect::<Result<Vec<_>>>()?;
                        held.retain(|id| named.contains(id));
                        held.sort();
                        let mut read = n.held.clone();
                        read.sort();
                        if held != read {
                            return Err(StoreError::ReadAgain("what is held under the consent"));
                        }
                        // Those named and not held are on their way: refused when they
                        // come, whatever time their sender's clock stamped them with. The
                        // newest few, in one statement: a narrowing names at most the
                        // referrals sent under one consent to this node, and one naming
                        // more than that is no way to make this node store ids at will.
                        let mut on_their_way: Vec<&MessageId> = n
                            .named
                            .iter()
                            .filter(|id| held.binary_search(id).is_err())
                            .collect();
                        on_their_way.sort_unstable_by(|a, b| b.cmp(a));
                        on_their_way.truncate(MAX_NARROWED_REFERRALS);
                        let ids = serde_json::to_string(
                            &on_their_way
                                .iter()
                                .map(|id| id.to_hex())
                                .collect::<Vec<_>>(),
                        )
                        .map_err(|_| StoreError::Corrupt("referral ids as JSON"))?;
                        sqlx::query(
                            "INSERT INTO narrowed_referrals (message_id, sender, named_at_ms)
                             SELECT unhex(value), $2, $3 FROM json_each($1) WHERE true
                             ON CONFLICT DO NOTHING",
                        )
                        .bind(ids)
                        .bind(sender.as_str())
                        .bind(n.request.received_at_ms)
                        .execute(&mut *conn)
                        .await?;
                        let mut case_keys = std::collections::BTreeSet::new();
                        for id in &n.purged {
                            let deleted: Option<String> = sqlx::query_scalar(
                                "DELETE FROM inbox
                                 WHERE message_id = $1 AND sender = $2 AND consent_id = $3
                                 RETURNING case_key_id",
                            )
                            .bind(&id.0[..])
                            .bind(sender.as_str())
                            .bind(&n.consent_id)
                            .fetch_optional(&mut *conn)
                            .await?;
                            let Some(case_key) = deleted else {
                                return Err(StoreError::ReadAgain(
                                    "what is held under the consent",
                                ));
                            };
                            case_keys.insert(case_key);
                        }
                        for (id, read, redacted) in &n.redacted {
                            let replaced = sqlx::query(
                                "UPDATE inbox SET payload_sealed = $4
                                 WHERE message_id = $1 AND sender = $2 AND consent_id = $3
                                   AND payload_sealed = $5",
                            )
                            .bind(&id.0[..])
                            .bind(sender.as_str())
                            .bind(&n.consent_id)
                            .bind(redacted)
                            .bind(read)
                            .execute(&mut *conn)
                            .await?
                            .rows_affected();
                            if replaced != 1 {
                                return Err(StoreError::ReadAgain(
                                    "what is held under the consent",
                                ));
                            }
                        }
                        for (case_key_id, read) in &n.keys_read {
                            let stored: Option<Vec<u8>> = sqlx::query_scalar(
                                "SELECT wrapped_key FROM case_keys WHERE id = $1",
                            )
                            .bind(case_key_id)
                            .fetch_optional(&mut *conn)
                            .await?;
                            if stored != *read {
                                return Err(StoreError::ReadAgain("the case's data key"));
                            }
                        }
                        if let Some(renewed) = &n.renewed {
                            // Every referral under the key must have been sealed again.
                            let under: Vec<Vec<u8>> = sqlx::query_scalar(
                                "SELECT message_id FROM inbox WHERE case_key_id = $1",
                            )
                            .bind(&renewed.case_key_id)
                            .fetch_all(&mut *conn)
                            .await?;
                            let resealed = |id: &[u8]| n.redacted.iter().any(|(r, _, _)| r.0 == id);
                            if !under.iter().all(|id| resealed(id)) {
                                return Err(StoreError::ReadAgain(
                                    "what is held under the consent",
                                ));
                            }
                            let replaced: Option<i64> = sqlx::query_scalar(
                                "UPDATE case_keys SET wrapped_key = $2
                                 WHERE id = $1 AND wrapped_key = $3 RETURNING 1",
                            )
                            .bind(&renewed.case_key_id)
                            .bind(&renewed.wrapped)
                            .bind(&renewed.read)
                            .fetch_optional(&mut *conn)
                            .await?;
                            if replaced.is_none() {
                                return Err(StoreError::ReadAgain("the case's data key"));
                            }
                        }
                        // The terms just stored are forgotten at once if nothing is held
                        // under the consent (any more).
                        let consent = (sender.as_str().to_owned(), n.consent_id.clone());
                        Self::shred_what_nothing_held_needs(conn, &case_keys, &[consent].into())
                            .await?;
                        log.append(audit.clone())?;
                        Ok(AcceptOutcome::Stored(response))
                    })
                },
                Some(self.case_keys.clearer()),
            )
            .await
    }

    /// Applies a withdrawal in one transaction: records that the envelope was seen with
    /// its answer, remembers the consent as withdrawn, deletes the referrals under it and
    /// destroys the data keys no referral needs any more.
    pub async fn purge_consent(
        &self,
        w: AcceptedWithdrawal,
        audit: Vec<u8>,
    ) -> Result<AcceptOutcome> {
        self.writer
            .run_then(
                (w, audit),
                |(w, audit), tx, log| {
                    Box::pin(async move {
                        let conn = tx.conn().await?;
                        let response = match Self::answer_once(conn, log, audit, &w.request).await?
                        {
                            Ok(response) => response,
                            Err(seen) => return Ok(seen),
                        };
                        let sender = &w.request.sender;
                        sqlx::query(
                            "INSERT INTO withdrawn_consents (sender, consent_id, withdrawn_at_ms)
                         VALUES ($1, $2, $3) ON CONFLICT(sender, consent_id) DO NOTHING",
                        )
                        .bind(sender.as_str())
                        .bind(&w.consent_id)
                        .bind(w.request.received_at_ms)
                        .execute(&mut *conn)
                        .await?;
                        let deleted = sqlx::query(
                            "DELETE FROM inbox WHERE sender = $1 AND consent_id = $2
                             RETURNING message_id, case_key_id",
                        )
                        .bind(sender.as_str())
                        .bind(&w.consent_id)
                        .fetch_all(&mut *conn)
                        .await?;
                        let case_keys: std::collections::BTreeSet<String> =
                            deleted.iter().map(|r| r.get(1)).collect();
                        let mut purged = deleted
                            .iter()
                            .map(|r| message_id(r.get(0)))
                            .collect::<Result<Vec<_>>>()?;
                        purged.sort();
                        let mut expected = w.expected.clone();
                        expected.sort();
                        if purged != expected {
                            // The inbox changed between reading and purging (a referral
                            // arrived, or retention deleted one): the purge receipt would
                            // name the wrong referrals. The job fails, nothing of it stays,
                            // and the sender's retry gets the truth.
                            return Err(StoreError::ReadAgain("what is held under the consent"));
                        }
                        let consent = (sender.as_str().to_owned(), w.consent_id.clone());
                        Self::shred_what_nothing_held_needs(conn, &case_keys, &[consent].into())
                            .await?;
                        log.append(audit.clone())?;
                        Ok(AcceptOutcome::Stored(response))
                    })
                },
                Some(self.case_keys.clearer()),
            )
            .await
    }

    /// Destroys those of `case_keys` (the data keys of referrals just deleted) that no
    /// stored referral needs any more, and forgets the terms narrowings stated for each
    /// of `consents` (sender, consent id) under which nothing is held any more
    /// (restrictions say something of the person too). Scoped to what was deleted, so a
    /// request that deletes nothing costs nothing here.
    async fn shred_what_nothing_held_needs(
        conn: &mut SqliteConnection,
        case_keys: &std::collections::BTreeSet<String>,
        consents: &std::collections::BTreeSet<(String, String)>,
    ) -> Result<()> {
        // Terms first: a key stays while terms still held are sealed under it (those of
        // a consent with referrals under other keys, one made before keys per consent).
        for (sender, consent_id) in consents {
            sqlx::query(
                "UPDATE narrowed_consents SET terms_sealed = NULL, terms_case_key_id = NULL
                 WHERE sender = $1 AND consent_id = $2 AND terms_sealed IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM inbox WHERE inbox.sender = $1
                                     AND inbox.consent_id = $2)",
            )
            .bind(sender)
            .bind(consent_id)
            .execute(&mut *conn)
            .await?;
        }
        for id in case_keys {
            sqlx::query(
                "DELETE FROM case_keys WHERE id = $1 AND id LIKE 'in:%'
                 AND NOT EXISTS (SELECT 1 FROM inbox WHERE inbox.case_key_id = $1)
                 AND NOT EXISTS (SELECT 1 FROM narrowed_consents
                                 WHERE terms_case_key_id = $1)",
            )
            .bind(id)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// How far narrowings of a consent (by `sender`, under this node's id for it) reached
    /// this node; `None` if none did.
    pub async fn narrowed_consent(
        &self,
        sender: &str,
        consent_id: &str,
    ) -> Result<Option<NarrowedConsent>> {
        let row = sqlx::query(
            "SELECT narrowed_at_ms, terms_case_key_id, terms_sealed FROM narrowed_consents
             WHERE sender = $1 AND consent_id = $2",
        )
        .bind(sender)
        .bind(consent_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| NarrowedConsent {
            narrowed_at_ms: r.get(0),
            terms: match (
                r.get::<Option<String>, _>(1),
                r.get::<Option<Vec<u8>>, _>(2),
            ) {
                (Some(case_key_id), Some(sealed)) => Some(SealedTerms {
                    case_key_id,
                    sealed,
                }),
                _ => None,
            },
        }))
    }

    /// Deletes received referrals past their retention and shreds the keys no longer
    /// needed; `audit` makes the log entry from the count. Returns how many referrals
    /// were deleted.
    pub async fn enforce_retention(
        &self,
        now_ms: i64,
        audit: Box<dyn Fn(u64) -> Vec<u8> + Send + Sync>,
    ) -> Result<u64> {
        let (deleted, swept) = self
            .writer
            .run_then(
                (now_ms, audit),
                |(now_ms, audit), tx, log| {
                    Box::pin(async move {
                        let conn = tx.conn().await?;
                        let rows = sqlx::query(
                            "DELETE FROM inbox WHERE retain_until_ms <= $1
                             RETURNING case_key_id, sender, consent_id",
                        )
                        .bind(*now_ms)
                        .fetch_all(&mut *conn)
                        .await?;
                        let deleted = rows.len() as u64;
                        let case_keys = rows.iter().map(|r| r.get(0)).collect();
                        let consents = rows.iter().map(|r| (r.get(1), r.get(2))).collect();
                        Self::shred_what_nothing_held_needs(conn, &case_keys, &consents).await?;
                        // Also, once a run, keys no referral ever came to need (made for
                        // one whose storing a crash cut short), and terms left stored for
                        // a consent under which nothing is held (by any earlier version).
                        let terms: Vec<i64> = sqlx::query_scalar(
                            "UPDATE narrowed_consents SET terms_sealed = NULL, terms_case_key_id = NULL
                             WHERE terms_sealed IS NOT NULL
                               AND NOT EXISTS (SELECT 1 FROM inbox
                                               WHERE inbox.sender = narrowed_consents.sender
                                                 AND inbox.consent_id = narrowed_consents.consent_id)
                             RETURNING 1",
                        )
                        .fetch_all(&mut *conn)
                        .await?;
                        let keys: Vec<i64> = sqlx::query_scalar(
                            "DELETE FROM case_keys WHERE id LIKE 'in:%'
                             AND NOT EXISTS (SELECT 1 FROM inbox WHERE inbox.case_key_id = case_keys.id)
                             AND NOT EXISTS (SELECT 1 FROM narrowed_consents
                                             WHERE terms_case_key_id = case_keys.id)
                             RETURNING 1",
                        )
                        .fetch_all(&mut *conn)
                        .await?;
                        // Referrals narrowings named that can no longer arrive: their
                        // ids date from before anything deliverable, and so does the
                        // narrowing that named them (for ids that do not begin with
                        // their time).
                        let oldest = MessageId::oldest_deliverable(*now_ms);
                        sqlx::query(
                            "DELETE FROM narrowed_referrals
                             WHERE message_id < $1 AND named_at_ms < $2",
                        )
                        .bind(&oldest.0[..])
                        .bind(oldest.created_at_ms())
                        .execute(&mut *conn)
                        .await?;
                        if deleted > 0 {
                            log.append(audit(deleted))?;
                        }
                        Ok((deleted, !keys.is_empty() || !terms.is_empty()))
                    })
                },
                Some(self.case_keys.clearer()),
            )
            .await?;
        // What the sweep removed is as much to be checkpointed as a purge.
        if swept && deleted == 0 {
            self.checkpoint_owed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(deleted)
    }

    /// Moves the WAL into the database file and truncates it, so that deleted pages
    /// (zeroed by secure_delete) do not linger in the WAL. SQLite waits (up to the busy
    /// timeout) for readers of older snapshots; if one outlasts it, the WAL is not empty
    /// and this says so ([`StoreError::CheckpointBusy`]) rather than report a clean purge.
    /// One that fails stays owed, for [`Store::checkpoint_if_owed`] to try again.
    pub async fn checkpoint(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        self.checkpoint_owed.store(false, Ordering::SeqCst);
        let result = self.writer.checkpoint().await;
        if result.is_err() {
            self.checkpoint_owed.store(true, Ordering::SeqCst);
        }
        result
    }

    /// Tries again a checkpoint that failed (a reader outlasted the busy timeout), so
    /// that purged pages do not stay in the WAL until the next purge. Returns whether one
    /// was owed. On a connection of its own that waits for readers only briefly: while a
    /// checkpoint waits, no write commits, and a reader that held up one may hold up the
    /// next.
    pub async fn checkpoint_if_owed(&self) -> Result<bool> {
        use sqlx::ConnectOptions as _;
        use std::sync::atomic::Ordering;
        if !self.checkpoint_owed.swap(false, Ordering::SeqCst) {
            return Ok(false);
        }
        let attempt = async {
            use sqlx::Connection as _;
            let mut conn = self.owed_checkpoint_options.connect().await?;
            let busy: i64 = sqlx::query_scalar("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut conn)
                .await?;
            let _ = conn.close().await;
            match busy {
                0 => Ok(true),
                _ => Err(StoreError::CheckpointBusy),
            }
        }
        .await;
        if attempt.is_err() {
            self.checkpoint_owed.store(true, Ordering::SeqCst);
        }
        attempt
    }

    /// Up to `limit` received referrals, newest first (in the order they were stored),
    /// before `before` (the position of the last of the previous page), without their
    /// payloads. Paged by the table's own row order, so listing needs no index that
    /// every stored referral would have to update.
    pub async fn inbox_page(&self, limit: i64, before: Option<i64>) -> Result<Vec<InboxListing>> {
        let rows = sqlx::query(
            "SELECT rowid, message_id, sender, purpose, case_ref, received_at_ms FROM inbox
             WHERE rowid < $1 ORDER BY rowid DESC LIMIT $2",
        )
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(InboxListing {
                    position: r.get(0),
                    message_id: message_id(r.get(1))?,
                    sender: r.get(2),
                    purpose: r.get(3),
                    case_ref: r.get(4),
                    received_at_ms: r.get(5),
                })
            })
            .collect()
    }

    /// The received referrals stored under message id `id`, from `sender` if given.
    /// Ids are their senders': two members may have used the same one (at most two
    /// rows are read, enough to tell the caller to name the sender).
    pub async fn inbox_items(
        &self,
        id: MessageId,
        sender: Option<&OrgId>,
    ) -> Result<Vec<InboxRow>> {
        let rows = sqlx::query(
            "SELECT message_id, sender, purpose, case_ref, case_key_id, consent_id,
                consent_expires_at_ms, payload_sealed, received_at_ms
             FROM inbox WHERE message_id = $1 AND ($2 IS NULL OR sender = $2) LIMIT 2",
        )
        .bind(&id.0[..])
        .bind(sender.map(OrgId::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(inbox_row).collect()
    }

    #[cfg(test)]
    async fn inbox_item(&self, id: MessageId) -> Result<Option<InboxRow>> {
        Ok(self.inbox_items(id, None).await?.pop())
    }

    // ---- audit log ---------------------------------------------------------------------

    /// Appends entries for events that change nothing else.
    pub async fn append_audit(&self, entries: Vec<Vec<u8>>) -> Result<Vec<Appended>> {
        self.writer
            .run(entries, |entries, _, log| {
                Box::pin(async move { entries.iter().map(|e| log.append(e.clone())).collect() })
            })
            .await
    }

    /// The number of entries: one past the highest index (a gap left by tampering is
    /// reported by [`Self::audit_entries`] as a missing entry).
    pub async fn audit_size(&self) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit_entries")
            .fetch_one(&self.pool)
            .await?
            .get(0);
        Ok(n as u64)
    }

    /// Entries [start, end).
    pub async fn audit_entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>> {
        let rows = sqlx::query(
            "SELECT idx, entry FROM audit_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx",
        )
        .bind(start as i64)
        .bind(end as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (expected, r) in (start..end).zip(rows.iter()) {
            let idx: i64 = r.get(0);
            if idx as u64 != expected {
                return Err(StoreError::MissingEntry(expected));
            }
            out.push(r.get(1));
        }
        if (out.len() as u64) < end - start {
            return Err(StoreError::MissingEntry(start + out.len() as u64));
        }
        Ok(out)
    }

    /// Runs a Merkle read (root, proof) against the stored hashes.
    pub async fn with_audit_hashes<T>(
        &self,
        op: impl Fn(
            &dyn corridor::merkle::HashReader,
        ) -> std::result::Result<T, corridor::merkle::MerkleError>,
    ) -> Result<T> {
        crate::audit_log::with_hashes(&self.pool, op).await
    }

    /// The newest signed checkpoint's size, when it was signed and how many witnesses
    /// cosigned it, if the node signed any.
    pub async fn checkpoint_health(&self) -> Result<Option<(u64, i64, u64)>> {
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT c.size, c.signed_at_ms,
                    (SELECT COUNT(*) FROM cosignatures s WHERE s.size = c.size)
             FROM checkpoints c ORDER BY c.size DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(size, signed_at_ms, cosignatures)| {
            (size as u64, signed_at_ms, cosignatures as u64)
        }))
    }

    pub async fn latest_checkpoint(&self) -> Result<Option<(u64, Vec<u8>, String)>> {
        let row =
            sqlx::query("SELECT size, root, note FROM checkpoints ORDER BY size DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| (r.get::<i64, _>(0) as u64, r.get(1), r.get(2))))
    }

    /// The size of the newest checkpoint at least `at_least` of `witnesses` cosigned.
    pub async fn newest_cosigned_size(
        &self,
        witnesses: &[String],
        at_least: usize,
    ) -> Result<Option<u64>> {
        let witnesses = serde_json::to_string(witnesses)
            .map_err(|_| StoreError::Corrupt("witness names do not encode"))?;
        let size: Option<i64> = sqlx::query_scalar(
            "SELECT size FROM cosignatures
             WHERE witness IN (SELECT value FROM json_each($1))
             GROUP BY size HAVING COUNT(*) >= $2
             ORDER BY size DESC LIMIT 1",
        )
        .bind(witnesses)
        .bind(i64::try_from(at_least).unwrap_or(i64::MAX))
        .fetch_optional(&self.pool)
        .await?;
        Ok(size.map(|s| s as u64))
    }

    /// The checkpoint signed at `size` (size, root, note), if any.
    pub async fn checkpoint_at(&self, size: u64) -> Result<Option<(u64, Vec<u8>, String)>> {
        let row = sqlx::query("SELECT size, root, note FROM checkpoints WHERE size = $1")
            .bind(i64::try_from(size).unwrap_or(i64::MAX))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get::<i64, _>(0) as u64, r.get(1), r.get(2))))
    }

    pub async fn store_checkpoint(
        &self,
        size: u64,
        root: &[u8],
        note: &str,
        now_ms: i64,
    ) -> Result<()> {
        let data = (size as i64, root.to_vec(), note.to_owned(), now_ms);
        self.writer
            .run(data, |(size, root, note, now_ms), tx, _| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO checkpoints (size, root, note, signed_at_ms)
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(*size)
                    .bind(root)
                    .bind(note)
                    .bind(*now_ms)
                    .execute(tx.conn().await?)
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    pub async fn cosignatures(&self, size: u64) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT line FROM cosignatures WHERE size = $1 ORDER BY witness")
            .bind(size as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Records a witness's cosignature of our checkpoint of `size`, and that it now stands
    /// at that size.
    pub async fn store_cosignature(&self, size: u64, witness: &str, line: &str) -> Result<()> {
        let data = (size, witness.to_owned(), line.to_owned());
        self.writer
            .run(data, |(size, witness, line), tx, _| {
                Box::pin(async move {
                    let conn = tx.conn().await?;
                    sqlx::query(
                        "INSERT INTO cosignatures (size, witness, line) VALUES ($1, $2, $3)
                         ON CONFLICT(size, witness) DO UPDATE SET line = excluded.line",
                    )
                    .bind(*size as i64)
                    .bind(witness)
                    .bind(line)
                    .execute(&mut *conn)
                    .await?;
                    Self::upsert_witness_view(conn, witness, *size).await
                })
            })
            .await
    }

    async fn upsert_witness_view<'e, E>(executor: E, witness: &str, size: u64) -> Result<()>
    where
        E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
    {
        sqlx::query(
            "INSERT INTO witness_views (witness, size) VALUES ($1, $2)
             ON CONFLICT(witness) DO UPDATE SET size = excluded.size",
        )
        .bind(witness)
        .bind(size as i64)
        .execute(executor)
        .await?;
        Ok(())
    }

    pub async fn witness_view(&self, witness: &str) -> Result<u64> {
        let row = sqlx::query("SELECT size FROM witness_views WHERE witness = $1")
            .bind(witness)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<i64, _>(0) as u64).unwrap_or(0))
    }

    pub async fn set_witness_view(&self, witness: &str, size: u64) -> Result<()> {
        self.writer
            .run((witness.to_owned(), size), |(witness, size), tx, _| {
                Box::pin(async move {
                    Self::upsert_witness_view(tx.conn().await?, witness, *size).await
                })
            })
            .await
    }

    /// As a witness: the state stored for a log.
    pub async fn witnessed(&self, origin: &str) -> Result<Option<(u64, Vec<u8>)>> {
        let row = sqlx::query("SELECT size, root FROM witnessed_logs WHERE origin = $1")
            .bind(origin)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get::<i64, _>(0) as u64, r.get(1))))
    }

    /// As a witness: moves a log's state from `old_size` to the new one atomically; false
    /// if the stored state is no longer `old_size` (a concurrent update won).
    pub async fn advance_witnessed(
        &self,
        origin: &str,
        old_size: Option<u64>,
        new_size: u64,
        new_root: &[u8],
        now_ms: i64,
    ) -> Result<bool> {
        let data = (
            origin.to_owned(),
            old_size,
            new_size as i64,
            new_root.to_vec(),
            now_ms,
        );
        self.writer
            .run(
                data,
                |(origin, old_size, new_size, new_root, now_ms), tx, _| {
                    Box::pin(async move {
                        // A statement of its own (not folded behind BEGIN): rows_affected
                        // is this statement's count.
                        let conn = tx.conn().await?;
                        let changed = match old_size {
                            None => sqlx::query(
                                "INSERT INTO witnessed_logs (origin, size, root, updated_at_ms)
                             VALUES ($1, $2, $3, $4) ON CONFLICT(origin) DO NOTHING",
                            )
                            .bind(origin)
                            .bind(*new_size)
                            .bind(new_root)
                            .bind(*now_ms)
                            .execute(&mut *conn)
                            .await?
                            .rows_affected(),
                            Some(old) => sqlx::query(
                                "UPDATE witnessed_logs SET size = $2, root = $3, updated_at_ms = $4
                             WHERE origin = $1 AND size = $5",
                            )
                            .bind(origin)
                            .bind(*new_size)
                            .bind(new_root)
                            .bind(*now_ms)
                            .bind(*old as i64)
                            .execute(&mut *conn)
                            .await?
                            .rows_affected(),
                        };
                        Ok(changed == 1)
                    })
                },
            )
            .await
    }

    /// Records that the directory of `serial` and `digest` is in use, unless this node
    /// accepted a newer one, or another of the same serial, before: then says which and
    /// records nothing.
    pub async fn accept_directory(
        &self,
        serial: u64,
        digest: [u8; 32],
    ) -> Result<Option<DirectoryRefusal>> {
        let serial = i64::try_from(serial).map_err(|_| StoreError::Corrupt("directory serial"))?;
        self.writer
            .run((serial, digest), |(serial, digest), tx, _log| {
                Box::pin(async move {
                    let accepted: Option<(i64, Option<Vec<u8>>)> = sqlx::query_as(tx.sql(
                        "SELECT serial, digest FROM directory_state WHERE id = 1 AND serial >= $1",
                    ))
                    .bind(*serial)
                    .fetch_optional(tx.conn().await?)
                    .await?;
                    if let Some(refusal) = accepted.and_then(|(accepted, stored)| {
                        directory_refusal(*serial, digest, accepted, stored.as_deref())
                    }) {
                        return Ok(Some(refusal));
                    }
                    sqlx::query(
                        "INSERT INTO directory_state (id, serial, digest) VALUES (1, $1, $2)
                         ON CONFLICT(id) DO UPDATE SET serial = excluded.serial,
                                                       digest = excluded.digest",
                    )
                    .bind(*serial)
                    .bind(&digest[..])
                    .execute(tx.conn().await?)
                    .await?;
                    Ok(None)
                })
            })
            .await
    }

    /// One trivial query: the cost of a round trip to SQLite's worker thread.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}

fn outbox_status(r: sqlx::sqlite::SqliteRow) -> Result<OutboxStatus> {
    Ok(OutboxStatus {
        message_id: message_id(r.get(0))?,
        kind: r.get(1),
        recipient: r.get(2),
        purpose: r.get(3),
        case_ref: r.get(4),
        state: r.get(5),
        attempts: r.get(6),
        last_error: r.get(7),
        created_at_ms: r.get(8),
        receipt: r.get(9),
        purge_receipt: r.get(10),
        narrowed_at_ms: r.get(11),
        consent_ref: r.get(12),
    })
}

/// A received referral as the inbox lists it: no payload.
#[derive(Debug, Clone)]
pub struct InboxListing {
    /// Where it stands in the order referrals were stored.
    pub position: i64,
    pub message_id: MessageId,
    pub sender: String,
    pub purpose: String,
    pub case_ref: String,
    pub received_at_ms: i64,
}

fn inbox_row(r: sqlx::sqlite::SqliteRow) -> Result<InboxRow> {
    Ok(InboxRow {
        message_id: message_id(r.get(0))?,
        sender: r.get(1),
        purpose: r.get(2),
        case_ref: r.get(3),
        case_key_id: r.get(4),
        consent_id: r.get(5),
        consent_expires_at_ms: r.get(6),
        payload_sealed: r.get(7),
        received_at_ms: r.get(8),
    })
}

/// Inserts the outbox rows of [`outbox_row`], each only if its consent is as read (when
/// checked: a withdrawn consent, or one narrowed since, stops it) and its request key is
/// new; returns the message id of each row inserted.
const QUEUE_SQL: &str =
    "INSERT INTO outbox (message_id, kind, case_id, consent_id, recipient, purpose,
        case_ref, envelope, envelope_digest, created_by, created_at_ms, expires_at_ms,
        state, next_attempt_at_ms, request_key, consent_ref, request_digest, fields,
        narrowed_at_ms)
     SELECT substr($2, r ->> 0, r ->> 1), r ->> 2, r ->> 3, r ->> 4, r ->> 5, r ->> 6,
        r ->> 7, substr($2, r ->> 8, r ->> 9), substr($2, r ->> 10, r ->> 11), r ->> 12,
        r ->> 13, r ->> 14, 'queued', r ->> 13, r ->> 17, r ->> 18,
        substr($2, r ->> 19, r ->> 20), r ->> 21, r ->> 22
     FROM (SELECT value AS r FROM jsonb_each($1))
     WHERE NOT (r ->> 15)
        OR EXISTS (SELECT 1 FROM consents WHERE id = r ->> 4 AND withdrawn_at_ms IS NULL
                                           AND narrowed_at_ms IS r ->> 16)
     ON CONFLICT (request_key) WHERE request_key IS NOT NULL DO NOTHING
     RETURNING message_id";

/// An outbox item as a row of [`QUEUE_SQL`]; `consent_as_read` as in
/// [`Store::insert_outbox`].
fn outbox_row(
    item: &NewOutboxItem,
    consent_as_read: Option<Option<i64>>,
    row: &mut Rows,
) -> Result<()> {
    row.blob(&item.message_id.0)
        .int(item.kind)
        .text(&item.case_id)?
        .text(&item.consent_id)?
        .text(item.recipient.as_str())?
        .text(&item.purpose)?
        .text(&item.case_ref)?
        .blob(&item.envelope)
        .blob(&item.envelope_digest)
        .int(item.created_by)
        .int(item.created_at_ms)
        .int(item.expires_at_ms)
        .int(i64::from(consent_as_read.is_some()))
        .opt_int(consent_as_read.flatten())
        .opt_text(item.request_key.as_deref())?
        .text(&item.consent_ref)?
        .opt_blob(item.request_digest.as_deref())
        .opt_text(item.fields.as_deref())?
        .opt_int(item.narrowed_at_ms);
    Ok(())
}

/// A referral to queue (see [`Store::enqueue`]).
struct QueueReferral {
    item: NewOutboxItem,
    consent_narrowed_at_ms: Option<i64>,
    audit: Vec<u8>,
}

impl RowWrite for QueueReferral {
    type Output = Enqueued;
    const SQL: &'static str = QUEUE_SQL;

    fn key(&self) -> &[u8] {
        &self.item.message_id.0
    }

    fn encode(&mut self, _ahead: u64, _log: &LogAppender, row: &mut Rows) -> Result<()> {
        outbox_row(&self.item, Some(self.consent_narrowed_at_ms), row)
    }

    fn written(&self, log: &mut LogAppender) -> Result<Enqueued> {
        log.append(self.audit.clone())?;
        Ok(Enqueued::Queued)
    }

    fn not_written<'c>(&'c self, tx: &'c mut Tx, _log: &'c mut LogAppender) -> Step<'c, Enqueued> {
        Box::pin(async move {
            let item = &self.item;
            // Its request key may have been used meanwhile (a concurrent retry).
            if let Some(key) = &item.request_key
                && let Some(first) = Store::select_requested(tx.conn().await?, key).await?
            {
                return Ok(Enqueued::AlreadyQueued(first));
            }
            let withdrawn: Option<bool> = sqlx::query_scalar(
                "SELECT withdrawn_at_ms IS NOT NULL FROM consents WHERE id = $1",
            )
            .bind(&item.consent_id)
            .fetch_optional(tx.conn().await?)
            .await?;
            Ok(match withdrawn {
                Some(false) => Enqueued::ConsentChanged,
                Some(true) | None => Enqueued::ConsentWithdrawn,
            })
        })
    }
}

/// Records verified answers: a receipt row for each delivery not recorded before, and
/// the item marked delivered. 'withdrawn' and 'cancelled' too: an attempt in flight when
/// the consent was withdrawn or narrowed may still have arrived (a withdrawal sent to that
/// recipient covers the former). Returns the message id of each receipt that is new: only
/// such a delivery is logged. An item in those states never has a receipt yet (only a
/// delivery records one, and it leaves them), so its receipt row is the one just written,
/// and the update, the last statement, changes one item per new receipt.
/// `+state` keeps the update on the primary key: by the state index it would visit every
/// queued item.
const DELIVERED_SQL: &str =
    "INSERT INTO receipts (message_id, receipt, purge_receipt, verified_at_ms)
        SELECT m, substr($2, r ->> 2, r ->> 3), substr($2, r ->> 4, r ->> 5), r ->> 6
        FROM (SELECT substr($2, value ->> 0, value ->> 1) AS m, value AS r FROM jsonb_each($1))
        WHERE EXISTS (SELECT 1 FROM outbox WHERE message_id = m
                      AND state IN ('queued', 'withdrawn', 'cancelled'))
        ON CONFLICT(message_id) DO NOTHING
        RETURNING message_id;
     UPDATE outbox SET state = 'delivered', attempts = attempts + 1, last_error = NULL,
            envelope = NULL, delivered_at_ms =
                (SELECT verified_at_ms FROM receipts WHERE message_id = outbox.message_id)
        WHERE message_id IN (SELECT substr($2, value ->> 0, value ->> 1) FROM jsonb_each($1))
          AND +state IN ('queued', 'withdrawn', 'cancelled')";

/// A verified answer to record (see [`Store::mark_delivered`]).
struct Delivered {
    id: MessageId,
    receipt: Vec<u8>,
    purge_receipt: Option<Vec<u8>>,
    now_ms: i64,
    audit: Vec<u8>,
}

impl RowWrite for Delivered {
    type Output = ();
    const SQL: &'static str = DELIVERED_SQL;

    fn key(&self) -> &[u8] {
        &self.id.0
    }

    fn encode(&mut self, _ahead: u64, _log: &LogAppender, row: &mut Rows) -> Result<()> {
        row.blob(&self.id.0)
            .blob(&self.receipt)
            .opt_blob(self.purge_receipt.as_deref())
            .int(self.now_ms);
        Ok(())
    }

    fn written(&self, log: &mut LogAppender) -> Result<()> {
        log.append(self.audit.clone())?;
        Ok(())
    }

    /// A receipt recorded before: its delivery is logged already.
    fn not_written<'c>(&'c self, _tx: &'c mut Tx, _log: &'c mut LogAppender) -> Step<'c, ()> {
        Box::pin(async move { Ok(()) })
    }
}

/// Stores accepted referrals: the seen row with its answer, unless the sender withdrew
/// the consent or the case's data key is no longer the one the payload is sealed under,
/// and, only where that row is new (its answer is this row's), the inbox row. Returns
/// the key ([`accept_key`]) of each referral stored.
const ACCEPT_SQL: &str = "INSERT INTO seen_messages
        (message_id, sender, envelope_digest, response, received_at_ms)
        SELECT substr($2, r ->> 0, r ->> 1), r ->> 2, substr($2, r ->> 3, r ->> 4),
            substr($2, r ->> 5, r ->> 6), r ->> 7
        FROM (SELECT value AS r FROM jsonb_each($1))
        WHERE NOT EXISTS (SELECT 1 FROM withdrawn_consents
                          WHERE sender = r ->> 2 AND consent_id = r ->> 8)
          AND NOT EXISTS (SELECT 1 FROM narrowed_consents
                          WHERE sender = r ->> 2 AND consent_id = r ->> 8
                            AND narrowed_at_ms >= r ->> 18)
          AND NOT EXISTS (SELECT 1 FROM narrowed_referrals
                          WHERE message_id = substr($2, r ->> 0, r ->> 1) AND sender = r ->> 2)
          AND EXISTS (SELECT 1 FROM case_keys
                      WHERE id = r ->> 11 AND wrapped_key = substr($2, r ->> 16, r ->> 17))
        ON CONFLICT(message_id, sender) DO NOTHING;
     INSERT INTO inbox (message_id, sender, purpose, case_ref, case_key_id, consent_id,
            consent_expires_at_ms, payload_sealed, received_at_ms, retain_until_ms)
        SELECT s.message_id, r ->> 2, r ->> 9, r ->> 10, r ->> 11, r ->> 8, r ->> 12,
            substr($2, r ->> 13, r ->> 14), r ->> 7, r ->> 15
        FROM (SELECT value AS r FROM jsonb_each($1))
        CROSS JOIN seen_messages s ON s.message_id = substr($2, r ->> 0, r ->> 1)
                            AND s.sender = r ->> 2
                            AND s.response = substr($2, r ->> 5, r ->> 6)
        WHERE true
        ON CONFLICT(message_id, sender) DO NOTHING
        RETURNING unhex(hex(sender) || '00' || hex(message_id))";

/// What [`ACCEPT_SQL`] returns for a stored referral: its sender, a zero byte (org ids
/// have none) and its message id, since ids are unique per sender only.
fn accept_key(sender: &OrgId, id: &MessageId) -> Vec<u8> {
    [sender.as_str().as_bytes(), &[0], &id.0].concat()
}

/// An accepted referral to store (see [`Store::accept_referral`]).
struct Accept {
    referral: AcceptedReferral,
    key: Vec<u8>,
    audit: Vec<u8>,
    /// The answer, built for the place in the log (`place`) the entry gets if every row
    /// before it in the statement is stored.
    response: Vec<u8>,
    place: u64,
}

impl RowWrite for Accept {
    type Output = AcceptOutcome;
    const SQL: &'static str = ACCEPT_SQL;

    fn key(&self) -> &[u8] {
        &self.key
    }

    fn encode(&mut self, ahead: u64, log: &LogAppender, row: &mut Rows) -> Result<()> {
        let a = &self.referral;
        let appended = log.upcoming(ahead, &self.audit);
        self.place = appended.0;
        self.response = (a.respond)(appended);
        row.blob(&a.message_id.0)
            .text(a.sender.as_str())?
            .blob(&a.envelope_digest)
            .blob(&self.response)
            .int(a.received_at_ms)
            .text(&a.consent_id)?
            .text(&a.purpose)?
            .text(&a.case_ref)?
            .text(&a.case_key_id)?
            .int(a.consent_expires_at_ms)
            .blob(&a.payload_sealed)
            .int(a.retain_until_ms)
            .blob(&a.wrapped_case_key)
            .int(a.sealed_at_ms);
        Ok(())
    }

    fn written(&self, log: &mut LogAppender) -> Result<AcceptOutcome> {
        let (place, _) = log.append(self.audit.clone())?;
        if place != self.place {
            // A row before it was not stored, so its answer names the wrong place.
            return Err(StoreError::PlaceMoved);
        }
        Ok(AcceptOutcome::Stored(self.response.clone()))
    }

    fn not_written<'c>(
        &'c self,
        tx: &'c mut Tx,
        _log: &'c mut LogAppender,
    ) -> Step<'c, AcceptOutcome> {
        Box::pin(async move {
            let a = &self.referral;
            let consent = Some((a.consent_id.as_str(), a.sealed_at_ms));
            Store::not_accepted(tx.conn().await?, a.sender.as_str(), a.message_id, consent).await
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use corridor::merkle;

    #[test]
    fn a_directory_is_refused_when_older_or_other_at_the_same_serial() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(
            directory_refusal(2, &a, 3, Some(&b)),
            Some(DirectoryRefusal::Older(3))
        );
        assert_eq!(
            directory_refusal(3, &a, 3, Some(&b)),
            Some(DirectoryRefusal::OtherContent)
        );
        assert_eq!(directory_refusal(3, &a, 3, Some(&a)), None);
        // Accepted before digests were recorded: the same serial is taken, and recorded.
        assert_eq!(directory_refusal(3, &a, 3, None), None);
        assert_eq!(directory_refusal(4, &a, 3, Some(&b)), None);
    }

    /// A new store in a directory of its own (`name` and this process's id).
    pub(crate) async fn temp_store(name: &str) -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("corridor-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let store = Store::open(&dir.join("store.db")).await.expect("open");
        (store, dir)
    }

    /// Adds the user "alice" (one audit entry, `audit`) and returns her id.
    /// The audit log's size, once its stored hashes are checked to give the root of its
    /// entries: what is stored is one consistent tree.
    pub(crate) async fn stored_tree_size(store: &Store) -> u64 {
        let size = store.audit_size().await.expect("size");
        let entries = store.audit_entries(0, size).await.expect("entries");
        let leaves: Vec<_> = entries.iter().map(|e| merkle::leaf_hash(e)).collect();
        let stored = store
            .with_audit_hashes(|r| merkle::tree_hash(size, r))
            .await
            .expect("tree hash");
        assert_eq!(stored, merkle::root(&leaves), "stored hashes and entries");
        size
    }

    pub(crate) async fn add_alice(store: &Store, audit: Vec<u8>) -> i64 {
        store
            .issue_token(
                "alice",
                corridor::LocalRole::Admin,
                &[7; 32],
                0,
                Box::new(move |_| audit.clone()),
            )
            .await
            .expect("token")
            .expect("alice is new");
        let alice = store.user_for_token(&[7; 32]).await.expect("lookup");
        alice.expect("alice exists").id
    }

    fn shelter_my() -> OrgId {
        OrgId::new("shelter-my").expect("org id")
    }

    fn referral(wrapped_case_key: &[u8]) -> AcceptedReferral {
        AcceptedReferral {
            message_id: MessageId([1; 16]),
            sender: shelter_my(),
            envelope_digest: [2; 32],
            purpose: "reintegration".into(),
            case_ref: "case-ref".into(),
            case_key_id: "in:shelter-my:case-ref".into(),
            wrapped_case_key: wrapped_case_key.to_vec(),
            consent_id: "consent-1".into(),
            consent_expires_at_ms: 10,
            payload_sealed: b"sealed".to_vec(),
            received_at_ms: 1,
            retain_until_ms: 10,
            sealed_at_ms: 0,
            respond: Box::new(|(index, _)| format!("receipt for entry {index}").into_bytes()),
        }
    }

    fn entry() -> Vec<u8> {
        corridor::audit::encode(&corridor::audit::Event::RetentionPurge { deleted: 0 }, 0)
    }

    fn scope(fields: &str) -> ScopeColumns {
        ScopeColumns {
            purposes: "reintegration".into(),
            recipient_orgs: "shelter-kh".into(),
            recipient_roles: String::new(),
            fields: fields.into(),
            excluded_countries: String::new(),
            no_family_contact: false,
            expires_at_ms: i64::MAX,
        }
    }

    /// Alice, her case "case-1" and its consent "consent-1" to `fields`; returns her id.
    async fn case_with_consent(store: &Store, fields: &str) -> i64 {
        let alice = add_alice(store, entry()).await;
        store
            .create_case("case-1", b"key", b"label", alice, 1)
            .await
            .expect("case");
        let consent = NewConsent {
            id: "consent-1".into(),
            case_id: "case-1".into(),
            given_by: "person".into(),
            details_sealed: b"sealed".to_vec(),
            method: "written".into(),
            recorded_by: alice,
            recorded_at_ms: 1,
            scope: scope(fields),
        };
        store
            .record_consent(consent, entry())
            .await
            .expect("consent");
        alice
    }

    fn outbox_item(n: u8) -> NewOutboxItem {
        NewOutboxItem {
            message_id: MessageId([n; 16]),
            kind: 1,
            case_id: "case-1".into(),
            consent_id: "consent-1".into(),
            consent_ref: "consent-1-at-kh".into(),
            recipient: OrgId::new("shelter-kh").expect("org id"),
            purpose: "reintegration".into(),
            case_ref: "case-ref".into(),
            envelope: b"envelope".to_vec(),
            envelope_digest: [n; 32],
            created_by: 1,
            created_at_ms: 1,
            expires_at_ms: i64::MAX,
            request_key: None,
            request_digest: None,
            fields: None,
            narrowed_at_ms: None,
        }
    }

    /// The delivery loop's scans read the index of due items, not the outbox, whose rows
    /// carry whole envelopes.
    #[tokio::test]
    async fn the_due_scans_use_the_index_of_queued_items() {
        let (store, dir) = temp_store("due-plan").await;
        for (sql, params) in [(DUE_IDS_SQL, 2), (NEXT_DUE_SQL, 0)] {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")));
            for _ in 0..params {
                query = query.bind(0i64);
            }
            let plan: Vec<String> = query
                .fetch_all(&store.pool)
                .await
                .expect("plan")
                .iter()
                .map(|r| r.get::<String, _>(3))
                .collect();
            assert!(
                plan.iter().any(|step| step.contains("INDEX outbox_due")),
                "{sql}: {plan:?}"
            );
            assert!(
                !plan.iter().any(|step| step.starts_with("SCAN outbox")),
                "{sql}: {plan:?}"
            );
        }
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The row statements look each row up by key: none walks a table or the index of
    /// queued items (which holds the whole backlog) per group.
    #[tokio::test]
    async fn the_row_statements_look_rows_up_by_key() {
        let (store, dir) = temp_store("row-plans").await;
        for sql in [QUEUE_SQL, DELIVERED_SQL, ACCEPT_SQL] {
            for statement in sql.split(';') {
                let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "EXPLAIN QUERY PLAN {statement}"
                )))
                .bind("[]")
                .bind(Vec::<u8>::new())
                .fetch_all(&store.pool)
                .await
                .expect("plan")
                .iter()
                .map(|r| r.get::<String, _>(3))
                .collect();
                let walks = |step: &String| {
                    (step.starts_with("SCAN") && !step.starts_with("SCAN jsonb_each"))
                        || step.contains("outbox_due")
                };
                assert!(!plan.iter().any(walks), "{statement}: {plan:?}");
            }
        }
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A withdrawal asks every recipient that may hold a referral to purge it: one whose
    /// referral expired, was cancelled (by a narrowing) or was given up on after an
    /// earlier attempt too, since an attempt whose answer was lost may have arrived. Only
    /// one refused at its first attempt is known not to have.
    #[tokio::test]
    async fn a_withdrawal_reaches_the_recipients_of_expired_and_cancelled_referrals() {
        let (store, dir) = temp_store("withdraw-expired").await;
        let alice = case_with_consent(&store, "age_band").await;
        for n in 1..=5 {
            let mut item = outbox_item(n);
            item.created_by = alice;
            store.enqueue(item, None, entry()).await.expect("queued");
        }
        store
            .mark_final(MessageId([1; 16]), "expired", "timed out")
            .await
            .expect("expired");
        store
            .mark_final(MessageId([2; 16]), "refused", "refused by recipient")
            .await
            .expect("refused");
        store
            .mark_final(MessageId([4; 16]), "cancelled", "consent narrowed")
            .await
            .expect("cancelled");
        // Given up on after an attempt whose answer was lost: the recipient may hold it.
        store
            .mark_retry(MessageId([5; 16]), "answer lost", 0)
            .await
            .expect("retried");
        store
            .mark_final(MessageId([5; 16]), "refused", "no longer a member")
            .await
            .expect("refused");
        let mut under: Vec<MessageId> = store
            .referrals_under_consent("consent-1")
            .await
            .expect("read")
            .into_iter()
            .map(|r| r.message_id)
            .collect();
        under.sort();
        assert_eq!(
            under,
            vec![
                MessageId([1; 16]),
                MessageId([3; 16]),
                MessageId([4; 16]),
                MessageId([5; 16])
            ]
        );
        let status = |n| {
            let store = &store;
            async move {
                store
                    .outbox_status(MessageId([n; 16]))
                    .await
                    .expect("read")
                    .expect("stored")
                    .may_be_held()
            }
        };
        assert!(!status(2).await && status(5).await && status(1).await);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An item queued under a request key is queued once: the second gets the first.
    #[tokio::test]
    async fn a_request_key_queues_one_referral() {
        let (store, dir) = temp_store("request-key").await;
        let alice = case_with_consent(&store, "age_band").await;
        let keyed = |n| NewOutboxItem {
            created_by: alice,
            request_key: Some(format!("{alice}:retry-me")),
            request_digest: None,
            fields: None,
            narrowed_at_ms: None,
            ..outbox_item(n)
        };
        let first = store.enqueue(keyed(1), None, entry()).await;
        assert!(matches!(first, Ok(Enqueued::Queued)), "{first:?}");
        let size = store.audit_size().await.expect("size");
        let second = store
            .enqueue(keyed(2), None, entry())
            .await
            .expect("enqueue");
        let Enqueued::AlreadyQueued(got) = second else {
            panic!("{second:?}");
        };
        assert_eq!(got.message_id, MessageId([1; 16]));
        assert_eq!(
            (got.case_id.as_str(), got.purpose.as_str()),
            ("case-1", "reintegration")
        );
        assert!(
            store
                .outbox_status(MessageId([2; 16]))
                .await
                .expect("read")
                .is_none()
        );
        assert_eq!(
            store.audit_size().await.expect("size"),
            size,
            "nothing logged"
        );
        let looked_up = store.requested_referral(&format!("{alice}:retry-me")).await;
        assert_eq!(looked_up.expect("read"), Some(got));
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With the clock stepped back since a referral was sealed, a narrowing still comes
    /// after it.
    #[tokio::test]
    async fn a_narrowing_is_later_than_every_referral_sealed_under_its_consent() {
        let (store, dir) = temp_store("narrow-clock").await;
        case_with_consent(&store, "age_band needs").await;
        let mut item = outbox_item(1);
        item.created_at_ms = 1_000;
        store.enqueue(item, None, entry()).await.expect("queued");
        let narrowed = store
            .narrow_consent(
                "consent-1",
                scope("age_band"),
                None,
                None,
                true,
                500,
                entry(),
            )
            .await
            .expect("narrow");
        assert!(narrowed.is_some());
        let read = store.consents_for_case("case-1", true).await.expect("read");
        assert_eq!(read[0].narrowed_at_ms, Some(1_001));
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The consent cache is only a guess too: a referral gated on a consent that was
    /// narrowed or withdrawn after it was read is not queued, and leaves nothing behind;
    /// a withdrawal is written only for the referrals it was made for.
    #[tokio::test]
    async fn a_referral_under_a_consent_changed_since_it_was_read_is_not_queued() {
        let (store, dir) = temp_store("consent").await;
        case_with_consent(&store, "age_band needs").await;
        let read = store
            .consents_for_case("case-1", false)
            .await
            .expect("read");
        assert_eq!(read[0].narrowed_at_ms, None);

        // Narrowed behind the cache's back, as by a narrowing that commits meanwhile.
        sqlx::query("UPDATE consents SET fields = 'age_band', narrowed_at_ms = 5")
            .execute(&store.pool)
            .await
            .expect("narrow");
        let cached = store
            .consents_for_case("case-1", false)
            .await
            .expect("read");
        assert_eq!(cached[0].narrowed_at_ms, None, "the cache answers first");
        let size = store.audit_size().await.expect("size");
        let stale = store.enqueue(outbox_item(1), None, entry()).await;
        assert!(matches!(stale, Ok(Enqueued::ConsentChanged)), "{stale:?}");
        let not_queued = store.outbox_status(MessageId([1; 16])).await.expect("read");
        assert!(not_queued.is_none());
        assert_eq!(store.audit_size().await.expect("size"), size);

        let fresh = store.consents_for_case("case-1", true).await.expect("read");
        assert_eq!(fresh[0].narrowed_at_ms, Some(5));
        let queued = store.enqueue(outbox_item(2), Some(5), entry()).await;
        assert!(matches!(queued, Ok(Enqueued::Queued)), "{queued:?}");

        // A narrowing through the store clears the cache and always moves the mark on,
        // even within the same millisecond.
        let narrowed = store
            .narrow_consent(
                "consent-1",
                scope("age_band"),
                Some(5),
                Some("languages".into()),
                true,
                5,
                entry(),
            )
            .await
            .expect("narrow");
        // The referral queued under the wider scope is cancelled with it, its sealed
        // envelope dropped: it must not leave under a scope that no longer holds.
        assert_eq!(narrowed, Some(vec![MessageId([2; 16])]));
        let (state, sealed): (String, bool) =
            sqlx::query_as("SELECT state, envelope IS NOT NULL FROM outbox WHERE message_id = $1")
                .bind(&[2u8; 16][..])
                .fetch_one(&store.pool)
                .await
                .expect("row");
        assert_eq!((state.as_str(), sealed), ("cancelled", false));
        let read = store
            .consents_for_case("case-1", false)
            .await
            .expect("read");
        assert_eq!(read[0].narrowed_at_ms, Some(6));
        assert_eq!(read[0].removed_fields, Some(vec!["languages".to_string()]));
        assert_eq!(read[0].terms_narrowed_at_ms, Some(6));
        // A narrowing checked against the scope as it was before that one is not
        // stored: checked against a stale scope, it could widen the current one.
        let size = store.audit_size().await.expect("size");
        let stale = store
            .narrow_consent(
                "consent-1",
                scope("age_band,languages"),
                Some(5),
                None,
                false,
                5,
                entry(),
            )
            .await
            .expect("narrow");
        assert!(stale.is_none(), "a narrowing of a stale read was stored");
        let read = store.consents_for_case("case-1", true).await.expect("read");
        assert_eq!(read[0].fields, vec!["age_band".to_string()]);
        assert_eq!(read[0].narrowed_at_ms, Some(6));
        assert_eq!(
            store.audit_size().await.expect("size"),
            size,
            "nothing logged"
        );
        let queued = store.enqueue(outbox_item(4), Some(6), entry()).await;
        assert!(matches!(queued, Ok(Enqueued::Queued)), "{queued:?}");
        // A withdrawal cancels what is still queued, and counts every recipient that
        // may hold data: the cancelled referral's too (an attempt may have been on its
        // way).
        let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let seen = counted.clone();
        let withdrawn = store
            .withdraw_consent(
                "consent-1",
                7,
                Box::new(move |recipients| {
                    seen.store(recipients, std::sync::atomic::Ordering::SeqCst);
                    entry()
                }),
            )
            .await;
        assert!(
            matches!(&withdrawn, Ok(Withdrawal::Withdrawn(ids)) if ids == &[MessageId([4; 16])]),
            "{withdrawn:?}"
        );
        assert_eq!(counted.load(std::sync::atomic::Ordering::SeqCst), 1);
        let again = store
            .withdraw_consent("consent-1", 8, Box::new(|_| entry()))
            .await;
        assert!(
            matches!(again, Ok(Withdrawal::AlreadyWithdrawn)),
            "{again:?}"
        );
        let refused = store.enqueue(outbox_item(3), Some(6), entry()).await;
        assert!(
            matches!(refused, Ok(Enqueued::ConsentWithdrawn)),
            "{refused:?}"
        );
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The case key cache is only a guess: a referral sealed under a key that is no
    /// longer the case's (shredded and replaced meanwhile) stores nothing, and the next
    /// look-up asks the database again.
    /// On a current-thread runtime every write below is queued before the writer runs,
    /// so they form one group and share one statement per kind. Each keeps its own
    /// outcome: a replay within the group gets the first copy's answer, a referral under a
    /// stale key is refused, and every answer names the place its entry really has in the
    /// log, although a row before it was not stored (the group then runs job by job).
    /// Retention deletes received referrals past their time (one entry for the run) and
    /// shreds their keys, and sweeps what nothing held needs any more: a key no referral
    /// came to need, terms left stored for a consent under which nothing is held. What a
    /// referral still held needs stays.
    #[tokio::test]
    async fn retention_deletes_what_expired_and_sweeps_what_nothing_held_needs() {
        let (store, dir) = temp_store("retention-sweep").await;
        let kept_key = "in:shelter-my:kept";
        for (id, key) in [
            ("in:shelter-my:case-ref", b"key-1".as_slice()),
            (kept_key, b"key-2"),
            ("in:shelter-my:orphan", b"key-3"),
        ] {
            store.ensure_case_key(id, key, 0).await.expect("key");
        }
        let expiring = store.accept_referral(referral(b"key-1"), entry()).await;
        assert!(matches!(expiring, Ok(AcceptOutcome::Stored(_))));
        let kept = AcceptedReferral {
            message_id: MessageId([2; 16]),
            case_key_id: kept_key.into(),
            consent_id: "consent-2".into(),
            retain_until_ms: 1000,
            ..referral(b"key-2")
        };
        let stored = store.accept_referral(kept, entry()).await;
        assert!(matches!(stored, Ok(AcceptOutcome::Stored(_))));
        sqlx::raw_sql(
            "INSERT INTO narrowed_consents
                 (sender, consent_id, narrowed_at_ms, terms_sealed, terms_case_key_id)
             VALUES ('shelter-my', 'consent-1', 0, x'01', 'in:shelter-my:case-ref'),
                    ('shelter-my', 'consent-2', 0, x'02', 'in:shelter-my:kept'),
                    ('shelter-my', 'consent-9', 0, x'09', 'in:shelter-my:gone')",
        )
        .execute(&store.pool)
        .await
        .expect("terms");
        let size = store.audit_size().await.expect("size");

        let audit = |deleted| {
            corridor::audit::encode(&corridor::audit::Event::RetentionPurge { deleted }, 0)
        };
        let deleted = store
            .enforce_retention(500, Box::new(audit))
            .await
            .expect("retention");
        assert_eq!(deleted, 1);
        assert_eq!(store.audit_size().await.expect("size"), size + 1);
        let keys: Vec<String> = sqlx::query_scalar("SELECT id FROM case_keys ORDER BY id")
            .fetch_all(&store.pool)
            .await
            .expect("keys");
        assert_eq!(
            keys,
            [kept_key],
            "the expired one's key and the orphan are shredded"
        );
        assert!(
            store
                .inbox_item(MessageId([1; 16]))
                .await
                .expect("read")
                .is_none()
        );
        assert!(
            store
                .inbox_item(MessageId([2; 16]))
                .await
                .expect("read")
                .is_some()
        );
        let terms: Vec<(String, bool)> = sqlx::query_as(
            "SELECT consent_id, terms_sealed IS NOT NULL FROM narrowed_consents ORDER BY consent_id",
        )
        .fetch_all(&store.pool)
        .await
        .expect("terms");
        assert_eq!(
            terms,
            [
                ("consent-1".to_owned(), false),
                ("consent-2".to_owned(), true),
                ("consent-9".to_owned(), false)
            ],
            "terms stay only where something is held under the consent"
        );

        // A run that deletes nothing appends nothing.
        let deleted = store
            .enforce_retention(500, Box::new(audit))
            .await
            .expect("retention");
        assert_eq!(deleted, 0);
        assert_eq!(store.audit_size().await.expect("size"), size + 1);
        assert!(!store.checkpoint_if_owed().await.expect("checkpoint"));
        // One that only sweeps a key leaves a checkpoint owed, as a purge does.
        store
            .ensure_case_key("in:shelter-my:orphan", b"key-9", 0)
            .await
            .expect("key");
        let deleted = store
            .enforce_retention(500, Box::new(audit))
            .await
            .expect("retention");
        assert_eq!(deleted, 0);
        assert!(store.checkpoint_if_owed().await.expect("checkpoint"));
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A database in a fresh directory with the schema up to migration `version`, for a
    /// test to fill as an earlier version left it and then open as a [`Store`].
    async fn store_before(
        name: &str,
        version: i64,
    ) -> (SqlitePool, std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("corridor-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("store.db");
        let options = SqliteConnectOptions::from_str("sqlite://")
            .expect("options")
            .filename(&path)
            .create_if_missing(true)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .connect_with(options)
            .await
            .expect("open");
        MIGRATOR
            .run_to(version, &pool)
            .await
            .expect("the schema before");
        (pool, dir, path)
    }

    /// Upgrading to seen envelopes and received referrals keyed by sender and message id
    /// keeps every row, each answer, and the inbox's order (its row ids, which page
    /// tokens name).
    #[tokio::test]
    async fn upgrading_to_ids_per_sender_keeps_what_was_received() {
        let (pool, dir, path) = store_before("ids-upgrade", 14).await;
        sqlx::raw_sql(
            "INSERT INTO case_keys VALUES ('in:shelter-my:case-ref', x'01', 0);
             INSERT INTO seen_messages VALUES (x'05050505050505050505050505050505', 'shelter-my', x'aa', x'a5', 1);
             INSERT INTO seen_messages VALUES (x'03030303030303030303030303030303', 'shelter-my', x'bb', x'b3', 2);
             INSERT INTO seen_messages VALUES (x'04040404040404040404040404040404', 'shelter-my', x'cc', x'c4', 3);
             INSERT INTO inbox (rowid, message_id, sender, purpose, case_ref, case_key_id,
                 consent_id, consent_expires_at_ms, payload_sealed, received_at_ms,
                 retain_until_ms)
             VALUES (7, x'05050505050505050505050505050505', 'shelter-my', 'reintegration', 'case-ref',
                     'in:shelter-my:case-ref', 'consent-1', 10, x'e5', 1, 10),
                    (9, x'03030303030303030303030303030303', 'shelter-my', 'reintegration', 'case-ref',
                     'in:shelter-my:case-ref', 'consent-1', 10, x'e3', 2, 10);",
        )
        .execute(&pool)
        .await
        .expect("rows of the schema before");
        pool.close().await;

        let store = Store::open(&path).await.expect("upgraded");
        let page = store.inbox_page(10, None).await.expect("page");
        let listed: Vec<(i64, u8)> = page
            .iter()
            .map(|item| (item.position, item.message_id.0[0]))
            .collect();
        assert_eq!(listed, [(9, 3), (7, 5)], "the same positions, newest first");
        for (id, response) in [(5u8, 0xa5u8), (3, 0xb3), (4, 0xc4)] {
            let seen = store
                .seen(&shelter_my(), MessageId([id; 16]))
                .await
                .expect("read")
                .expect("still seen");
            assert_eq!(seen.response, [response]);
        }
        let payload: Vec<u8> =
            sqlx::query_scalar("SELECT payload_sealed FROM inbox WHERE message_id = x'03030303030303030303030303030303'")
                .fetch_one(&store.pool)
                .await
                .expect("read");
        assert_eq!(payload, [0xe3]);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A checkpoint a reader kept from finishing is owed, and made once the reader is
    /// gone: purged pages do not wait in the WAL for the next purge.
    #[tokio::test]
    async fn a_checkpoint_a_reader_held_up_is_made_later() {
        use sqlx::ConnectOptions as _;
        let (store, dir) = temp_store("checkpoint-owed").await;
        store
            .append_audit(vec![b"entry".to_vec()])
            .await
            .expect("append");
        let mut reader = SqliteConnectOptions::new()
            .filename(dir.join("store.db"))
            .read_only(true)
            .connect()
            .await
            .expect("reader");
        sqlx::raw_sql("BEGIN; SELECT COUNT(*) FROM audit_entries;")
            .execute(&mut reader)
            .await
            .expect("a snapshot held");
        assert!(matches!(
            store.checkpoint().await,
            Err(StoreError::CheckpointBusy)
        ));
        // Tried again while the reader stays, it fails and stays owed.
        assert!(matches!(
            store.checkpoint_if_owed().await,
            Err(StoreError::CheckpointBusy)
        ));
        sqlx::raw_sql("COMMIT")
            .execute(&mut reader)
            .await
            .expect("end");
        drop(reader);
        assert!(store.checkpoint_if_owed().await.expect("made now"));
        assert!(!store.checkpoint_if_owed().await.expect("none owed"));
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Upgrading rounds the expiry of consents recorded before expiries were kept to the
    /// day down to the start of their UTC day, and leaves those kept so as they are.
    #[tokio::test]
    async fn upgrading_keeps_every_consent_expiry_to_the_day() {
        let (pool, dir, path) = store_before("expiry-upgrade", 16).await;
        let day = corridor::consent::EXPIRY_UNIT_MS;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO users VALUES (1, 'admin', 'admin', 0);
             INSERT INTO case_keys VALUES ('case-1', x'01', 0);
             INSERT INTO cases VALUES ('case-1', x'02', 1, 0);
             INSERT INTO consents (id, case_id, given_by, guardian_basis, method, language,
                 recorded_by, recorded_at_ms, purposes, recipient_orgs, recipient_roles,
                 fields, excluded_countries, no_family_contact, expires_at_ms)
             VALUES ('consent-ms', 'case-1', 'person', '', 'verbal', '', 1, 0,
                     'reintegration', 'shelter-kh', '', 'needs', '', 0, {}),
                    ('consent-day', 'case-1', 'person', '', 'verbal', '', 1, 0,
                     'reintegration', 'shelter-kh', '', 'needs', '', 0, {});",
            20_000 * day + 12 * 3_600_000 + 345,
            20_001 * day,
        )))
        .execute(&pool)
        .await
        .expect("rows of the schema before");
        pool.close().await;

        let store = Store::open(&path).await.expect("upgraded");
        let expiries: Vec<(String, i64)> =
            sqlx::query_as("SELECT id, expires_at_ms FROM consents ORDER BY id")
                .fetch_all(&store.pool)
                .await
                .expect("read");
        assert_eq!(
            expiries,
            [
                ("consent-day".to_string(), 20_001 * day),
                ("consent-ms".to_string(), 20_000 * day)
            ]
        );
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Message ids are their senders': another member's referral under an id already
    /// used is another referral, stored beside the first with its own answer. In one
    /// group each keeps its own outcome, also when the first of two with the same id is
    /// not stored and the second is.
    #[tokio::test]
    async fn message_ids_are_unique_per_sender_only() {
        let (store, dir) = temp_store("ids-per-sender").await;
        let other = OrgId::new("shelter-th").expect("org id");
        store
            .ensure_case_key("in:shelter-my:case-ref", b"key-1", 0)
            .await
            .expect("key");
        store
            .ensure_case_key("in:shelter-th:case-ref", b"key-th", 0)
            .await
            .expect("key");
        let from_other = |key: &[u8]| AcceptedReferral {
            sender: other.clone(),
            case_key_id: "in:shelter-th:case-ref".into(),
            ..referral(key)
        };
        let answer = |n: u64| format!("receipt for entry {n}").into_bytes();
        let id = MessageId([1; 16]);
        let outcomes = tokio::join!(
            store.accept_referral(from_other(b"stale"), entry()),
            store.accept_referral(referral(b"key-1"), entry()),
        );
        assert!(matches!(outcomes.0, Ok(AcceptOutcome::CaseKeyChanged)));
        assert!(matches!(&outcomes.1, Ok(AcceptOutcome::Stored(r)) if *r == answer(0)));
        let stored = store.accept_referral(from_other(b"key-th"), entry()).await;
        assert!(matches!(&stored, Ok(AcceptOutcome::Stored(r)) if *r == answer(1)));
        let replayed = store.accept_referral(referral(b"key-1"), entry()).await;
        assert!(matches!(&replayed, Ok(AcceptOutcome::AlreadySeen(s)) if s.response == answer(0)));
        assert_eq!(store.audit_size().await.expect("size"), 2);

        let seen = |org: OrgId| {
            let store = store.clone();
            async move { store.seen(&org, id).await.expect("read").expect("seen") }
        };
        assert_eq!(seen(shelter_my()).await.response, answer(0));
        assert_eq!(seen(other.clone()).await.response, answer(1));
        assert_eq!(store.inbox_items(id, None).await.expect("read").len(), 2);
        let theirs = store.inbox_items(id, Some(&other)).await.expect("read");
        assert_eq!(theirs.len(), 1);
        assert_eq!(theirs[0].case_key_id, "in:shelter-th:case-ref");
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn accepted_referrals_of_one_group_keep_their_own_outcomes() {
        let (store, dir) = temp_store("accept-rows").await;
        store
            .ensure_case_key("in:shelter-my:case-ref", b"key-1", 0)
            .await
            .expect("key");
        let with_id = |n: u8, key: &[u8]| AcceptedReferral {
            message_id: MessageId([n; 16]),
            envelope_digest: [n; 32],
            ..referral(key)
        };
        let outcomes = tokio::join!(
            store.accept_referral(with_id(1, b"key-1"), entry()),
            store.accept_referral(with_id(1, b"key-1"), entry()),
            store.accept_referral(with_id(2, b"key-1"), entry()),
            store.accept_referral(with_id(3, b"stale"), entry()),
            store.accept_referral(with_id(4, b"key-1"), entry()),
        );
        let answer = |n: u64| format!("receipt for entry {n}").into_bytes();
        assert!(matches!(&outcomes.0, Ok(AcceptOutcome::Stored(r)) if *r == answer(0)));
        assert!(
            matches!(&outcomes.1, Ok(AcceptOutcome::AlreadySeen(s)) if s.response == answer(0))
        );
        assert!(matches!(&outcomes.2, Ok(AcceptOutcome::Stored(r)) if *r == answer(1)));
        assert!(matches!(outcomes.3, Ok(AcceptOutcome::CaseKeyChanged)));
        assert!(matches!(&outcomes.4, Ok(AcceptOutcome::Stored(r)) if *r == answer(2)));
        for (n, place) in [(1, 0), (2, 1), (4, 2)] {
            let seen = store
                .seen(&shelter_my(), MessageId([n; 16]))
                .await
                .expect("read");
            assert_eq!(seen.expect("seen").response, answer(place));
            let stored = store.inbox_item(MessageId([n; 16])).await.expect("read");
            assert_eq!(stored.expect("stored").payload_sealed, b"sealed");
        }
        assert!(
            store
                .seen(&shelter_my(), MessageId([3; 16]))
                .await
                .expect("read")
                .is_none()
        );
        assert!(
            store
                .inbox_item(MessageId([3; 16]))
                .await
                .expect("read")
                .is_none()
        );
        assert_eq!(store.audit_size().await.expect("size"), 3);

        // Without a refusal among them the rows of one group are all stored in one go.
        let outcomes = tokio::join!(
            store.accept_referral(with_id(5, b"key-1"), entry()),
            store.accept_referral(with_id(6, b"key-1"), entry()),
        );
        assert!(matches!(&outcomes.0, Ok(AcceptOutcome::Stored(r)) if *r == answer(3)));
        assert!(matches!(&outcomes.1, Ok(AcceptOutcome::Stored(r)) if *r == answer(4)));
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Queued referrals and delivery receipts of one group (see above) keep their own
    /// outcomes too, and values travel exactly, whatever characters a request id holds.
    #[tokio::test]
    async fn queued_and_delivered_rows_of_one_group_keep_their_own_outcomes() {
        let (store, dir) = temp_store("outbox-rows").await;
        let alice = case_with_consent(&store, "age_band").await;
        let item = |n: u8, request: Option<&str>| NewOutboxItem {
            created_by: alice,
            request_key: request.map(|r| format!("{alice}:{r}")),
            request_digest: None,
            fields: None,
            narrowed_at_ms: None,
            envelope: vec![n; 100 * usize::from(n)],
            ..outbox_item(n)
        };
        let odd = r#"q"u\o\"te'\n"#;
        let size = store.audit_size().await.expect("size");
        let at_once = store.writer.groups_at_once();
        let queued = tokio::join!(
            store.enqueue(item(1, None), None, entry()),
            store.enqueue(item(2, Some(odd)), None, entry()),
            store.enqueue(item(3, Some(odd)), None, entry()),
            store.enqueue(item(4, None), Some(5), entry()),
            store.enqueue(item(5, None), None, entry()),
        );
        assert!(matches!(queued.0, Ok(Enqueued::Queued)));
        assert!(matches!(queued.1, Ok(Enqueued::Queued)));
        assert!(
            matches!(&queued.2, Ok(Enqueued::AlreadyQueued(first)) if first.message_id == MessageId([2; 16])),
            "{:?}",
            queued.2
        );
        assert!(matches!(queued.3, Ok(Enqueued::ConsentChanged)));
        assert!(matches!(queued.4, Ok(Enqueued::Queued)));
        assert_eq!(store.audit_size().await.expect("size"), size + 3);
        assert_eq!(
            store.writer.groups_at_once(),
            at_once,
            "a group with rows not written runs the usual way"
        );
        let requested = store
            .requested_referral(&format!("{alice}:{odd}"))
            .await
            .expect("read");
        assert_eq!(requested.map(|r| r.message_id), Some(MessageId([2; 16])));
        for n in [1, 2, 5] {
            let due = store.due_item(MessageId([n; 16])).await.expect("read");
            let due = due.expect("queued");
            assert_eq!(due.envelope, vec![n; 100 * usize::from(n)]);
            assert_eq!(due.envelope_digest, vec![n; 32]);
        }

        let delivered = tokio::join!(
            store.mark_delivered(MessageId([1; 16]), b"receipt-1".to_vec(), None, 7, entry()),
            store.mark_delivered(MessageId([1; 16]), b"again".to_vec(), None, 8, entry()),
            store.mark_delivered(
                MessageId([2; 16]),
                b"receipt-2".to_vec(),
                Some(b"purged".to_vec()),
                9,
                entry()
            ),
        );
        assert!(delivered.0.is_ok() && delivered.1.is_ok() && delivered.2.is_ok());
        assert_eq!(store.audit_size().await.expect("size"), size + 5);
        assert_eq!(store.writer.groups_at_once(), at_once);

        let status = |n: u8| {
            let store = store.clone();
            async move {
                let status = store.outbox_status(MessageId([n; 16])).await.expect("read");
                status.expect("an item")
            }
        };
        let (one, two, five) = (status(1).await, status(2).await, status(5).await);
        assert_eq!(
            (one.state.as_str(), one.attempts, one.receipt.as_deref()),
            ("delivered", 1, Some(&b"receipt-1"[..]))
        );
        assert_eq!(one.purge_receipt, None);
        assert_eq!(two.receipt.as_deref(), Some(&b"receipt-2"[..]));
        assert_eq!(two.purge_receipt.as_deref(), Some(&b"purged"[..]));
        assert_eq!((five.state.as_str(), five.receipt), ("queued", None));
        let delivered_at: Vec<i64> = sqlx::query_scalar(
            "SELECT delivered_at_ms FROM outbox WHERE message_id IN ($1, $2) ORDER BY message_id",
        )
        .bind(&[1u8; 16][..])
        .bind(&[2u8; 16][..])
        .fetch_all(&store.pool)
        .await
        .expect("read");
        assert_eq!(delivered_at, vec![7, 9]);

        // The usual group, every row written: rows, entries and commit in one query,
        // with the same outcomes as the usual way (two kinds, so two guards).
        let usual = tokio::join!(
            store.enqueue(item(6, None), None, entry()),
            store.mark_delivered(MessageId([5; 16]), b"receipt-5".to_vec(), None, 10, entry()),
            store.enqueue(item(7, Some("fresh")), None, entry()),
        );
        assert!(matches!(usual.0, Ok(Enqueued::Queued)));
        assert!(usual.1.is_ok());
        assert!(matches!(usual.2, Ok(Enqueued::Queued)));
        assert_eq!(store.writer.groups_at_once(), at_once + 1);
        assert_eq!(store.audit_size().await.expect("size"), size + 8);
        let five = status(5).await;
        assert_eq!(
            (five.state.as_str(), five.receipt.as_deref()),
            ("delivered", Some(&b"receipt-5"[..]))
        );
        for n in [6, 7] {
            let due = store.due_item(MessageId([n; 16])).await.expect("read");
            assert_eq!(due.expect("queued").envelope, vec![n; 100 * usize::from(n)]);
        }
        assert_eq!(stored_tree_size(&store).await, size + 8);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_referral_sealed_under_a_stale_case_key_is_not_stored() {
        let (store, dir) = temp_store("case-key").await;
        let id = "in:shelter-my:case-ref";
        store.ensure_case_key(id, b"key-1", 0).await.expect("key");
        sqlx::query("UPDATE case_keys SET wrapped_key = $1 WHERE id = $2")
            .bind(&b"key-2"[..])
            .bind(id)
            .execute(&store.pool)
            .await
            .expect("replace the key behind the cache");
        let stale = store.case_key(id).await.expect("read").expect("a key");
        assert_eq!(stale, b"key-1", "the cache answers first");

        let outcome = store.accept_referral(referral(&stale), entry()).await;
        assert!(matches!(outcome, Ok(AcceptOutcome::CaseKeyChanged)));
        let message = MessageId([1; 16]);
        assert!(
            store
                .seen(&shelter_my(), message)
                .await
                .expect("read")
                .is_none()
        );
        assert!(store.inbox_item(message).await.expect("read").is_none());
        assert_eq!(store.audit_size().await.expect("size"), 0);

        let current = store.case_key(id).await.expect("read").expect("a key");
        assert_eq!(current, b"key-2", "the stale key was forgotten");
        let stored = store.accept_referral(referral(&current), entry()).await;
        assert!(matches!(stored, Ok(AcceptOutcome::Stored(_))));
        let replayed = store.accept_referral(referral(&current), entry()).await;
        assert!(matches!(replayed, Ok(AcceptOutcome::AlreadySeen(_))));
        assert!(store.inbox_item(message).await.expect("read").is_some());
        assert_eq!(store.audit_size().await.expect("size"), 1);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A narrowing deletes and cuts exactly what it read, or nothing; once carried out, a
    /// referral under the consent sealed at or before it, or named by it and not held
    /// (cancelled by its sender while on its way), is refused, and one sealed after it is
    /// stored.
    #[tokio::test]
    async fn a_narrowing_cuts_what_it_read_and_refuses_what_was_sealed_before_it() {
        let (store, dir) = temp_store("narrowing").await;
        let key = "in:shelter-my:case-ref";
        store.ensure_case_key(key, b"key-1", 0).await.expect("key");
        let with_id = |n: u8, sealed_at_ms: i64| AcceptedReferral {
            message_id: MessageId([n; 16]),
            payload_sealed: vec![n; 8],
            sealed_at_ms,
            ..referral(b"key-1")
        };
        for n in [1, 2] {
            let stored = store.accept_referral(with_id(n, 5), entry()).await;
            assert!(matches!(stored, Ok(AcceptOutcome::Stored(_))));
        }
        let narrowing = |read: Vec<u8>, held: Vec<MessageId>| AcceptedNarrowing {
            request: PurgeRequest {
                message_id: MessageId([9; 16]),
                sender: OrgId::new("shelter-my").expect("org id"),
                envelope_digest: [3; 32],
                received_at_ms: 101,
                respond: Box::new(|_| b"narrowed".to_vec()),
            },
            consent_id: "consent-1".into(),
            named: [1, 2, 5, 6].map(|n| MessageId([n; 16])).to_vec(),
            held,
            purged: vec![MessageId([1; 16])],
            redacted: vec![(MessageId([2; 16]), read, b"cut".to_vec())],
            narrowed_at_ms: 100,
            terms: Some((sealed(b"first"), None)),
            renewed: None,
            keys_read: Vec::new(),
        };
        let read = vec![MessageId([1; 16]), MessageId([2; 16])];
        // Read before the payload changed: nothing of it stays.
        let stale = store
            .apply_narrowing(narrowing(b"other".to_vec(), read.clone()), entry())
            .await;
        assert!(stale.is_err());
        assert!(
            store
                .inbox_item(MessageId([1; 16]))
                .await
                .expect("read")
                .is_some()
        );
        assert!(
            store
                .seen(&shelter_my(), MessageId([9; 16]))
                .await
                .expect("read")
                .is_none()
        );

        // A referral it names stored since it was read (it was on its way): nothing of
        // it stays either, and a read that sees it goes through.
        let arrived = store.accept_referral(with_id(5, 5), entry()).await;
        assert!(matches!(arrived, Ok(AcceptOutcome::Stored(_))));
        let stale = store
            .apply_narrowing(narrowing(vec![2; 8], read.clone()), entry())
            .await;
        assert!(stale.is_err());
        let mut read = read;
        read.push(MessageId([5; 16]));
        let applied = store
            .apply_narrowing(narrowing(vec![2; 8], read.clone()), entry())
            .await;
        assert!(matches!(applied, Ok(AcceptOutcome::Stored(r)) if r == b"narrowed"));
        assert!(
            store
                .inbox_item(MessageId([1; 16]))
                .await
                .expect("read")
                .is_none()
        );
        let cut = store.inbox_item(MessageId([2; 16])).await.expect("read");
        assert_eq!(cut.expect("kept").payload_sealed, b"cut");
        let replayed = store
            .apply_narrowing(narrowing(vec![2; 8], read), entry())
            .await;
        assert!(matches!(replayed, Ok(AcceptOutcome::AlreadySeen(_))));

        for sealed_at_ms in [99, 100] {
            let late = store
                .accept_referral(with_id(3, sealed_at_ms), entry())
                .await;
            assert!(matches!(late, Ok(AcceptOutcome::ConsentNarrowed)));
        }
        assert!(
            store
                .inbox_item(MessageId([3; 16]))
                .await
                .expect("read")
                .is_none()
        );
        let after = store.accept_referral(with_id(4, 101), entry()).await;
        assert!(matches!(after, Ok(AcceptOutcome::Stored(_))));
        // One it named and did not hold is refused even if its sender's clock, stepped
        // back since, stamped it after the narrowing; another sender's referral under
        // the same id is not.
        let late = store.accept_referral(with_id(6, 500), entry()).await;
        assert!(matches!(late, Ok(AcceptOutcome::ConsentNarrowed)));
        assert!(
            store
                .seen(&shelter_my(), MessageId([6; 16]))
                .await
                .expect("read")
                .is_none()
        );
        let other = AcceptedReferral {
            sender: OrgId::new("ngo-th").expect("org id"),
            ..with_id(6, 500)
        };
        let stored = store.accept_referral(other, entry()).await;
        assert!(matches!(stored, Ok(AcceptOutcome::Stored(_))));

        // The terms it restated are stored; a narrowing that combined its terms with
        // other terms than those stored now is read again.
        let stored = store
            .narrowed_consent("shelter-my", "consent-1")
            .await
            .expect("read");
        assert_eq!(
            stored,
            Some(NarrowedConsent {
                narrowed_at_ms: 100,
                terms: Some(sealed(b"first")),
            })
        );
        let later = |id: u8, as_read: Option<SealedTerms>| AcceptedNarrowing {
            request: PurgeRequest {
                message_id: MessageId([id; 16]),
                sender: OrgId::new("shelter-my").expect("org id"),
                envelope_digest: [id; 32],
                received_at_ms: 102,
                respond: Box::new(|_| b"narrowed".to_vec()),
            },
            narrowed_at_ms: 90,
            terms: Some((sealed(b"second"), as_read)),
            ..narrowing_of_consent_1()
        };
        let stale = store.apply_narrowing(later(8, None), entry()).await;
        assert!(stale.is_err());
        let applied = store
            .apply_narrowing(later(7, Some(sealed(b"first"))), entry())
            .await;
        assert!(matches!(applied, Ok(AcceptOutcome::Stored(_))));
        let stored = store
            .narrowed_consent("shelter-my", "consent-1")
            .await
            .expect("read");
        assert_eq!(
            stored,
            Some(NarrowedConsent {
                narrowed_at_ms: 100,
                terms: Some(sealed(b"second")),
            })
        );

        // The referral named on its way is remembered until it can no longer arrive.
        let remembered = async || -> i64 {
            sqlx::query_scalar("SELECT COUNT(*) FROM narrowed_referrals")
                .fetch_one(&store.pool)
                .await
                .expect("count")
        };
        assert_eq!(remembered().await, 1);
        let made_at = i64::from_be_bytes([0, 0, 6, 6, 6, 6, 6, 6]);
        let last_chance =
            made_at + corridor::envelope::MAX_LIFETIME_MS + corridor::envelope::MAX_CLOCK_SKEW_MS;
        let audit = |deleted| {
            corridor::audit::encode(&corridor::audit::Event::RetentionPurge { deleted }, 0)
        };
        for (now, left) in [(last_chance, 1), (last_chance + 1, 0)] {
            store
                .enforce_retention(now, Box::new(audit))
                .await
                .expect("retention");
            assert_eq!(remembered().await, left, "at {now}");
        }
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A key that terms held under a consent are sealed under stays while anything is
    /// held under the consent, also once no referral is stored under the key itself: a
    /// consent with a referral under the key its case had before keys per consent, and
    /// one under its own.
    #[tokio::test]
    async fn a_key_that_held_terms_are_sealed_under_stays_while_they_are_held() {
        let (store, dir) = temp_store("terms-key").await;
        let (legacy, own) = ("in:shelter-my:case-ref", "in:shelter-my:case-ref:consent-1");
        store
            .ensure_case_key(legacy, b"key-1", 0)
            .await
            .expect("key");
        store.ensure_case_key(own, b"key-2", 0).await.expect("key");
        let old = AcceptedReferral {
            retain_until_ms: 10,
            ..referral(b"key-1")
        };
        let new = AcceptedReferral {
            message_id: MessageId([2; 16]),
            case_key_id: own.into(),
            retain_until_ms: 20,
            ..referral(b"key-2")
        };
        for r in [old, new] {
            let stored = store.accept_referral(r, entry()).await;
            assert!(matches!(stored, Ok(AcceptOutcome::Stored(_))));
        }
        let narrowing = AcceptedNarrowing {
            terms: Some((
                SealedTerms {
                    case_key_id: legacy.into(),
                    sealed: b"terms".to_vec(),
                },
                None,
            )),
            ..narrowing_of_consent_1()
        };
        let applied = store.apply_narrowing(narrowing, entry()).await;
        assert!(matches!(applied, Ok(AcceptOutcome::Stored(_))));
        let keys = async || -> Vec<String> {
            sqlx::query_scalar("SELECT id FROM case_keys ORDER BY id")
                .fetch_all(&store.pool)
                .await
                .expect("keys")
        };
        let audit = |deleted| {
            corridor::audit::encode(&corridor::audit::Event::RetentionPurge { deleted }, 0)
        };
        // The old referral's retention ends: its key stays, for the terms.
        let deleted = store.enforce_retention(15, Box::new(audit)).await;
        assert_eq!(deleted.expect("retention"), 1);
        assert_eq!(keys().await, [legacy, own]);
        let held = store.narrowed_consent("shelter-my", "consent-1").await;
        assert!(held.expect("read").expect("narrowed").terms.is_some());
        // The last referral under the consent goes: terms and both keys with it.
        let deleted = store.enforce_retention(25, Box::new(audit)).await;
        assert_eq!(deleted.expect("retention"), 1);
        assert!(keys().await.is_empty());
        let held = store.narrowed_consent("shelter-my", "consent-1").await;
        assert!(held.expect("read").expect("narrowed").terms.is_none());
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A narrowing remembers at most the newest [`MAX_NARROWED_REFERRALS`] of the
    /// referrals it names on their way.
    #[tokio::test]
    async fn a_narrowing_remembers_a_bounded_number_of_referrals_on_their_way() {
        let (store, dir) = temp_store("narrowed-cap").await;
        let named: Vec<MessageId> = (0..MAX_NARROWED_REFERRALS as u64 + 6)
            .map(|n| {
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&n.to_be_bytes());
                MessageId(id)
            })
            .collect();
        let narrowing = AcceptedNarrowing {
            named: named.clone(),
            ..narrowing_of_consent_1()
        };
        let applied = store.apply_narrowing(narrowing, entry()).await;
        assert!(matches!(applied, Ok(AcceptOutcome::Stored(_))));
        let kept: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT message_id FROM narrowed_referrals ORDER BY message_id")
                .fetch_all(&store.pool)
                .await
                .expect("read");
        let newest: Vec<Vec<u8>> = named[6..].iter().map(|id| id.0.to_vec()).collect();
        assert_eq!(kept, newest);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A narrowing renews a key only with every referral under it sealed again, and
    /// only if the key is still the one read.
    #[tokio::test]
    async fn a_renewed_key_leaves_no_referral_under_the_old_one() {
        let (store, dir) = temp_store("renew-key").await;
        let key = "in:shelter-my:case-ref:consent-1";
        store.ensure_case_key(key, b"key-1", 0).await.expect("key");
        for n in [1, 2] {
            let r = AcceptedReferral {
                message_id: MessageId([n; 16]),
                case_key_id: key.into(),
                payload_sealed: vec![n; 4],
                ..referral(b"key-1")
            };
            let stored = store.accept_referral(r, entry()).await;
            assert!(matches!(stored, Ok(AcceptOutcome::Stored(_))));
        }
        let narrowing = |resealed: &[u8], read: &[u8]| AcceptedNarrowing {
            named: vec![MessageId([1; 16])],
            held: vec![MessageId([1; 16])],
            redacted: resealed
                .iter()
                .map(|n| (MessageId([*n; 16]), vec![*n; 4], vec![*n + 10; 4]))
                .collect(),
            renewed: Some(RenewedKey {
                case_key_id: key.into(),
                read: read.to_vec(),
                wrapped: b"key-2".to_vec(),
            }),
            ..narrowing_of_consent_1()
        };
        let wrapped = async || store.case_key(key).await.expect("read").expect("key");
        for (resealed, read) in [(&[1u8][..], &b"key-1"[..]), (&[1, 2], b"key-0")] {
            let stale = store
                .apply_narrowing(narrowing(resealed, read), entry())
                .await;
            assert!(
                matches!(stale, Err(StoreError::ReadAgain(_))),
                "{resealed:?}"
            );
            assert_eq!(wrapped().await, b"key-1");
        }
        // Cut under a key that is not the one stored now (a concurrent narrowing
        // renewed it): read again, rather than purge what did not open.
        let stale = AcceptedNarrowing {
            keys_read: vec![(key.into(), Some(b"key-0".to_vec()))],
            ..narrowing(&[1, 2], b"key-1")
        };
        let stale = store.apply_narrowing(stale, entry()).await;
        assert!(matches!(stale, Err(StoreError::ReadAgain(_))));
        let applied = AcceptedNarrowing {
            keys_read: vec![(key.into(), Some(b"key-1".to_vec()))],
            ..narrowing(&[1, 2], b"key-1")
        };
        let applied = store.apply_narrowing(applied, entry()).await;
        assert!(matches!(applied, Ok(AcceptOutcome::Stored(_))));
        assert_eq!(wrapped().await, b"key-2");
        let payload = store.inbox_item(MessageId([2; 16])).await.expect("read");
        assert_eq!(payload.expect("held").payload_sealed, [12; 4]);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A narrowing of `consent-1` by shelter-my that names, cuts and states nothing: a
    /// base for the tests' own.
    fn narrowing_of_consent_1() -> AcceptedNarrowing {
        AcceptedNarrowing {
            request: PurgeRequest {
                message_id: MessageId([9; 16]),
                sender: shelter_my(),
                envelope_digest: [3; 32],
                received_at_ms: 5,
                respond: Box::new(|_| b"narrowed".to_vec()),
            },
            consent_id: "consent-1".into(),
            named: Vec::new(),
            held: Vec::new(),
            purged: Vec::new(),
            redacted: Vec::new(),
            narrowed_at_ms: 5,
            terms: None,
            renewed: None,
            keys_read: Vec::new(),
        }
    }

    fn sealed(bytes: &[u8]) -> SealedTerms {
        SealedTerms {
            case_key_id: "in:key-1".into(),
            sealed: bytes.to_vec(),
        }
    }
}
