//! Durable state in SQLite through sqlx (WAL, `synchronous = FULL`, embedded migrations).
//!
//! Every function that changes state does so in one transaction, so a crash leaves either
//! all of a change or none of it; callers acknowledge only after the function returns.
//! Values that are protocol objects (envelopes, receipts, payloads) are stored as their
//! protobuf encodings.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use corridor::{MessageId, OrgId};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlitePool};

/// Why a storage operation failed. Messages never contain stored values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(&'static str),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

/// A local user authenticated by a bearer token.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub role: String,
}

/// A consent row.
#[derive(Debug, Clone)]
pub struct ConsentRow {
    pub id: String,
    pub recipients: Vec<String>,
    pub purposes: Vec<String>,
    pub expires_at_ms: i64,
    pub withdrawn_at_ms: Option<i64>,
}

/// A new consent to record.
pub struct NewConsent<'a> {
    pub id: &'a str,
    pub case_id: &'a str,
    pub recipients: &'a [OrgId],
    pub purposes: &'a [corridor::Purpose],
    pub given_by: &'a str,
    pub method: &'a str,
    pub recorded_by: i64,
    pub recorded_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A sealed envelope to queue for delivery.
pub struct NewOutboxItem<'a> {
    pub message_id: MessageId,
    pub case_id: &'a str,
    pub consent_id: &'a str,
    pub recipient: &'a OrgId,
    pub purpose: &'a str,
    pub envelope: &'a [u8],
    pub envelope_digest: &'a [u8; 32],
    pub created_by: i64,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// An outbox row due for a delivery attempt.
#[derive(Debug, Clone)]
pub struct DueItem {
    pub message_id: MessageId,
    pub recipient: String,
    pub envelope: Vec<u8>,
    pub envelope_digest: Vec<u8>,
    pub attempts: i64,
    pub expires_at_ms: i64,
}

/// What the sender knows about a referral it sent.
#[derive(Debug, Clone)]
pub struct OutboxStatus {
    pub message_id: MessageId,
    pub recipient: String,
    pub purpose: String,
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub receipt: Option<Vec<u8>>,
}

/// A referral received.
#[derive(Debug, Clone)]
pub struct InboxRow {
    pub message_id: MessageId,
    pub sender: String,
    pub purpose: String,
    pub case_ref: String,
    pub payload: Vec<u8>,
    pub received_at_ms: i64,
}

/// An envelope accepted before.
#[derive(Debug, Clone)]
pub struct SeenMessage {
    pub sender: String,
    pub envelope_digest: Vec<u8>,
    pub receipt: Vec<u8>,
}

/// What the receiving side stores for an accepted referral.
pub struct AcceptedReferral<'a> {
    pub message_id: MessageId,
    pub sender: &'a OrgId,
    pub envelope_digest: &'a [u8; 32],
    pub receipt: &'a [u8],
    pub purpose: &'a str,
    pub case_ref: &'a str,
    pub payload: &'a [u8],
    pub received_at_ms: i64,
}

/// Outcome of storing an accepted envelope.
pub enum AcceptOutcome {
    /// Stored now; answer with the new receipt.
    Stored,
    /// Already stored (a replay or a concurrent duplicate); answer with this.
    AlreadySeen(SeenMessage),
}

fn message_id(bytes: Vec<u8>) -> Result<MessageId> {
    MessageId::from_bytes(&bytes).map_err(|_| StoreError::Corrupt("message id"))
}

fn split_list(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

impl Store {
    /// Opens (creating if needed) the database file and applies migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before we acknowledge anything it records.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    // ---- users and tokens -------------------------------------------------------------

    /// Creates a user (or reuses one of that name) and issues a token for it.
    pub async fn issue_token(
        &self,
        name: &str,
        role: &str,
        token_hash: &[u8; 32],
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO users (name, role, created_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT(name) DO NOTHING",
        )
        .bind(name)
        .bind(role)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO tokens (token_hash, user_id, created_at_ms)
             SELECT $1, id, $2 FROM users WHERE name = $3",
        )
        .bind(&token_hash[..])
        .bind(now_ms)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn user_for_token(&self, token_hash: &[u8; 32]) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT u.id, u.name, u.role FROM tokens t JOIN users u ON u.id = t.user_id
             WHERE t.token_hash = $1 AND t.revoked_at_ms IS NULL",
        )
        .bind(&token_hash[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| User {
            id: r.get(0),
            name: r.get(1),
            role: r.get(2),
        }))
    }

    // ---- cases and consents -----------------------------------------------------------

    pub async fn create_case(&self, id: &str, label: &str, user: i64, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO cases (id, label, created_by, created_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(label)
        .bind(user)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn case_exists(&self, id: &str) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM cases WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    pub async fn record_consent(&self, c: &NewConsent<'_>) -> Result<()> {
        let recipients = c
            .recipients
            .iter()
            .map(OrgId::as_str)
            .collect::<Vec<_>>()
            .join(" ");
        let purposes = c
            .purposes
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        sqlx::query(
            "INSERT INTO consents (id, case_id, recipients, purposes, given_by, method,
                recorded_by, recorded_at_ms, expires_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(c.id)
        .bind(c.case_id)
        .bind(recipients)
        .bind(purposes)
        .bind(c.given_by)
        .bind(c.method)
        .bind(c.recorded_by)
        .bind(c.recorded_at_ms)
        .bind(c.expires_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn consents_for_case(&self, case_id: &str) -> Result<Vec<ConsentRow>> {
        let rows = sqlx::query(
            "SELECT id, recipients, purposes, expires_at_ms, withdrawn_at_ms
             FROM consents WHERE case_id = $1 ORDER BY recorded_at_ms",
        )
        .bind(case_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ConsentRow {
                id: r.get(0),
                recipients: split_list(r.get(1)),
                purposes: split_list(r.get(2)),
                expires_at_ms: r.get(3),
                withdrawn_at_ms: r.get(4),
            })
            .collect())
    }

    // ---- outbox (sending side) --------------------------------------------------------

    pub async fn enqueue(&self, item: &NewOutboxItem<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO outbox (message_id, case_id, consent_id, recipient, purpose, envelope,
                envelope_digest, created_by, created_at_ms, expires_at_ms, state,
                next_attempt_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'queued', $9)",
        )
        .bind(&item.message_id.0[..])
        .bind(item.case_id)
        .bind(item.consent_id)
        .bind(item.recipient.as_str())
        .bind(item.purpose)
        .bind(item.envelope)
        .bind(&item.envelope_digest[..])
        .bind(item.created_by)
        .bind(item.created_at_ms)
        .bind(item.expires_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Queued items whose next attempt is due, oldest first.
    pub async fn due(&self, now_ms: i64, limit: i64) -> Result<Vec<DueItem>> {
        let rows = sqlx::query(
            "SELECT message_id, recipient, envelope, envelope_digest, attempts, expires_at_ms
             FROM outbox WHERE state = 'queued' AND next_attempt_at_ms <= $1
             ORDER BY next_attempt_at_ms LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DueItem {
                    message_id: message_id(r.get(0))?,
                    recipient: r.get(1),
                    envelope: r.get(2),
                    envelope_digest: r.get(3),
                    attempts: r.get(4),
                    expires_at_ms: r.get(5),
                })
            })
            .collect()
    }

    /// When the earliest queued item is due, if any.
    pub async fn next_due_at(&self) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT MIN(next_attempt_at_ms) FROM outbox WHERE state = 'queued'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get(0))
    }

    /// Records a verified receipt and marks the item delivered, in one transaction.
    pub async fn mark_delivered(&self, id: MessageId, receipt: &[u8], now_ms: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO receipts (message_id, receipt, verified_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT(message_id) DO NOTHING",
        )
        .bind(&id.0[..])
        .bind(receipt)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE outbox SET state = 'delivered', delivered_at_ms = $2, attempts = attempts + 1,
                last_error = NULL
             WHERE message_id = $1",
        )
        .bind(&id.0[..])
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a failed attempt and when to try again.
    pub async fn mark_retry(
        &self,
        id: MessageId,
        error: &str,
        next_attempt_at_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2, next_attempt_at_ms = $3
             WHERE message_id = $1 AND state = 'queued'",
        )
        .bind(&id.0[..])
        .bind(error)
        .bind(next_attempt_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends delivery of an item for good (`refused` or `expired`).
    pub async fn mark_final(&self, id: MessageId, state: &str, error: &str) -> Result<()> {
        sqlx::query(
            "UPDATE outbox SET state = $2, attempts = attempts + 1, last_error = $3
             WHERE message_id = $1 AND state = 'queued'",
        )
        .bind(&id.0[..])
        .bind(state)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn outbox_status(&self, id: MessageId) -> Result<Option<OutboxStatus>> {
        let row = sqlx::query(
            "SELECT o.message_id, o.recipient, o.purpose, o.state, o.attempts, o.last_error,
                o.created_at_ms, r.receipt
             FROM outbox o LEFT JOIN receipts r ON r.message_id = o.message_id
             WHERE o.message_id = $1",
        )
        .bind(&id.0[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(OutboxStatus {
                message_id: message_id(r.get(0))?,
                recipient: r.get(1),
                purpose: r.get(2),
                state: r.get(3),
                attempts: r.get(4),
                last_error: r.get(5),
                created_at_ms: r.get(6),
                receipt: r.get(7),
            })
        })
        .transpose()
    }

    // ---- inbox (receiving side) -------------------------------------------------------

    pub async fn seen(&self, id: MessageId) -> Result<Option<SeenMessage>> {
        let row = sqlx::query(
            "SELECT sender, envelope_digest, receipt FROM seen_messages WHERE message_id = $1",
        )
        .bind(&id.0[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| SeenMessage {
            sender: r.get(0),
            envelope_digest: r.get(1),
            receipt: r.get(2),
        }))
    }

    /// Stores an accepted referral and the receipt that acknowledges it, exactly once per
    /// message id.
    pub async fn accept_referral(&self, a: &AcceptedReferral<'_>) -> Result<AcceptOutcome> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO seen_messages (message_id, sender, envelope_digest, receipt, received_at_ms)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT(message_id) DO NOTHING",
        )
        .bind(&a.message_id.0[..])
        .bind(a.sender.as_str())
        .bind(&a.envelope_digest[..])
        .bind(a.receipt)
        .bind(a.received_at_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            drop(tx);
            return self
                .seen(a.message_id)
                .await?
                .map(AcceptOutcome::AlreadySeen)
                .ok_or(StoreError::Corrupt("seen message vanished"));
        }
        sqlx::query(
            "INSERT INTO inbox (message_id, sender, purpose, case_ref, payload, received_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&a.message_id.0[..])
        .bind(a.sender.as_str())
        .bind(a.purpose)
        .bind(a.case_ref)
        .bind(a.payload)
        .bind(a.received_at_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(AcceptOutcome::Stored)
    }

    pub async fn inbox(&self, limit: i64) -> Result<Vec<InboxRow>> {
        let rows = sqlx::query(
            "SELECT message_id, sender, purpose, case_ref, payload, received_at_ms
             FROM inbox ORDER BY received_at_ms DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(inbox_row).collect()
    }

    pub async fn inbox_item(&self, id: MessageId) -> Result<Option<InboxRow>> {
        let row = sqlx::query(
            "SELECT message_id, sender, purpose, case_ref, payload, received_at_ms
             FROM inbox WHERE message_id = $1",
        )
        .bind(&id.0[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(inbox_row).transpose()
    }

    /// Number of envelopes accepted so far (for tests and metrics).
    pub async fn seen_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM seen_messages")
            .fetch_one(&self.pool)
            .await?
            .get(0))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn inbox_row(r: sqlx::sqlite::SqliteRow) -> Result<InboxRow> {
    Ok(InboxRow {
        message_id: message_id(r.get(0))?,
        sender: r.get(1),
        purpose: r.get(2),
        case_ref: r.get(3),
        payload: r.get(4),
        received_at_ms: r.get(5),
    })
}
