//! Purpose profiles: for each purpose, the fields a referral must carry, the fields it may
//! carry, and the recipient roles it may go to. Everything else is refused.
//!
//! Profiles prefer the least identifying form: an age band rather than a date of birth,
//! a preferred name rather than legal names, unless the purpose needs the exact value
//! (an embassy verifying nationality needs legal names and date of birth). Return
//! assistance and nationality verification go to embassies only. The table is rendered
//! into `docs/purpose-profiles.md` by [`markdown_table`]; a test keeps the two in step.

use crate::directory::Role;
use crate::fields::Field::{self, *};
use crate::purpose::Purpose;

/// What one purpose requires and allows.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub purpose: Purpose,
    pub required: &'static [Field],
    /// Optional fields; the allowed set is `required ∪ optional`.
    pub optional: &'static [Field],
    pub recipient_roles: &'static [Role],
}

impl Profile {
    pub fn allows(&self, field: Field) -> bool {
        self.required.contains(&field) || self.optional.contains(&field)
    }
}

const PROFILES: [Profile; 8] = [
    Profile {
        purpose: Purpose::ShelterPlacement,
        required: &[AgeBand, Sex, Languages, Needs],
        optional: &[
            PreferredName,
            Dependents,
            ArrivalWindow,
            AccessibilityNeeds,
            HealthSummary,
            RiskFlags,
            CurrentCity,
            SafeContactInstructions,
            CaseworkerNote,
        ],
        recipient_roles: &[Role::Shelter, Role::Ngo],
    },
    Profile {
        purpose: Purpose::MedicalCare,
        required: &[AgeBand, Sex, HealthSummary],
        optional: &[
            PreferredName,
            Languages,
            AccessibilityNeeds,
            Needs,
            SafeContactInstructions,
            CaseworkerNote,
        ],
        recipient_roles: &[Role::Shelter, Role::Ngo],
    },
    Profile {
        purpose: Purpose::LegalAid,
        required: &[PreferredName, LegalProceedingsStatus],
        optional: &[
            LegalGivenName,
            LegalFamilyName,
            Nationality,
            Languages,
            ExploitationSector,
            ExploitationSummary,
            IdDocumentType,
            Phone,
            SafeContactInstructions,
            CaseworkerNote,
        ],
        recipient_roles: &[Role::Ngo],
    },
    Profile {
        purpose: Purpose::PsychosocialSupport,
        required: &[PreferredName, Languages],
        optional: &[
            AgeBand,
            Sex,
            Needs,
            RiskFlags,
            ExploitationSummary,
            SafeContactInstructions,
            CaseworkerNote,
        ],
        recipient_roles: &[Role::Shelter, Role::Ngo],
    },
    Profile {
        purpose: Purpose::ReturnAssistance,
        required: &[
            LegalGivenName,
            LegalFamilyName,
            DateOfBirth,
            Nationality,
            ArrivalWindow,
        ],
        optional: &[
            PlaceOfBirth,
            IdDocumentType,
            IdDocumentNumber,
            IdDocumentIssuer,
            Dependents,
            Needs,
            AccessibilityNeeds,
            Languages,
            Phone,
            SafeContactInstructions,
            RiskFlags,
        ],
        recipient_roles: &[Role::Embassy],
    },
    Profile {
        purpose: Purpose::Reintegration,
        required: &[PreferredName, AgeBand, Languages, Needs],
        optional: &[
            Sex,
            Dependents,
            ArrivalWindow,
            CurrentCity,
            AccessibilityNeeds,
            HealthSummary,
            ExploitationSector,
            RiskFlags,
            SafeContactInstructions,
            CaseworkerNote,
        ],
        recipient_roles: &[Role::Shelter, Role::Ngo],
    },
    Profile {
        purpose: Purpose::FamilyTracing,
        required: &[LegalGivenName, LegalFamilyName, Nationality, PlaceOfBirth],
        optional: &[
            PreferredName,
            AgeBand,
            DateOfBirth,
            Languages,
            SafeContactInstructions,
            CaseworkerNote,
        ],
        recipient_roles: &[Role::Ngo, Role::Government],
    },
    Profile {
        purpose: Purpose::NationalityVerification,
        required: &[LegalGivenName, LegalFamilyName, DateOfBirth, Nationality],
        optional: &[
            PlaceOfBirth,
            IdDocumentType,
            IdDocumentNumber,
            IdDocumentIssuer,
            Sex,
            Languages,
        ],
        recipient_roles: &[Role::Embassy],
    },
];

/// The profile of a purpose.
pub fn profile(purpose: Purpose) -> &'static Profile {
    // PROFILES is in Purpose::ALL order; the test below holds it there.
    let index = Purpose::ALL
        .iter()
        .position(|p| *p == purpose)
        .unwrap_or_default();
    &PROFILES[index]
}

pub fn all() -> &'static [Profile] {
    &PROFILES
}

fn list(fields: &[Field]) -> String {
    fields
        .iter()
        .map(|f| f.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The purpose table as Markdown.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| purpose | recipient roles | required fields | optional fields |\n|---|---|---|---|\n",
    );
    for p in &PROFILES {
        let roles = p
            .recipient_roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            p.purpose,
            roles,
            list(p.required),
            list(p.optional)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_profile_per_purpose_in_order() {
        for (p, purpose) in PROFILES.iter().zip(Purpose::ALL) {
            assert_eq!(p.purpose, purpose);
            assert_eq!(profile(purpose).purpose, purpose);
        }
    }

    #[test]
    fn required_and_optional_do_not_overlap_and_roles_are_set() {
        for p in &PROFILES {
            assert!(!p.recipient_roles.is_empty());
            for f in p.required {
                assert!(!p.optional.contains(f), "{} lists {f} twice", p.purpose);
            }
        }
    }

    #[test]
    fn embassy_only_purposes() {
        for purpose in [Purpose::ReturnAssistance, Purpose::NationalityVerification] {
            assert_eq!(profile(purpose).recipient_roles, &[Role::Embassy]);
        }
    }

    #[test]
    fn least_identifying_form_unless_needed() {
        // Purposes that only need an age never carry the exact date of birth.
        for purpose in [
            Purpose::ShelterPlacement,
            Purpose::MedicalCare,
            Purpose::PsychosocialSupport,
            Purpose::Reintegration,
            Purpose::LegalAid,
        ] {
            assert!(!profile(purpose).allows(Field::DateOfBirth), "{purpose}");
            assert!(
                !profile(purpose).allows(Field::IdDocumentNumber),
                "{purpose}"
            );
        }
    }

    #[test]
    fn documented_table_is_current() {
        let doc = include_str!("../../docs/purpose-profiles.md");
        assert!(
            doc.contains(&markdown_table()),
            "docs/purpose-profiles.md is out of date; paste the output of `corridor profiles --output markdown`"
        );
    }
}
