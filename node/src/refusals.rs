//! How many refused envelopes a member may cost this node. Every refusal is examined,
//! answered and recorded in the audit log for good, so a member sending envelopes that
//! fail (by fault or on purpose) would otherwise grow the log, and this node's disk,
//! without bound. Each member has a budget of refusals that refills at a steady rate;
//! while it is spent, that member's envelopes are turned away unexamined and unrecorded
//! (`RESOURCE_EXHAUSTED`, which senders take as "try again later"). Accepted envelopes and
//! answered replays cost nothing, so an honest member never meets the bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use corridor::OrgId;

/// Each member's refusal budget.
pub struct RefusalBudgets {
    burst: f64,
    per_second: f64,
    members: Mutex<HashMap<OrgId, Budget>>,
}

struct Budget {
    /// Refusals left; below zero when refusals examined at once overshot it.
    left: f64,
    at: Instant,
    /// Envelopes turned away since the budget was last spent, for the log.
    turned_away: u64,
    /// When turning this member away was last logged.
    logged_at: Option<Instant>,
}

/// A member's envelope turned away: its budget refills in `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    pub wait: Duration,
    /// Whether this is due to be logged (at most once a minute per member), and how many
    /// were turned away since it last was.
    pub log: Option<u64>,
}

const LOG_EVERY: Duration = Duration::from_secs(60);

impl RefusalBudgets {
    /// Budgets of `burst` refusals, refilling by `per_minute`.
    pub fn new(burst: u32, per_minute: u32) -> Self {
        Self {
            burst: f64::from(burst),
            per_second: f64::from(per_minute) / 60.0,
            members: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, budget: &mut Budget, now: Instant) {
        let elapsed = now.saturating_duration_since(budget.at).as_secs_f64();
        budget.left = (budget.left + elapsed * self.per_second).min(self.burst);
        budget.at = now;
    }

    /// Whether an envelope of `member` may be examined now.
    pub fn admit(&self, member: &OrgId, now: Instant) -> Result<(), Spent> {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let Some(budget) = members.get_mut(member) else {
            return Ok(());
        };
        self.refill(budget, now);
        if budget.left >= 1.0 {
            return Ok(());
        }
        budget.turned_away += 1;
        let wait = Duration::from_secs_f64(((1.0 - budget.left) / self.per_second).max(0.0));
        let due = budget
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
        let log = due.then(|| {
            budget.logged_at = Some(now);
            std::mem::take(&mut budget.turned_away)
        });
        Err(Spent { wait, log })
    }

    /// Charges one refusal to `member`.
    pub fn charge(&self, member: &OrgId, now: Instant) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let budget = members.entry(member.clone()).or_insert(Budget {
            left: self.burst,
            at: now,
            turned_away: 0,
            logged_at: None,
        });
        self.refill(budget, now);
        budget.left -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_budget_turns_a_member_away_until_it_refills() {
        let budgets = RefusalBudgets::new(3, 60);
        let (a, b) = (OrgId::new("a").unwrap(), OrgId::new("b").unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(budgets.admit(&a, t0), Ok(()));
            budgets.charge(&a, t0);
        }
        let spent = budgets.admit(&a, t0).unwrap_err();
        assert_eq!(spent.wait, Duration::from_secs(1));
        assert_eq!(spent.log, Some(1), "the first turned away is logged");
        assert_eq!(budgets.admit(&a, t0).unwrap_err().log, None);
        // Another member's budget is its own.
        assert_eq!(budgets.admit(&b, t0), Ok(()));
        // One refusal a second comes back, up to the burst.
        assert_eq!(budgets.admit(&a, t0 + Duration::from_secs(1)), Ok(()));
        budgets.charge(&a, t0 + Duration::from_secs(1));
        assert!(budgets.admit(&a, t0 + Duration::from_secs(1)).is_err());
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(budgets.admit(&a, later), Ok(()));
            budgets.charge(&a, later);
        }
        let spent = budgets.admit(&a, later).unwrap_err();
        assert_eq!(
            spent.log,
            Some(3),
            "turned away since the last log line, the one now included"
        );
    }

    #[test]
    fn refusals_examined_at_once_overshoot_and_wait_longer() {
        let budgets = RefusalBudgets::new(2, 60);
        let a = OrgId::new("a").unwrap();
        let t0 = Instant::now();
        for _ in 0..4 {
            budgets.charge(&a, t0);
        }
        assert_eq!(
            budgets.admit(&a, t0).unwrap_err().wait,
            Duration::from_secs(3)
        );
        assert!(budgets.admit(&a, t0 + Duration::from_secs(2)).is_err());
        assert_eq!(budgets.admit(&a, t0 + Duration::from_secs(3)), Ok(()));
    }
}
