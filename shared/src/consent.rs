//! Consent: what a person agreed to disclose, to whom and for what, and the gate every
//! referral passes before it leaves a node.
//!
//! This is the walking-skeleton gate: a referral needs an unexpired, unwithdrawn consent
//! of its case that names the recipient and the purpose.

use crate::org::OrgId;
use crate::purpose::Purpose;

/// The scope of one recorded consent, as the gate needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consent {
    pub id: String,
    pub recipients: Vec<OrgId>,
    pub purposes: Vec<Purpose>,
    pub expires_at_ms: i64,
    pub withdrawn_at_ms: Option<i64>,
}

/// Why the gate refused a referral. The message is shown to the caseworker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateRefusal {
    #[error("the case has no recorded consent")]
    NoConsent,
    #[error(
        "no unexpired, unwithdrawn consent of this case names recipient {recipient} for purpose {purpose}"
    )]
    NotConsented { recipient: OrgId, purpose: Purpose },
}

/// Returns the id of the consent that allows disclosing the case to `recipient` for
/// `purpose` at time `now_ms`, or why none does.
pub fn gate<'a>(
    consents: &'a [Consent],
    recipient: &OrgId,
    purpose: Purpose,
    now_ms: i64,
) -> Result<&'a Consent, GateRefusal> {
    if consents.is_empty() {
        return Err(GateRefusal::NoConsent);
    }
    consents
        .iter()
        .find(|c| {
            c.withdrawn_at_ms.is_none()
                && c.expires_at_ms > now_ms
                && c.recipients.contains(recipient)
                && c.purposes.contains(&purpose)
        })
        .ok_or_else(|| GateRefusal::NotConsented {
            recipient: recipient.clone(),
            purpose,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn org(s: &str) -> OrgId {
        OrgId::new(s).unwrap()
    }

    fn consent() -> Consent {
        Consent {
            id: "c1".into(),
            recipients: vec![org("shelter-kh")],
            purposes: vec![Purpose::Reintegration],
            expires_at_ms: 1000,
            withdrawn_at_ms: None,
        }
    }

    #[test]
    fn matching_consent_passes() {
        let c = [consent()];
        assert_eq!(
            gate(&c, &org("shelter-kh"), Purpose::Reintegration, 999)
                .unwrap()
                .id,
            "c1"
        );
    }

    #[test]
    fn each_rule_refuses() {
        assert_eq!(
            gate(&[], &org("shelter-kh"), Purpose::Reintegration, 0),
            Err(GateRefusal::NoConsent)
        );
        let c = [consent()];
        let refused = |r: &str, p, now| gate(&c, &org(r), p, now).is_err();
        assert!(refused("other", Purpose::Reintegration, 0), "recipient");
        assert!(refused("shelter-kh", Purpose::LegalAid, 0), "purpose");
        assert!(
            refused("shelter-kh", Purpose::Reintegration, 1000),
            "expired"
        );
        let mut w = consent();
        w.withdrawn_at_ms = Some(5);
        assert!(
            gate(&[w], &org("shelter-kh"), Purpose::Reintegration, 0).is_err(),
            "withdrawn"
        );
    }

    proptest! {
        /// Whatever the consents, a pass always rests on one consent that names exactly
        /// this recipient and purpose and is live.
        #[test]
        fn pass_implies_a_live_matching_consent(
            specs in proptest::collection::vec((0usize..3, 0usize..8, 0i64..100, proptest::option::of(0i64..100)), 0..6),
            r in 0usize..3, p in 0usize..8, now in 0i64..100,
        ) {
            let orgs = [org("a"), org("b"), org("c")];
            let consents: Vec<Consent> = specs.iter().enumerate().map(|(i, (o, pu, exp, w))| Consent {
                id: i.to_string(),
                recipients: vec![orgs[*o].clone()],
                purposes: vec![Purpose::ALL[*pu]],
                expires_at_ms: *exp,
                withdrawn_at_ms: *w,
            }).collect();
            let expected = consents.iter().any(|c| c.recipients[0] == orgs[r]
                && c.purposes[0] == Purpose::ALL[p] && c.expires_at_ms > now && c.withdrawn_at_ms.is_none());
            match gate(&consents, &orgs[r], Purpose::ALL[p], now) {
                Ok(c) => {
                    prop_assert!(expected);
                    prop_assert!(c.recipients.contains(&orgs[r]) && c.purposes.contains(&Purpose::ALL[p]));
                    prop_assert!(c.expires_at_ms > now && c.withdrawn_at_ms.is_none());
                }
                Err(_) => prop_assert!(!expected),
            }
        }
    }
}
