//! The field catalogue: every piece of personal data a referral can carry, by name, with
//! its sensitivity class. A referral is a set of these fields and nothing else, so the
//! consent gate can reason about exactly what leaves a node.

use std::fmt;

/// How much harm a disclosure of the field can do; shown to caseworkers and used to order
/// the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sensitivity {
    /// Identifies the person.
    Identity,
    /// Reaches the person.
    Contact,
    /// What a service needs to plan help.
    Operational,
    /// Health, exploitation, legal and risk details: harm if disclosed.
    Sensitive,
}

impl Sensitivity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Contact => "contact",
            Self::Operational => "operational",
            Self::Sensitive => "sensitive",
        }
    }
}

macro_rules! fields {
    ($($variant:ident = $name:literal, $class:ident, $doc:literal;)*) => {
        /// A named field of personal data.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Field {
            $(#[doc = $doc] $variant,)*
        }

        impl Field {
            /// Every field, in catalogue order.
            pub const ALL: &'static [Field] = &[$(Field::$variant,)*];

            /// The field's name on the wire and in the CLI.
            pub fn as_str(self) -> &'static str {
                match self { $(Field::$variant => $name,)* }
            }

            pub fn sensitivity(self) -> Sensitivity {
                match self { $(Field::$variant => Sensitivity::$class,)* }
            }

            pub fn description(self) -> &'static str {
                match self { $(Field::$variant => $doc,)* }
            }
        }
    };
}

fields! {
    LegalGivenName = "legal_given_name", Identity, "Legal given name(s)";
    LegalFamilyName = "legal_family_name", Identity, "Legal family name";
    PreferredName = "preferred_name", Identity, "Name the person wants to be called";
    DateOfBirth = "date_of_birth", Identity, "Exact date of birth, YYYY-MM-DD";
    AgeBand = "age_band", Identity, "Age band, e.g. 25-29 (less identifying than date of birth)";
    Sex = "sex", Identity, "Sex";
    Nationality = "nationality", Identity, "Nationality, ISO 3166-1 alpha-2 (XK Kosovo, XX stateless)";
    PlaceOfBirth = "place_of_birth", Identity, "Place of birth";
    IdDocumentType = "id_document_type", Identity, "Identity document type";
    IdDocumentNumber = "id_document_number", Identity, "Identity document number";
    IdDocumentIssuer = "id_document_issuer", Identity, "Identity document issuer";
    Phone = "phone", Contact, "Phone number";
    SafeContactInstructions = "safe_contact_instructions", Contact, "How to contact the person safely";
    CurrentCity = "current_city", Contact, "Current city";
    Languages = "languages", Operational, "Languages spoken";
    Needs = "needs", Operational, "Needs for assistance";
    Dependents = "dependents", Operational, "Dependents travelling or staying with the person";
    ArrivalWindow = "arrival_window", Operational, "When the person can arrive";
    AccessibilityNeeds = "accessibility_needs", Operational, "Accessibility needs";
    HealthSummary = "health_summary", Sensitive, "Health summary";
    ExploitationSector = "exploitation_sector", Sensitive, "Sector of exploitation";
    ExploitationSummary = "exploitation_summary", Sensitive, "Summary of the exploitation";
    LegalProceedingsStatus = "legal_proceedings_status", Sensitive, "Status of legal proceedings";
    RiskFlags = "risk_flags", Sensitive, "Risk flags, e.g. threat from traffickers";
    CaseworkerNote = "caseworker_note", Sensitive, "Free-text note of the caseworker";
}

/// `YYYY-MM-DD`, a day that exists in the Gregorian calendar, from 1900 on.
fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = text.get(range)?;
        if !digits.bytes().all(|d| d.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let (Some(year), Some(month), Some(day)) = (number(0..4), number(5..7), number(8..10)) else {
        return false;
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    year >= 1900 && (1..=days).contains(&day)
}

/// `N-M` with N <= M, or `N+`: whole years, at most three digits each.
fn is_age_band(text: &str) -> bool {
    let age = |s: &str| -> Option<u32> {
        if s.is_empty() || s.len() > 3 || !s.bytes().all(|d| d.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match text.strip_suffix('+') {
        Some(from) => age(from).is_some(),
        None => text
            .split_once('-')
            .and_then(|(low, high)| Some(age(low)? <= age(high)?))
            .unwrap_or(false),
    }
}

/// A field name that is not in the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown field {0:?}; run `corridor profiles` for the catalogue")]
pub struct UnknownField(pub String);

/// Longest value of a field, in bytes.
pub const MAX_VALUE_LEN: usize = 8192;

/// Why a field's value is refused. Names the field, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldValueError {
    #[error("field {0} is empty")]
    Empty(Field),
    #[error("field {0} is longer than {MAX_VALUE_LEN} bytes")]
    TooLong(Field),
    /// Control characters (escape sequences, carriage returns, NUL, ...) would let a
    /// sender rewrite what the recipient's screen shows around the value.
    #[error("field {0} contains a control character (only line breaks and tabs are allowed)")]
    ControlCharacter(Field),
    /// A field with a format of its own that the value does not have.
    #[error("field {0} must be {1}")]
    Format(Field, &'static str),
}

const NATIONALITY_FORMAT: &str =
    "an ISO 3166-1 alpha-2 code in capitals, such as KH (XX if stateless)";

impl Field {
    /// The rule every value a node's own users enter meets, at `now_ms`: [`Self::check_value`],
    /// and a nationality must be a code ISO has assigned (or XK, or XX if stateless).
    pub fn check_entered_value(self, value: &str, now_ms: i64) -> Result<(), FieldValueError> {
        self.check_value(value, now_ms)?;
        if self == Self::Nationality && value != "XX" && !crate::country::is_country_code(value) {
            return Err(FieldValueError::Format(self, NATIONALITY_FORMAT));
        }
        Ok(())
    }

    /// The rule every value of a referral meets, checked by the sender before it seals
    /// and by the recipient before it stores, at `now_ms`: a date of birth may not lie
    /// in the future (a day's grace, for time zones ahead of UTC). A nationality is
    /// checked for its form only: a peer on an older version checked no more, and what
    /// it sent must not be refused for good.
    pub fn check_value(self, value: &str, now_ms: i64) -> Result<(), FieldValueError> {
        if value.is_empty() {
            return Err(FieldValueError::Empty(self));
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(FieldValueError::TooLong(self));
        }
        if value
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(FieldValueError::ControlCharacter(self));
        }
        let format = match self {
            // "XX" for a stateless person: ISO leaves it to users, and many a trafficked
            // person has no nationality a state recognises.
            Self::Nationality => {
                (!crate::country::has_country_code_form(value)).then_some(NATIONALITY_FORMAT)
            }
            Self::DateOfBirth if !is_date(value) => Some(
                "a date as YYYY-MM-DD from 1900 on (give age_band when the exact date is not known)",
            ),
            // Dates of one form compare as text.
            Self::DateOfBirth => (value
                > crate::utc::date(now_ms.saturating_add(86_400_000)).as_str())
            .then_some("a date that is not in the future"),
            Self::AgeBand => (!is_age_band(value)).then_some("an age band such as 25-29 or 60+"),
            _ => None,
        };
        match format {
            Some(expected) => Err(FieldValueError::Format(self, expected)),
            None => Ok(()),
        }
    }

    pub fn parse(name: &str) -> Result<Self, UnknownField> {
        Self::ALL
            .iter()
            .copied()
            .find(|f| f.as_str() == name)
            .ok_or_else(|| UnknownField(name.chars().take(64).collect()))
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut names: Vec<_> = Field::ALL.iter().map(|f| f.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Field::ALL.len());
        for f in Field::ALL {
            assert_eq!(Field::parse(f.as_str()), Ok(*f));
        }
        assert!(Field::parse("shoe_size").is_err());
    }

    #[test]
    fn values_are_bounded_and_free_of_control_characters() {
        let f = Field::CaseworkerNote;
        for fine in ["Srey Mom", "ស្រី", "line one\nline two\tand a tab", "🙂"] {
            assert_eq!(f.check_value(fine, NOW), Ok(()), "{fine:?}");
        }
        assert_eq!(f.check_value("", NOW), Err(FieldValueError::Empty(f)));
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        assert_eq!(f.check_value(&long, NOW), Err(FieldValueError::TooLong(f)));
        assert_eq!(f.check_value(&long[1..], NOW), Ok(()));
        for bad in [
            "Srey\u{1b}[31mRED",
            "a\rb",
            "nul\0",
            "del\u{7f}",
            "c1\u{9b}31m",
        ] {
            assert_eq!(
                f.check_value(bad, NOW),
                Err(FieldValueError::ControlCharacter(f)),
                "{bad:?}"
            );
        }
    }

    /// 2026-11-30 12:00:00 UTC.
    const NOW: i64 = 1_796_040_000_000;

    #[test]
    fn fields_with_a_format_of_their_own_are_checked() {
        let cases: [(Field, &[&str], &[&str]); 3] = [
            (
                Field::Nationality,
                &["KH", "MM", "XX"],
                &["Cambodia", "kh", "KHM"],
            ),
            (
                Field::DateOfBirth,
                &["1999-01-31", "2000-02-29", "1990-12-01"],
                &[
                    "not a date",
                    "1999-02-29",
                    "1999-13-01",
                    "1999-1-1",
                    "31/01/1999",
                    "+999-01-01",
                ],
            ),
            (
                Field::AgeBand,
                &["25-29", "0-4", "60+", "18-18"],
                &["banana", "29-25", "25-", "-29", "25 - 29", "+"],
            ),
        ];
        for (field, good, bad) in cases {
            for value in good {
                assert_eq!(field.check_value(value, NOW), Ok(()), "{field} {value:?}");
            }
            for value in bad {
                assert!(
                    matches!(field.check_value(value, NOW), Err(FieldValueError::Format(f, _)) if f == field),
                    "{field} {value:?}"
                );
            }
        }
        assert_eq!(Field::PreferredName.check_value("banana", NOW), Ok(()));
        // A nationality a user enters must be one ISO assigned; one from a peer, of its form.
        for (value, entered) in [
            ("KH", true),
            ("XK", true),
            ("XX", true),
            ("QQ", false),
            ("CB", false),
        ] {
            assert_eq!(
                Field::Nationality.check_entered_value(value, NOW).is_ok(),
                entered,
                "{value}"
            );
            assert_eq!(
                Field::Nationality.check_value(value, NOW),
                Ok(()),
                "{value}"
            );
        }
        // A date of birth in the future is refused; today, and tomorrow in UTC (today
        // east of it), are not.
        let dob = |value| Field::DateOfBirth.check_value(value, NOW);
        assert_eq!(dob("2026-11-30"), Ok(()));
        assert_eq!(dob("2026-12-01"), Ok(()));
        assert_eq!(
            dob("2026-12-02"),
            Err(FieldValueError::Format(
                Field::DateOfBirth,
                "a date that is not in the future"
            ))
        );
        assert!(dob("2090-02-01").is_err());
        // Before 1900 is a typo, and the refusal says where dates start.
        let refused = dob("1899-12-31").expect_err("before 1900");
        assert!(refused.to_string().contains("from 1900 on"), "{refused}");
        assert_eq!(dob("1900-01-01"), Ok(()));
    }

    #[test]
    fn caseworker_note_is_sensitive() {
        assert_eq!(Field::CaseworkerNote.sensitivity(), Sensitivity::Sensitive);
        assert_eq!(Field::AgeBand.sensitivity(), Sensitivity::Identity);
    }
}
