//! Purposes for which personal data may be disclosed. A referral always names exactly one.

use std::fmt;

/// Why data is disclosed to a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Purpose {
    ShelterPlacement,
    MedicalCare,
    LegalAid,
    PsychosocialSupport,
    ReturnAssistance,
    Reintegration,
    FamilyTracing,
    NationalityVerification,
}

/// The purpose named is not one Corridor knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown purpose {0:?}; known purposes: {known}", known = Purpose::ALL.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", "))]
pub struct UnknownPurpose(pub String);

impl Purpose {
    pub const ALL: [Purpose; 8] = [
        Self::ShelterPlacement,
        Self::MedicalCare,
        Self::LegalAid,
        Self::PsychosocialSupport,
        Self::ReturnAssistance,
        Self::Reintegration,
        Self::FamilyTracing,
        Self::NationalityVerification,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ShelterPlacement => "shelter-placement",
            Self::MedicalCare => "medical-care",
            Self::LegalAid => "legal-aid",
            Self::PsychosocialSupport => "psychosocial-support",
            Self::ReturnAssistance => "return-assistance",
            Self::Reintegration => "reintegration",
            Self::FamilyTracing => "family-tracing",
            Self::NationalityVerification => "nationality-verification",
        }
    }

    pub fn parse(text: &str) -> Result<Self, UnknownPurpose> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == text)
            .ok_or_else(|| UnknownPurpose(text.chars().take(64).collect()))
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for p in Purpose::ALL {
            assert_eq!(Purpose::parse(p.as_str()), Ok(p));
        }
        let err = Purpose::parse("marketing").unwrap_err().to_string();
        assert!(err.contains("marketing") && err.contains("reintegration"));
    }
}
