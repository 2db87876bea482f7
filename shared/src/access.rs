//! Local access: the roles a node's own users hold and what each role may do on the
//! node's local API.
//!
//! A token is issued for a local user, and a user holds exactly one [`LocalRole`] for as
//! long as it exists. Each local request needs one [`LocalAction`]; [`LocalRole::may`] is
//! the one table that decides. The roles follow who uses a node: caseworkers (and the
//! embassy staff who work cases) handle personal data; an auditor reads the audit log,
//! which holds none, and nothing else; an administrator runs the node and may do both.
//! Members of the federation reach the audit log over mutual TLS instead, by their roles
//! in the directory ([`crate::Role`]): that is not decided here.

use std::fmt;
use std::str::FromStr;

/// The role of a local user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalRole {
    /// Runs the node: everything a caseworker and an auditor may do.
    Admin,
    /// Works cases: records cases and consents, sends referrals, reads received ones.
    Caseworker,
    /// Reads the node's audit log (checkpoints, entries, proofs) and nothing else.
    Auditor,
}

/// What a local request does, as far as access is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalAction {
    /// Anything that records or reads cases, consents and referrals: personal data, or
    /// the references and states that follow one person's case.
    CaseWork,
    /// Reading the audit log: checkpoints, entries and proofs.
    ReadAuditLog,
    /// Counts of the outbox by state: how the node is doing, nothing of any case.
    ViewOutboxStats,
}

impl LocalRole {
    pub const ALL: [LocalRole; 3] = [Self::Admin, Self::Caseworker, Self::Auditor];

    /// The role's name as stored and as typed on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Caseworker => "caseworker",
            Self::Auditor => "auditor",
        }
    }

    /// Whether a user of this role may do `action`.
    pub fn may(self, action: LocalAction) -> bool {
        match (self, action) {
            (Self::Admin, _) => true,
            (Self::Caseworker, LocalAction::CaseWork | LocalAction::ViewOutboxStats) => true,
            (Self::Caseworker, LocalAction::ReadAuditLog) => false,
            (Self::Auditor, LocalAction::ReadAuditLog) => true,
            (Self::Auditor, LocalAction::CaseWork | LocalAction::ViewOutboxStats) => false,
        }
    }
}

impl LocalAction {
    /// What the action covers, for a refusal's message.
    pub fn describe(self) -> &'static str {
        match self {
            Self::CaseWork => "working with cases, consents and referrals",
            Self::ReadAuditLog => "reading the audit log",
            Self::ViewOutboxStats => "reading the outbox's counts",
        }
    }

    /// The roles that may do the action, in the order of [`LocalRole::ALL`].
    pub fn roles(self) -> Vec<LocalRole> {
        LocalRole::ALL
            .into_iter()
            .filter(|role| role.may(self))
            .collect()
    }

    /// Why a user of `role` may not do this action: the sentence a refused request gets.
    pub fn refusal(self, role: LocalRole) -> String {
        let roles: Vec<&str> = self.roles().into_iter().map(LocalRole::as_str).collect();
        format!(
            "{} needs a token of a local user with the role {}; this token's user has the role {}",
            self.describe(),
            roles.join(" or "),
            role
        )
    }
}

impl fmt::Display for LocalRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name this crate does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown local role {0:?}: expected admin, caseworker or auditor")]
pub struct UnknownLocalRole(pub String);

impl FromStr for LocalRole {
    type Err = UnknownLocalRole;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|role| role.as_str() == name)
            .ok_or_else(|| UnknownLocalRole(name.chars().take(32).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIONS: [LocalAction; 3] = [
        LocalAction::CaseWork,
        LocalAction::ReadAuditLog,
        LocalAction::ViewOutboxStats,
    ];

    #[test]
    fn each_role_may_do_exactly_its_actions() {
        let allowed = |role: LocalRole| -> Vec<LocalAction> {
            ACTIONS.into_iter().filter(|a| role.may(*a)).collect()
        };
        assert_eq!(allowed(LocalRole::Admin), ACTIONS.to_vec());
        assert_eq!(
            allowed(LocalRole::Caseworker),
            [LocalAction::CaseWork, LocalAction::ViewOutboxStats]
        );
        assert_eq!(allowed(LocalRole::Auditor), [LocalAction::ReadAuditLog]);
    }

    #[test]
    fn an_auditor_never_reaches_personal_data_and_a_caseworker_never_the_log() {
        assert!(!LocalRole::Auditor.may(LocalAction::CaseWork));
        assert!(!LocalRole::Caseworker.may(LocalAction::ReadAuditLog));
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for role in LocalRole::ALL {
            assert_eq!(role.as_str().parse::<LocalRole>(), Ok(role));
        }
        for bad in ["", "Admin", "officer", "admin ", "root"] {
            assert!(bad.parse::<LocalRole>().is_err(), "{bad:?}");
        }
        let long = "x".repeat(1000);
        let err = long.parse::<LocalRole>().unwrap_err();
        assert!(
            err.to_string().len() < 120,
            "the error quotes at most 32 characters"
        );
    }

    #[test]
    fn a_refusal_names_the_action_the_roles_that_may_and_the_callers() {
        assert_eq!(
            LocalAction::CaseWork.refusal(LocalRole::Auditor),
            "working with cases, consents and referrals needs a token of a local user with \
             the role admin or caseworker; this token's user has the role auditor"
        );
        assert_eq!(
            LocalAction::ReadAuditLog.refusal(LocalRole::Caseworker),
            "reading the audit log needs a token of a local user with the role admin or \
             auditor; this token's user has the role caseworker"
        );
    }
}
