//! Read caches whose entries are only a guess.
//!
//! The node caches a few things it reads on every referral (a case's consents, a received
//! case's wrapped data key). A cached value may be stale: whatever acts on it re-checks it
//! in the transaction that writes, and the writes that change it clear the cache once they
//! have committed. A read that began before a clearing must not put what it read back, so
//! the cache counts its clearings (its generation) and a fill names the generation it
//! read at.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A bounded map from a string key to a cached value, shared between tasks.
pub struct GuessCache<V> {
    inner: Arc<Mutex<Entries<V>>>,
    max: usize,
}

struct Entries<V> {
    by_key: HashMap<String, V>,
    generation: u64,
}

impl<V: Clone> GuessCache<V> {
    /// An empty cache of at most `max` entries (it starts over when full).
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Entries {
                by_key: HashMap::new(),
                generation: 0,
            })),
            max,
        }
    }

    /// The cached value of `key`, or the generation to name when filling it after a read.
    pub fn get(&self, key: &str) -> Result<V, u64> {
        match self.inner.lock() {
            Ok(entries) => match entries.by_key.get(key) {
                Some(value) => Ok(value.clone()),
                None => Err(entries.generation),
            },
            // A poisoned lock only loses the cache; the generation never matches again.
            Err(_) => Err(u64::MAX),
        }
    }

    /// The current generation, for a read that bypasses the cache but fills it.
    pub fn generation(&self) -> u64 {
        self.inner.lock().map_or(u64::MAX, |e| e.generation)
    }

    /// Caches `value`, read at `generation`, unless the cache was cleared since.
    pub fn fill(&self, key: &str, value: V, generation: u64) {
        if let Ok(mut entries) = self.inner.lock()
            && entries.generation == generation
        {
            if entries.by_key.len() >= self.max {
                entries.by_key.clear();
            }
            entries.by_key.insert(key.to_owned(), value);
        }
    }

    /// Forgets everything (after a write that may have changed cached values).
    pub fn clear(&self) {
        if let Ok(mut entries) = self.inner.lock() {
            entries.by_key.clear();
            entries.generation = entries.generation.wrapping_add(1);
        }
    }

    /// Clears the cache when called: to run once a write has committed.
    pub fn clearer(&self) -> Box<dyn FnOnce() + Send>
    where
        V: Send + 'static,
    {
        let cache = Self {
            inner: self.inner.clone(),
            max: self.max,
        };
        Box::new(move || cache.clear())
    }
}

impl<V> Clone for GuessCache<V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            max: self.max,
        }
    }
}

/// Counts only: cached values may name people or cases, and nothing personal may reach
/// a log.
impl<V> std::fmt::Debug for GuessCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (entries, generation) = self
            .inner
            .lock()
            .map_or((0, 0), |e| (e.by_key.len(), e.generation));
        f.debug_struct("GuessCache")
            .field("entries", &entries)
            .field("generation", &generation)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::GuessCache;

    #[test]
    fn a_read_that_began_before_a_clearing_does_not_fill_the_cache() {
        let cache = GuessCache::new(2);
        let Err(read_at) = cache.get("case") else {
            panic!("empty cache answered");
        };
        cache.clear();
        cache.fill("case", 1, read_at);
        assert!(cache.get("case").is_err(), "a stale read was cached");
        let Err(read_at) = cache.get("case") else {
            panic!("empty cache answered");
        };
        cache.fill("case", 2, read_at);
        assert_eq!(cache.get("case"), Ok(2));
        // Full: it starts over rather than grow.
        cache.fill("b", 3, read_at);
        cache.fill("c", 4, read_at);
        assert!(cache.get("case").is_err());
        assert_eq!(cache.get("c"), Ok(4));
        cache.clearer()();
        assert!(cache.get("c").is_err());
    }
}
