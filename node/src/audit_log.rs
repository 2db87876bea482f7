//! The node's audit log on top of storage: appending entries inside the transaction of the
//! event they record, and reading tree hashes and proofs with O(log n) reads.
//!
//! The Merkle arithmetic is the protocol core's (`corridor::merkle`, modelled on Go's
//! sumdb/tlog). Which stored hashes an operation reads depends only on the tree sizes, not
//! on hash values, so each operation runs in two passes: the first records the indexes it
//! needs, one query fetches them, the second computes with them.

use std::collections::HashMap;
use std::sync::Mutex;

use corridor::merkle::{self, Hash, HashReader};
use sqlx::Row as _;

use crate::storage::{Result, StoreError};

/// Records which stored hashes an operation reads, answering with zeros.
#[derive(Default)]
struct Recorder(Mutex<Vec<u64>>);

impl HashReader for Recorder {
    fn read_hashes(&self, indexes: &[u64]) -> std::result::Result<Vec<Hash>, merkle::ReadError> {
        if let Ok(mut seen) = self.0.lock() {
            seen.extend_from_slice(indexes);
        }
        Ok(vec![[0u8; 32]; indexes.len()])
    }
}

/// Answers from a map of hashes known in memory.
pub(crate) struct Known<'a>(pub &'a HashMap<u64, Hash>);

impl HashReader for Known<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> std::result::Result<Vec<Hash>, merkle::ReadError> {
        indexes
            .iter()
            .map(|i| self.0.get(i).copied().ok_or(merkle::ReadError::Missing(*i)))
            .collect()
    }
}

/// Fetches stored hashes by index.
pub(crate) async fn fetch<'e, E>(executor: E, indexes: &[u64]) -> Result<HashMap<u64, Hash>>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    if indexes.is_empty() {
        return Ok(HashMap::new());
    }
    // Indexes are integers we computed, never input; the list is O(log n) long.
    let list = indexes
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id, hash FROM audit_hashes WHERE id IN ({list})"
    )))
    .fetch_all(executor)
    .await?;
    rows.into_iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let hash: Vec<u8> = r.get(1);
            let hash: Hash = hash
                .try_into()
                .map_err(|_| StoreError::Corrupt("stored audit hash"))?;
            Ok((id as u64, hash))
        })
        .collect()
}

/// Runs a Merkle operation in two passes against the stored hashes.
pub(crate) async fn with_hashes<'e, E, T>(
    executor: E,
    op: impl Fn(&dyn HashReader) -> std::result::Result<T, merkle::MerkleError>,
) -> Result<T>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let recorder = Recorder::default();
    op(&recorder).map_err(|_| StoreError::Corrupt("audit log arithmetic"))?;
    let wanted = recorder.0.into_inner().unwrap_or_default();
    let fetched = fetch(executor, &wanted).await?;
    op(&Known(&fetched)).map_err(|e| {
        tracing::error!(error = %e, "audit log hashes missing or corrupt");
        StoreError::Corrupt("audit log hashes missing")
    })
}
