//! Consent: what a person agreed to disclose, to whom, for what and until when — and the
//! gate every referral passes on the sending node *and again* on the receiving node.
//!
//! A referral passes only if every field in it is consented and allowed by the purpose,
//! every field the purpose requires is present, the recipient is in scope (named, or by
//! role and country) and its role may receive that purpose, no restriction forbids it,
//! and the consent is neither expired nor withdrawn. Two rules always hold: a state
//! authority (embassy, government) is in scope only if the consent names it; a consent
//! can be narrowed but never widened (widening is a new consent).

use std::collections::BTreeSet;
use std::fmt;

use crate::canonical::{Canonical, label};
use crate::country::has_country_code_form;
use crate::directory::{Member, Role};
use crate::fields::Field;
use crate::org::OrgId;
use crate::profile::profile;
use crate::purpose::Purpose;
use crate::sign::{SigningKey, VerifyingKey};

/// Recipients by role and country: `role` None means any role.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleInCountry {
    pub role: Option<Role>,
    /// ISO 3166-1 alpha-2.
    pub country: String,
}

impl fmt::Display for RoleInCountry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Some(role) => write!(f, "{}@{}", role.as_str(), self.country),
            None => write!(f, "*@{}", self.country),
        }
    }
}

impl std::str::FromStr for RoleInCountry {
    type Err = String;
    /// `role@CC` or `*@CC`, e.g. `shelter@KH`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (role, country) = text
            .split_once('@')
            .ok_or_else(|| format!("recipient role {text:?} must be written role@CC or *@CC"))?;
        let role = match role {
            "*" => None,
            r => Some(Role::parse(r).ok_or_else(|| format!("unknown role {r:?}"))?),
        };
        // The form only: stored consents recorded before codes were checked against
        // ISO's list must still be read. New records check the list too.
        if !has_country_code_form(country) {
            return Err(format!(
                "{country:?} is not an ISO 3166-1 alpha-2 country code"
            ));
        }
        Ok(Self {
            role,
            country: country.to_owned(),
        })
    }
}

/// Whether `text` has the form of a consent id: `consent-` and 32 lowercase hex digits.
/// Consent ids travel to recipients and into audit entries, so nothing else is accepted
/// from a peer where one belongs.
pub fn is_consent_id(text: &str) -> bool {
    text.strip_prefix("consent-")
        .is_some_and(|hex| crate::is_lower_hex(hex, 32))
}

/// Longest a consent may run from when it is recorded: ten years. A later expiry is a
/// typo or a unit mistake rather than what a person agreed to.
pub const MAX_CONSENT_LIFETIME_MS: i64 = 10 * 366 * 24 * 3600 * 1000;

/// What a consent's expiry is kept to: a whole UTC day.
pub const EXPIRY_UNIT_MS: i64 = 24 * 3600 * 1000;

/// `expires_at_ms` as a consent records it: the start of its UTC day. Every recipient of a
/// referral under a consent learns its expiry from the consent receipt; to the
/// millisecond, it would be a value unique to this person's consent, by which recipients
/// could match the records their pairwise references keep apart. To the day, it is shared
/// by every consent recorded that day for as long. Rounding down only shortens what the
/// person agreed to.
pub fn recorded_expiry(expires_at_ms: i64) -> i64 {
    // Saturating: a caller's value within a day of the smallest is refused as past anyway.
    expires_at_ms.saturating_sub(expires_at_ms.rem_euclid(EXPIRY_UNIT_MS))
}

/// Restrictions the person asked for, on top of the scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restrictions {
    /// Never to organisations in these countries (ISO 3166-1 alpha-2).
    pub excluded_countries: BTreeSet<String>,
    /// No contact with family: refuses family tracing.
    pub no_family_contact: bool,
}

/// The terms of a consent that bind a recipient beside the data it holds: the person's
/// restrictions and when the consent ends. A recipient learns them from each referral's
/// consent receipt, and again from every narrowing, which restates them as they stand
/// after it: a restriction the person adds later reaches every organisation that holds
/// data under the consent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsentTerms {
    pub restrictions: Restrictions,
    pub expires_at_ms: i64,
}

/// Why terms a peer stated are not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsentTermsError {
    #[error("consent terms exclude a country that is not an ISO 3166-1 alpha-2 code")]
    MalformedCountry,
    #[error("consent terms exclude more than {MAX_EXCLUDED_COUNTRIES} countries")]
    TooManyCountries,
    #[error("consent terms name no expiry")]
    NoExpiry,
}

/// Excluded countries a statement of terms may name: every code of the form.
pub const MAX_EXCLUDED_COUNTRIES: usize = 26 * 26;

impl ConsentTerms {
    pub fn of(scope: &ConsentScope) -> Self {
        Self {
            restrictions: scope.restrictions.clone(),
            expires_at_ms: scope.expires_at_ms,
        }
    }

    /// Checks the form of terms a peer stated (they go into this node's records and are
    /// shown to its users). The form only: codes from before ISO's list was checked
    /// still bind.
    pub fn check_form(&self) -> Result<(), ConsentTermsError> {
        let countries = &self.restrictions.excluded_countries;
        if countries.len() > MAX_EXCLUDED_COUNTRIES {
            return Err(ConsentTermsError::TooManyCountries);
        }
        if !countries.iter().all(|c| has_country_code_form(c)) {
            return Err(ConsentTermsError::MalformedCountry);
        }
        if self.expires_at_ms <= 0 {
            return Err(ConsentTermsError::NoExpiry);
        }
        Ok(())
    }

    /// Appends the terms to a canonical encoding: excluded countries (sorted), no family
    /// contact, expiry. Consent receipts and narrowing receipts sign them this way.
    pub fn encode(&self, out: Canonical) -> Canonical {
        encode_terms(out, &self.restrictions, self.expires_at_ms)
    }

    /// The terms as a recipient confirms them in its answer to the narrowing that stated
    /// them: HMAC-SHA256, keyed with what that narrowing gave it
    /// ([`crate::PairwiseKey::terms_key`]), of their canonical encoding. Keyed, so that the
    /// few guessable values of a consent's terms cannot be recovered from the answer.
    pub fn confirmation_digest(&self, key: &[u8; 32]) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let terms = self
            .encode(Canonical::new(label::TERMS_CONFIRMATION))
            .finish();
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ring::hmac::sign(&key, &terms).as_ref());
        digest
    }

    /// How a recipient's confirmation (`confirmed`, keyed with `key`) stands against
    /// these terms, the consent's now. A narrowing states the terms as they stand when it
    /// is made and a consent's terms only ever tighten, so a confirmation of other terms
    /// is one of earlier terms.
    pub fn confirmation(&self, key: &[u8; 32], confirmed: Option<&[u8; 32]>) -> TermsConfirmation {
        match confirmed {
            None => TermsConfirmation::Unconfirmed,
            Some(digest) if *digest == self.confirmation_digest(key) => {
                TermsConfirmation::AsTheyStand
            }
            Some(_) => TermsConfirmation::Earlier,
        }
    }

    /// The terms that bind a recipient holding both statements. A consent is only ever
    /// narrowed, so every restriction either names holds, and the earlier expiry: the
    /// order in which statements arrive does not matter, and one delayed behind a later
    /// one cannot loosen what binds.
    pub fn and(&self, other: &Self) -> Self {
        Self {
            restrictions: Restrictions {
                excluded_countries: self
                    .restrictions
                    .excluded_countries
                    .union(&other.restrictions.excluded_countries)
                    .cloned()
                    .collect(),
                no_family_contact: self.restrictions.no_family_contact
                    || other.restrictions.no_family_contact,
            },
            expires_at_ms: self.expires_at_ms.min(other.expires_at_ms),
        }
    }
}

fn encode_terms(out: Canonical, restrictions: &Restrictions, expires_at_ms: i64) -> Canonical {
    let countries: Vec<&String> = restrictions.excluded_countries.iter().collect();
    out.strs(&countries)
        .u64(u64::from(restrictions.no_family_contact))
        .i64(expires_at_ms)
}

/// Whether a recipient confirmed that it applies a consent's terms as they now stand.
/// Ordered from the weakest, so that of several answers (one per consent id a recipient
/// knows the consent by) the least stands for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TermsConfirmation {
    /// It confirmed none: it, or the request it answered, predates confirmations.
    Unconfirmed,
    /// It confirmed earlier terms: a later change has yet to reach it.
    Earlier,
    /// It confirmed the consent's terms as they now stand.
    AsTheyStand,
}

impl TermsConfirmation {
    /// The fixed name the local API gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AsTheyStand => "as-they-stand",
            Self::Earlier => "earlier",
            Self::Unconfirmed => "unconfirmed",
        }
    }
}

/// What a consent covers. This is what the gate reads and what narrowing compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentScope {
    pub id: String,
    pub purposes: BTreeSet<Purpose>,
    /// Recipients named by org id.
    pub recipient_orgs: BTreeSet<OrgId>,
    /// Recipients by role and country.
    pub recipient_roles: BTreeSet<RoleInCountry>,
    pub fields: BTreeSet<Field>,
    pub restrictions: Restrictions,
    pub expires_at_ms: i64,
    pub withdrawn_at_ms: Option<i64>,
}

/// One reason the gate refuses. A refusal lists every reason that applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Withdrawn,
    Expired,
    PurposeNotConsented(Purpose),
    RecipientNotInScope(OrgId),
    StateAuthorityNotNamed(OrgId),
    RoleCannotReceivePurpose { recipient: OrgId, purpose: Purpose },
    CountryExcluded { recipient: OrgId, country: String },
    FamilyContactForbidden,
    FieldNotConsented(Field),
    FieldNotAllowedForPurpose { field: Field, purpose: Purpose },
    RequiredFieldMissing { field: Field, purpose: Purpose },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Withdrawn => write!(f, "the consent was withdrawn"),
            Self::Expired => write!(f, "the consent has expired"),
            Self::PurposeNotConsented(p) => write!(f, "purpose {p} is not consented"),
            Self::RecipientNotInScope(o) => {
                write!(f, "recipient {o} is not in the consent's scope")
            }
            Self::StateAuthorityNotNamed(o) => write!(
                f,
                "recipient {o} is a state authority and the consent does not name it"
            ),
            Self::RoleCannotReceivePurpose { recipient, purpose } => write!(
                f,
                "recipient {recipient} does not have a role that may receive {purpose}"
            ),
            Self::CountryExcluded { recipient, country } => write!(
                f,
                "recipient {recipient} is in or acts for {country}, a country the consent excludes"
            ),
            Self::FamilyContactForbidden => {
                write!(
                    f,
                    "the consent forbids contact with family (family tracing)"
                )
            }
            Self::FieldNotConsented(field) => write!(f, "field {field} is not consented"),
            Self::FieldNotAllowedForPurpose { field, purpose } => {
                write!(f, "field {field} is not allowed for {purpose}")
            }
            Self::RequiredFieldMissing { field, purpose } => {
                write!(f, "field {field} is required for {purpose} but missing")
            }
        }
    }
}

/// The gate's refusal: which consent, and every reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRefusal {
    pub consent_id: Option<String>,
    pub reasons: Vec<Reason>,
}

impl fmt::Display for GateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.consent_id {
            None => write!(f, "the case has no recorded consent"),
            Some(id) => {
                write!(f, "under consent {id}: ")?;
                let reasons: Vec<String> = self.reasons.iter().map(Reason::to_string).collect();
                write!(f, "{}", reasons.join("; "))
            }
        }
    }
}

impl std::error::Error for GateRefusal {}

impl Reason {
    /// The rule broken, by name alone: what a log may say. The reason itself may name a
    /// country the person will not be sent to or that she forbade family contact, which
    /// says something of her (the recipient seals a consent's restrictions at rest); so
    /// would a name of its own for each restriction, so they share one.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Withdrawn => "withdrawn",
            Self::Expired => "expired",
            Self::PurposeNotConsented(_) => "purpose-not-consented",
            Self::RecipientNotInScope(_) => "recipient-not-in-scope",
            Self::StateAuthorityNotNamed(_) => "state-authority-not-named",
            Self::RoleCannotReceivePurpose { .. } => "role-cannot-receive-purpose",
            Self::CountryExcluded { .. } | Self::FamilyContactForbidden => "restricted",
            Self::FieldNotConsented(_) => "field-not-consented",
            Self::FieldNotAllowedForPurpose { .. } => "field-not-allowed-for-purpose",
            Self::RequiredFieldMissing { .. } => "required-field-missing",
        }
    }
}

impl GateRefusal {
    /// The rules broken, by name, each once, comma-separated (`no-consent` for a case
    /// without one):
    /// for logs, which must not carry what the reasons say of the person.
    pub fn rules(&self) -> String {
        if self.consent_id.is_none() {
            return "no-consent".into();
        }
        let mut rules: Vec<&str> = self.reasons.iter().map(Reason::rule).collect();
        rules.sort_unstable();
        rules.dedup();
        rules.join(",")
    }
}

fn is_state_authority(member: &Member) -> bool {
    member.roles.iter().any(|r| r.is_state_authority())
}

/// The gate: may `fields` of a case go to `recipient` for `purpose` under `consent` at
/// `now_ms`? On refusal, every applicable reason is listed.
pub fn gate(
    consent: &ConsentScope,
    recipient: &Member,
    purpose: Purpose,
    fields: &BTreeSet<Field>,
    now_ms: i64,
) -> Result<(), GateRefusal> {
    let mut reasons = Vec::new();
    if consent.withdrawn_at_ms.is_some() {
        reasons.push(Reason::Withdrawn);
    }
    if consent.expires_at_ms <= now_ms {
        reasons.push(Reason::Expired);
    }
    if !consent.purposes.contains(&purpose) {
        reasons.push(Reason::PurposeNotConsented(purpose));
    }
    reasons.extend(consent.recipient_not_in_scope(recipient));
    let profile = profile(purpose);
    if !ConsentScope::role_may_receive(recipient, purpose) {
        reasons.push(Reason::RoleCannotReceivePurpose {
            recipient: recipient.id.clone(),
            purpose,
        });
    }
    reasons.extend(consent.recipient_excluded(recipient));
    if consent.restrictions.no_family_contact && purpose == Purpose::FamilyTracing {
        reasons.push(Reason::FamilyContactForbidden);
    }
    for field in fields {
        if !consent.fields.contains(field) {
            reasons.push(Reason::FieldNotConsented(*field));
        }
        if !profile.allows(*field) {
            reasons.push(Reason::FieldNotAllowedForPurpose {
                field: *field,
                purpose,
            });
        }
    }
    for field in profile.required {
        if !fields.contains(field) {
            reasons.push(Reason::RequiredFieldMissing {
                field: *field,
                purpose,
            });
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(GateRefusal {
            consent_id: Some(consent.id.clone()),
            reasons,
        })
    }
}

/// Gates a referral against every consent of its case: passes with the first consent
/// (newest first) that allows it; otherwise refuses with the reasons of the newest
/// consent that is neither withdrawn nor expired (or of the newest at all).
pub fn gate_case<'a>(
    consents_newest_first: &'a [ConsentScope],
    recipient: &Member,
    purpose: Purpose,
    fields: &BTreeSet<Field>,
    now_ms: i64,
) -> Result<&'a ConsentScope, GateRefusal> {
    let mut first_refusal: Option<GateRefusal> = None;
    let mut live_refusal: Option<GateRefusal> = None;
    for consent in consents_newest_first {
        match gate(consent, recipient, purpose, fields, now_ms) {
            Ok(()) => return Ok(consent),
            Err(refusal) => {
                let live = !refusal
                    .reasons
                    .iter()
                    .any(|r| matches!(r, Reason::Withdrawn | Reason::Expired));
                if live && live_refusal.is_none() {
                    live_refusal = Some(refusal.clone());
                }
                first_refusal.get_or_insert(refusal);
            }
        }
    }
    Err(live_refusal.or(first_refusal).unwrap_or(GateRefusal {
        consent_id: None,
        reasons: Vec::new(),
    }))
}

/// Why a scope is not a narrowing of a consent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarrowingError {
    /// It would widen the consent instead: what it adds or lifts.
    #[error("narrowing may not widen the consent: {0}; record a new consent instead")]
    Widens(String),
    /// It takes nothing away. Refused rather than recorded: a narrowing ends the
    /// referrals still queued under the consent, and a caller who meant to remove
    /// something (a misspelt field, say) must not be told it was.
    #[error(
        "the narrowing changes nothing: it removes no purpose, recipient or field the consent has, adds no restriction and does not bring the expiry forward"
    )]
    ChangesNothing,
}

/// A country code a consent newly names that ISO has not assigned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnassignedCountry {
    #[error("excluded country {0:?} is not an ISO 3166-1 alpha-2 code")]
    Excluded(String),
    #[error("recipient role \"{0}\": {country} is not an ISO 3166-1 alpha-2 country code", country = .0.country)]
    Role(RoleInCountry),
}

/// A recipient a consent names that could receive nothing under it: a mistake in the
/// record rather than what the person agreed to, so a consent naming one is not
/// recorded. (A narrowing may leave such recipients: taking away what they could
/// receive is what it is for.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnusableRecipient {
    #[error(
        "recipient {0} could receive nothing under this consent: it is in or acts for an excluded country, or its roles may receive none of its purposes (family tracing counts for none under no-family-contact)"
    )]
    Org(OrgId),
    #[error("recipients {0} could receive nothing under this consent: it excludes {country}", country = .0.country)]
    CountryExcluded(RoleInCountry),
    #[error(
        "recipients {0} could receive nothing under this consent: embassies and governments receive only where a consent names them"
    )]
    StateAuthorityByRole(RoleInCountry),
    #[error(
        "recipients {0} could receive nothing under this consent: only embassies or governments may receive its purposes (family tracing counts for none under no-family-contact), and those only where it names them"
    )]
    NoPurposeByRole(RoleInCountry),
    #[error(
        "recipient {0} is the organisation recording the consent: a case is not referred to itself"
    )]
    Recorder(OrgId),
}

/// A purpose a consent names for which no referral could ever be sent: it lacks a field
/// the purpose requires. Like an unusable recipient, a mistake in the record, so a consent
/// naming one is not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "purpose {purpose} requires {missing}, which this consent does not list: add them to its fields, or leave the purpose out"
)]
pub struct UnusablePurpose {
    pub purpose: Purpose,
    /// The required fields it lacks, comma-separated.
    pub missing: String,
}

impl ConsentScope {
    /// Why `recipient` is not among the recipients this consent names, if it is not:
    /// by org, or by role and country; a state authority only by org.
    fn recipient_not_in_scope(&self, recipient: &Member) -> Option<Reason> {
        let named = self.recipient_orgs.contains(&recipient.id);
        let by_role = self.recipient_roles.iter().any(|rc| {
            rc.country == recipient.country && rc.role.is_none_or(|role| recipient.has_role(role))
        });
        if is_state_authority(recipient) {
            (!named).then(|| Reason::StateAuthorityNotNamed(recipient.id.clone()))
        } else {
            (!named && !by_role).then(|| Reason::RecipientNotInScope(recipient.id.clone()))
        }
    }

    /// The excluded countries `recipient` is in or acts for. Excluding a country
    /// excludes organisations there and the authorities acting for it wherever they sit
    /// ("never to the authorities of the origin country").
    fn recipient_excluded(&self, recipient: &Member) -> Vec<Reason> {
        [Some(&recipient.country), recipient.represents.as_ref()]
            .into_iter()
            .flatten()
            .filter(|country| self.restrictions.excluded_countries.contains(*country))
            .map(|country| Reason::CountryExcluded {
                recipient: recipient.id.clone(),
                country: country.clone(),
            })
            .collect()
    }

    /// Whether the purpose's profile lets `recipient`'s roles receive it.
    fn role_may_receive(recipient: &Member, purpose: Purpose) -> bool {
        profile(purpose)
            .recipient_roles
            .iter()
            .any(|r| recipient.has_role(*r))
    }

    /// Whether this consent lets `recipient` receive anything at all for `purpose`: the
    /// gate's rules but those on fields, expiry and withdrawal.
    pub fn admits_for(&self, recipient: &Member, purpose: Purpose) -> bool {
        self.purposes.contains(&purpose)
            && Self::role_may_receive(recipient, purpose)
            && !(self.restrictions.no_family_contact && purpose == Purpose::FamilyTracing)
            && self.recipient_not_in_scope(recipient).is_none()
            && self.recipient_excluded(recipient).is_empty()
    }

    /// Whether this consent lets `recipient` receive anything at all: it names it,
    /// excludes none of its countries, and has a purpose its roles may receive that no
    /// restriction forbids.
    pub fn admits_recipient(&self, recipient: &Member) -> bool {
        self.purposes.iter().any(|p| self.admits_for(recipient, *p))
    }

    /// Checks that the countries this scope names are codes ISO has assigned
    /// ([`crate::country`]), except in entries `before` (the scope it narrows) already
    /// had: a consent recorded by a version that checked only their form must stay
    /// narrowable, but a narrowing adds no new such entry.
    pub fn check_new_country_codes(
        &self,
        before: Option<&ConsentScope>,
    ) -> Result<(), UnassignedCountry> {
        let assigned = crate::country::is_country_code;
        if let Some(c) = self.restrictions.excluded_countries.iter().find(|c| {
            !assigned(c) && !before.is_some_and(|b| b.restrictions.excluded_countries.contains(*c))
        }) {
            return Err(UnassignedCountry::Excluded(c.clone()));
        }
        match self.recipient_roles.iter().find(|r| {
            !assigned(&r.country) && !before.is_some_and(|b| b.recipient_roles.contains(*r))
        }) {
            Some(entry) => Err(UnassignedCountry::Role(entry.clone())),
            None => Ok(()),
        }
    }

    /// Checks that every recipient this consent names could receive something under it:
    /// a named org (looked up with `member`; one not found is left to the caller) that
    /// it admits, and role-and-country entries that could admit some member. A member
    /// may hold several roles, so an entry is refused only where no member could ever
    /// match it: its country excluded, a state authority's role (those are admitted only
    /// by name), or no purpose left that a role other than a state authority's may
    /// receive.
    pub fn check_recipients<'a>(
        &self,
        recorder: &OrgId,
        member: impl Fn(&OrgId) -> Option<&'a Member>,
    ) -> Result<(), UnusableRecipient> {
        if self.recipient_orgs.contains(recorder) {
            return Err(UnusableRecipient::Recorder(recorder.clone()));
        }
        for org in &self.recipient_orgs {
            if let Some(m) = member(org)
                && !self.admits_recipient(m)
            {
                return Err(UnusableRecipient::Org(org.clone()));
            }
        }
        self.recipient_roles
            .iter()
            .try_for_each(|entry| self.check_role_entry(entry))
    }

    /// Checks that for every purpose this consent names a referral could be sent: the
    /// consent lists every field the purpose requires.
    pub fn check_purposes(&self) -> Result<(), UnusablePurpose> {
        for purpose in &self.purposes {
            let missing: Vec<&str> = profile(*purpose)
                .required
                .iter()
                .filter(|f| !self.fields.contains(f))
                .map(|f| f.as_str())
                .collect();
            if !missing.is_empty() {
                return Err(UnusablePurpose {
                    purpose: *purpose,
                    missing: missing.join(", "),
                });
            }
        }
        Ok(())
    }

    fn check_role_entry(&self, entry: &RoleInCountry) -> Result<(), UnusableRecipient> {
        if self
            .restrictions
            .excluded_countries
            .contains(&entry.country)
        {
            return Err(UnusableRecipient::CountryExcluded(entry.clone()));
        }
        if entry.role.is_some_and(Role::is_state_authority) {
            return Err(UnusableRecipient::StateAuthorityByRole(entry.clone()));
        }
        let some_purpose_by_role = self.purposes.iter().any(|p| {
            !(self.restrictions.no_family_contact && *p == Purpose::FamilyTracing)
                && profile(*p)
                    .recipient_roles
                    .iter()
                    .any(|r| !r.is_state_authority())
        });
        if !some_purpose_by_role {
            return Err(UnusableRecipient::NoPurposeByRole(entry.clone()));
        }
        Ok(())
    }

    /// What of this consent one referral discloses: its purpose and the fields it
    /// carries (as far as the consent covers them), with the consent's restrictions and
    /// expiry, which bind what the recipient does with the data. A consent receipt is
    /// issued from this, not from the whole consent, so that a recipient does not learn
    /// the person's other purposes or what other kinds of data are held about them.
    pub fn disclosed_by(&self, purpose: Purpose, fields: &BTreeSet<Field>) -> ConsentScope {
        ConsentScope {
            purposes: self
                .purposes
                .iter()
                .copied()
                .filter(|p| *p == purpose)
                .collect(),
            fields: self.fields.intersection(fields).copied().collect(),
            ..self.clone()
        }
    }

    /// What `recipient` may keep, under this (narrowed) consent, of one referral it got
    /// under it for `purpose`, disclosing `disclosed`. Nothing, if the consent no longer
    /// admits it for that purpose or covers none of its fields; the fields it still
    /// covers, if some are gone. Only fields the referral disclosed are named, so that
    /// the recipient learns nothing of the consent beyond what it was sent.
    ///
    /// `disclosed` is `None` for a referral sent before the sender recorded what it
    /// disclosed: naming the fields the consent still covers would tell the recipient
    /// of kinds of data it was never sent, so such a referral is kept or purged whole,
    /// by its purpose alone.
    pub fn after_narrowing(
        &self,
        recipient: &Member,
        purpose: Purpose,
        disclosed: Option<&BTreeSet<Field>>,
    ) -> AfterNarrowing {
        if !self.admits_for(recipient, purpose) {
            return AfterNarrowing::Purge;
        }
        let Some(disclosed) = disclosed else {
            return AfterNarrowing::Unchanged;
        };
        let kept: BTreeSet<Field> = disclosed.intersection(&self.fields).copied().collect();
        if kept.is_empty() {
            AfterNarrowing::Purge
        } else if kept.len() == disclosed.len() {
            AfterNarrowing::Unchanged
        } else {
            AfterNarrowing::Keep(kept)
        }
    }

    /// Whether `recipient` keeps whole, under this narrowed consent, a referral for
    /// `purpose` sent before its sender recorded the fields it carries
    /// ([`Self::after_narrowing`]) although it may carry a field the narrowings took
    /// away: one of `removed` its purpose allows. Where `removed` is not known (narrowed
    /// by an earlier version), any field its purpose allows and this consent no longer
    /// covers counts. Only a withdrawal has such a referral purged.
    pub fn keeps_whole_beyond_consent(
        &self,
        recipient: &Member,
        purpose: Purpose,
        removed: Option<&BTreeSet<Field>>,
    ) -> bool {
        let profile = profile(purpose);
        self.admits_for(recipient, purpose)
            && profile
                .required
                .iter()
                .chain(profile.optional)
                .any(|f| match removed {
                    Some(removed) => removed.contains(f),
                    None => !self.fields.contains(f),
                })
    }

    /// Checks that `narrower` only takes away from this scope (no new purpose, field or
    /// recipient, no later expiry, no restriction lifted) and takes something away.
    pub fn check_narrowing(&self, narrower: &ConsentScope) -> Result<(), NarrowingError> {
        let mut widened = Vec::new();
        for p in narrower.purposes.difference(&self.purposes) {
            widened.push(format!("adds purpose {p}"));
        }
        for f in narrower.fields.difference(&self.fields) {
            widened.push(format!("adds field {f}"));
        }
        for o in narrower.recipient_orgs.difference(&self.recipient_orgs) {
            widened.push(format!("adds recipient {o}"));
        }
        for r in narrower.recipient_roles.difference(&self.recipient_roles) {
            widened.push(format!("adds recipients {r}"));
        }
        if narrower.expires_at_ms > self.expires_at_ms {
            widened.push("extends the expiry".into());
        }
        for c in self
            .restrictions
            .excluded_countries
            .difference(&narrower.restrictions.excluded_countries)
        {
            widened.push(format!("lifts the exclusion of {c}"));
        }
        if self.restrictions.no_family_contact && !narrower.restrictions.no_family_contact {
            widened.push("lifts the ban on family contact".into());
        }
        if !widened.is_empty() {
            return Err(NarrowingError::Widens(widened.join(", ")));
        }
        let unchanged = narrower.purposes == self.purposes
            && narrower.fields == self.fields
            && narrower.recipient_orgs == self.recipient_orgs
            && narrower.recipient_roles == self.recipient_roles
            && narrower.expires_at_ms == self.expires_at_ms
            && narrower.restrictions == self.restrictions;
        if unchanged {
            return Err(NarrowingError::ChangesNothing);
        }
        Ok(())
    }
}

/// What a recipient may keep of one referral once its consent is narrowed
/// ([`ConsentScope::after_narrowing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterNarrowing {
    /// The referral as it is.
    Unchanged,
    /// These of its fields, and none of the others.
    Keep(BTreeSet<Field>),
    /// Nothing of it.
    Purge,
}

/// The receipt of consent that travels sealed inside a referral: the sending org's signed
/// statement of what the person consented to, scoped to this one recipient. The
/// recipient runs the gate again against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentReceipt {
    pub consent_id: String,
    pub sender: OrgId,
    pub recipient: OrgId,
    /// The case reference this recipient knows.
    pub case_ref: String,
    pub purposes: BTreeSet<Purpose>,
    pub fields: BTreeSet<Field>,
    pub restrictions: Restrictions,
    pub expires_at_ms: i64,
    pub issued_at_ms: i64,
    pub signature: Vec<u8>,
}

/// Why a consent receipt is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsentReceiptError {
    #[error("consent receipt names sender {found}, but the envelope comes from {expected}")]
    WrongSender { found: OrgId, expected: OrgId },
    #[error("consent receipt names recipient {found}, not this node ({expected})")]
    WrongRecipient { found: OrgId, expected: OrgId },
    #[error("consent receipt signature does not verify with the sender's key")]
    BadSignature,
    #[error("consent receipt is for case reference other than the referral's")]
    WrongCase,
    #[error("consent receipt's case reference is not of the form ref- and 32 hex digits")]
    MalformedCaseRef,
    #[error("consent receipt's consent id is not of the form consent- and 32 hex digits")]
    MalformedConsentId,
    #[error("consent receipt excludes a country that is not an ISO 3166-1 alpha-2 code")]
    MalformedCountry,
}

impl ConsentReceipt {
    /// Issues a receipt of `consent` for one recipient and signs it. `consent_ref` is the
    /// id under which that recipient knows the consent: its own, so that recipients
    /// cannot link their records through it ([`crate::PairwiseKey::consent_ref`]).
    pub fn issue(
        consent: &ConsentScope,
        consent_ref: String,
        sender: OrgId,
        recipient: OrgId,
        case_ref: String,
        issued_at_ms: i64,
        key: &SigningKey,
    ) -> Self {
        let mut receipt = Self {
            consent_id: consent_ref,
            sender,
            recipient,
            case_ref,
            purposes: consent.purposes.clone(),
            fields: consent.fields.clone(),
            restrictions: consent.restrictions.clone(),
            expires_at_ms: consent.expires_at_ms,
            issued_at_ms,
            signature: Vec::new(),
        };
        receipt.signature = key.sign(&receipt.signed_bytes()).to_vec();
        receipt
    }

    pub fn signed_bytes(&self) -> Vec<u8> {
        let purposes: Vec<&str> = self.purposes.iter().map(|p| p.as_str()).collect();
        let fields: Vec<&str> = self.fields.iter().map(|f| f.as_str()).collect();
        let out = Canonical::new(label::CONSENT_RECEIPT)
            .str(&self.consent_id)
            .str(self.sender.as_str())
            .str(self.recipient.as_str())
            .str(&self.case_ref)
            .strs(&purposes)
            .strs(&fields);
        encode_terms(out, &self.restrictions, self.expires_at_ms)
            .i64(self.issued_at_ms)
            .finish()
    }

    /// Checks who issued the receipt and for whom, the form of what it names (it goes
    /// into the recipient's records and audit log), and its signature.
    pub fn verify(
        &self,
        sender: &OrgId,
        sender_key: &VerifyingKey,
        local: &OrgId,
        case_ref: &str,
    ) -> Result<(), ConsentReceiptError> {
        if &self.sender != sender {
            return Err(ConsentReceiptError::WrongSender {
                found: self.sender.clone(),
                expected: sender.clone(),
            });
        }
        if &self.recipient != local {
            return Err(ConsentReceiptError::WrongRecipient {
                found: self.recipient.clone(),
                expected: local.clone(),
            });
        }
        if self.case_ref != case_ref {
            return Err(ConsentReceiptError::WrongCase);
        }
        if !crate::caseref::is_case_ref(&self.case_ref) {
            return Err(ConsentReceiptError::MalformedCaseRef);
        }
        if !is_consent_id(&self.consent_id) {
            return Err(ConsentReceiptError::MalformedConsentId);
        }
        if !self
            .restrictions
            .excluded_countries
            .iter()
            .all(|c| has_country_code_form(c))
        {
            return Err(ConsentReceiptError::MalformedCountry);
        }
        sender_key
            .verify(&self.signed_bytes(), &self.signature)
            .map_err(|_| ConsentReceiptError::BadSignature)
    }

    /// The restrictions and expiry the receipt states.
    pub fn terms(&self) -> ConsentTerms {
        ConsentTerms {
            restrictions: self.restrictions.clone(),
            expires_at_ms: self.expires_at_ms,
        }
    }

    /// The scope this receipt grants, for running the gate on the receiving side: the
    /// recipient is named, so only the receipt's purposes, fields, restrictions and
    /// expiry decide.
    pub fn scope(&self) -> ConsentScope {
        ConsentScope {
            id: self.consent_id.clone(),
            purposes: self.purposes.clone(),
            recipient_orgs: [self.recipient.clone()].into(),
            recipient_roles: BTreeSet::new(),
            fields: self.fields.clone(),
            restrictions: self.restrictions.clone(),
            expires_at_ms: self.expires_at_ms,
            withdrawn_at_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::SealingKey;
    use proptest::prelude::*;

    #[test]
    fn a_recorded_expiry_is_the_start_of_its_utc_day() {
        // 2026-12-01 10:15:42.123 UTC.
        let at = 1_796_120_142_123;
        assert_eq!(recorded_expiry(at), 1_796_083_200_000);
        assert_eq!(
            crate::utc::format(recorded_expiry(at)),
            "2026-12-01 00:00:00 UTC"
        );
        assert_eq!(recorded_expiry(1_796_083_200_000), 1_796_083_200_000);
        assert_eq!(recorded_expiry(-1), -EXPIRY_UNIT_MS);
        // Any value a caller sends, without overflow.
        assert_eq!(recorded_expiry(i64::MIN), i64::MIN);
        assert_eq!(recorded_expiry(i64::MAX).rem_euclid(EXPIRY_UNIT_MS), 0);
    }

    proptest! {
        /// Never later than asked, less than a day earlier, and the same for every moment
        /// of one day.
        #[test]
        fn a_recorded_expiry_only_shortens_and_only_by_less_than_a_day(at in any::<i64>().prop_map(|v| v / 4)) {
            let kept = recorded_expiry(at);
            prop_assert!(kept <= at && at - kept < EXPIRY_UNIT_MS);
            prop_assert_eq!(kept.rem_euclid(EXPIRY_UNIT_MS), 0);
            prop_assert_eq!(recorded_expiry(kept + EXPIRY_UNIT_MS - 1), kept);
        }
    }

    fn member(id: &str, country: &str, role: Role) -> Member {
        Member {
            id: OrgId::new(id).unwrap(),
            name: id.into(),
            country: country.into(),
            represents: None,
            roles: vec![role],
            endpoint: "https://127.0.0.1:1".into(),
            signing_key: SigningKey::from_seed(&[1; 32]).unwrap().verifying_key(),
            sealing_key: SealingKey::derive(&[2; 32]).public_key().clone(),
            cert_sha256: [0; 32],
        }
    }

    fn reintegration_fields() -> BTreeSet<Field> {
        [
            Field::PreferredName,
            Field::AgeBand,
            Field::Languages,
            Field::Needs,
        ]
        .into()
    }

    const CONSENT_1: &str = "consent-0123456789abcdef0123456789abcdef";
    const REF_1: &str = "ref-00000000000000000000000000000001";
    const REF_2: &str = "ref-00000000000000000000000000000002";

    fn consent() -> ConsentScope {
        ConsentScope {
            id: CONSENT_1.into(),
            purposes: [Purpose::Reintegration, Purpose::NationalityVerification].into(),
            recipient_orgs: [OrgId::new("shelter-kh").unwrap()].into(),
            recipient_roles: BTreeSet::new(),
            fields: reintegration_fields()
                .into_iter()
                .chain([Field::Sex, Field::RiskFlags])
                .collect(),
            restrictions: Restrictions::default(),
            expires_at_ms: 1000,
            withdrawn_at_ms: None,
        }
    }

    fn refused(result: Result<(), GateRefusal>) -> Vec<Reason> {
        result.expect_err("must be refused").reasons
    }

    #[test]
    fn a_refusal_logs_its_rules_and_nothing_of_the_person() {
        let refusal = GateRefusal {
            consent_id: Some("consent-1".into()),
            reasons: vec![
                Reason::CountryExcluded {
                    recipient: OrgId::new("embassy-kh").unwrap(),
                    country: "KH".into(),
                },
                Reason::FamilyContactForbidden,
                Reason::CountryExcluded {
                    recipient: OrgId::new("embassy-kh").unwrap(),
                    country: "TH".into(),
                },
            ],
        };
        assert!(refusal.to_string().contains("KH"), "the caseworker is told");
        // Nor which restriction: beside the recipient, either says what the person asked.
        assert_eq!(refusal.rules(), "restricted");
        let none = GateRefusal {
            consent_id: None,
            reasons: vec![],
        };
        assert_eq!(none.rules(), "no-consent");
    }

    #[test]
    fn role_in_country_parses() {
        let rc: RoleInCountry = "shelter@KH".parse().unwrap();
        assert_eq!(rc.role, Some(Role::Shelter));
        assert_eq!(rc.to_string(), "shelter@KH");
        assert_eq!("*@MY".parse::<RoleInCountry>().unwrap().role, None);
        assert!("shelter".parse::<RoleInCountry>().is_err());
        assert!("spy@KH".parse::<RoleInCountry>().is_err());
        assert!("shelter@Cambodia".parse::<RoleInCountry>().is_err());
    }

    #[test]
    fn consented_referral_passes() {
        let kh = member("shelter-kh", "KH", Role::Shelter);
        gate(
            &consent(),
            &kh,
            Purpose::Reintegration,
            &reintegration_fields(),
            0,
        )
        .unwrap();
    }

    #[test]
    fn every_rule_refuses_and_is_named() {
        let kh = member("shelter-kh", "KH", Role::Shelter);
        let f = reintegration_fields();
        let c = consent();

        let mut extra = f.clone();
        extra.insert(Field::Phone);
        assert!(
            refused(gate(&c, &kh, Purpose::Reintegration, &extra, 0))
                .contains(&Reason::FieldNotConsented(Field::Phone))
        );

        let mut mut_c = c.clone();
        mut_c.fields.insert(Field::DateOfBirth);
        let mut dob = f.clone();
        dob.insert(Field::DateOfBirth);
        assert_eq!(
            refused(gate(&mut_c, &kh, Purpose::Reintegration, &dob, 0)),
            vec![Reason::FieldNotAllowedForPurpose {
                field: Field::DateOfBirth,
                purpose: Purpose::Reintegration
            }]
        );

        let mut missing = f.clone();
        missing.remove(&Field::Languages);
        assert_eq!(
            refused(gate(&c, &kh, Purpose::Reintegration, &missing, 0)),
            vec![Reason::RequiredFieldMissing {
                field: Field::Languages,
                purpose: Purpose::Reintegration
            }]
        );

        let th = member("ngo-th", "TH", Role::Ngo);
        assert_eq!(
            refused(gate(&c, &th, Purpose::Reintegration, &f, 0)),
            vec![Reason::RecipientNotInScope(th.id.clone())]
        );

        assert_eq!(
            refused(gate(&c, &kh, Purpose::Reintegration, &f, 1000)),
            vec![Reason::Expired]
        );

        let mut w = c.clone();
        w.withdrawn_at_ms = Some(5);
        assert_eq!(
            refused(gate(&w, &kh, Purpose::Reintegration, &f, 0)),
            vec![Reason::Withdrawn]
        );

        // An embassy in scope only by role and country is a state authority not named.
        let embassy = member("kh-embassy-kl", "MY", Role::Embassy);
        let mut by_country = c.clone();
        by_country.recipient_roles.insert(RoleInCountry {
            role: None,
            country: "MY".into(),
        });
        let nv: BTreeSet<Field> = [
            Field::LegalGivenName,
            Field::LegalFamilyName,
            Field::DateOfBirth,
            Field::Nationality,
        ]
        .into();
        by_country.fields.extend(nv.iter().copied());
        assert_eq!(
            refused(gate(
                &by_country,
                &embassy,
                Purpose::NationalityVerification,
                &nv,
                0
            )),
            vec![Reason::StateAuthorityNotNamed(embassy.id.clone())]
        );
        // Named, it passes.
        by_country.recipient_orgs.insert(embassy.id.clone());
        gate(
            &by_country,
            &embassy,
            Purpose::NationalityVerification,
            &nv,
            0,
        )
        .unwrap();

        // Return assistance goes to embassies only.
        let mut ra = c.clone();
        ra.purposes.insert(Purpose::ReturnAssistance);
        assert!(
            refused(gate(&ra, &kh, Purpose::ReturnAssistance, &f, 0)).contains(
                &Reason::RoleCannotReceivePurpose {
                    recipient: kh.id.clone(),
                    purpose: Purpose::ReturnAssistance
                }
            )
        );

        let mut excluded = c.clone();
        excluded.restrictions.excluded_countries.insert("KH".into());
        assert_eq!(
            refused(gate(&excluded, &kh, Purpose::Reintegration, &f, 0)),
            vec![Reason::CountryExcluded {
                recipient: kh.id.clone(),
                country: "KH".into()
            }]
        );

        // The Cambodian embassy in Kuala Lumpur sits in MY but acts for KH: a consent
        // that excludes KH excludes it, even where the consent names it.
        let mut embassy = member("kh-embassy-kl", "MY", Role::Embassy);
        embassy.represents = Some("KH".into());
        let mut to_embassy = c.clone();
        to_embassy.recipient_orgs.insert(embassy.id.clone());
        to_embassy.purposes.insert(Purpose::NationalityVerification);
        let verify_fields: BTreeSet<Field> = profile(Purpose::NationalityVerification)
            .required
            .iter()
            .copied()
            .collect();
        to_embassy.fields.extend(verify_fields.iter().copied());
        let nv = Purpose::NationalityVerification;
        assert_eq!(gate(&to_embassy, &embassy, nv, &verify_fields, 0), Ok(()));
        to_embassy
            .restrictions
            .excluded_countries
            .insert("KH".into());
        assert_eq!(
            refused(gate(&to_embassy, &embassy, nv, &verify_fields, 0)),
            vec![Reason::CountryExcluded {
                recipient: embassy.id.clone(),
                country: "KH".into()
            }]
        );

        let mut family = c.clone();
        family.restrictions.no_family_contact = true;
        family.purposes.insert(Purpose::FamilyTracing);
        assert!(
            refused(gate(&family, &kh, Purpose::FamilyTracing, &f, 0))
                .contains(&Reason::FamilyContactForbidden)
        );
    }

    #[test]
    fn refusal_lists_every_reason_in_one_sentence() {
        let th = member("ngo-th", "TH", Role::Ngo);
        let mut fields = reintegration_fields();
        fields.insert(Field::Phone);
        let refusal = gate(&consent(), &th, Purpose::LegalAid, &fields, 2000).unwrap_err();
        let text = refusal.to_string();
        for word in [
            CONSENT_1,
            "expired",
            "legal-aid",
            "ngo-th",
            "phone",
            "legal_proceedings_status",
        ] {
            assert!(text.contains(word), "{text} should name {word}");
        }
        assert!(!text.contains('\n'));
    }

    #[test]
    fn gate_case_picks_a_passing_consent_or_reports_the_newest_live_one() {
        let kh = member("shelter-kh", "KH", Role::Shelter);
        let f = reintegration_fields();
        let mut old = consent();
        old.id = "old".into();
        let mut withdrawn = consent();
        withdrawn.id = "withdrawn".into();
        withdrawn.withdrawn_at_ms = Some(1);
        let consents = [withdrawn.clone(), old.clone()];
        assert_eq!(
            gate_case(&consents, &kh, Purpose::Reintegration, &f, 0)
                .unwrap()
                .id,
            "old"
        );
        let mut extra = f.clone();
        extra.insert(Field::Phone);
        let refusal = gate_case(&consents, &kh, Purpose::Reintegration, &extra, 0).unwrap_err();
        assert_eq!(refusal.consent_id.as_deref(), Some("old"));
        let none = gate_case(&[], &kh, Purpose::Reintegration, &f, 0).unwrap_err();
        assert_eq!(none.to_string(), "the case has no recorded consent");
    }

    #[test]
    fn narrowing_never_widens() {
        let c = consent();
        let mut n = c.clone();
        n.fields.remove(&Field::RiskFlags);
        n.expires_at_ms = 500;
        n.restrictions.no_family_contact = true;
        c.check_narrowing(&n).unwrap();
        let mut w = c.clone();
        w.fields.insert(Field::Phone);
        w.purposes.insert(Purpose::LegalAid);
        w.expires_at_ms = 2000;
        let err = c.check_narrowing(&w).unwrap_err().to_string();
        assert!(
            err.contains("phone") && err.contains("legal-aid") && err.contains("expiry"),
            "{err}"
        );
        let mut lifted = n.clone();
        lifted.restrictions.no_family_contact = false;
        assert!(matches!(
            n.check_narrowing(&lifted),
            Err(NarrowingError::Widens(_))
        ));
    }

    #[test]
    fn a_recipient_is_admitted_by_name_or_role_unless_its_country_is_excluded() {
        let kh = member("shelter-kh", "KH", Role::Shelter);
        let th = member("ngo-th", "TH", Role::Ngo);
        let mut c = consent();
        assert!(c.admits_recipient(&kh));
        assert!(!c.admits_recipient(&th));
        c.recipient_roles.insert("ngo@TH".parse().unwrap());
        assert!(c.admits_recipient(&th));
        c.restrictions.excluded_countries.insert("TH".into());
        assert!(!c.admits_recipient(&th));
        assert!(c.admits_recipient(&kh));
        c.recipient_orgs.clear();
        assert!(!c.admits_recipient(&kh));
        // Named, but for no purpose its role may receive.
        let embassy = member("kh-embassy-kl", "MY", Role::Embassy);
        let mut c = consent();
        c.recipient_orgs.insert(embassy.id.clone());
        assert!(c.admits_recipient(&embassy), "nationality verification");
        c.purposes.remove(&Purpose::NationalityVerification);
        assert!(!c.admits_recipient(&embassy));
        assert!(c.admits_recipient(&kh));
    }

    #[test]
    fn a_narrowing_must_take_something_away() {
        let c = consent();
        assert_eq!(
            c.check_narrowing(&c.clone()),
            Err(NarrowingError::ChangesNothing)
        );
        // The id and the withdrawal are not part of what a narrowing changes.
        let mut renamed = c.clone();
        renamed.id = "other".into();
        assert_eq!(
            c.check_narrowing(&renamed),
            Err(NarrowingError::ChangesNothing)
        );
        // Each single change that takes something away is a narrowing.
        let changes: [fn(&mut ConsentScope); 6] = [
            |n| {
                n.fields.pop_first();
            },
            |n| n.recipient_orgs.clear(),
            |n| {
                n.purposes.pop_first();
            },
            |n| n.expires_at_ms -= 1,
            |n| n.restrictions.no_family_contact = true,
            |n| {
                n.restrictions.excluded_countries.insert("TH".into());
            },
        ];
        for change in changes {
            let mut n = c.clone();
            change(&mut n);
            assert_eq!(c.check_narrowing(&n), Ok(()), "{n:?}");
        }
    }

    #[test]
    fn a_narrowing_names_what_a_recipient_may_keep_of_each_referral() {
        let kh = member("shelter-kh", "KH", Role::Shelter);
        let sent: BTreeSet<Field> = [Field::PreferredName, Field::Needs, Field::RiskFlags].into();
        let full = consent();
        assert_eq!(
            full.after_narrowing(&kh, Purpose::Reintegration, Some(&sent)),
            AfterNarrowing::Unchanged
        );
        let mut narrowed = consent();
        narrowed.fields.remove(&Field::RiskFlags);
        assert_eq!(
            narrowed.after_narrowing(&kh, Purpose::Reintegration, Some(&sent)),
            AfterNarrowing::Keep([Field::PreferredName, Field::Needs].into())
        );
        // A referral sent before what it disclosed was recorded is kept or purged
        // whole: naming the fields the consent covers would tell of others.
        assert_eq!(
            narrowed.after_narrowing(&kh, Purpose::Reintegration, None),
            AfterNarrowing::Unchanged
        );
        // A restriction the narrowing added counts too.
        let mut no_family = consent();
        no_family.purposes.insert(Purpose::FamilyTracing);
        no_family.restrictions.no_family_contact = true;
        let ngo = member("shelter-kh", "KH", Role::Ngo);
        assert_eq!(
            no_family.after_narrowing(&ngo, Purpose::FamilyTracing, Some(&sent)),
            AfterNarrowing::Purge
        );
        // No field of it left, its purpose gone, or the recipient gone: nothing.
        narrowed.fields.retain(|f| !sent.contains(f));
        assert_eq!(
            narrowed.after_narrowing(&kh, Purpose::Reintegration, Some(&sent)),
            AfterNarrowing::Purge
        );
        let mut no_purpose = consent();
        no_purpose.purposes.remove(&Purpose::Reintegration);
        assert_eq!(
            no_purpose.after_narrowing(&kh, Purpose::Reintegration, None),
            AfterNarrowing::Purge
        );
        let mut no_recipient = consent();
        no_recipient.recipient_orgs.clear();
        assert_eq!(
            no_recipient.after_narrowing(&kh, Purpose::Reintegration, Some(&sent)),
            AfterNarrowing::Purge
        );
    }

    #[test]
    fn a_recipient_that_could_receive_nothing_is_named() {
        let kh = member("shelter-kh", "KH", Role::Shelter);
        let embassy = Member {
            represents: Some("KH".into()),
            ..member("kh-embassy-kl", "MY", Role::Embassy)
        };
        let lookup = |org: &OrgId| [&kh, &embassy].into_iter().find(|m| &m.id == org);
        let entry = |text: &str| text.parse::<RoleInCountry>().unwrap();
        let recorder = OrgId::new("shelter-my").unwrap();
        let mut c = consent();
        c.check_recipients(&recorder, lookup).unwrap();
        // The organisation recording it: a case is not referred to itself.
        assert_eq!(
            c.check_recipients(&kh.id, lookup),
            Err(UnusableRecipient::Recorder(kh.id.clone()))
        );

        // Named, but in an excluded country.
        c.restrictions.excluded_countries.insert("KH".into());
        assert_eq!(
            c.check_recipients(&recorder, lookup),
            Err(UnusableRecipient::Org(kh.id.clone()))
        );
        // By role, in an excluded country.
        c.recipient_orgs.clear();
        c.recipient_roles.insert(entry("shelter@KH"));
        let refused = c.check_recipients(&recorder, lookup).unwrap_err();
        assert_eq!(
            refused,
            UnusableRecipient::CountryExcluded(entry("shelter@KH"))
        );
        assert!(refused.to_string().contains("shelter@KH"), "{refused}");
        assert!(refused.to_string().contains("excludes KH"), "{refused}");
        // A state authority's role: those are admitted by name only.
        c.restrictions.excluded_countries.clear();
        c.recipient_roles = [entry("embassy@MY")].into();
        assert_eq!(
            c.check_recipients(&recorder, lookup),
            Err(UnusableRecipient::StateAuthorityByRole(entry("embassy@MY")))
        );
        // Purposes only a state authority may receive, for recipients by role.
        c.recipient_roles = [entry("*@MY")].into();
        c.purposes = [Purpose::NationalityVerification].into();
        assert_eq!(
            c.check_recipients(&recorder, lookup),
            Err(UnusableRecipient::NoPurposeByRole(entry("*@MY")))
        );
        // Family tracing counts for none under no-family-contact.
        c.purposes = [Purpose::FamilyTracing].into();
        c.check_recipients(&recorder, lookup).unwrap();
        c.restrictions.no_family_contact = true;
        assert_eq!(
            c.check_recipients(&recorder, lookup),
            Err(UnusableRecipient::NoPurposeByRole(entry("*@MY")))
        );
        // The embassy, named, for what it may receive.
        c.recipient_roles.clear();
        c.recipient_orgs = [embassy.id.clone()].into();
        c.purposes = [Purpose::NationalityVerification].into();
        c.check_recipients(&recorder, lookup).unwrap();
        // ... but not where the consent excludes the country it acts for.
        c.restrictions.excluded_countries.insert("KH".into());
        assert_eq!(
            c.check_recipients(&recorder, lookup),
            Err(UnusableRecipient::Org(embassy.id.clone()))
        );
    }

    #[test]
    fn a_purpose_lacking_a_required_field_is_named() {
        let mut c = consent();
        c.purposes = [Purpose::Reintegration].into();
        c.fields = profile(Purpose::Reintegration)
            .required
            .iter()
            .copied()
            .collect();
        assert_eq!(c.check_purposes(), Ok(()));
        let dropped = profile(Purpose::Reintegration).required[0];
        c.fields.remove(&dropped);
        let refused = c.check_purposes().unwrap_err();
        assert_eq!(refused.purpose, Purpose::Reintegration);
        assert!(refused.to_string().contains(dropped.as_str()), "{refused}");
    }

    #[test]
    fn new_country_codes_must_be_assigned_and_old_ones_may_stay() {
        let mut c = consent();
        c.restrictions.excluded_countries.insert("TH".into());
        c.recipient_roles.insert("shelter@XK".parse().unwrap());
        c.check_new_country_codes(None).unwrap();
        let mut typo = c.clone();
        typo.restrictions.excluded_countries.insert("CB".into());
        assert_eq!(
            typo.check_new_country_codes(None),
            Err(UnassignedCountry::Excluded("CB".into()))
        );
        let mut role = c.clone();
        role.recipient_roles.insert("ngo@QQ".parse().unwrap());
        let refused = role.check_new_country_codes(None).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "recipient role \"ngo@QQ\": QQ is not an ISO 3166-1 alpha-2 country code"
        );
        // A narrowing of a consent an older version recorded with them keeps them.
        let mut narrower = typo.clone();
        narrower.fields.remove(&Field::Sex);
        narrower.check_new_country_codes(Some(&typo)).unwrap();
        narrower.restrictions.excluded_countries.insert("ZZ".into());
        assert!(narrower.check_new_country_codes(Some(&typo)).is_err());
    }

    #[test]
    fn a_referral_kept_whole_is_beyond_the_consent_only_if_a_removed_field_may_be_in_it() {
        let kh = member("shelter-kh", "KH", Role::Shelter);
        let mut c = consent();
        c.fields = Field::ALL.iter().copied().collect();
        let reintegration = profile(Purpose::Reintegration);
        let other = *Field::ALL
            .iter()
            .find(|f| !reintegration.allows(**f))
            .unwrap();
        let allowed = reintegration.optional[0];
        let removed = |f: Field| BTreeSet::from([f]);
        let beyond = |c: &ConsentScope, removed: Option<&BTreeSet<Field>>| {
            c.keeps_whole_beyond_consent(&kh, Purpose::Reintegration, removed)
        };
        // Nothing removed that the purpose allows: nothing beyond.
        c.fields.remove(&other);
        assert!(!beyond(&c, Some(&removed(other))));
        assert!(!beyond(&c, None));
        // A field the purpose allows removed: beyond, whether known or inferred.
        c.fields.remove(&allowed);
        assert!(beyond(&c, Some(&removed(allowed))));
        assert!(beyond(&c, None));
        // A consent that never covered that field, narrowed of something else: known
        // removals say nothing is beyond; without them it cannot be told.
        assert!(!beyond(&c, Some(&BTreeSet::new())));
        // A recipient no longer admitted purges instead.
        c.recipient_orgs.clear();
        assert!(!beyond(&c, None));
    }

    #[test]
    fn consent_receipt_signs_every_field() {
        let key = SigningKey::from_seed(&[3; 32]).unwrap();
        let my = OrgId::new("shelter-my").unwrap();
        let kh = OrgId::new("shelter-kh").unwrap();
        let c = consent();
        let r = ConsentReceipt::issue(
            &c,
            c.id.clone(),
            my.clone(),
            kh.clone(),
            REF_1.into(),
            10,
            &key,
        );
        r.verify(&my, &key.verifying_key(), &kh, REF_1).unwrap();
        assert!(r.verify(&kh, &key.verifying_key(), &kh, REF_1).is_err());
        assert!(r.verify(&my, &key.verifying_key(), &my, REF_1).is_err());
        assert!(r.verify(&my, &key.verifying_key(), &kh, REF_2).is_err());
        let mut t = r.clone();
        t.fields.insert(Field::Phone);
        assert_eq!(
            t.verify(&my, &key.verifying_key(), &kh, REF_1),
            Err(ConsentReceiptError::BadSignature)
        );
        let mut t = r.clone();
        t.expires_at_ms += 1;
        assert!(t.verify(&my, &key.verifying_key(), &kh, REF_1).is_err());
        let mut t = r.clone();
        t.restrictions.excluded_countries.insert("TH".into());
        assert!(t.verify(&my, &key.verifying_key(), &kh, REF_1).is_err());
    }

    /// What a receipt names goes into the recipient's records and audit log: free text
    /// where an identifier belongs is refused, even under a valid signature.
    #[test]
    fn a_consent_receipt_naming_free_text_is_refused() {
        let key = SigningKey::from_seed(&[3; 32]).unwrap();
        let my = OrgId::new("shelter-my").unwrap();
        let kh = OrgId::new("shelter-kh").unwrap();
        let issue = |consent: &ConsentScope, case_ref: &str| {
            let id = consent.id.clone();
            ConsentReceipt::issue(
                consent,
                id,
                my.clone(),
                kh.clone(),
                case_ref.into(),
                10,
                &key,
            )
        };
        let name = "Maria Santos";
        assert_eq!(
            issue(&consent(), name).verify(&my, &key.verifying_key(), &kh, name),
            Err(ConsentReceiptError::MalformedCaseRef)
        );
        let mut named = consent();
        named.id = name.into();
        assert_eq!(
            issue(&named, REF_1).verify(&my, &key.verifying_key(), &kh, REF_1),
            Err(ConsentReceiptError::MalformedConsentId)
        );
        let mut excluding = consent();
        excluding
            .restrictions
            .excluded_countries
            .insert(name.into());
        assert_eq!(
            issue(&excluding, REF_1).verify(&my, &key.verifying_key(), &kh, REF_1),
            Err(ConsentReceiptError::MalformedCountry)
        );
        assert!(is_consent_id(CONSENT_1));
        for bad in [
            "consent-1",
            "consent-",
            "CONSENT-0123456789abcdef0123456789abcdef",
        ] {
            assert!(!is_consent_id(bad), "{bad:?}");
        }
    }

    fn arb_scope() -> impl Strategy<Value = ConsentScope> {
        (
            proptest::collection::btree_set(0usize..8, 0..4),
            proptest::collection::btree_set(0usize..3, 0..3),
            proptest::collection::btree_set((proptest::option::of(0usize..3), 0usize..3), 0..3),
            proptest::collection::btree_set(0usize..Field::ALL.len(), 0..Field::ALL.len()),
            proptest::collection::btree_set(0usize..3, 0..2),
            any::<bool>(),
            0i64..100,
            proptest::option::of(0i64..100),
        )
            .prop_map(|(p, o, rc, f, ex, fam, exp, w)| ConsentScope {
                id: "c".into(),
                purposes: p.into_iter().map(|i| Purpose::ALL[i]).collect(),
                recipient_orgs: o
                    .into_iter()
                    .map(|i| OrgId::new(ORGS[i].0).unwrap())
                    .collect(),
                recipient_roles: rc
                    .into_iter()
                    .map(|(r, c)| RoleInCountry {
                        role: r.map(|i| ROLES[i]),
                        country: COUNTRIES[c].into(),
                    })
                    .collect(),
                fields: f.into_iter().map(|i| Field::ALL[i]).collect(),
                restrictions: Restrictions {
                    excluded_countries: ex.into_iter().map(|i| COUNTRIES[i].to_string()).collect(),
                    no_family_contact: fam,
                },
                expires_at_ms: exp,
                withdrawn_at_ms: w,
            })
    }

    const ORGS: [(&str, &str, Role); 3] = [
        ("shelter-kh", "KH", Role::Shelter),
        ("ngo-th", "TH", Role::Ngo),
        ("kh-embassy-kl", "MY", Role::Embassy),
    ];
    const ROLES: [Role; 3] = [Role::Shelter, Role::Ngo, Role::Embassy];

    /// A referral to gate: a recipient (one of [`ORGS`]), a purpose and some fields.
    fn arb_referral() -> impl Strategy<Value = (Member, Purpose, BTreeSet<Field>)> {
        (
            0usize..ORGS.len(),
            0usize..Purpose::ALL.len(),
            proptest::collection::btree_set(0usize..Field::ALL.len(), 0..12),
        )
            .prop_map(|(org, purpose, fields)| {
                let (id, country, role) = ORGS[org];
                (
                    member(id, country, role),
                    Purpose::ALL[purpose],
                    fields.into_iter().map(|i| Field::ALL[i]).collect(),
                )
            })
    }
    const COUNTRIES: [&str; 3] = ["KH", "TH", "MY"];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Nothing outside consent ∩ purpose ever passes, and everything else the gate
        /// promises holds whenever it lets a referral through.
        #[test]
        fn nothing_outside_consent_and_purpose_passes(
            scope in arb_scope(),
            (recipient, purpose, fields) in arb_referral(),
            now in 0i64..100,
        ) {
            let (country, role) = (recipient.country.as_str(), recipient.roles[0]);
            let profile = profile(purpose);
            if gate(&scope, &recipient, purpose, &fields, now).is_ok() {
                for f in &fields {
                    prop_assert!(scope.fields.contains(f) && profile.allows(*f));
                }
                for f in profile.required {
                    prop_assert!(fields.contains(f));
                }
                prop_assert!(scope.purposes.contains(&purpose));
                prop_assert!(scope.expires_at_ms > now && scope.withdrawn_at_ms.is_none());
                prop_assert!(profile.recipient_roles.iter().any(|r| recipient.has_role(*r)));
                prop_assert!(!scope.restrictions.excluded_countries.contains(country));
                prop_assert!(!(scope.restrictions.no_family_contact && purpose == Purpose::FamilyTracing));
                if role == Role::Embassy {
                    prop_assert!(scope.recipient_orgs.contains(&recipient.id));
                } else {
                    prop_assert!(scope.recipient_orgs.contains(&recipient.id)
                        || scope.recipient_roles.iter().any(|rc| rc.country == country
                            && rc.role.is_none_or(|r| r == role)));
                }
            }
        }

        /// A recipient entry is refused only where no member could ever be admitted
        /// through it: any member a consent admits without naming it matches an entry
        /// the check keeps, whatever roles it holds.
        #[test]
        fn no_role_entry_that_could_admit_someone_is_refused(
            scope in arb_scope(),
            roles in proptest::collection::btree_set(0usize..Role::ALL.len(), 1..4),
            country in 0usize..COUNTRIES.len(),
            represents in proptest::option::of(0usize..COUNTRIES.len()),
        ) {
            let mut m = member("member-x", COUNTRIES[country], Role::Shelter);
            m.roles = roles.into_iter().map(|i| Role::ALL[i]).collect();
            m.represents = represents.map(|i| COUNTRIES[i].to_string());
            if scope.admits_recipient(&m) {
                let kept = scope.recipient_roles.iter().any(|entry| {
                    entry.country == m.country
                        && entry.role.is_none_or(|r| m.has_role(r))
                        && scope.check_role_entry(entry).is_ok()
                });
                prop_assert!(kept, "{:?} admits {:?}", scope, m);
            }
            // And a named member is refused exactly when the consent admits it nowhere.
            let named = ConsentScope { recipient_orgs: [m.id.clone()].into(), recipient_roles: BTreeSet::new(), ..scope.clone() };
            prop_assert_eq!(
                named.check_recipients(&OrgId::new("recorder").unwrap(), |_| Some(&m)).is_ok(),
                named.admits_recipient(&m)
            );
        }

        /// A receipt issued for one referral lets the recipient's gate pass exactly that
        /// referral, and names nothing of the consent beyond it.
        #[test]
        fn a_receipt_discloses_the_referral_and_admits_it(
            scope in arb_scope(),
            (recipient, purpose, fields) in arb_referral(),
            now in 0i64..100,
        ) {
            let key = SigningKey::from_seed(&[3; 32]).unwrap();
            let r = ConsentReceipt::issue(
                &scope.disclosed_by(purpose, &fields),
                scope.id.clone(),
                OrgId::new("a").unwrap(),
                recipient.id.clone(),
                "ref".into(),
                0,
                &key,
            );
            let s = r.scope();
            prop_assert!(s.purposes.iter().all(|p| *p == purpose));
            prop_assert!(s.fields.is_subset(&fields));
            if gate(&scope, &recipient, purpose, &fields, now).is_ok() {
                prop_assert!(gate(&s, &recipient, purpose, &fields, now).is_ok());
            }
        }

        /// `admits_for` is the gate without its rules on fields, expiry and withdrawal.
        #[test]
        fn admits_for_is_the_gate_but_for_fields(
            scope in arb_scope(),
            (recipient, purpose, _) in arb_referral(),
        ) {
            let mut live = scope.clone();
            live.expires_at_ms = i64::MAX;
            live.withdrawn_at_ms = None;
            let refusal = gate(&live, &recipient, purpose, &BTreeSet::new(), 0).err();
            let only_fields_missing = refusal.is_none_or(|r| {
                r.reasons.iter().all(|x| matches!(x, Reason::RequiredFieldMissing { .. }))
            });
            prop_assert_eq!(scope.admits_for(&recipient, purpose), only_fields_missing);
        }

        /// After a narrowing, a recipient keeps of a referral only fields it was sent and
        /// the narrowed consent still covers, and only for a purpose the narrowed consent
        /// still lets it receive; a referral it may keep whole was all within the consent.
        #[test]
        fn a_narrowing_keeps_nothing_outside_the_narrowed_consent(
            scope in arb_scope(),
            (recipient, purpose, disclosed) in arb_referral(),
            known in any::<bool>(),
        ) {
            let after = scope.after_narrowing(&recipient, purpose, known.then_some(&disclosed));
            if after != AfterNarrowing::Purge {
                // Whatever it keeps, the gate would still let it be sent for the purpose.
                let mut live = scope.clone();
                live.expires_at_ms = i64::MAX;
                live.withdrawn_at_ms = None;
                let kept = match &after {
                    AfterNarrowing::Keep(kept) => kept.clone(),
                    _ if known => disclosed.clone(),
                    _ => BTreeSet::new(),
                };
                let refusal = gate(&live, &recipient, purpose, &kept, 0).err();
                prop_assert!(refusal.is_none_or(|r| r.reasons.iter().all(|reason| matches!(
                    reason,
                    Reason::RequiredFieldMissing { .. } | Reason::FieldNotAllowedForPurpose { .. }
                ))), "{:?}", after);
            }
            match after {
                AfterNarrowing::Keep(kept) => {
                    // Only fields it was sent are named.
                    prop_assert!(known && !kept.is_empty() && kept.is_subset(&scope.fields));
                    prop_assert!(kept.is_subset(&disclosed) && kept.len() < disclosed.len());
                }
                AfterNarrowing::Unchanged if known => {
                    prop_assert!(disclosed.is_subset(&scope.fields));
                }
                AfterNarrowing::Unchanged | AfterNarrowing::Purge => {}
            }
        }

        /// The receiving side's gate over a consent receipt never admits more than the
        /// sender's consent did.
        #[test]
        fn receipt_scope_is_no_wider_than_the_consent(scope in arb_scope()) {
            let key = SigningKey::from_seed(&[3; 32]).unwrap();
            let r = ConsentReceipt::issue(&scope, scope.id.clone(), OrgId::new("a").unwrap(), OrgId::new("b").unwrap(), "ref".into(), 0, &key);
            let s = r.scope();
            prop_assert!(s.fields.is_subset(&scope.fields));
            prop_assert!(s.purposes.is_subset(&scope.purposes));
            prop_assert_eq!(s.expires_at_ms, scope.expires_at_ms);
            prop_assert_eq!(&s.restrictions, &scope.restrictions);
        }

        /// Terms that bind together admit no referral that either statement alone
        /// refuses and widen neither, whichever statement arrives first.
        #[test]
        fn terms_that_bind_together_admit_nothing_either_refuses(
            scope in arb_scope(),
            other in arb_scope(),
            (recipient, purpose, fields) in arb_referral(),
            now in 0i64..100,
        ) {
            let (a, b) = (ConsentTerms::of(&scope), ConsentTerms::of(&other));
            let both = a.and(&b);
            prop_assert_eq!(&both, &b.and(&a));
            prop_assert_eq!(&both.and(&a), &both);
            let under = |t: &ConsentTerms| ConsentScope {
                restrictions: t.restrictions.clone(),
                expires_at_ms: t.expires_at_ms,
                ..scope.clone()
            };
            for one in [&a, &b] {
                if gate(&under(&both), &recipient, purpose, &fields, now).is_ok() {
                    prop_assert!(gate(&under(one), &recipient, purpose, &fields, now).is_ok());
                }
                prop_assert!(!matches!(
                    under(one).check_narrowing(&under(&both)),
                    Err(NarrowingError::Widens(_))
                ));
            }
        }
    }

    #[test]
    fn a_confirmation_stands_only_for_the_terms_and_key_it_was_made_with() {
        let now = ConsentTerms {
            restrictions: Restrictions {
                excluded_countries: ["VN".to_owned()].into(),
                no_family_contact: true,
            },
            expires_at_ms: 100,
        };
        let key = [7; 32];
        let with = |f: &dyn Fn(&mut ConsentTerms)| {
            let mut t = now.clone();
            f(&mut t);
            t
        };
        let stands = |t: &ConsentTerms| now.confirmation(&key, Some(&t.confirmation_digest(&key)));
        assert_eq!(stands(&now), TermsConfirmation::AsTheyStand);
        for earlier in [
            with(&|t| t.expires_at_ms = 101),
            with(&|t| t.restrictions.no_family_contact = false),
            with(&|t| t.restrictions.excluded_countries.clear()),
            with(&|t| {
                t.restrictions.excluded_countries.insert("KH".into());
            }),
        ] {
            assert_eq!(stands(&earlier), TermsConfirmation::Earlier, "{earlier:?}");
        }
        let other_key = now.confirmation_digest(&[8; 32]);
        assert_eq!(
            now.confirmation(&key, Some(&other_key)),
            TermsConfirmation::Earlier
        );
        assert_eq!(now.confirmation(&key, None), TermsConfirmation::Unconfirmed);
        assert!(TermsConfirmation::Unconfirmed < TermsConfirmation::Earlier);
        assert!(TermsConfirmation::Earlier < TermsConfirmation::AsTheyStand);
    }

    #[test]
    fn terms_a_peer_states_are_checked_for_form() {
        let terms = |countries: &[&str], expires_at_ms| ConsentTerms {
            restrictions: Restrictions {
                excluded_countries: countries.iter().map(|c| c.to_string()).collect(),
                no_family_contact: true,
            },
            expires_at_ms,
        };
        assert_eq!(terms(&["KH", "QQ"], 1).check_form(), Ok(()));
        assert_eq!(
            terms(&["kh"], 1).check_form(),
            Err(ConsentTermsError::MalformedCountry)
        );
        assert_eq!(
            terms(&["KHM"], 1).check_form(),
            Err(ConsentTermsError::MalformedCountry)
        );
        assert_eq!(terms(&[], 0).check_form(), Err(ConsentTermsError::NoExpiry));
    }
}
