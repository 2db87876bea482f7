//! Group commit: the one task that writes to the database.
//!
//! Every change is a *job* sent to this task: one writer means no connection ever waits
//! for SQLite's write lock (whose busy handler sleeps in steps of up to 100 ms). The task takes
//! whatever jobs are waiting, runs them one after another inside a single `BEGIN
//! IMMEDIATE` transaction on its own connection, writes their audit entries with
//! multi-row inserts, commits once (one fsync for the whole group) and only then answers
//! each caller. Under load a group grows while the previous commit is on its way to disk,
//! so the durable-commit cost is shared; unloaded a group is one job and nothing waits.
//!
//! The writes every referral makes are *row writes* ([`RowWrite`]): the rows of one kind
//! in a group travel together to one statement, and a group made only of them usually
//! travels with its audit entries and its `COMMIT` in one query: one round trip to
//! SQLite's thread for the whole group. Such a round trip (a hand-off to another thread
//! and back) costs more CPU here than the statements it carries.
//!
//! The task keeps the log's size and right-edge hashes (its "frontier") in memory, so an
//! append reads nothing. It is the node's only appender, but not always the database's:
//! `corridor-node create-admin-token` may append to it while the node runs. Such an entry
//! takes the index the task would give its next one, so that group fails on the index and
//! the task catches up (the stored size and frontier, read again) and runs it once more.
//! A job that fails within its group is undone alone (from a savepoint opened before its
//! first statement) and the rest commits; should the group fail all the same, it is rolled
//! back and run again without that job, then job by job, so one bad job never fails or
//! half-writes another.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use corridor::merkle::{self, Hash};
use sqlx::{AssertSqlSafe, Connection as _, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use crate::storage::{Appended, Result, StoreError};

/// Most jobs in one group: bounds how long one transaction holds the write lock.
const MAX_GROUP: usize = 256;
/// Jobs waiting for the writer before callers wait to hand theirs in.
const QUEUE: usize = 4096;
/// A group commit slower than this is logged: every caller in it waited that long.
const SLOW_GROUP: std::time::Duration = std::time::Duration::from_millis(50);

/// The future of one job's statements, borrowing its data, the connection and the log.
pub type Step<'c, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>;

/// The statements of one job: runs inside the group's transaction. It may be run twice
/// (alone, after its group failed), so it reads its input by reference.
pub type Op<D, T> = for<'c> fn(&'c D, &'c mut Tx, &'c mut LogAppender) -> Step<'c, T>;

/// The writer's connection, and whether the current group's transaction is open yet.
///
/// The transaction opens with the group's first statement: `BEGIN IMMEDIATE` travels in
/// front of it in one query, because each query is a round trip to SQLite's thread and,
/// unloaded, the round trips in series are most of a referral's latency.
pub struct Tx {
    conn: SqliteConnection,
    open: bool,
    /// For the job running: whether it is to have a savepoint, opened (in front of its
    /// first statement, as `BEGIN` is) only if it runs one.
    savepoint: Savepoint,
    /// Groups committed in one query ([`commit_rows_at_once`]), shared with the handle.
    at_once: Arc<AtomicU64>,
    /// Transactions committed, shared with the handle.
    commits: Arc<AtomicU64>,
}

/// A job's savepoint ([`Tx::savepoint`]), named by the job's place in its group: a name
/// of its own, so that undoing it can never undo another job's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Savepoint {
    /// None asked for: a job alone, a row write, the group's own statements.
    None,
    /// The running job is to have one, opened in front of its first statement.
    Wanted(usize),
    /// Opened, or sent to be opened in front of a statement.
    Open(usize),
    /// Opening the transaction or the savepoint failed: none of the job's statements ran.
    Broken,
}

impl Tx {
    /// What must run before the next statement: `BEGIN IMMEDIATE` if the transaction is
    /// not open, the job's savepoint if it wants one; both count as done from here.
    fn opening(&mut self) -> Option<String> {
        let savepoint = match self.savepoint {
            Savepoint::Wanted(n) => {
                self.savepoint = Savepoint::Open(n);
                Some(format!("SAVEPOINT job{n}"))
            }
            _ => None,
        };
        let begin = !self.open;
        self.open = true;
        match (begin, savepoint) {
            (false, savepoint) => savepoint,
            (true, None) => Some("BEGIN IMMEDIATE".to_owned()),
            (true, Some(savepoint)) => Some(format!("BEGIN IMMEDIATE; {savepoint}")),
        }
    }

    /// The connection, inside the group's transaction (opened first if need be).
    pub async fn conn(&mut self) -> Result<&mut SqliteConnection> {
        let was_open = self.open;
        if let Some(opening) = self.opening() {
            let opened = sqlx::raw_sql(AssertSqlSafe(opening))
                .execute(&mut self.conn)
                .await;
            if let Err(error) = opened {
                self.open = was_open;
                if matches!(self.savepoint, Savepoint::Open(_)) {
                    self.savepoint = Savepoint::Broken;
                }
                return Err(error.into());
            }
        }
        Ok(&mut self.conn)
    }

    /// `sql` as the next statement of the group: if it is the first, with the
    /// `BEGIN IMMEDIATE` that opens the transaction folded in front. Run it on
    /// [`Tx::conn`], and read its outcome from `RETURNING` rows, not `rows_affected`:
    /// sqlx adds SQLite's `changes()` after every statement, and after `BEGIN` that is
    /// still the count of the previous group's last statement.
    pub fn sql(&mut self, sql: &'static str) -> AssertSqlSafe<Cow<'static, str>> {
        match self.opening() {
            None => AssertSqlSafe(Cow::Borrowed(sql)),
            Some(opening) => AssertSqlSafe(Cow::Owned(format!("{opening};\n{sql}"))),
        }
    }
}

/// Audit entries appended by the current group, computed in memory and written when the
/// group commits.
pub struct LogAppender {
    /// Entries committed before this group.
    committed: u64,
    /// The stored hashes the next append needs (the frontier), and the new ones.
    known: HashMap<u64, Hash>,
    pending: Vec<(Vec<u8>, Hash)>,
    new_hashes: Vec<(u64, Hash)>,
}

impl LogAppender {
    /// Reads the log's size and frontier.
    async fn load(conn: &mut SqliteConnection) -> Result<Self> {
        let size = stored_size(&mut *conn).await?;
        // Stored hashes never change once written, so this frontier stays right for
        // `size` even if another process appends meanwhile.
        let known = crate::audit_log::fetch(&mut *conn, &frontier(size)).await?;
        Ok(Self {
            committed: size,
            known,
            pending: Vec::new(),
            new_hashes: Vec::new(),
        })
    }

    /// Catches up with entries another process appended since this log was read;
    /// between groups only. Returns whether there were any.
    async fn catch_up(&mut self, conn: &mut SqliteConnection) -> Result<bool> {
        let stored = stored_size(&mut *conn).await?;
        if stored <= self.committed {
            if stored < self.committed {
                // Entries this task committed are gone: not something to write over. The
                // checkpointer refuses to sign such a log.
                tracing::error!(
                    stored,
                    written = self.committed,
                    "the stored audit log is shorter than this node wrote"
                );
            }
            return Ok(false);
        }
        tracing::warn!(
            from = self.committed,
            to = stored,
            "the audit log grew outside this node (another process appended to it); continuing from its stored size"
        );
        *self = Self::load(conn).await?;
        Ok(true)
    }

    /// The index and leaf hash `entry` gets if it is appended next.
    pub fn next(&self, entry: &[u8]) -> Appended {
        (
            self.committed + self.pending.len() as u64,
            merkle::leaf_hash(entry),
        )
    }

    /// The index and leaf hash `entry` gets if `ahead` entries are appended before it.
    pub fn upcoming(&self, ahead: u64, entry: &[u8]) -> Appended {
        let (n, leaf) = self.next(entry);
        (n + ahead, leaf)
    }

    /// Appends an entry: computes its index and the tree hashes it completes.
    pub fn append(&mut self, entry: Vec<u8>) -> Result<Appended> {
        let (n, leaf) = self.next(&entry);
        let hashes =
            merkle::stored_hashes_for_record(n, leaf, &crate::audit_log::Known(&self.known))
                .map_err(|_| StoreError::Corrupt("audit log frontier hashes missing"))?;
        let first = merkle::stored_hash_index(0, n);
        for (k, h) in hashes.into_iter().enumerate() {
            self.known.insert(first + k as u64, h);
            self.new_hashes.push((first + k as u64, h));
        }
        self.pending.push((entry, leaf));
        Ok((n, leaf))
    }

    /// Writes the group's entries and hashes and commits, in one round trip to SQLite
    /// and with one fixed query whatever the group's size.
    async fn write_and_commit(&self, tx: &mut Tx) -> Result<()> {
        if self.pending.is_empty() {
            if tx.open {
                sqlx::query("COMMIT").execute(tx.conn().await?).await?;
            }
            return Ok(());
        }
        let params = self.audit_params()?;
        params
            .bind_to(sqlx::query(tx.sql(AUDIT_SQL)))
            .execute(tx.conn().await?)
            .await?;
        Ok(())
    }

    /// The parameters of [`AUDIT_SQL`] for the group's entries and hashes: they travel as
    /// [`Rows`], one JSON array and one blob each.
    fn audit_params(&self) -> Result<AuditParams> {
        let mut entries = Rows::default();
        for (entry, leaf) in &self.pending {
            entries.row(|row| {
                row.blob(entry).blob(leaf);
                Ok(())
            })?;
        }
        let mut hashes = Rows::default();
        for (id, hash) in &self.new_hashes {
            let id = i64::try_from(*id).map_err(|_| StoreError::Corrupt("audit hash index"))?;
            hashes.row(|row| {
                row.int(id).blob(hash);
                Ok(())
            })?;
        }
        let first = i64::try_from(self.committed)
            .map_err(|_| StoreError::Corrupt("audit log size out of range"))?;
        Ok(AuditParams {
            first,
            entries: entries.into_params()?,
            hashes: hashes.into_params()?,
        })
    }

    /// The group committed: its entries are part of the log.
    fn committed(&mut self) {
        self.committed += self.pending.len() as u64;
        self.pending.clear();
        self.new_hashes.clear();
        let keep = frontier(self.committed);
        self.known.retain(|id, _| keep.contains(id));
    }

    /// Where the group's appends stand, to undo those made after ([`LogAppender::rewind`]).
    fn mark(&self) -> (usize, usize) {
        (self.pending.len(), self.new_hashes.len())
    }

    /// Forgets what the group appended since `mark`: a job undone within its group.
    fn rewind(&mut self, (pending, hashes): (usize, usize)) {
        for (id, _) in self.new_hashes.drain(hashes..) {
            self.known.remove(&id);
        }
        self.pending.truncate(pending);
    }

    /// The group rolled back: forget what it appended.
    fn rolled_back(&mut self) {
        for (id, _) in self.new_hashes.drain(..) {
            self.known.remove(&id);
        }
        self.pending.clear();
    }
}

/// Writes a group's audit entries (from index `$1`) and their hashes, and commits.
const AUDIT_SQL: &str = "INSERT INTO audit_entries (idx, entry, leaf_hash)
        SELECT $1 + key, substr($3, value ->> 0, value ->> 1),
            substr($3, value ->> 2, value ->> 3)
        FROM jsonb_each($2);
     INSERT INTO audit_hashes (id, hash)
        SELECT value ->> 0, substr($5, value ->> 1, value ->> 2) FROM jsonb_each($4);
     COMMIT";

/// The five parameters of [`AUDIT_SQL`].
struct AuditParams {
    first: i64,
    entries: (String, Vec<u8>),
    hashes: (String, Vec<u8>),
}

impl AuditParams {
    fn bind_to<'q>(self, query: SqliteQuery<'q>) -> SqliteQuery<'q> {
        query
            .bind(self.first)
            .bind(self.entries.0)
            .bind(self.entries.1)
            .bind(self.hashes.0)
            .bind(self.hashes.1)
    }
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// The number of entries stored in the log.
async fn stored_size(conn: &mut SqliteConnection) -> Result<u64> {
    // idx is the rowid: MAX is a lookup, COUNT would scan the table.
    let size: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit_entries")
        .fetch_one(conn)
        .await?;
    u64::try_from(size).map_err(|_| StoreError::Corrupt("audit size"))
}

/// Stored-hash indexes of the complete subtrees on the right edge of a tree of `size`.
fn frontier(size: u64) -> Vec<u64> {
    (0..64u32)
        .filter(|l| (size >> l) & 1 == 1)
        .map(|l| merkle::stored_hash_index(l, (size >> l) - 1))
        .collect()
}

/// A write that is one row of a statement shared by every write of its kind in a group.
///
/// The statement ([`RowWrite::SQL`]) reads the group's rows from `jsonb_each($1)`: each
/// row is a JSON array of its values, in the order [`RowWrite::encode`] wrote them, and a
/// blob value is its 1-based offset and length in `$2`, the rows' blobs end to end, to be
/// read with `substr($2, offset, length)`. (`jsonb_each` hands each row over in SQLite's
/// binary form, which `->>` reads as it is; `json_each` hands it over as text, which
/// every `->>` would parse again.) It returns the key of every row it wrote (its
/// first column; a row written twice, as by a retry in the same group, comes back once),
/// and its last statement changes exactly one row for each row it writes (SQLite's
/// `changes()` then tells whether it wrote them all). Everything a row write does beyond
/// its row happens in the same transaction: a row it wrote appends exactly one entry to
/// the log in [`RowWrite::written`], and one it did not makes the reads its unusual
/// outcome needs in [`RowWrite::not_written`], appending nothing.
pub trait RowWrite: Send + Sync + 'static {
    type Output: Send + 'static;
    /// The statement for a group's rows of this kind (parameters `$1` and `$2` only).
    const SQL: &'static str;
    /// The key the statement returns for this row if it wrote it.
    fn key(&self) -> &[u8];
    /// Writes the row's values. `ahead` is how many entries the rows before it in the
    /// statement append to the log if all are written (see [`LogAppender::upcoming`]).
    fn encode(&mut self, ahead: u64, log: &LogAppender, row: &mut Rows) -> Result<()>;
    /// The statement wrote this row: appends its entry and gives the output. It reads
    /// nothing, because it may run before the statement, when a group's rows and its
    /// commit travel in one query (see [`commit_rows_at_once`]).
    fn written(&self, log: &mut LogAppender) -> Result<Self::Output>;
    /// The statement did not write this row: finds out why, for the output.
    fn not_written<'c>(
        &'c self,
        tx: &'c mut Tx,
        log: &'c mut LogAppender,
    ) -> Step<'c, Self::Output>;
}

/// The rows of one kind in a group, as their statement reads them (see [`RowWrite`]).
#[derive(Default)]
pub struct Rows {
    json: Vec<u8>,
    blobs: Vec<u8>,
    /// Whether the current row has a value yet (for the commas).
    started: bool,
}

impl Rows {
    /// Adds a row whose values `values` writes.
    pub fn row(&mut self, values: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        self.begin();
        values(self)?;
        self.end();
        Ok(())
    }

    fn begin(&mut self) {
        self.json
            .extend_from_slice(if self.json.is_empty() { b"[[" } else { b",[" });
        self.started = false;
    }

    fn end(&mut self) {
        self.json.push(b']');
    }

    fn separate(&mut self) {
        if self.started {
            self.json.push(b',');
        }
        self.started = true;
    }

    pub fn int(&mut self, value: i64) -> &mut Self {
        self.separate();
        self.json.extend_from_slice(value.to_string().as_bytes());
        self
    }

    pub fn opt_int(&mut self, value: Option<i64>) -> &mut Self {
        match value {
            Some(v) => self.int(v),
            None => self.null(),
        }
    }

    fn null(&mut self) -> &mut Self {
        self.separate();
        self.json.extend_from_slice(b"null");
        self
    }

    /// A string, escaped as JSON.
    pub fn text(&mut self, value: &str) -> Result<&mut Self> {
        self.separate();
        serde_json::to_writer(&mut self.json, value)
            .map_err(|_| StoreError::Corrupt("a row value could not be written"))?;
        Ok(self)
    }

    pub fn opt_text(&mut self, value: Option<&str>) -> Result<&mut Self> {
        match value {
            Some(v) => self.text(v),
            None => Ok(self.null()),
        }
    }

    /// A blob: two values, its offset (1-based) and length in the blobs.
    pub fn blob(&mut self, value: &[u8]) -> &mut Self {
        let offset = self.blobs.len() as i64 + 1;
        self.blobs.extend_from_slice(value);
        self.int(offset).int(value.len() as i64)
    }

    /// An optional blob: two nulls for none (`substr` of them is NULL).
    pub fn opt_blob(&mut self, value: Option<&[u8]>) -> &mut Self {
        match value {
            Some(v) => self.blob(v),
            None => self.null().null(),
        }
    }

    /// The two parameters a statement reads the rows from: the JSON array of rows and
    /// the blobs.
    fn into_params(self) -> Result<(String, Vec<u8>)> {
        let mut json = self.json;
        if json.is_empty() {
            json.push(b'[');
        }
        json.push(b']');
        let json =
            String::from_utf8(json).map_err(|_| StoreError::Corrupt("rows are not UTF-8"))?;
        Ok((json, self.blobs))
    }
}

/// A job with its result type erased, as the writer task holds it.
trait Job: Send {
    /// For a row write: the statement it shares with the other rows of its kind.
    fn shared(&self) -> Option<&'static str> {
        None
    }
    /// For a row write: its key, as its statement returns it.
    fn key(&self) -> &[u8] {
        &[]
    }
    /// For a row write: adds its row.
    fn encode(&mut self, _ahead: u64, _log: &LogAppender, _rows: &mut Rows) -> Result<()> {
        Ok(())
    }
    /// For a row write: what follows once its statement wrote the row ([`RowWrite::written`]).
    fn written(&mut self, _log: &mut LogAppender) -> Result<()> {
        Err(StoreError::Corrupt("only a row write has a row"))
    }
    /// Runs the job (for a row write, what follows its statement, which says whether it
    /// wrote the row).
    fn run<'c>(
        &'c mut self,
        written: bool,
        tx: &'c mut Tx,
        log: &'c mut LogAppender,
    ) -> Step<'c, ()>;
    /// Answers the caller: the job's output if its group committed, else the error.
    fn finish(self: Box<Self>, failure: Option<StoreError>);
}

/// Answers a caller once its job's group is over.
fn answer<T>(
    failure: Option<StoreError>,
    output: Option<T>,
    on_commit: Option<OnCommit>,
    reply: oneshot::Sender<Result<T>>,
) {
    let result = match (failure, output) {
        (Some(error), _) => Err(error),
        (None, Some(output)) => {
            if let Some(on_commit) = on_commit {
                on_commit();
            }
            Ok(output)
        }
        (None, None) => Err(StoreError::Corrupt("a write job did not run")),
    };
    // The caller may have gone away (its request was cancelled); the write stands.
    let _ = reply.send(result);
}

/// Runs in the writer task once a job's group has committed.
pub type OnCommit = Box<dyn FnOnce() + Send>;

struct Typed<D, T> {
    data: D,
    op: Op<D, T>,
    output: Option<T>,
    on_commit: Option<OnCommit>,
    reply: oneshot::Sender<Result<T>>,
}

impl<D: Send + Sync, T: Send> Job for Typed<D, T> {
    fn run<'c>(
        &'c mut self,
        _written: bool,
        tx: &'c mut Tx,
        log: &'c mut LogAppender,
    ) -> Step<'c, ()> {
        Box::pin(async move {
            let output = (self.op)(&self.data, tx, log).await?;
            self.output = Some(output);
            Ok(())
        })
    }

    fn finish(self: Box<Self>, failure: Option<StoreError>) {
        answer(failure, self.output, self.on_commit, self.reply);
    }
}

/// A [`RowWrite`] as the writer task holds it.
struct RowJob<R: RowWrite> {
    row: R,
    output: Option<R::Output>,
    reply: oneshot::Sender<Result<R::Output>>,
}

impl<R: RowWrite> Job for RowJob<R> {
    fn shared(&self) -> Option<&'static str> {
        Some(R::SQL)
    }

    fn key(&self) -> &[u8] {
        self.row.key()
    }

    fn encode(&mut self, ahead: u64, log: &LogAppender, rows: &mut Rows) -> Result<()> {
        rows.row(|rows| self.row.encode(ahead, log, rows))
    }

    fn written(&mut self, log: &mut LogAppender) -> Result<()> {
        self.output = Some(self.row.written(log)?);
        Ok(())
    }

    fn run<'c>(
        &'c mut self,
        written: bool,
        tx: &'c mut Tx,
        log: &'c mut LogAppender,
    ) -> Step<'c, ()> {
        Box::pin(async move {
            if written {
                return Job::written(self, log);
            }
            self.output = Some(self.row.not_written(tx, log).await?);
            Ok(())
        })
    }

    fn finish(self: Box<Self>, failure: Option<StoreError>) {
        answer(failure, self.output, None, self.reply);
    }
}

enum Message {
    Job(Box<dyn Job>),
    /// Move the WAL into the database file and truncate it, between two groups.
    Checkpoint(oneshot::Sender<Result<()>>),
    Close(oneshot::Sender<()>),
}

/// The handle through which the node hands jobs to the writer task.
#[derive(Clone, Debug)]
pub struct Writer {
    jobs: mpsc::Sender<Message>,
    at_once: Arc<AtomicU64>,
    commits: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the writer task on `conn`, which it owns from now on.
    pub async fn start(mut conn: SqliteConnection) -> Result<Self> {
        let log = LogAppender::load(&mut conn).await?;
        let (jobs, queue) = mpsc::channel(QUEUE);
        let at_once = Arc::new(AtomicU64::new(0));
        let commits = Arc::new(AtomicU64::new(0));
        let tx = Tx {
            conn,
            open: false,
            savepoint: Savepoint::None,
            at_once: at_once.clone(),
            commits: commits.clone(),
        };
        tokio::spawn(run(tx, log, queue));
        Ok(Self {
            jobs,
            at_once,
            commits,
        })
    }

    /// How many groups were committed in one query, all their rows written at once.
    pub fn groups_at_once(&self) -> u64 {
        self.at_once.load(Ordering::Relaxed)
    }

    /// Transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Runs `op` on `data` in the next group and returns its output once the group is
    /// committed.
    pub async fn run<D, T>(&self, data: D, op: Op<D, T>) -> Result<T>
    where
        D: Send + Sync + 'static,
        T: Send + 'static,
    {
        self.run_then(data, op, None).await
    }

    /// As [`Writer::run`], and `on_commit` runs in the writer task right after the commit,
    /// whether or not the caller is still waiting (its request may be cancelled): for what
    /// must follow a committed change, such as dropping cached copies of what it changed.
    pub async fn run_then<D, T>(
        &self,
        data: D,
        op: Op<D, T>,
        on_commit: Option<OnCommit>,
    ) -> Result<T>
    where
        D: Send + Sync + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Typed {
            data,
            op,
            output: None,
            on_commit,
            reply,
        };
        self.submit(Box::new(job), answer).await
    }

    /// Writes `row` in the next group, in one statement with the other rows of its kind,
    /// and returns its output once the group is committed.
    pub async fn write_row<R: RowWrite>(&self, row: R) -> Result<R::Output> {
        let (reply, answer) = oneshot::channel();
        let job = RowJob {
            row,
            output: None,
            reply,
        };
        self.submit(Box::new(job), answer).await
    }

    /// Hands `job` to the writer task and waits for its `answer`.
    async fn submit<T>(
        &self,
        job: Box<dyn Job>,
        answer: oneshot::Receiver<Result<T>>,
    ) -> Result<T> {
        self.jobs
            .send(Message::Job(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Commits the jobs already handed in, then moves the WAL into the database file and
    /// truncates it. Done here because a checkpoint needs the write lock: taken by any
    /// other connection, it would make this task wait in SQLite's busy handler, whose
    /// sleeps of up to 100 ms would stall every caller.
    pub async fn checkpoint(&self) -> Result<()> {
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Message::Checkpoint(done))
            .await
            .map_err(|_| StoreError::Closed)?;
        result.await.map_err(|_| StoreError::Closed)?
    }

    /// Finishes the jobs already handed in and closes the writer's connection.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.jobs.send(Message::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

async fn run(mut tx: Tx, mut log: LogAppender, mut queue: mpsc::Receiver<Message>) {
    let mut group: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_GROUP);
    let (mut closing, mut checkpoint) = (None, None);
    while closing.is_none() {
        match queue.recv().await {
            Some(Message::Job(job)) => group.push(job),
            Some(Message::Checkpoint(done)) => checkpoint = Some(done),
            Some(Message::Close(done)) => closing = Some(done),
            None => break,
        }
        while closing.is_none() && checkpoint.is_none() && group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(Message::Job(job)) => group.push(job),
                Ok(Message::Checkpoint(done)) => checkpoint = Some(done),
                Ok(Message::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            commit_and_answer(&mut tx, &mut log, &mut group).await;
        }
        if let Some(done) = checkpoint.take() {
            // Between groups, so outside any transaction, and no other connection writes.
            // The first column says whether a reader kept it from finishing.
            let result = sqlx::query_scalar::<_, i64>("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut tx.conn)
                .await
                .map_err(StoreError::from)
                .and_then(|busy| match busy {
                    0 => Ok(()),
                    _ => Err(StoreError::CheckpointBusy),
                });
            let _ = done.send(result);
        }
    }
    if let Err(error) = tx.conn.close().await {
        tracing::warn!(%error, "closing the writer's connection failed");
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Answers the callers of a committed group: each job that failed within it (and was
/// undone alone) with its error, the others with their output.
fn finish_committed(group: &mut Vec<Box<dyn Job>>, mut failures: Vec<(usize, StoreError)>) {
    for (at, job) in group.drain(..).enumerate() {
        let failure = failures
            .iter()
            .position(|(failed, _)| *failed == at)
            .map(|found| failures.swap_remove(found).1);
        job.finish(failure);
    }
}

/// Commits `group` and answers its callers. A job whose own statements fail is undone
/// alone within the group (a savepoint each), and the rest commits together: jobs that
/// fail on purpose (a member's requests built to conflict with each other in one group)
/// cost no commit of their own. If the group fails all the same, it runs without the job
/// that failed it, and failing that, each job alone.
async fn commit_and_answer(tx: &mut Tx, log: &mut LogAppender, group: &mut Vec<Box<dyn Job>>) {
    let started = std::time::Instant::now();
    let mut failed_job = None;
    let mut failures = Vec::new();
    let result = commit_group_caught_up(tx, log, group, &mut failed_job, &mut failures).await;
    let took = started.elapsed();
    if took > SLOW_GROUP {
        tracing::warn!(
            jobs = group.len(),
            took_ms = took.as_millis() as u64,
            "slow group commit"
        );
    }
    match result {
        Ok(()) => finish_committed(group, failures),
        Err(error) if group.len() == 1 => {
            if let Some(job) = group.pop() {
                job.finish(Some(error));
            }
        }
        Err(error) => {
            // A concurrent change is no fault; anything else may be.
            if matches!(error, StoreError::ReadAgain(_)) {
                tracing::debug!(%error, jobs = group.len(), "group commit failed; running its jobs one by one");
            } else {
                tracing::warn!(%error, jobs = group.len(), "group commit failed; running its jobs one by one");
            }
            if let Some(at) = failed_job.filter(|at| *at < group.len()) {
                let culprit = group.remove(at);
                let mut failures = Vec::new();
                if commit_group_caught_up(tx, log, group, &mut None, &mut failures)
                    .await
                    .is_ok()
                {
                    finish_committed(group, failures);
                }
                group.push(culprit);
            }
            for mut job in group.drain(..) {
                let alone = commit_group_caught_up(
                    tx,
                    log,
                    std::slice::from_mut(&mut job),
                    &mut None,
                    &mut Vec::new(),
                )
                .await;
                job.finish(alone.err());
            }
        }
    }
}

/// [`commit_group`], run once more if it failed because another process appended to the
/// log: its entries took the indexes this group's were given.
async fn commit_group_caught_up(
    tx: &mut Tx,
    log: &mut LogAppender,
    group: &mut [Box<dyn Job>],
    failed_job: &mut Option<usize>,
    failures: &mut Vec<(usize, StoreError)>,
) -> Result<()> {
    let result = commit_group(tx, log, group, failed_job, failures).await;
    if result.is_err() {
        match log.catch_up(&mut tx.conn).await {
            Ok(true) => {
                *failed_job = None;
                return commit_group(tx, log, group, failed_job, failures).await;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "could not read the audit log's stored size"),
        }
    }
    result
}

/// Runs `group` in one transaction and commits it; on any failure nothing of it stays.
/// Its row writes run first, then its other jobs in order: no caller in a group has been
/// answered yet, so any order of its jobs is one they could have arrived in. In a group of
/// several, each of those other jobs runs in a savepoint: one that fails is undone alone
/// and named in `failures`, and the group goes on.
///
/// The transaction is opened and closed with plain statements rather than sqlx's
/// transaction guard so that they share round trips with the group's own statements
/// (see [`Tx`]).
async fn commit_group(
    tx: &mut Tx,
    log: &mut LogAppender,
    group: &mut [Box<dyn Job>],
    failed_job: &mut Option<usize>,
    failures: &mut Vec<(usize, StoreError)>,
) -> Result<()> {
    failures.clear();
    if group.iter().all(|job| job.shared().is_some()) {
        match commit_rows_at_once(tx, log, group).await {
            Ok(()) => {
                tx.open = false;
                tx.at_once.fetch_add(1, Ordering::Relaxed);
                tx.commits.fetch_add(1, Ordering::Relaxed);
                log.committed();
                return Ok(());
            }
            Err(error) => {
                // Some row was not written (a replay, a changed consent, ...) or the query
                // failed: nothing of it stays, and the group runs the usual way.
                tracing::debug!(%error, jobs = group.len(), "group of rows not written at once");
                let _ = sqlx::query("ROLLBACK").execute(&mut tx.conn).await;
                tx.open = false;
                log.rolled_back();
            }
        }
    }
    let isolate = group.len() > 1;
    let result = async {
        write_rows(tx, log, group).await?;
        for (at, job) in group.iter_mut().enumerate() {
            if job.shared().is_some() {
                continue;
            }
            if !isolate {
                job.run(false, tx, log)
                    .await
                    .inspect_err(|_| *failed_job = Some(at))?;
                continue;
            }
            // Savepoints stay on the stack once the job is done (the commit releases
            // them all): no round trip of their own.
            tx.savepoint = Savepoint::Wanted(at);
            let mark = log.mark();
            let outcome = job.run(false, tx, log).await;
            let savepoint = std::mem::replace(&mut tx.savepoint, Savepoint::None);
            if let Err(error) = outcome {
                *failed_job = Some(at);
                match savepoint {
                    // Should the undoing fail (SQLite ended the transaction itself,
                    // or the savepoint never opened), the group fails, naming this job.
                    Savepoint::Open(n) => {
                        sqlx::raw_sql(AssertSqlSafe(format!("ROLLBACK TO job{n}")))
                            .execute(tx.conn().await?)
                            .await?;
                    }
                    // It ran no statement: nothing to undo but its entries.
                    Savepoint::Wanted(_) | Savepoint::None => {}
                    // Opening the transaction or its savepoint failed: no fault of the
                    // job's.
                    Savepoint::Broken => return Err(error),
                }
                *failed_job = None;
                log.rewind(mark);
                failures.push((at, error));
            }
        }
        log.write_and_commit(tx).await
    }
    .await;
    match result {
        Ok(()) => {
            tx.commits.fetch_add(1, Ordering::Relaxed);
            log.committed();
        }
        Err(_) => {
            // Nothing of the group may stay; "no transaction is active" is fine here.
            let _ = sqlx::query("ROLLBACK").execute(&mut tx.conn).await;
            log.rolled_back();
        }
    }
    tx.open = false;
    result
}

/// Runs a [`RowWrite`] statement over `rows` inside the group's transaction; returns the
/// keys of the rows it wrote. For a job that writes such rows among other statements.
pub async fn run_rows(tx: &mut Tx, sql: &'static str, rows: Rows) -> Result<Vec<Vec<u8>>> {
    let (json, blobs) = rows.into_params()?;
    Ok(sqlx::query_scalar(tx.sql(sql))
        .bind(json)
        .bind(blobs)
        .fetch_all(tx.conn().await?)
        .await?)
}

/// The statements of the group's row writes, each once, in the order each first appears.
fn row_kinds(group: &[Box<dyn Job>]) -> Vec<&'static str> {
    let mut kinds: Vec<&'static str> = Vec::new();
    for job in group {
        if let Some(sql) = job.shared()
            && !kinds.contains(&sql)
        {
            kinds.push(sql);
        }
    }
    kinds
}

/// Runs the group's row writes: one statement per kind, in the order each kind first
/// appears, then each row's own follow-up, in order.
async fn write_rows(tx: &mut Tx, log: &mut LogAppender, group: &mut [Box<dyn Job>]) -> Result<()> {
    for sql in row_kinds(group) {
        let mut rows = Rows::default();
        let of_kind = group.iter_mut().filter(|job| job.shared() == Some(sql));
        for (ahead, job) in (0u64..).zip(of_kind) {
            job.encode(ahead, log, &mut rows)?;
        }
        let mut written = run_rows(tx, sql, rows).await?;
        for job in group.iter_mut().filter(|job| job.shared() == Some(sql)) {
            // A key written twice comes back once: it counts for the first of its rows.
            let found = written.iter().position(|key| key.as_slice() == job.key());
            if let Some(at) = found {
                written.swap_remove(at);
            }
            job.run(found.is_some(), tx, log).await?;
        }
    }
    Ok(())
}

/// Writes a group made only of row writes, its audit entries and its `COMMIT` in one
/// query: one round trip to SQLite's thread instead of two, so one wake-up of a sleeping
/// thread fewer per commit when unloaded, and one hand-off fewer per group under load.
///
/// It assumes the usual outcome, that every statement writes every row: each row's
/// [`RowWrite::written`] runs before the statements, in the order [`write_rows`] would
/// run it, and after each kind's statement a guard makes the query fail unless
/// `changes()` counts one row per row (`abs` of the smallest integer is SQLite's
/// overflow error). On any failure the caller rolls back and runs the group the usual way,
/// which finds out what each row's outcome was.
async fn commit_rows_at_once(
    tx: &mut Tx,
    log: &mut LogAppender,
    group: &mut [Box<dyn Job>],
) -> Result<()> {
    let mut sql = String::from("BEGIN IMMEDIATE;\n");
    let mut rows_params = Vec::new();
    for kind in row_kinds(group) {
        let mut rows = Rows::default();
        let mut count = 0i64;
        let of_kind = group.iter_mut().filter(|job| job.shared() == Some(kind));
        for (ahead, job) in (0u64..).zip(of_kind) {
            job.encode(ahead, log, &mut rows)?;
            count += 1;
        }
        for job in group.iter_mut().filter(|job| job.shared() == Some(kind)) {
            job.written(log)?;
        }
        // This kind's parameters follow the earlier kinds': rows, blobs, row count.
        let first = 3 * rows_params.len();
        sql.push_str(&shift_params(kind, first));
        sql.push_str(&format!(
            ";\nSELECT abs(CASE WHEN changes() = ${} THEN 0 ELSE -9223372036854775808 END);\n",
            first + 3
        ));
        rows_params.push((rows.into_params()?, count));
    }
    sql.push_str(&shift_params(AUDIT_SQL, 3 * rows_params.len()));
    let audit = log.audit_params()?;
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for ((json, blobs), count) in rows_params {
        query = query.bind(json).bind(blobs).bind(count);
    }
    tx.open = true;
    audit.bind_to(query).execute(&mut tx.conn).await?;
    Ok(())
}

/// `sql` with each parameter `$n` renamed `$(n + by)`, for a query that carries the
/// parameters of several statements (sqlx numbers them across the whole query).
fn shift_params(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::Rows;
    use crate::storage::Store;
    use crate::storage::tests::{add_alice, stored_tree_size, temp_store};

    #[test]
    fn rows_travel_as_json_arrays_with_blobs_by_offset() {
        let mut rows = Rows::default();
        rows.row(|row| {
            row.blob(&[0x00, 0xab])
                .text("a \"quoted\" \\ line\n")?
                .int(-7)
                .opt_int(None)
                .opt_blob(None);
            Ok(())
        })
        .expect("row");
        rows.row(|row| {
            row.opt_text(None)?.blob(&[]).blob(&[0xff]).int(i64::MAX);
            Ok(())
        })
        .expect("row");
        let (json, blobs) = rows.into_params().expect("params");
        assert_eq!(
            json,
            r#"[[1,2,"a \"quoted\" \\ line\n",-7,null,null,null],[null,3,0,3,1,9223372036854775807]]"#
        );
        assert_eq!(blobs, vec![0x00, 0xab, 0xff]);
        let (json, blobs) = Rows::default().into_params().expect("params");
        assert_eq!((json.as_str(), blobs.len()), ("[]", 0));
    }

    #[test]
    fn parameters_are_renumbered_for_a_query_of_several_statements() {
        use super::shift_params;
        assert_eq!(
            shift_params("SELECT $1, $2 || '$', $10 FROM t WHERE a = $2", 3),
            "SELECT $4, $5 || '$', $13 FROM t WHERE a = $5"
        );
        assert_eq!(shift_params("SELECT 1", 6), "SELECT 1");
        assert_eq!(shift_params("$1", 0), "$1");
    }

    fn entry(i: u64) -> Vec<u8> {
        corridor::audit::encode(&corridor::audit::Event::RetentionPurge { deleted: i }, 0)
    }

    /// On a current-thread runtime every job below is queued before the writer runs, so
    /// they form one group; those that break a foreign key must fail alone, however many.
    #[tokio::test]
    async fn failing_jobs_fail_alone_and_the_rest_of_their_group_commits() {
        let (store, dir) = temp_store("writer").await;
        let alice = add_alice(&store, entry(0)).await;
        let commits = store.commits();
        let (bad, good, appended, worse, more) = tokio::join!(
            store.create_case("case-bad", b"key", b"label", alice + 99, 1),
            store.create_case("case-good", b"key", b"label", alice, 1),
            store.append_audit(vec![entry(1), entry(2)]),
            store.create_case("case-worse", b"key", b"label", alice + 98, 1),
            store.append_audit(vec![entry(3)]),
        );
        assert!(good.is_ok(), "{good:?}");
        assert!(
            bad.is_err() && worse.is_err(),
            "a case by a user that does not exist must fail"
        );
        assert!(!store.case_exists("case-worse").await.expect("read"));
        let appended = appended.expect("append");
        let more = more.expect("append");
        let indexes: Vec<u64> = appended.iter().chain(&more).map(|a| a.0).collect();
        assert_eq!(indexes, vec![1, 2, 3]);
        assert!(store.case_exists("case-good").await.expect("read"));
        assert!(!store.case_exists("case-bad").await.expect("read"));
        // The rest of the group committed together, once, not job by job.
        assert_eq!(store.commits(), commits + 1);

        // What is stored is one consistent tree, and the cached frontier carries on from
        // it after a reopen.
        assert_eq!(stored_tree_size(&store).await, 4);
        store.close().await;
        let store = Store::open(&dir.join("store.db")).await.expect("reopen");
        store.append_audit(vec![entry(4)]).await.expect("append");
        assert_eq!(stored_tree_size(&store).await, 5);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `corridor-node create-admin-token` appends to the log of a running node from
    /// another process: the node's writer must carry on after its entry, not fail every
    /// later write on an index already taken.
    #[tokio::test]
    async fn a_writer_carries_on_after_entries_another_process_appended() {
        let (node, dir) = temp_store("writer-catch-up").await;
        let appended = node.append_audit(vec![entry(0), entry(1)]).await;
        assert_eq!(appended.expect("append")[1].0, 1);
        let other = Store::open(&dir.join("store.db"))
            .await
            .expect("open again");
        let theirs = other.append_audit(vec![entry(2)]).await.expect("append");
        assert_eq!(theirs[0].0, 2);

        // Two jobs in one group, both from a writer that last saw two entries.
        let (one, two) = tokio::join!(
            node.append_audit(vec![entry(3)]),
            node.append_audit(vec![entry(4), entry(5)]),
        );
        let indexes: Vec<u64> = one
            .expect("append after the other process's entry")
            .iter()
            .chain(&two.expect("append in the same group"))
            .map(|a| a.0)
            .collect();
        assert_eq!(indexes, vec![3, 4, 5]);
        // A job with its own statements, and the other writer catching up in turn.
        add_alice(&node, entry(6)).await;
        let theirs = other.append_audit(vec![entry(7)]).await.expect("append");
        assert_eq!(theirs[0].0, 7);
        assert_eq!(stored_tree_size(&node).await, 8);
        other.close().await;
        node.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
