//! What the node does, between the gRPC transport and storage: creating cases, recording
//! consent, sending a referral through the consent gate into the outbox, and accepting a
//! referral from a peer. Each workflow checks everything before it writes, and writes in
//! one transaction, so bad input never leaves a partial write.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use corridor::audit::{self, Event};
use corridor::consent::{self, ConsentScope, Restrictions, RoleInCountry};
use corridor::envelope::{ENVELOPE_VERSION, EnvelopeError, MAX_LIFETIME_MS};
use corridor::{
    AfterNarrowing, ConsentReceipt, ConsentTerms, Envelope, EnvelopeHeader, Field, Member,
    MessageId, MessageKind, OrgId, PurgeReceipt, Purpose, Receipt, TermsConfirmation,
};
use corridor_proto::v1 as pb;
use prost::Message as _;
use tonic::{Code, Status};

use crate::convert;
use crate::delivery::Delivered;
use crate::node::{Node, now_ms};
use crate::storage::{
    AcceptOutcome, AcceptedNarrowing, AcceptedReferral, AcceptedWithdrawal, ConsentDetails,
    ConsentRow, Enqueued, InboxRow, NewConsent, NewOutboxItem, PurgeRequest, Respond, ScopeColumns,
    SealedTerms, SentReferral, User, Withdrawal,
};
use crate::tls::PeerInfo;

/// Most fields one referral may carry.
pub const MAX_FIELDS: usize = 64;
/// Longest field name and value, in bytes.
pub const MAX_FIELD_NAME_LEN: usize = 64;
pub const MAX_FIELD_VALUE_LEN: usize = corridor::fields::MAX_VALUE_LEN;
/// Longest case label, in bytes.
pub const MAX_LABEL_LEN: usize = 200;
/// Most entries in any list of a consent's scope.
pub const MAX_CONSENT_LIST: usize = 64;
/// Longest free-text consent detail (guardian basis, language), in bytes.
pub const MAX_CONSENT_TEXT: usize = 200;

/// A workflow failure: the gRPC code and a message that names the problem. Messages never
/// contain personal data.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
    /// Fixed code of the rule that refused, for the audit log (never free text).
    pub rule: &'static str,
}

impl Failure {
    fn new(code: Code, message: impl Into<String>) -> Self {
        let rule = match code {
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission-denied",
            Code::FailedPrecondition => "failed-precondition",
            Code::AlreadyExists => "message-id-reused",
            Code::Internal => "internal",
            _ => "invalid-input",
        };
        Self {
            code,
            message: bounded_message(message.into()),
            rule,
        }
    }

    fn rule(mut self, rule: &'static str) -> Self {
        self.rule = rule;
        self
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }
    fn precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }
    fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        Self::new(Code::Internal, format!("{context}; see the node's log"))
    }
}

/// Longest status message, in bytes. Messages may quote what the caller sent (an id
/// that was not found, say); quoted whole, an oversized one would come back in the
/// `grpc-message` header and break the response instead of explaining it.
pub const MAX_MESSAGE_LEN: usize = 512;

fn bounded_message(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// A peer's status message as this node logs, stores or shows it: the peer chose its
/// words, so line breaks and other control characters become spaces (one entry stays
/// one line in logs) and it is bounded like this node's own messages.
pub fn peer_message(status: &Status) -> String {
    let words: String = status
        .message()
        .chars()
        // One more than fits, so that a longer message is marked as cut.
        .take(MAX_MESSAGE_LEN + 1)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("{} ({:?})", bounded_message(words), status.code())
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Self {
        Status::new(f.code, f.message)
    }
}

impl From<crate::storage::StoreError> for Failure {
    fn from(e: crate::storage::StoreError) -> Self {
        match e {
            // No fault: another request changed the same records at once. Worth asking
            // again, as the code says.
            crate::storage::StoreError::ReadAgain(_) => {
                Self::new(Code::Aborted, format!("{e}; ask again")).rule("concurrent-change")
            }
            e => Self::internal("storage failed", e),
        }
    }
}

/// How often a withdrawal or narrowing is carried out again, here, when what it read
/// changed before it could store its outcome ([`crate::storage::StoreError::ReadAgain`]:
/// two requests on one consent processed at once). After that the sender asks again.
const READ_AGAIN_ATTEMPTS: usize = 3;

/// Runs `attempt` until it does not fail with `Code::Aborted`, at most
/// [`READ_AGAIN_ATTEMPTS`] times.
async fn reading_again<T, F>(mut attempt: impl FnMut() -> F) -> Result<T, Failure>
where
    F: std::future::Future<Output = Result<T, Failure>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(failure) if failure.code == Code::Aborted && tries < READ_AGAIN_ATTEMPTS => {
                tracing::debug!(error = %failure.message, "what a request read changed before it was stored; reading again");
                tries += 1;
            }
            result => return result,
        }
    }
}

/// The gRPC code for each envelope refusal.
pub fn envelope_failure(e: EnvelopeError) -> Failure {
    let code = match &e {
        EnvelopeError::BadSignature => Code::Unauthenticated,
        EnvelopeError::SenderMismatch { .. } => Code::PermissionDenied,
        EnvelopeError::Expired { .. } => Code::FailedPrecondition,
        // Not final: the same envelope is taken once this node's clock catches up with
        // the sender's, so a clock ahead by minutes delays a referral rather than drop it.
        EnvelopeError::FromTheFuture { .. } => Code::Unavailable,
        EnvelopeError::Randomness => Code::Internal,
        _ => Code::InvalidArgument,
    };
    Failure::new(code, format!("envelope refused: {e}")).rule(e.rule())
}

/// The pseudonym under which this node's audit log names one of its own cases, and its
/// tracing logs too: a case id beside a purpose and a recipient would let whoever reads
/// the logs look the case up, where the pseudonym matches only audit entries.
fn local_pseudonym(node: &Node, case_id: &str) -> String {
    node.pairwise.case_ref(case_id, &node.org)
}

/// A fresh local id (of a case or a consent): 16 random bytes in hex after `prefix`.
fn random_id(prefix: &str) -> Result<String, Failure> {
    use ring::rand::SecureRandom as _;
    let mut id = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| Failure::internal("randomness unavailable", EnvelopeError::Randomness))?;
    Ok(format!("{prefix}-{}", hex::encode(id)))
}

fn parse_org(field: &str, value: &str) -> Result<OrgId, Failure> {
    OrgId::new(value).map_err(|e| Failure::invalid(format!("{field}: {e}")))
}

fn parse_purpose(value: &str) -> Result<Purpose, Failure> {
    Purpose::parse(value).map_err(|e| Failure::invalid(e.to_string()))
}

fn data_failure(e: corridor::at_rest::AtRestError) -> Failure {
    Failure::internal("encryption at rest failed", e)
}

pub async fn create_case(node: &Node, user: &User, label: &str) -> Result<String, Failure> {
    if label.len() > MAX_LABEL_LEN || label.chars().any(char::is_control) {
        return Err(Failure::invalid(format!(
            "label must be one line of at most {MAX_LABEL_LEN} bytes, without control characters"
        )));
    }
    let id = random_id("case")?;
    let (key, wrapped) = node.data_key.new_data_key(&id).map_err(data_failure)?;
    let label_sealed = key
        .encrypt(&id, "label", label.as_bytes())
        .map_err(data_failure)?;
    node.store
        .create_case(&id, &wrapped, &label_sealed, user.id, now_ms())
        .await?;
    tracing::info!(case = %local_pseudonym(node, &id), user = user.id, "case created");
    Ok(id)
}

fn bounded<'a>(what: &str, list: &'a [String]) -> Result<&'a [String], Failure> {
    if list.len() > MAX_CONSENT_LIST {
        return Err(Failure::invalid(format!(
            "a consent names at most {MAX_CONSENT_LIST} {what}"
        )));
    }
    Ok(list)
}

/// Validates a wire scope against the catalogue, the purposes and the directory.
fn parse_scope(node: &Node, id: &str, s: &pb::ConsentScope) -> Result<ConsentScope, Failure> {
    let purposes = bounded("purposes", &s.purposes)?
        .iter()
        .map(|p| parse_purpose(p))
        .collect::<Result<BTreeSet<_>, _>>()?;
    let mut recipient_orgs = BTreeSet::new();
    for r in bounded("recipients", &s.recipient_orgs)? {
        let org = parse_org("recipient", r)?;
        if node.directory.get(&org).is_none() {
            return Err(Failure::not_found(format!(
                "recipient {org} is not a member of the federation"
            )));
        }
        recipient_orgs.insert(org);
    }
    let mut recipient_roles = BTreeSet::new();
    for r in bounded("recipient roles", &s.recipient_roles)? {
        recipient_roles.insert(r.parse::<RoleInCountry>().map_err(Failure::invalid)?);
    }
    let fields = bounded("fields", &s.fields)?
        .iter()
        .map(|f| Field::parse(f).map_err(|e| Failure::invalid(e.to_string())))
        .collect::<Result<BTreeSet<_>, _>>()?;
    let mut excluded_countries = BTreeSet::new();
    for c in bounded("excluded countries", &s.excluded_countries)? {
        // The form here; whether ISO assigned it, where the scope is new
        // (`ConsentScope::check_new_country_codes`).
        if !corridor::country::has_country_code_form(c) {
            return Err(Failure::invalid(format!(
                "excluded country {c:?} is not an ISO 3166-1 alpha-2 code"
            )));
        }
        excluded_countries.insert(c.clone());
    }
    if purposes.is_empty() {
        return Err(Failure::invalid(
            "a consent must name at least one purpose (to take back every one, withdraw the consent)",
        ));
    }
    if recipient_orgs.is_empty() && recipient_roles.is_empty() {
        return Err(Failure::invalid(
            "a consent must name at least one recipient, org or role@country (to take back every one, withdraw the consent)",
        ));
    }
    if fields.is_empty() {
        return Err(Failure::invalid(
            "a consent must name at least one field (to take back every one, withdraw the consent)",
        ));
    }
    Ok(ConsentScope {
        id: id.to_owned(),
        purposes,
        recipient_orgs,
        recipient_roles,
        fields,
        restrictions: Restrictions {
            excluded_countries,
            no_family_contact: s.no_family_contact,
        },
        expires_at_ms: s.expires_at_ms,
        withdrawn_at_ms: None,
    })
}

fn join<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn scope_columns(s: &ConsentScope) -> ScopeColumns {
    ScopeColumns {
        purposes: join(&s.purposes),
        recipient_orgs: join(&s.recipient_orgs),
        recipient_roles: join(&s.recipient_roles),
        fields: join(&s.fields),
        excluded_countries: join(&s.restrictions.excluded_countries),
        no_family_contact: s.restrictions.no_family_contact,
        expires_at_ms: s.expires_at_ms,
    }
}

/// The scope of a stored consent. Stored values were validated when written.
fn scope_of(row: &ConsentRow) -> Result<ConsentScope, Failure> {
    let corrupt = |what: &str| Failure::internal("stored consent is corrupt", what);
    Ok(ConsentScope {
        id: row.id.clone(),
        purposes: row
            .purposes
            .iter()
            .map(|p| Purpose::parse(p).map_err(|_| corrupt("purpose")))
            .collect::<Result<_, _>>()?,
        recipient_orgs: row
            .recipient_orgs
            .iter()
            .map(|o| OrgId::new(o).map_err(|_| corrupt("recipient")))
            .collect::<Result<_, _>>()?,
        recipient_roles: row
            .recipient_roles
            .iter()
            .map(|r| r.parse().map_err(|_| corrupt("recipient role")))
            .collect::<Result<_, _>>()?,
        fields: row
            .fields
            .iter()
            .map(|f| Field::parse(f).map_err(|_| corrupt("field")))
            .collect::<Result<_, _>>()?,
        restrictions: Restrictions {
            excluded_countries: row.excluded_countries.iter().cloned().collect(),
            no_family_contact: row.no_family_contact,
        },
        expires_at_ms: row.expires_at_ms,
        withdrawn_at_ms: row.withdrawn_at_ms,
    })
}

/// Where a consent's details are sealed: under its case's data key, bound to the consent.
fn consent_details_record(consent_id: &str) -> String {
    format!("consent-details:{consent_id}")
}

/// The data key of one of this node's own cases.
async fn case_data_key(
    node: &Node,
    case_id: &str,
) -> Result<Option<corridor::at_rest::DataKey>, Failure> {
    let Some(wrapped) = node.store.case_key(case_id).await? else {
        return Ok(None);
    };
    node.data_key
        .unwrap_data_key(case_id, &wrapped)
        .map(Some)
        .map_err(data_failure)
}

/// Seals a consent's free-text details under its case's data key.
fn seal_consent_details(
    key: &corridor::at_rest::DataKey,
    case_id: &str,
    consent_id: &str,
    details: &ConsentDetails,
) -> Result<Vec<u8>, Failure> {
    let plaintext = serde_json::to_vec(details)
        .map_err(|e| Failure::internal("consent details not encoded", e))?;
    key.encrypt(case_id, &consent_details_record(consent_id), &plaintext)
        .map_err(data_failure)
}

/// Seals the details of consents recorded before details were sealed, and clears their
/// plaintext. Runs as the node starts.
pub async fn seal_legacy_consent_details(node: &Node) -> Result<usize, Failure> {
    let legacy = node.store.consents_with_plaintext_details().await?;
    for (consent_id, case_id, details) in &legacy {
        let key = case_data_key(node, case_id)
            .await?
            .ok_or_else(|| Failure::internal("a consent's case has no data key", consent_id))?;
        let sealed = seal_consent_details(&key, case_id, consent_id, details)?;
        node.store.seal_consent_details(consent_id, sealed).await?;
    }
    if !legacy.is_empty() {
        // So that the plaintext does not linger in the WAL's earlier frames.
        node.store.checkpoint().await?;
    }
    Ok(legacy.len())
}

/// A consent as the local API shows it; its sealed details (the guardian basis and the
/// language) opened only `with_details`, for a caller that asked to read them.
async fn consent_view(
    node: &Node,
    row: &ConsentRow,
    with_details: bool,
) -> Result<pb::ConsentView, Failure> {
    let details = match &row.details_sealed {
        _ if !with_details => ConsentDetails::default(),
        None => row.legacy_details.clone(),
        Some(sealed) => {
            let key = case_data_key(node, &row.case_id)
                .await?
                .ok_or_else(|| Failure::internal("a consent's case has no data key", &row.id))?;
            let plaintext = key
                .decrypt(&row.case_id, &consent_details_record(&row.id), sealed)
                .map_err(data_failure)?;
            serde_json::from_slice(&plaintext)
                .map_err(|e| Failure::internal("stored consent details are corrupt", e))?
        }
    };
    Ok(pb::ConsentView {
        consent_id: row.id.clone(),
        case_id: row.case_id.clone(),
        scope: Some(pb::ConsentScope {
            purposes: row.purposes.clone(),
            recipient_orgs: row.recipient_orgs.clone(),
            recipient_roles: row.recipient_roles.clone(),
            fields: row.fields.clone(),
            excluded_countries: row.excluded_countries.clone(),
            no_family_contact: row.no_family_contact,
            expires_at_ms: row.expires_at_ms,
        }),
        given_by: row.given_by.clone(),
        guardian_basis: details.guardian_basis,
        method: row.method.clone(),
        language: details.language,
        recorded_by: row.recorded_by.clone(),
        recorded_at_ms: row.recorded_at_ms,
        withdrawn_at_ms: row.withdrawn_at_ms.unwrap_or(0),
        narrowed_at_ms: row.narrowed_at_ms.unwrap_or(0),
    })
}

fn text_detail(what: &str, value: &str) -> Result<(), Failure> {
    if value.len() > MAX_CONSENT_TEXT || value.chars().any(char::is_control) {
        return Err(Failure::invalid(format!(
            "{what} must be one line of at most {MAX_CONSENT_TEXT} bytes, without control characters"
        )));
    }
    Ok(())
}

pub async fn record_consent(
    node: &Node,
    user: &User,
    req: pb::RecordConsentRequest,
) -> Result<String, Failure> {
    check_case_id(&req.case_id)?;
    let id = random_id("consent")?;
    let wire = req
        .scope
        .as_ref()
        .ok_or_else(|| Failure::invalid("consent scope is missing"))?;
    let mut scope = parse_scope(node, &id, wire)?;
    scope.expires_at_ms = consent::recorded_expiry(scope.expires_at_ms);
    scope
        .check_new_country_codes(None)
        .map_err(|e| Failure::invalid(e.to_string()))?;
    // A recipient named but never admitted is a mistake in the record, not a consent.
    scope
        .check_recipients(&node.org, |org| node.directory.get(org))
        .map_err(|e| Failure::invalid(e.to_string()))?;
    scope
        .check_purposes()
        .map_err(|e| Failure::invalid(e.to_string()))?;
    let given_by = match req.given_by.as_str() {
        "" | "person" => "person",
        "guardian" => "guardian",
        _ => {
            return Err(Failure::invalid(
                "given_by must be \"person\" or \"guardian\"",
            ));
        }
    };
    if given_by == "person" && !req.guardian_basis.trim().is_empty() {
        return Err(Failure::invalid(
            "a guardian basis is recorded only for consent given by a guardian",
        ));
    }
    if given_by == "guardian" && req.guardian_basis.trim().is_empty() {
        return Err(Failure::invalid(
            "consent given by a guardian must record the basis (e.g. parent of a minor)",
        ));
    }
    let method = match req.method.as_str() {
        "" | "written" => "written",
        m @ ("verbal" | "interpreter") => m,
        _ => {
            return Err(Failure::invalid(
                "method must be \"written\", \"verbal\" or \"interpreter\"",
            ));
        }
    };
    if method == "interpreter" && req.language.trim().is_empty() {
        return Err(Failure::invalid(
            "consent through an interpreter must record the language",
        ));
    }
    text_detail("guardian basis", &req.guardian_basis)?;
    text_detail("language", &req.language)?;
    let now = now_ms();
    if scope.expires_at_ms <= now {
        return Err(Failure::invalid(
            "consent expiry must fall on a later UTC day than today: a consent's expiry is kept to the start of its UTC day, so that recipients cannot match their records by it",
        ));
    }
    if scope.expires_at_ms > now.saturating_add(consent::MAX_CONSENT_LIFETIME_MS) {
        return Err(Failure::invalid(
            "consent expiry must be within ten years of its recording",
        ));
    }
    // Every case has its data key: a case without one does not exist.
    let key = case_data_key(node, &req.case_id)
        .await?
        .ok_or_else(|| Failure::not_found(format!("case {} not found", req.case_id)))?;
    let details = ConsentDetails {
        guardian_basis: req.guardian_basis.trim().to_owned(),
        language: req.language.trim().to_owned(),
    };
    let details_sealed = seal_consent_details(&key, &req.case_id, &id, &details)?;
    let entry = audit::encode(
        &Event::ConsentRecorded {
            consent_id: id.clone(),
            case: local_pseudonym(node, &req.case_id),
            user: user.id,
        },
        now,
    );
    node.store
        .record_consent(
            NewConsent {
                id: id.clone(),
                case_id: req.case_id.clone(),
                given_by: given_by.to_owned(),
                details_sealed,
                method: method.to_owned(),
                recorded_by: user.id,
                recorded_at_ms: now,
                scope: scope_columns(&scope),
            },
            entry,
        )
        .await?;
    tracing::info!(case = %local_pseudonym(node, &req.case_id), consent = %id, user = user.id, "consent recorded");
    Ok(id)
}

/// Refuses a case id of another form than the node gives out, without repeating it: it
/// may be anything, of any length.
fn check_case_id(id: &str) -> Result<(), Failure> {
    if corridor::caseref::is_case_id(id) {
        Ok(())
    } else {
        Err(Failure::invalid(
            "a case id is case- and 32 lowercase hex digits",
        ))
    }
}

/// As [`check_case_id`], for consent ids.
fn check_consent_id(id: &str) -> Result<(), Failure> {
    if consent::is_consent_id(id) {
        Ok(())
    } else {
        Err(Failure::invalid(
            "a consent id is consent- and 32 lowercase hex digits",
        ))
    }
}

async fn consent_row(node: &Node, id: &str) -> Result<ConsentRow, Failure> {
    check_consent_id(id)?;
    node.store
        .consent(id)
        .await?
        .ok_or_else(|| Failure::not_found(format!("consent {id} not found")))
}

/// A consent with its sealed details: a read the audit log records, as a read of a
/// received referral is.
pub async fn get_consent(node: &Node, user: &User, id: &str) -> Result<pb::ConsentView, Failure> {
    let row = consent_row(node, id).await?;
    let view = consent_view(node, &row, true).await?;
    node.store
        .append_audit(vec![audit::encode(
            &Event::ConsentDetailsRead {
                consent_id: row.id.clone(),
                case: local_pseudonym(node, &row.case_id),
                user: user.id,
            },
            now_ms(),
        )])
        .await?;
    Ok(view)
}

/// Narrows a consent; anything that would widen it is refused with what widens.
///
/// The narrowing is checked against the consent as read, and stored only if the consent
/// is still as read; if another narrowing (or a withdrawal) landed in between, it is
/// checked again against what is stored now, so two concurrent narrowings can never
/// together widen a consent. Referrals still queued under it are cancelled: they were
/// sealed under the wider scope (see [`crate::storage::Store::narrow_consent`]).
pub async fn narrow_consent(
    node: &Node,
    user: &User,
    req: pb::NarrowConsentRequest,
) -> Result<pb::ConsentView, Failure> {
    let wire = req
        .scope
        .as_ref()
        .ok_or_else(|| Failure::invalid("consent scope is missing"))?;
    for _ in 0..5 {
        let row = consent_row(node, &req.consent_id).await?;
        if row.withdrawn_at_ms.is_some() {
            return Err(Failure::precondition(
                "a withdrawn consent cannot be narrowed",
            ));
        }
        if let Some(read) = req.if_narrowed_at_ms
            && read != row.narrowed_at_ms.unwrap_or(0)
        {
            return Err(Failure::new(
                Code::Aborted,
                format!(
                    "consent {} was narrowed since it was read; read it and narrow it again",
                    row.id
                ),
            ));
        }
        let current = scope_of(&row)?;
        let mut narrower = parse_scope(node, &row.id, wire)?;
        // An earlier expiry is kept to the day; a later one stays as asked, for the check
        // below to refuse as a widening (one left as it was is kept to the day already).
        if narrower.expires_at_ms < current.expires_at_ms {
            narrower.expires_at_ms = consent::recorded_expiry(narrower.expires_at_ms);
        }
        narrower
            .check_new_country_codes(Some(&current))
            .map_err(|e| Failure::invalid(e.to_string()))?;
        // What all narrowings took away, unless one before this version did (not known).
        let removed_fields = match (&row.removed_fields, row.narrowed_at_ms) {
            (None, Some(_)) => None,
            (removed, _) => {
                let mut all: BTreeSet<String> = removed.iter().flatten().cloned().collect();
                all.extend(
                    current
                        .fields
                        .difference(&narrower.fields)
                        .map(|f| f.as_str().to_owned()),
                );
                Some(join(all))
            }
        };
        if narrower.expires_at_ms <= now_ms() {
            // Recipients would keep what they hold until their retention ends.
            return Err(Failure::invalid(
                "a narrowing cannot end the consent now (an expiry is kept to the start of its UTC day, so one within today ends it now): withdraw it instead, so that every recipient purges what it holds",
            ));
        }
        current
            .check_narrowing(&narrower)
            .map_err(|e| Failure::invalid(e.to_string()))?;
        let now = now_ms();
        let entry = audit::encode(
            &Event::ConsentNarrowed {
                consent_id: row.id.clone(),
                case: local_pseudonym(node, &row.case_id),
                user: user.id,
            },
            now,
        );
        if let Some(cancelled) = node
            .store
            .narrow_consent(
                &row.id,
                scope_columns(&narrower),
                row.narrowed_at_ms,
                removed_fields,
                ConsentTerms::of(&current) != ConsentTerms::of(&narrower),
                now,
                entry,
            )
            .await?
        {
            // An attempt about to send one of them notices, and does not.
            node.revocations.revoked();
            // Whoever waits for one of them learns now that it will not be attempted.
            for id in &cancelled {
                node.waiters.attempt_ended(*id, None);
            }
            // The narrowed scope now keeps referrals from recipients it no longer admits,
            // so who of them may hold data is fixed: ask them to purge.
            let asked = ask_to_purge(node, &row.id, Some(user.id), None)
                .await
                .map_err(|failure| {
                    // Not Aborted even if that was the cause: narrowing again would not help.
                    Failure::new(
                        Code::Internal,
                        format!(
                            "consent {} is narrowed, but its recipients could not all be asked to carry it out ({}): `corridor consent restate {}` asks them again, as the node does when it starts",
                            row.id, failure.message, row.id
                        ),
                    )
                })?;
            tracing::info!(consent = %row.id, user = user.id, cancelled = cancelled.len(), asked, "consent narrowed");
            return consent_view(node, &consent_row(node, &row.id).await?, false).await;
        }
    }
    Err(Failure::new(
        Code::Aborted,
        format!(
            "consent {} kept changing while it was narrowed; narrow it again",
            req.consent_id
        ),
    ))
}

fn check_fields(fields: &HashMap<String, String>) -> Result<BTreeSet<Field>, Failure> {
    if fields.len() > MAX_FIELDS {
        return Err(Failure::invalid(format!(
            "a referral carries at most {MAX_FIELDS} fields"
        )));
    }
    let mut names = BTreeSet::new();
    for (name, value) in fields {
        let field = Field::parse(name).map_err(|e| Failure::invalid(e.to_string()))?;
        field
            .check_entered_value(value, now_ms())
            .map_err(|e| Failure::invalid(e.to_string()))?;
        names.insert(field);
    }
    Ok(names)
}

fn member<'a>(node: &'a Node, org: &OrgId) -> Result<&'a Member, Failure> {
    node.directory.get(org).ok_or_else(|| {
        Failure::not_found(format!("recipient {org} is not a member of the federation"))
    })
}

fn envelope_ttl_ms(node: &Node) -> i64 {
    i64::try_from(node.config.delivery.envelope_ttl_hours)
        .unwrap_or(72)
        .saturating_mul(3_600_000)
}

/// Seals and signs a payload into an envelope for `recipient`.
fn seal(
    node: &Node,
    kind: MessageKind,
    recipient: &Member,
    payload: &[u8],
    now: i64,
    ttl_ms: i64,
) -> Result<Envelope, Failure> {
    let message_id =
        MessageId::new(now).map_err(|e| Failure::internal("randomness unavailable", e))?;
    let header = EnvelopeHeader {
        version: ENVELOPE_VERSION,
        message_id,
        kind,
        sender: node.org.clone(),
        recipient: recipient.id.clone(),
        route: Vec::new(),
        created_at_ms: now,
        expires_at_ms: now.saturating_add(ttl_ms),
    };
    Envelope::seal(header, payload, &recipient.sealing_key, &node.signing_key).map_err(
        |e| match e {
            EnvelopeError::Seal(corridor::SealError::PayloadTooLarge(_)) => {
                Failure::invalid(format!(
                    "referral is larger than {} bytes",
                    corridor::MAX_PAYLOAD_LEN
                ))
            }
            other => Failure::internal("sealing failed", other),
        },
    )
}

/// A referral durably queued.
pub struct Queued {
    pub id: MessageId,
    /// Its status as queued.
    pub status: pb::GetReferralStatusResponse,
    /// If the caller asked to wait: resolves when the first attempt to deliver it ends.
    /// Registered before the referral could be attempted, so that end cannot be missed.
    pub first_attempt: Option<tokio::sync::oneshot::Receiver<Option<Delivered>>>,
}

/// Gates, seals, signs and queues a referral. Answers once it is durably queued.
///
/// The consents are read (perhaps from the store's cache) before the referral is sealed,
/// and the transaction that queues it checks that the chosen consent is still as read:
/// if it was withdrawn or narrowed meanwhile, the referral is gated and sealed again from
/// a fresh read, so nothing leaves under a scope that no longer holds.
pub async fn send_referral(
    node: &Node,
    user: &User,
    req: pb::SendReferralRequest,
) -> Result<Queued, Failure> {
    check_case_id(&req.case_id)?;
    if !req.consent_id.is_empty() {
        check_consent_id(&req.consent_id)?;
    }
    let recipient_id = parse_org("recipient", &req.recipient)?;
    let recipient = member(node, &recipient_id)?;
    if recipient_id == node.org {
        return Err(Failure::invalid("a node cannot refer a case to itself"));
    }
    let purpose = parse_purpose(&req.purpose)?;
    let field_names = check_fields(&req.fields)?;
    let request_key = request_key(node, user, &req.request_id)?;
    // Only a request with a key is ever compared with a retry.
    let request_digest = request_key.as_ref().map(|_| {
        node.pairwise.request_digest(
            &req.case_id,
            &recipient_id,
            &req.purpose,
            &req.consent_id,
            req.fields.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
    });
    if let Some(key) = &request_key
        && let Some(first) = node.store.requested_referral(key).await?
    {
        return already_queued(node, &req, request_digest.as_ref(), first).await;
    }
    // Who is a member, in which role and country, is no longer known: the gate cannot
    // be run, and the node would send nothing anyway. (A retry above still learns what
    // became of the referral its request made.)
    if !node.directory.is_current(now_ms()) {
        return Err(Failure::precondition(format!(
            "this node's federation directory expired at {}: nothing can be sent until the operator installs a newer one",
            corridor::utc::format(node.directory.expires_at_ms)
        )));
    }
    let mut fresh = false;
    loop {
        let mut sealed =
            match gate_and_seal(node, user, &req, recipient, purpose, &field_names, fresh).await {
                Ok(sealed) => sealed,
                // The consents came from the cache, which may lag a consent just recorded
                // (its clearing runs after the commit): refuse only on a fresh read.
                Err(failure)
                    if !fresh
                        && matches!(failure.code, Code::FailedPrecondition | Code::NotFound) =>
                {
                    fresh = true;
                    continue;
                }
                Err(failure) => return Err(failure),
            };
        sealed.item.request_key.clone_from(&request_key);
        sealed.item.request_digest = request_digest.map(|d| d.to_vec());
        let (message_id, consent_id) = (sealed.item.message_id, sealed.item.consent_id.clone());
        let created_at_ms = sealed.item.created_at_ms;
        let due = crate::delivery::Noted {
            item: sealed.item.due(),
            // Before the transaction that queues it: a narrowing or withdrawal that ends it
            // after that moves the count.
            revocations: node.revocations.current(),
        };
        let mut first_attempt = req.wait.then(|| node.waiters.wait(message_id));
        let outcome = node
            .store
            .enqueue(sealed.item, sealed.consent_narrowed_at_ms, sealed.audit)
            .await;
        if !matches!(outcome, Ok(Enqueued::Queued)) {
            // Never queued, so no attempt will end it: drop the registration now.
            drop(first_attempt.take());
            node.waiters.forget(message_id);
        }
        match outcome? {
            Enqueued::Queued => {
                if !node.handoff.offer(due) {
                    node.outbox_ready.notify_one();
                }
                tracing::info!(referral = %message_id, case = %local_pseudonym(node, &req.case_id), recipient = %recipient_id, %purpose, "referral queued");
                return Ok(Queued {
                    id: message_id,
                    status: pb::GetReferralStatusResponse {
                        referral_id: message_id.to_hex(),
                        recipient: recipient_id.to_string(),
                        purpose: purpose.as_str().to_owned(),
                        state: "queued".into(),
                        attempts: 0,
                        last_error: String::new(),
                        created_at_ms,
                        receipt: None,
                        since_delivered: String::new(),
                    },
                    first_attempt,
                });
            }
            // The consents read were stale: gate again on what is stored now.
            Enqueued::ConsentWithdrawn | Enqueued::ConsentChanged if !fresh => fresh = true,
            Enqueued::ConsentWithdrawn => {
                return Err(Failure::precondition(format!(
                    "referral refused: consent {consent_id} was withdrawn"
                )));
            }
            Enqueued::AlreadyQueued(first) => {
                return already_queued(node, &req, request_digest.as_ref(), first).await;
            }
            Enqueued::ConsentChanged => {
                return Err(Failure::new(
                    Code::Aborted,
                    format!(
                        "consent {consent_id} changed while the referral was sent; send it again"
                    ),
                ));
            }
        }
    }
}

/// Longest request id a caller may give, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// The key under which a referral with `request_id` is queued: per user, so that one
/// user's ids never collide with another's, and keyed, so that the id is not stored
/// ([`corridor::PairwiseKey::request_key`]). `None` if the caller gave none.
fn request_key(node: &Node, user: &User, request_id: &str) -> Result<Option<String>, Failure> {
    if request_id.is_empty() {
        return Ok(None);
    }
    if request_id.len() > MAX_REQUEST_ID_LEN || !request_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Failure::invalid(format!(
            "request_id must be 1-{MAX_REQUEST_ID_LEN} printable ASCII characters without spaces"
        )));
    }
    Ok(Some(node.pairwise.request_key(user.id, request_id)))
}

/// Replaces the request ids stored before they were keyed with their keys. Runs as the
/// node starts.
pub async fn key_legacy_request_ids(node: &Node) -> Result<usize, Failure> {
    let legacy = node.store.legacy_request_keys().await?;
    for stored in &legacy {
        let Some((user, request_id)) = stored.split_once(':') else {
            continue;
        };
        let Ok(user) = user.parse::<i64>() else {
            continue;
        };
        let keyed = node.pairwise.request_key(user, request_id);
        node.store.replace_request_key(stored, &keyed).await?;
    }
    if !legacy.is_empty() {
        // So that the ids do not linger in the WAL's earlier frames.
        node.store.checkpoint().await?;
    }
    Ok(legacy.len())
}

/// The answer to a retried `SendReferral`: the referral its first call queued, if this
/// call asks for the same one.
async fn already_queued(
    node: &Node,
    req: &pb::SendReferralRequest,
    request_digest: Option<&[u8; 32]>,
    first: crate::storage::RequestedReferral,
) -> Result<Queued, Failure> {
    if (
        first.case_id.as_str(),
        first.recipient.as_str(),
        first.purpose.as_str(),
    ) != (
        req.case_id.as_str(),
        req.recipient.as_str(),
        req.purpose.as_str(),
    ) {
        return Err(Failure::new(
            Code::AlreadyExists,
            "request_id was used before for a referral of another case, recipient or purpose",
        ));
    }
    // The fields the caseworker corrected must not be dropped in silence.
    if first
        .request_digest
        .as_deref()
        .zip(request_digest)
        .is_some_and(|(first, now)| first != now.as_slice())
    {
        return Err(Failure::new(
            Code::AlreadyExists,
            "request_id was used before for a referral with other fields or another consent; send the new one with a request_id of its own",
        ));
    }
    let status = node
        .store
        .outbox_status(first.message_id)
        .await?
        .ok_or_else(|| Failure::internal("a requested referral has no status", first.message_id))
        .and_then(|s| {
            convert::outbox_status_to_pb(s)
                .map_err(|e| Failure::internal("stored receipt is corrupt", e))
        })?;
    tracing::info!(referral = %first.message_id, "retried request answered with the referral it queued");
    Ok(Queued {
        id: first.message_id,
        status,
        first_attempt: None,
    })
}

/// A referral gated and sealed, ready to be queued.
struct SealedReferral {
    item: NewOutboxItem,
    /// The chosen consent's last narrowing as read: it must be unchanged when queued.
    consent_narrowed_at_ms: Option<i64>,
    audit: Vec<u8>,
}

/// Runs the consent gate over the case's consents (`fresh`: read past the cache), then
/// builds, seals and signs the referral under the consent that allows it.
async fn gate_and_seal(
    node: &Node,
    user: &User,
    req: &pb::SendReferralRequest,
    recipient: &Member,
    purpose: Purpose,
    field_names: &BTreeSet<Field>,
    fresh: bool,
) -> Result<SealedReferral, Failure> {
    let recipient_id = &recipient.id;
    let now = now_ms();
    let rows = node.store.consents_for_case(&req.case_id, fresh).await?;
    // A case with consents exists (foreign key); only an empty answer needs a second look.
    if rows.is_empty() && !node.store.case_exists(&req.case_id).await? {
        return Err(Failure::not_found(format!(
            "case {} not found",
            req.case_id
        )));
    }
    let rows: Vec<_> = if req.consent_id.is_empty() {
        rows
    } else {
        let chosen: Vec<_> = rows
            .into_iter()
            .filter(|r| r.id == req.consent_id)
            .collect();
        if chosen.is_empty() {
            return Err(Failure::not_found(format!(
                "consent {} is not a consent of case {}",
                req.consent_id, req.case_id
            )));
        }
        chosen
    };
    let scopes = rows.iter().map(scope_of).collect::<Result<Vec<_>, _>>()?;
    let consent = consent::gate_case(&scopes, recipient, purpose, field_names, now).map_err(
        |refusal| {
            // A refusal from the cache is read again fresh before it stands: log it once.
            if fresh {
                tracing::info!(case = %local_pseudonym(node, &req.case_id), recipient = %recipient_id, %purpose, rules = %refusal.rules(), "referral refused by the consent gate");
            }
            Failure::precondition(format!("referral refused: {refusal}"))
        },
    )?;
    let consent_narrowed_at_ms = rows
        .iter()
        .find(|r| r.id == consent.id)
        .and_then(|r| r.narrowed_at_ms);
    // Sealed after the narrowing it was gated under, by the clock too: a recipient that
    // carried out that narrowing refuses what was sealed at or before it (referrals the
    // narrowing cancelled while they were on their way).
    let now = corridor::envelope::stamp(now, consent_narrowed_at_ms.map(|at| at.saturating_add(1)));

    let case_ref = node.pairwise.case_ref(&req.case_id, recipient_id);
    let consent_ref = node.pairwise.consent_ref(&consent.id, recipient_id);
    let consent_receipt = ConsentReceipt::issue(
        &consent.disclosed_by(purpose, field_names),
        consent_ref.clone(),
        node.org.clone(),
        recipient_id.clone(),
        case_ref.clone(),
        now,
        &node.signing_key,
    );
    let mut fields: Vec<_> = req.fields.iter().collect();
    fields.sort();
    let payload = pb::ReferralPayload {
        case_ref: case_ref.clone(),
        purpose: purpose.as_str().to_owned(),
        fields: fields
            .into_iter()
            .filter_map(|(name, value)| {
                Field::parse(name).ok().map(|f| pb::FieldValue {
                    field: convert::field_to_pb(f),
                    value: value.clone(),
                })
            })
            .collect(),
        consent_receipt: Some(convert::consent_receipt_to_pb(&consent_receipt)),
    }
    .encode_to_vec();
    let ttl = envelope_ttl_ms(node).min(consent.expires_at_ms.saturating_sub(now));
    let envelope = seal(node, MessageKind::Referral, recipient, &payload, now, ttl)?;
    let message_id = envelope.header.message_id;
    let audit = audit::encode(
        &Event::ReferralSent {
            message_id,
            recipient: recipient_id.clone(),
            purpose: purpose.as_str().to_owned(),
            case: local_pseudonym(node, &req.case_id),
            consent_id: consent.id.clone(),
            user: user.id,
        },
        now,
    );
    let item = NewOutboxItem {
        message_id,
        kind: MessageKind::Referral.as_i32().into(),
        case_id: req.case_id.clone(),
        consent_id: consent.id.clone(),
        consent_ref,
        recipient: recipient_id.clone(),
        purpose: purpose.as_str().to_owned(),
        case_ref,
        envelope: convert::envelope_to_pb(&envelope).encode_to_vec(),
        envelope_digest: envelope.digest(),
        created_by: user.id,
        created_at_ms: now,
        expires_at_ms: envelope.header.expires_at_ms,
        request_key: None,
        request_digest: None,
        // What it disclosed, so that a narrowing can tell the recipient what to keep.
        fields: Some(join(field_names.iter().map(|f| f.as_str()))),
        narrowed_at_ms: None,
    };
    Ok(SealedReferral {
        item,
        consent_narrowed_at_ms,
        audit,
    })
}

/// Withdraws a consent: nothing more leaves under it, queued referrals are cancelled,
/// and every org that may hold data under it gets a withdrawal to purge it.
///
/// Two steps, so that no stream of sends can hold a withdrawal up: the consent is marked
/// withdrawn first, which fixes who may hold data under it (no referral can be queued
/// under it any more); then each of those recipients is sent a withdrawal. Should the
/// second step fail (a full disk, say), withdrawing again sends those not yet sent; should
/// the node stop in between, it sends them when it starts again.
pub async fn withdraw_consent(
    node: &Node,
    user: &User,
    consent_id: &str,
) -> Result<pb::ConsentStatusResponse, Failure> {
    let row = consent_row(node, consent_id).await?;
    if row.withdrawn_at_ms.is_some() {
        let asked = ask_to_purge(node, consent_id, Some(user.id), None).await?;
        if asked > 0 {
            tracing::info!(consent = %consent_id, user = user.id, recipients = asked, "withdrawn consent: recipients not asked before now asked");
        }
        return consent_status(node, consent_id).await;
    }
    let now = now_ms();
    let entry = {
        let (consent_id, case, user) = (
            consent_id.to_owned(),
            local_pseudonym(node, &row.case_id),
            user.id,
        );
        Box::new(move |recipients| {
            audit::encode(
                &Event::ConsentWithdrawn {
                    consent_id: consent_id.clone(),
                    case: case.clone(),
                    user,
                    recipients,
                },
                now,
            )
        })
    };
    // A call that finds it withdrawn already leaves the asking to the one that did.
    if let Withdrawal::Withdrawn(cancelled) =
        node.store.withdraw_consent(consent_id, now, entry).await?
    {
        // An attempt about to send a referral it ended notices, and does not.
        node.revocations.revoked();
        // Whoever waits for one of them learns now that it ended.
        for id in &cancelled {
            node.waiters.attempt_ended(*id, None);
        }
        let asked = ask_to_purge(node, consent_id, Some(user.id), None).await?;
        tracing::info!(consent = %consent_id, user = user.id, recipients = asked, "consent withdrawn");
    }
    consent_status(node, consent_id).await
}

/// Recipients with a withdrawal of `consent_id` on its way or answered.
async fn recipients_asked_to_purge(
    node: &Node,
    consent_id: &str,
) -> Result<BTreeSet<String>, Failure> {
    Ok(node
        .store
        .outbox_for_consent(consent_id)
        .await?
        .into_iter()
        .filter(|item| {
            item.kind == i64::from(MessageKind::ConsentWithdrawal.as_i32())
                && matches!(item.state.as_str(), "queued" | "delivered")
        })
        .map(|item| item.recipient)
        .collect())
}

/// Whom a withdrawal or narrowing is for, and under which consent.
struct PurgeRequestFor<'a> {
    case_id: &'a str,
    consent_id: &'a str,
    /// The consent's id at the recipient.
    consent_ref: &'a str,
    /// The case's reference at the recipient.
    case_ref: &'a str,
    /// The user who withdrew or narrowed the consent.
    by: i64,
}

/// What one withdrawal envelope says, and for whom it is queued.
struct WithdrawalOf<'a> {
    to: PurgeRequestFor<'a>,
    /// The referrals sent there under the consent.
    referrals: &'a [MessageId],
}

/// A withdrawal for `recipient`, sealed and signed, ready to queue.
fn withdrawal_item(
    node: &Node,
    recipient: &Member,
    w: WithdrawalOf<'_>,
    now: i64,
) -> Result<NewOutboxItem, Failure> {
    let payload = pb::ConsentWithdrawal {
        consent_id: w.to.consent_ref.to_owned(),
        case_ref: w.to.case_ref.to_owned(),
        referral_ids: w.referrals.iter().map(|i| i.0.to_vec()).collect(),
        // Not sent: the same to the millisecond for every recipient, it would let them
        // link their records, and none needs it (each dates the withdrawal by its arrival).
        withdrawn_at_ms: 0,
    }
    .encode_to_vec();
    purge_request_item(
        node,
        recipient,
        MessageKind::ConsentWithdrawal,
        &payload,
        w.to,
        None,
        now,
    )
}

/// What a narrowing asks of one recipient: the referrals it may keep only some fields
/// of, and those it may keep nothing of.
#[derive(Debug, Default, PartialEq, Eq)]
struct NarrowingOf {
    kept: Vec<(MessageId, BTreeSet<Field>)>,
    purged: Vec<MessageId>,
}

impl NarrowingOf {
    fn cuts_something(&self) -> bool {
        !self.kept.is_empty() || !self.purged.is_empty()
    }

    /// What each referral discloses once the recipient has done as asked (the fields it
    /// keeps; none, for one it purges), recorded at the sender once its purge receipt is
    /// verified: a later narrowing then asks only for what it takes away itself.
    fn disclosed_after(&self) -> Vec<(MessageId, String)> {
        self.kept
            .iter()
            .map(|(id, fields)| (*id, join(fields.iter().map(|f| f.as_str()))))
            .chain(self.purged.iter().map(|id| (*id, String::new())))
            .collect()
    }

    /// As stored with the narrowing's envelope (which only the recipient can open), so
    /// that a renewal asks the same: `id=field,field` for a referral cut, `id=` for one
    /// purged, separated by spaces. Identifiers and field names only.
    fn to_stored(&self) -> String {
        let kept = self.kept.iter().map(|(id, fields)| {
            let names: Vec<&str> = fields.iter().map(|f| f.as_str()).collect();
            format!("{}={}", id.to_hex(), names.join(","))
        });
        let purged = self.purged.iter().map(|id| format!("{}=", id.to_hex()));
        kept.chain(purged).collect::<Vec<_>>().join(" ")
    }

    /// What [`NarrowingOf::to_stored`] stored; `None` if it does not parse.
    fn from_stored(stored: &str) -> Option<Self> {
        let mut n = Self::default();
        for item in stored.split_whitespace() {
            let (id, names) = item.split_once('=')?;
            let id = MessageId::from_hex(id).ok()?;
            if names.is_empty() {
                n.purged.push(id);
            } else {
                let fields = names
                    .split(',')
                    .map(Field::parse)
                    .collect::<Result<BTreeSet<Field>, _>>()
                    .ok()?;
                n.kept.push((id, fields));
            }
        }
        Some(n)
    }
}

/// What `recipient` may keep, under the narrowed `scope`, of the referrals it was sent
/// (nothing to cut, if it may keep them all as they are); `None` if it holds none of them
/// any more, as an earlier narrowing asked. A stored value that does not parse
/// (which only a damaged database holds) does not stop the asking: a purpose asks to
/// purge; field names count as not recorded.
fn narrowing_of(
    scope: &ConsentScope,
    recipient: &Member,
    referrals: &[SentReferral],
) -> Option<NarrowingOf> {
    let mut n = NarrowingOf::default();
    let mut holds = false;
    for sent in referrals {
        let disclosed = match sent.fields.as_deref() {
            // Purged already, as an earlier narrowing asked.
            Some("") => continue,
            Some(names) => names
                .split_whitespace()
                .map(Field::parse)
                .collect::<Result<BTreeSet<Field>, _>>()
                .ok(),
            None => None,
        };
        let after = match Purpose::parse(&sent.purpose) {
            Ok(purpose) => scope.after_narrowing(recipient, purpose, disclosed.as_ref()),
            Err(_) => AfterNarrowing::Purge,
        };
        match after {
            AfterNarrowing::Unchanged => {}
            AfterNarrowing::Keep(fields) => n.kept.push((sent.message_id, fields)),
            AfterNarrowing::Purge => n.purged.push(sent.message_id),
        }
        holds = true;
    }
    holds.then_some(n)
}

/// A narrowing for `recipient`, sealed and signed, ready to queue.
fn narrowing_item(
    node: &Node,
    recipient: &Member,
    to: PurgeRequestFor<'_>,
    n: &NarrowingOf,
    (narrowed_at_ms, terms): (i64, &ConsentTerms),
    now: i64,
) -> Result<NewOutboxItem, Failure> {
    let payload = pb::ConsentNarrowing {
        consent_id: to.consent_ref.to_owned(),
        case_ref: to.case_ref.to_owned(),
        kept: n
            .kept
            .iter()
            .map(|(id, fields)| pb::KeptFields {
                referral_id: id.0.to_vec(),
                fields: fields.iter().map(|f| convert::field_to_pb(*f)).collect(),
            })
            .collect(),
        purged_referral_ids: n.purged.iter().map(|i| i.0.to_vec()).collect(),
        narrowed_at_ms,
        terms: Some(convert::consent_terms_to_pb(terms)),
        terms_key: node
            .pairwise
            .terms_key(to.consent_ref, &recipient.id, narrowed_at_ms)
            .to_vec(),
    }
    .encode_to_vec();
    let mut item = purge_request_item(
        node,
        recipient,
        MessageKind::ConsentNarrowing,
        &payload,
        to,
        Some(narrowed_at_ms),
        now,
    )?;
    item.fields = Some(n.to_stored());
    Ok(item)
}

/// A withdrawal or narrowing envelope for `recipient`, sealed and signed, ready to queue.
fn purge_request_item(
    node: &Node,
    recipient: &Member,
    kind: MessageKind,
    payload: &[u8],
    to: PurgeRequestFor<'_>,
    narrowed_at_ms: Option<i64>,
    now: i64,
) -> Result<NewOutboxItem, Failure> {
    // Dated no earlier than the narrowing it carries out: the recipient dates the
    // narrowing no later than its envelope.
    let now = corridor::envelope::stamp(now, narrowed_at_ms);
    // They live as long as any envelope may, and are renewed when that ends.
    let e = seal(node, kind, recipient, payload, now, MAX_LIFETIME_MS)?;
    Ok(NewOutboxItem {
        message_id: e.header.message_id,
        kind: kind.as_i32().into(),
        case_id: to.case_id.to_owned(),
        consent_id: to.consent_id.to_owned(),
        consent_ref: to.consent_ref.to_owned(),
        recipient: recipient.id.clone(),
        purpose: String::new(),
        case_ref: to.case_ref.to_owned(),
        envelope: convert::envelope_to_pb(&e).encode_to_vec(),
        envelope_digest: e.digest(),
        created_by: to.by,
        created_at_ms: now,
        expires_at_ms: e.header.expires_at_ms,
        request_key: None,
        request_digest: None,
        fields: None,
        narrowed_at_ms,
    })
}

/// Records, once a narrowing's purge receipt is verified, what each referral it named
/// discloses now, so that a later narrowing asks only for what it takes away itself.
/// Until then (and if this fails) a later narrowing asks again for what this one did,
/// which the recipient has nothing left to do for.
pub async fn narrowing_done(node: &Node, id: MessageId) -> Result<(), Failure> {
    let asked = node
        .store
        .narrowing_request(id)
        .await?
        .and_then(|stored| NarrowingOf::from_stored(&stored))
        .ok_or_else(|| Failure::internal("a delivered narrowing's request is not stored", id))?;
    node.store.record_disclosed(asked.disclosed_after()).await?;
    Ok(())
}

/// Renews a withdrawal or narrowing whose envelope expired undelivered (its recipient
/// was away for longer than an envelope may live), or that its recipient kept refusing:
/// the same request in a new envelope is queued in the transaction that ends the old one,
/// so the recipient is asked until it purges. Returns the new envelope's id, or `None` if
/// the old one was no longer queued.
pub async fn renew_withdrawal(
    node: &Node,
    expired: MessageId,
    why: crate::storage::Renewal,
) -> Result<Option<MessageId>, Failure> {
    let Some(old) = node.store.withdrawal_to_renew(expired).await? else {
        return Ok(None);
    };
    let consent = consent_row(node, &old.consent_id).await?;
    let recipient =
        OrgId::new(&old.recipient).map_err(|e| Failure::internal("stored recipient", e))?;
    let Some(member) = node.directory.get(&recipient) else {
        return Err(Failure::precondition(format!(
            "{recipient} is no longer a member and cannot be asked to purge"
        )));
    };
    let to = PurgeRequestFor {
        case_id: &old.case_id,
        consent_id: &old.consent_id,
        consent_ref: &old.consent_ref,
        case_ref: &old.case_ref,
        by: old.created_by,
    };
    let item = if old.kind == i64::from(MessageKind::ConsentNarrowing.as_i32()) {
        // The narrowing it carries out, which a later one does not change.
        let narrowed_at_ms = old
            .narrowed_at_ms
            .ok_or_else(|| Failure::internal("a queued narrowing names no narrowing", expired))?;
        // The same request again, as stored with it (a later narrowing asks for its
        // own part itself).
        let n = old
            .fields
            .as_deref()
            .and_then(NarrowingOf::from_stored)
            .ok_or_else(|| {
                Failure::internal("a queued narrowing's request is not stored", expired)
            })?;
        // The terms as they stand now: a later narrowing only ever tightens them.
        let terms = ConsentTerms::of(&scope_of(&consent)?);
        narrowing_item(node, member, to, &n, (narrowed_at_ms, &terms), now_ms())?
    } else {
        // A narrowing that took the recipient out of the consent withdrew it there.
        if consent.withdrawn_at_ms.or(consent.narrowed_at_ms).is_none() {
            return Err(Failure::internal(
                "a withdrawal is queued for a consent neither withdrawn nor narrowed",
                &old.consent_id,
            ));
        }
        let ids: Vec<MessageId> = node
            .store
            .referrals_under_consent(&old.consent_id)
            .await?
            .into_iter()
            .filter(|sent| sent.recipient == old.recipient && sent.consent_ref == old.consent_ref)
            .map(|sent| sent.message_id)
            .collect();
        withdrawal_item(
            node,
            member,
            WithdrawalOf {
                to,
                referrals: &ids,
            },
            now_ms(),
        )?
    };
    let renewed = item.message_id;
    if !node.store.renew_withdrawal(expired, item, why).await? {
        return Ok(None);
    }
    node.outbox_ready.notify_one();
    Ok(Some(renewed))
}

/// A consent with, per recipient, the referrals it got and whether it has purged them.
pub async fn consent_status(
    node: &Node,
    consent_id: &str,
) -> Result<pb::ConsentStatusResponse, Failure> {
    let row = consent_row(node, consent_id).await?;
    let mut recipients: std::collections::BTreeMap<String, pb::RecipientPurgeStatus> =
        Default::default();
    let mut asked_to_withdraw = BTreeSet::new();
    // Per recipient and consent id it knows: the latest narrowing it answered, with its
    // confirmation of the terms and the key that narrowing gave it to confirm them with;
    // `None` while the first narrowing asked of it is unanswered.
    type Confirmed = (Option<[u8; 32]>, [u8; 32]);
    let mut answered: BTreeMap<(String, String), Option<Confirmed>> = BTreeMap::new();
    for item in node.store.outbox_for_consent(consent_id).await? {
        let entry =
            recipients
                .entry(item.recipient.clone())
                .or_insert_with(|| pb::RecipientPurgeStatus {
                    recipient: item.recipient.clone(),
                    state: "not-withdrawn".into(),
                    ..Default::default()
                });
        if item.kind == i64::from(MessageKind::Referral.as_i32()) {
            entry
                .referral_ids
                .push(format!("{} ({})", item.message_id, item.state));
            entry.referrals.push(pb::ReferralDelivery {
                referral_id: item.message_id.to_string(),
                state: item.state.clone(),
            });
            continue;
        }
        // The latest narrowing asked of it shows, unless it was asked to purge everything.
        let narrowing = item.kind == i64::from(MessageKind::ConsentNarrowing.as_i32());
        if narrowing && asked_to_withdraw.contains(&item.recipient) {
            continue;
        }
        if !narrowing {
            asked_to_withdraw.insert(item.recipient.clone());
        }
        entry.attempts = u32::try_from(item.attempts).unwrap_or(u32::MAX);
        entry.last_error = item.last_error.clone().unwrap_or_default();
        // An earlier request's receipt does not answer this one: it stays as proof.
        entry.earlier_receipts.extend(entry.purge_receipt.take());
        entry.request = if narrowing { "narrowing" } else { "withdrawal" }.into();
        entry.request_state = item.state.clone();
        match item.purge_receipt.as_deref().map(pb::PurgeReceipt::decode) {
            Some(Ok(receipt)) => {
                if narrowing && let Ok(org) = OrgId::new(&item.recipient) {
                    let key = node.pairwise.terms_key(
                        &item.consent_ref,
                        &org,
                        item.narrowed_at_ms.unwrap_or_default(),
                    );
                    let confirmed = receipt.terms_confirmed.as_slice().try_into().ok();
                    answered.insert(
                        (item.recipient.clone(), item.consent_ref.clone()),
                        Some((confirmed, key)),
                    );
                }
                entry.state = if narrowing { "narrowed" } else { "purged" }.into();
                entry.request_state = "answered".into();
                entry.purge_receipt = Some(receipt);
            }
            _ => {
                if narrowing {
                    answered
                        .entry((item.recipient.clone(), item.consent_ref.clone()))
                        .or_insert(None);
                }
                entry.state = if narrowing {
                    format!("pending narrowing ({})", item.state)
                } else {
                    format!("pending ({})", item.state)
                };
            }
        }
    }
    // Every referral under the consent its recipient may hold (all but those it refused
    // at their first attempt), with what each still discloses.
    let sent_under = node.store.referrals_under_consent(consent_id).await?;
    if row.withdrawn_at_ms.is_some() {
        // Recipients that hold data but could not be asked: not members when the consent
        // was withdrawn (a narrowing they carried out before leaves them holding the
        // rest). They are asked when a directory brings them back. One that refused
        // every referral at its first attempt holds nothing.
        let may_hold: BTreeSet<&String> = sent_under.iter().map(|sent| &sent.recipient).collect();
        for (recipient, entry) in recipients.iter_mut() {
            if !may_hold.contains(recipient) {
                entry.state = "nothing to purge (it refused every referral)".into();
                continue;
            }
            if !asked_to_withdraw.contains(recipient) {
                entry.attempts = 0;
                entry.last_error.clear();
                entry.state =
                    "pending (not a member of the federation: asked if it returns)".into();
                entry.request = "withdrawal".into();
                entry.request_state = "not-a-member".into();
                // A narrowing's receipt does not answer the withdrawal.
                entry.earlier_receipts.extend(entry.purge_receipt.take());
            }
        }
    }
    // Whether a recipient whose latest request is a narrowing (answered or on its way)
    // confirmed the terms as they now stand, in the answers it gave, for everything it
    // still holds data under: the weakest of its latest answers under each consent id it
    // knows the consent by.
    let holding: BTreeSet<(&String, &String)> = sent_under
        .iter()
        .filter(|sent| sent.fields.as_deref() != Some(""))
        .map(|sent| (&sent.recipient, &sent.consent_ref))
        .collect();
    if let Ok(scope) = scope_of(&row) {
        let current = ConsentTerms::of(&scope);
        for (recipient, entry) in recipients.iter_mut() {
            if entry.request != "narrowing" {
                continue;
            }
            // Nothing is said while one of them has yet to answer its first narrowing.
            let answers: Option<Vec<TermsConfirmation>> = holding
                .iter()
                .filter(|(to, _)| *to == recipient)
                .filter_map(|(to, consent_ref)| {
                    answered.get(&((*to).clone(), (*consent_ref).clone()))
                })
                .map(|answer| {
                    answer
                        .as_ref()
                        .map(|(confirmed, key)| current.confirmation(key, confirmed.as_ref()))
                })
                .collect();
            if let Some(weakest) = answers.and_then(|all| all.into_iter().min()) {
                entry.terms_confirmation = weakest.as_str().into();
            }
        }
    }
    if row.withdrawn_at_ms.is_none() && row.narrowed_at_ms.is_some() {
        let scope = scope_of(&row)?;
        let removed: Option<BTreeSet<Field>> = row
            .removed_fields
            .as_ref()
            .map(|names| names.iter().filter_map(|f| Field::parse(f).ok()).collect());
        // The referrals a narrowing asks about (`narrowing_of`): all but refused ones.
        for sent in &sent_under {
            let member = OrgId::new(&sent.recipient)
                .ok()
                .and_then(|org| node.directory.get(&org));
            let kept_whole = sent.fields.is_none()
                && member.is_some_and(|m| {
                    Purpose::parse(&sent.purpose).is_ok_and(|purpose| {
                        scope.keeps_whole_beyond_consent(m, purpose, removed.as_ref())
                    })
                });
            if kept_whole && let Some(entry) = recipients.get_mut(&sent.recipient) {
                entry.kept_whole_referral_ids.push(sent.message_id.to_hex());
            }
        }
    }
    Ok(pb::ConsentStatusResponse {
        consent: Some(consent_view(node, &row, false).await?),
        recipients: recipients.into_values().collect(),
    })
}

/// Asks the recipients of a narrowed consent that hold data under it, have answered their
/// last request and have not confirmed its terms as they stand (they, or the request they
/// answered, predate confirmations, or a later change has yet to reach them) to confirm
/// them: a narrowing that restates the terms and asks for any cut still due. It carries
/// the consent's latest narrowing time, so it refuses nothing on its way that the latest
/// narrowing let through.
pub async fn restate_consent_terms(
    node: &Node,
    user: &User,
    consent_id: &str,
) -> Result<pb::RestateConsentTermsResponse, Failure> {
    let row = consent_row(node, consent_id).await?;
    if row.withdrawn_at_ms.is_some() {
        return Err(Failure::precondition(format!(
            "consent {consent_id} is withdrawn: its recipients were asked to purge everything"
        )));
    }
    if row.narrowed_at_ms.is_none() {
        return Err(Failure::precondition(format!(
            "consent {consent_id} was never narrowed: every referral under it stated its terms as they stand"
        )));
    }
    // Recipients the narrowing has not reached yet (asking them failed) are asked first.
    ask_to_purge(node, consent_id, Some(user.id), None).await?;
    let before = consent_status(node, consent_id).await?;
    let to: BTreeSet<String> = before
        .recipients
        .iter()
        .filter(|r| r.request_state == "answered" && r.terms_confirmation != "as-they-stand")
        .filter(|r| !r.terms_confirmation.is_empty())
        .map(|r| r.recipient.clone())
        .collect();
    if !to.is_empty() {
        ask_to_purge(node, consent_id, Some(user.id), Some(&to)).await?;
    }
    let status = consent_status(node, consent_id).await?;
    // Those now asked: a recipient no longer a member is not.
    let asked = status
        .recipients
        .iter()
        .filter(|r| to.contains(&r.recipient) && r.request_state != "answered")
        .map(|r| r.recipient.clone())
        .collect();
    tracing::info!(consent = %consent_id, user = user.id, recipients = to.len(), "consent terms restated");
    Ok(pb::RestateConsentTermsResponse {
        asked,
        status: Some(status),
    })
}

/// Asks to purge the recipients of withdrawn or narrowed consents that may hold data
/// under them, that the consent no longer admits, and that have no withdrawal on its
/// way or answered: the node stopped before it sent them, they were not members then,
/// or their withdrawal was refused while they were away. Runs as the node starts, which
/// is also when a newer directory may bring members back. Returns how many withdrawals
/// it queued.
pub async fn ask_outstanding_recipients_to_purge(node: &Node) -> Result<usize, Failure> {
    let consents: BTreeSet<String> = node
        .store
        .withdrawals_missing()
        .await?
        .into_iter()
        .map(|(consent_id, _)| consent_id)
        .collect();
    let mut queued = 0;
    for consent_id in consents {
        queued += ask_to_purge(node, &consent_id, None, None).await?;
    }
    Ok(queued)
}

/// Gates every referral still queued again, against the directory this node started
/// with: one queued under an earlier directory may be for a member whose entry changed
/// since (a role, or a country, its consent does not admit). Those no longer admitted are
/// cancelled, as a narrowing cancels what it no longer admits. The directory changes only
/// as a node starts, and runs as it starts. Returns how many it cancelled.
pub async fn cancel_referrals_no_longer_admitted(node: &Node) -> Result<usize, Failure> {
    let mut scopes: BTreeMap<String, Result<ConsentScope, Failure>> = BTreeMap::new();
    let mut cancelled = 0;
    for (id, consent_id, recipient, purpose) in node.store.queued_referrals().await? {
        // One that left the federation is not sent to either: delivery says so.
        let Some(member) = OrgId::new(&recipient)
            .ok()
            .and_then(|org| node.directory.get(&org))
        else {
            continue;
        };
        if !scopes.contains_key(&consent_id) {
            let scope = match consent_row(node, &consent_id).await {
                Ok(row) => scope_of(&row),
                Err(failure) => Err(failure),
            };
            scopes.insert(consent_id.clone(), scope);
        }
        // One that cannot be checked (its consent unreadable) does not leave either.
        let admitted = match (&scopes[&consent_id], parse_purpose(&purpose)) {
            (Ok(scope), Ok(purpose)) => Ok(scope.admits_for(member, purpose)),
            (Err(failure), _) => Err(failure.message.clone()),
            (_, Err(failure)) => Err(failure.message),
        };
        let reason = match admitted {
            Ok(true) => continue,
            Ok(false) => {
                tracing::warn!(referral = %id, %recipient, "queued referral cancelled: its consent no longer admits the recipient under the current directory");
                "the federation directory changed and the consent no longer admits the recipient for this purpose"
            }
            Err(error) => {
                tracing::error!(referral = %id, %error, "queued referral cannot be checked against the directory; cancelled");
                "it could not be checked against the federation directory the node started with"
            }
        };
        node.store.mark_final(id, "cancelled", reason).await?;
        cancelled += 1;
    }
    if cancelled > 0 {
        node.revocations.revoked();
    }
    Ok(cancelled)
}

/// Queues a withdrawal of `consent_id` for each recipient that may hold data under it,
/// is a member, has none on its way or answered, and that the consent no longer admits:
/// every recipient of a withdrawn consent; of a narrowed one, those it no longer admits
/// at all (the org, its role or country removed, a country it is in or acts for
/// excluded, or no purpose left its role may receive). Such a recipient purges what it
/// holds and refuses more under the consent.
///
/// A narrowing that leaves a recipient admitted asks it instead, once per narrowing, to
/// purge the referrals whose purpose the consent no longer covers and to cut from the
/// others the fields it no longer covers (a consent narrowing): a withdrawal would end
/// the consent there for good, also for what the person still agrees to.
///
/// `by` is the user who withdrew or narrowed it (or, when the node catches up at start,
/// each referral's sender). Returns how many envelopes it queued.
async fn ask_to_purge(
    node: &Node,
    consent_id: &str,
    by: Option<i64>,
    restate_to: Option<&BTreeSet<String>>,
) -> Result<usize, Failure> {
    let _one_at_a_time = node.asking_to_purge.lock().await;
    let row = consent_row(node, consent_id).await?;
    // When the consent was withdrawn, or last narrowed.
    let (changed_at_ms, scope) = match (row.withdrawn_at_ms, row.narrowed_at_ms) {
        (Some(at), _) => (at, None),
        (None, Some(at)) => (at, Some(scope_of(&row)?)),
        (None, None) => return Ok(0),
    };
    let asked_before = recipients_asked_to_purge(node, consent_id).await?;
    // Per recipient, the latest narrowing on its way to it or carried out there, which
    // restates the terms as they stood when it was made, and its first referral that may
    // have arrived: one whose referrals were all sealed after the terms changed holds
    // them in every referral's consent receipt.
    let mut narrowed_at: BTreeMap<String, i64> = BTreeMap::new();
    let mut first_sent_at: BTreeMap<String, i64> = BTreeMap::new();
    for item in node.store.outbox_for_consent(consent_id).await? {
        if item.kind == i64::from(MessageKind::ConsentNarrowing.as_i32())
            && matches!(item.state.as_str(), "queued" | "delivered")
            && let Some(at) = item.narrowed_at_ms
        {
            let latest = narrowed_at.entry(item.recipient).or_insert(at);
            *latest = (*latest).max(at);
        } else if item.kind == i64::from(MessageKind::Referral.as_i32()) && item.may_be_held() {
            let first = first_sent_at
                .entry(item.recipient)
                .or_insert(item.created_at_ms);
            *first = (*first).min(item.created_at_ms);
        }
    }
    let narrowed_before: BTreeSet<&String> = narrowed_at
        .iter()
        .filter(|(_, at)| Some(**at) == row.narrowed_at_ms)
        .map(|(recipient, _)| recipient)
        .collect();
    // One request per recipient and consent id it holds: a recipient of referrals
    // queued before consent ids became pairwise holds the consent's own id too.
    let mut per_recipient: BTreeMap<(String, String), Vec<SentReferral>> = BTreeMap::new();
    for sent in node.store.referrals_under_consent(consent_id).await? {
        if asked_before.contains(&sent.recipient) {
            continue;
        }
        per_recipient
            .entry((sent.recipient.clone(), sent.consent_ref.clone()))
            .or_default()
            .push(sent);
    }
    let mut items = Vec::new();
    for ((recipient, consent_ref), sent) in &per_recipient {
        let org = OrgId::new(recipient).map_err(|e| Failure::internal("stored recipient", e))?;
        let Some(member) = node.directory.get(&org) else {
            // Unless this narrowing was asked of it already, while it was a member.
            if scope.is_none() || !narrowed_before.contains(recipient) {
                tracing::warn!(recipient = %org, consent = %consent_id, "cannot ask a former member to purge; will ask if it returns");
            }
            continue;
        };
        let Some(first) = sent.first() else {
            continue;
        };
        let to = PurgeRequestFor {
            case_id: &row.case_id,
            consent_id,
            consent_ref,
            case_ref: &first.case_ref,
            by: by.unwrap_or(first.created_by),
        };
        match &scope {
            Some(scope) if scope.admits_recipient(member) => {
                let restating = restate_to.is_some_and(|to| to.contains(recipient));
                if narrowed_before.contains(recipient) && !restating {
                    continue;
                }
                // Told when it has something to cut, or terms no narrowing told it yet
                // (also one it was away for, or that a concurrent narrowing overtook).
                let untold_terms = row.terms_narrowed_at_ms.is_some_and(|changed| {
                    narrowed_at.get(recipient).is_none_or(|&at| at < changed)
                        && first_sent_at.get(recipient).is_none_or(|&at| at <= changed)
                });
                if let Some(n) = narrowing_of(scope, member, sent)
                    && (n.cuts_something() || untold_terms || restating)
                {
                    items.push(narrowing_item(
                        node,
                        member,
                        to,
                        &n,
                        (changed_at_ms, &ConsentTerms::of(scope)),
                        now_ms(),
                    )?);
                }
            }
            _ => {
                let ids: Vec<MessageId> = sent.iter().map(|s| s.message_id).collect();
                items.push(withdrawal_item(
                    node,
                    member,
                    WithdrawalOf {
                        to,
                        referrals: &ids,
                    },
                    now_ms(),
                )?);
            }
        }
    }
    let queued = items.len();
    if queued > 0 {
        node.store.queue_withdrawals(items).await?;
        node.outbox_ready.notify_one();
    }
    Ok(queued)
}

/// Decrypts a received referral for a local user.
pub async fn read_referral(
    node: &Node,
    user: &User,
    id: MessageId,
    sender: Option<&OrgId>,
) -> Result<pb::GetReferralResponse, Failure> {
    // A narrowing may renew the key between the reads of the referral, its key and its
    // terms: what does not open is read once more before it counts as unreadable.
    match read_referral_once(node, user, id, sender, false).await {
        Err(failure) if failure.code == Code::Aborted => {
            read_referral_once(node, user, id, sender, true).await
        }
        result => result,
    }
}

/// [`read_referral`], once; on the `last_try` what does not open is taken as it is.
async fn read_referral_once(
    node: &Node,
    user: &User,
    id: MessageId,
    sender: Option<&OrgId>,
    last_try: bool,
) -> Result<pb::GetReferralResponse, Failure> {
    let again = |failure: Failure| {
        if last_try {
            failure
        } else {
            Failure::new(Code::Aborted, "read again")
        }
    };
    let mut rows = node.store.inbox_items(id, sender).await?;
    if rows.len() > 1 {
        return Err(Failure::new(
            Code::FailedPrecondition,
            format!("referrals from more than one sender carry the id {id}: name the sender"),
        ));
    }
    let row = rows.pop().ok_or_else(|| {
        Failure::not_found(match sender {
            None => format!("no received referral {id} (never received, purged or past retention)"),
            Some(org) => format!(
                "no received referral {id} from {org} (never received, purged or past retention)"
            ),
        })
    })?;
    let wrapped = node
        .store
        .case_key(&row.case_key_id)
        .await?
        .ok_or_else(|| Failure::not_found(format!("referral {id} was purged")))?;
    let key = node
        .data_key
        .unwrap_data_key(&row.case_key_id, &wrapped)
        .map_err(data_failure)?;
    let plaintext = key
        .decrypt(&row.case_key_id, &id.to_hex(), &row.payload_sealed)
        .map_err(|e| again(data_failure(e)))?;
    let payload = pb::ReferralPayload::decode(plaintext.as_slice())
        .map_err(|e| Failure::internal("stored referral is corrupt", e))?;
    // What binds this node: the receipt the referral carried, and every narrowing since.
    let sent_with = ConsentTerms {
        restrictions: corridor::consent::Restrictions {
            excluded_countries: payload
                .consent_receipt
                .as_ref()
                .map(|r| r.excluded_countries.iter().cloned().collect())
                .unwrap_or_default(),
            no_family_contact: payload
                .consent_receipt
                .as_ref()
                .is_some_and(|r| r.no_family_contact),
        },
        expires_at_ms: row.consent_expires_at_ms,
    };
    let narrowed = node
        .store
        .narrowed_consent(&row.sender, &row.consent_id)
        .await?;
    let restated = match narrowed.as_ref().and_then(|n| n.terms.as_ref()) {
        // What cannot be read shows as not restated, not as a referral that cannot be read.
        Some(stored) => match open_terms(node, &row.consent_id, stored).await {
            Ok(terms) => terms,
            Err(failure) if !last_try => return Err(again(failure)),
            Err(failure) => {
                tracing::warn!(referral = %id, error = %failure.message, "stored consent terms cannot be read");
                None
            }
        },
        None => None,
    };
    // Current if a narrowing restated them, or the referral was sealed after the latest
    // narrowing that reached this node (its receipt states them as they were then).
    let receipt_issued_at_ms = payload
        .consent_receipt
        .as_ref()
        .map_or(0, |r| r.issued_at_ms);
    let terms_current = restated.is_some()
        || narrowed
            .as_ref()
            .is_some_and(|n| receipt_issued_at_ms > n.narrowed_at_ms);
    let terms = match &restated {
        Some(restated) => sent_with.and(restated),
        None => sent_with,
    };
    // No read of personal data without its audit entry.
    node.store
        .append_audit(vec![audit::encode(
            &Event::PersonalDataRead {
                message_id: id,
                sender: OrgId::new(&row.sender)
                    .map_err(|_| Failure::internal("stored referral is corrupt", "sender"))?,
                case: row.case_ref.clone(),
                user: user.id,
            },
            now_ms(),
        )])
        .await?;
    tracing::info!(referral = %id, case_ref = %row.case_ref, user = user.id, "personal data read");
    Ok(pb::GetReferralResponse {
        referral_id: id.to_hex(),
        sender: row.sender,
        recipient: node.org.to_string(),
        purpose: row.purpose,
        case_ref: row.case_ref,
        fields: payload
            .fields
            .into_iter()
            .filter_map(|fv| {
                convert::field_from_pb(fv.field).map(|f| (f.as_str().to_owned(), fv.value))
            })
            .collect(),
        received_at_ms: row.received_at_ms,
        consent_expires_at_ms: terms.expires_at_ms,
        consent_excluded_countries: terms.restrictions.excluded_countries.into_iter().collect(),
        consent_no_family_contact: terms.restrictions.no_family_contact,
        consent_narrowed_at_ms: narrowed.map_or(0, |n| n.narrowed_at_ms),
        consent_terms_restated: terms_current,
        consent_id: row.consent_id,
    })
}

/// Accepts an envelope from an authenticated peer: verifies every rule, answers a replay
/// with the answer it got the first time, opens the payload and handles it by kind,
/// committing before answering.
pub async fn receive_envelope(
    node: &Node,
    peer: &PeerInfo,
    envelope: pb::Envelope,
) -> Result<pb::DeliverResponse, Failure> {
    if let Err(spent) = node.refusals.admit(&peer.org, std::time::Instant::now()) {
        if let Some(turned_away) = spent.log {
            tracing::warn!(
                peer = %peer.org,
                turned_away,
                "envelopes turned away unexamined: too many of this member's were refused recently"
            );
        }
        node.metrics.envelope_answered(Some("turned-away"));
        return Err(Failure::new(
            Code::ResourceExhausted,
            format!(
                "too many envelopes from {} were refused recently; send again in {} s",
                peer.org,
                spent.wait.as_secs().max(1)
            ),
        ));
    }
    let message_id = envelope
        .header
        .as_ref()
        .and_then(|h| MessageId::from_bytes(&h.message_id).ok());
    let result = receive(node, peer, envelope).await;
    // Not refusals: a fault of this node, a request to ask again, or an envelope taken
    // once the clocks agree (its sender's tries must not spend the sender's budget or
    // each add an entry; the log says it once a try).
    if let Err(failure) = &result
        && failure.code == Code::Unavailable
    {
        tracing::warn!(peer = %peer.org, envelope = ?message_id.map(|id| id.to_hex()), rule = failure.rule, "envelope dated ahead of this node's clock: one of the two clocks is wrong");
    }
    if let Err(failure) = &result
        && !matches!(
            failure.code,
            Code::Internal | Code::Aborted | Code::Unavailable
        )
    {
        node.refusals.charge(&peer.org, std::time::Instant::now());
        let entry = audit::encode(
            &Event::EnvelopeRefused {
                message_id,
                sender: peer.org.clone(),
                rule: failure.rule.to_owned(),
            },
            now_ms(),
        );
        if let Err(error) = node.store.append_audit(vec![entry]).await {
            tracing::error!(%error, "could not log a refused envelope");
        }
    }
    node.metrics
        .envelope_answered(result.as_ref().err().map(|failure| failure.rule));
    result
}

async fn receive(
    node: &Node,
    peer: &PeerInfo,
    envelope: pb::Envelope,
) -> Result<pb::DeliverResponse, Failure> {
    let envelope = convert::envelope_from_pb(envelope).map_err(envelope_failure)?;
    // The peer passed the handshake, so it is a member; its key signs its envelopes.
    let sender = node.directory.get(&peer.org).ok_or_else(|| {
        Failure::new(
            Code::PermissionDenied,
            format!("{} is not a member", peer.org),
        )
    })?;
    let now = now_ms();
    let verified = match envelope.verify_or_return(&node.org, &peer.org, &sender.signing_key, now) {
        Ok(verified) => verified,
        Err((e, envelope)) => {
            // An envelope accepted before gets its first answer even where it would be
            // refused now (expired since, say): the sender would otherwise record a
            // refusal for a referral this node holds, and send it no withdrawal.
            let digest = envelope.digest();
            if let Some(seen) = node
                .store
                .seen(&peer.org, envelope.header.message_id)
                .await?
                && seen.sender == peer.org.as_str()
                && seen.envelope_digest == digest
            {
                return replay_answer(node, envelope.header.message_id, seen, &peer.org, &digest);
            }
            tracing::warn!(peer = %peer.org, error = %e, "envelope refused");
            return Err(envelope_failure(e));
        }
    };
    let (message_id, digest) = (verified.header().message_id, verified.digest());
    // A referral's replay is recognised by the transaction that would store it, so the
    // common case reads nothing first. A withdrawal or narrowing reads and signs before
    // it is stored, so its replay is looked for first.
    if verified.header().kind != MessageKind::Referral
        && let Some(seen) = node.store.seen(&peer.org, message_id).await?
    {
        return replay_answer(node, message_id, seen, &peer.org, &digest);
    }
    let result = async {
        let keys = std::iter::once(&node.sealing_key).chain(&node.previous_sealing_keys);
        let opened = verified.open_with_any(keys).map_err(|e| {
            tracing::warn!(peer = %peer.org, envelope = %message_id, error = %e, "envelope does not open");
            envelope_failure(e)
        })?;
        match opened.header.kind {
            MessageKind::Referral => {
                let sealed_at_ms = opened.header.created_at_ms;
                accept_referral(node, sender, message_id, &digest, &opened.payload, sealed_at_ms, now)
                    .await
            }
            MessageKind::ConsentWithdrawal => {
                reading_again(|| {
                    accept_withdrawal(node, sender, message_id, &digest, &opened.payload, now)
                })
                .await
            }
            MessageKind::ConsentNarrowing => {
                // The sender's word on when it narrowed, but no later than it sealed this.
                let sealed_at_ms = opened.header.created_at_ms;
                reading_again(|| {
                    accept_narrowing(node, sender, message_id, &digest, &opened.payload, sealed_at_ms, now)
                })
                .await
            }
        }
    }
    .await;
    match result {
        // A replay of an envelope accepted before gets its first answer, even where it
        // would be refused now (its consent has expired since, say).
        Err(failure) if failure.code != Code::Internal => {
            match node.store.seen(&peer.org, message_id).await? {
                Some(seen) => replay_answer(node, message_id, seen, &peer.org, &digest),
                None => Err(failure),
            }
        }
        answer => answer,
    }
}

/// Builds the answer to an accepted envelope once its audit entry's place is known: the
/// signed receipt naming that entry, and for a withdrawal the purge receipt.
fn responder(
    node: &Node,
    sender: &OrgId,
    message_id: MessageId,
    digest: &[u8; 32],
    now: i64,
    purge_receipt: Option<pb::PurgeReceipt>,
) -> Respond {
    let (key, me, sender, digest) = (
        node.signing_key.clone(),
        node.org.clone(),
        sender.clone(),
        *digest,
    );
    Box::new(move |(log_index, leaf_hash)| {
        let receipt = Receipt::sign(
            message_id,
            digest,
            sender.clone(),
            me.clone(),
            now,
            log_index,
            leaf_hash,
            &key,
        );
        pb::DeliverResponse {
            receipt: Some(convert::receipt_to_pb(&receipt)),
            purge_receipt: purge_receipt.clone(),
        }
        .encode_to_vec()
    })
}

async fn accept_referral(
    node: &Node,
    sender: &Member,
    message_id: MessageId,
    digest: &[u8; 32],
    plaintext: &[u8],
    sealed_at_ms: i64,
    now: i64,
) -> Result<pb::DeliverResponse, Failure> {
    let payload = pb::ReferralPayload::decode(plaintext)
        .map_err(|_| Failure::invalid("referral payload is not a valid ReferralPayload"))?;
    let purpose = parse_purpose(&payload.purpose)?;
    if !corridor::caseref::is_case_ref(&payload.case_ref) {
        return Err(Failure::invalid(
            "referral case_ref is not a case reference (ref- and 32 lowercase hex digits)",
        ));
    }
    if payload.fields.len() > MAX_FIELDS {
        return Err(Failure::invalid(format!(
            "a referral carries at most {MAX_FIELDS} fields"
        )));
    }
    let mut fields = BTreeSet::new();
    for fv in &payload.fields {
        let field = convert::field_from_pb(fv.field).ok_or_else(|| {
            Failure::invalid(format!("referral carries unknown field {}", fv.field))
        })?;
        if !fields.insert(field) {
            return Err(Failure::invalid(format!(
                "referral carries field {field} twice"
            )));
        }
        field
            // The sender's clock may run ahead of ours by as much as an envelope may.
            .check_value(
                &fv.value,
                now.saturating_add(corridor::envelope::MAX_CLOCK_SKEW_MS),
            )
            .map_err(|e| Failure::invalid(format!("referral refused: {e}")))?;
    }
    // The consent travels with the referral; run the same gate against it here.
    let consent_receipt = payload
        .consent_receipt
        .clone()
        .ok_or_else(|| Failure::precondition("referral refused: it carries no consent receipt"))
        .and_then(|r| {
            convert::consent_receipt_from_pb(r)
                .map_err(|e| Failure::invalid(format!("consent receipt is malformed: {e}")))
        })?;
    consent_receipt
        .verify(
            &sender.id,
            &sender.signing_key,
            &node.org,
            &payload.case_ref,
        )
        .map_err(|e| Failure::new(Code::PermissionDenied, format!("referral refused: {e}")))?;
    let me = node
        .directory
        .get(&node.org)
        .ok_or_else(|| Failure::internal("this node is not in the directory", &node.org))?;
    consent::gate(&consent_receipt.scope(), me, purpose, &fields, now).map_err(|refusal| {
        tracing::warn!(sender = %sender.id, envelope = %message_id, rules = %refusal.rules(), "referral refused by the consent gate on arrival");
        Failure::new(Code::PermissionDenied, format!("referral refused: {refusal}")).rule("consent-gate")
    })?;

    // What is kept is what was read and gated: the payload encoded again, so that fields
    // this version does not know (prost skips them) are not stored beside it.
    let kept = payload.encode_to_vec();
    // Encrypt under the data key of this received case and consent before anything is
    // stored: one key per consent, so that a withdrawal destroys the key of what it
    // purged even while referrals of the case under another consent stay. (Referrals
    // stored before keep their key per case, `in:<sender>:<case_ref>`.) The key may be
    // shredded meanwhile (a withdrawal or retention purge); then the store refuses the
    // stale key and the payload is sealed again under the new one.
    let case_key_id = format!(
        "in:{}:{}:{}",
        sender.id, payload.case_ref, consent_receipt.consent_id
    );
    let entry = audit::encode(
        &Event::ReferralReceived {
            message_id,
            sender: sender.id.clone(),
            envelope_digest: *digest,
            case: payload.case_ref.clone(),
            purpose: purpose.as_str().to_owned(),
        },
        now,
    );
    let mut attempts = 0;
    let outcome = loop {
        attempts += 1;
        let wrapped = match node.store.case_key(&case_key_id).await? {
            Some(w) => w,
            None => {
                // A replay of a referral whose data was purged since must not bring a
                // key for its case back.
                if let Some(seen) = node.store.seen(&sender.id, message_id).await? {
                    return replay_answer(node, message_id, seen, &sender.id, digest);
                }
                let (_, wrapped) = node
                    .data_key
                    .new_data_key(&case_key_id)
                    .map_err(data_failure)?;
                node.store
                    .ensure_case_key(&case_key_id, &wrapped, now)
                    .await?
            }
        };
        let key = node
            .data_key
            .unwrap_data_key(&case_key_id, &wrapped)
            .map_err(data_failure)?;
        let payload_sealed = key
            .encrypt(&case_key_id, &message_id.to_hex(), &kept)
            .map_err(data_failure)?;
        let outcome = node
            .store
            .accept_referral(
                AcceptedReferral {
                    message_id,
                    sender: sender.id.clone(),
                    envelope_digest: *digest,
                    purpose: purpose.as_str().to_owned(),
                    case_ref: payload.case_ref.clone(),
                    case_key_id: case_key_id.clone(),
                    wrapped_case_key: wrapped,
                    consent_id: consent_receipt.consent_id.clone(),
                    consent_expires_at_ms: consent_receipt.expires_at_ms,
                    payload_sealed,
                    received_at_ms: now,
                    retain_until_ms: now
                        .saturating_add(node.config.retention.retention_ms(purpose)),
                    sealed_at_ms,
                    respond: responder(node, &sender.id, message_id, digest, now, None),
                },
                entry.clone(),
            )
            .await?;
        if !matches!(outcome, AcceptOutcome::CaseKeyChanged) || attempts == 3 {
            break outcome;
        }
    };
    match outcome {
        AcceptOutcome::Stored(response) => {
            tracing::info!(referral = %message_id, sender = %sender.id, %purpose, "referral received");
            decode_response(&response)
        }
        AcceptOutcome::AlreadySeen(seen) => {
            replay_answer(node, message_id, seen, &sender.id, digest)
        }
        AcceptOutcome::ConsentWithdrawn => {
            // A key made for this referral alone would otherwise stay until a purge.
            if let Err(error) = node.store.drop_unused_received_key(&case_key_id).await {
                tracing::warn!(%error, "could not shred the key of a refused referral");
            }
            Err(Failure::precondition(format!(
                "referral refused: consent {} was withdrawn",
                consent_receipt.consent_id
            )))
        }
        AcceptOutcome::ConsentNarrowed => {
            if let Err(error) = node.store.drop_unused_received_key(&case_key_id).await {
                tracing::warn!(%error, "could not shred the key of a refused referral");
            }
            Err(Failure::precondition(format!(
                "referral refused: consent {} was narrowed after the referral was sealed",
                consent_receipt.consent_id
            )))
        }
        // Transient: not a refusal of the envelope; the sender tries again later.
        AcceptOutcome::CaseKeyChanged => Err(Failure::internal(
            "the case's data key kept changing while the referral was stored",
            message_id,
        )),
    }
}

async fn accept_withdrawal(
    node: &Node,
    sender: &Member,
    message_id: MessageId,
    digest: &[u8; 32],
    plaintext: &[u8],
    now: i64,
) -> Result<pb::DeliverResponse, Failure> {
    let w = pb::ConsentWithdrawal::decode(plaintext)
        .map_err(|_| Failure::invalid("withdrawal payload is not a valid ConsentWithdrawal"))?;
    check_purge_request_ids("withdrawal", &w.consent_id, &w.case_ref)?;
    let purged = node
        .store
        .inbox_under_consent(&sender.id, &w.consent_id)
        .await?;
    let purge_receipt = PurgeReceipt::sign(
        message_id,
        w.consent_id.clone(),
        w.case_ref.clone(),
        sender.id.clone(),
        node.org.clone(),
        purged.clone(),
        None,
        None,
        now,
        &node.signing_key,
    );
    let entry = audit::encode(
        &Event::PurgeDone {
            message_id,
            sender: sender.id.clone(),
            consent_id: w.consent_id.clone(),
            case: w.case_ref.clone(),
            purged: purged.len() as u64,
        },
        now,
    );
    let purged_count = purged.len();
    let outcome = node
        .store
        .purge_consent(
            AcceptedWithdrawal {
                request: purge_request(node, sender, message_id, digest, now, &purge_receipt),
                consent_id: w.consent_id.clone(),
                expected: purged,
            },
            entry,
        )
        .await?;
    purge_answer(node, message_id, outcome, sender, digest, ("withdrawal", purged_count > 0), || {
        tracing::info!(sender = %sender.id, consent = %w.consent_id, purged = purged_count, "consent withdrawn by sender; data purged");
    })
    .await
}

/// A withdrawal or narrowing received now, answered with its receipt and `purge_receipt`.
fn purge_request(
    node: &Node,
    sender: &Member,
    message_id: MessageId,
    digest: &[u8; 32],
    now: i64,
    purge_receipt: &PurgeReceipt,
) -> PurgeRequest {
    PurgeRequest {
        message_id,
        sender: sender.id.clone(),
        envelope_digest: *digest,
        received_at_ms: now,
        respond: responder(
            node,
            &sender.id,
            message_id,
            digest,
            now,
            Some(convert::purge_receipt_to_pb(purge_receipt)),
        ),
    }
}

/// Checks the identifiers a withdrawal or narrowing (`what`) names: both go into this
/// node's audit log and the purge receipt, so they must be identifiers only.
fn check_purge_request_ids(what: &str, consent_id: &str, case_ref: &str) -> Result<(), Failure> {
    if !corridor::consent::is_consent_id(consent_id) {
        return Err(Failure::invalid(format!(
            "{what} consent_id is not a consent id (consent- and 32 lowercase hex digits)"
        )));
    }
    if !corridor::caseref::is_case_ref(case_ref) {
        return Err(Failure::invalid(format!(
            "{what} case_ref is not a case reference (ref- and 32 lowercase hex digits)"
        )));
    }
    Ok(())
}

/// The answer to a withdrawal or narrowing (`what`) once storage carried it out:
/// stored now (the deletion made final on disk, then `log`), or a replay's first answer.
async fn purge_answer(
    node: &Node,
    message_id: MessageId,
    outcome: AcceptOutcome,
    sender: &Member,
    digest: &[u8; 32],
    // What the request was, and whether it deleted or cut anything.
    (what, changed_any): (&str, bool),
    log: impl FnOnce(),
) -> Result<pb::DeliverResponse, Failure> {
    match outcome {
        AcceptOutcome::Stored(response) => {
            // Make the deletion final on disk: no purged page stays in the WAL. A request
            // that deleted nothing (held nothing) needs none, and must not be a way to
            // make this node checkpoint at will.
            if changed_any && let Err(error) = node.store.checkpoint().await {
                tracing::warn!(%error, what, "WAL checkpoint after purge failed; tried again at the next retention check");
            }
            log();
            decode_response(&response)
        }
        AcceptOutcome::AlreadySeen(seen) => {
            replay_answer(node, message_id, seen, &sender.id, digest)
        }
        AcceptOutcome::ConsentWithdrawn
        | AcceptOutcome::ConsentNarrowed
        | AcceptOutcome::CaseKeyChanged => Err(Failure::internal(
            "storage answered a request to purge as a referral",
            what,
        )),
    }
}

/// Carries out a sender's narrowing of a consent: the referrals it names to purge are
/// deleted, and the others it names lose every field it does not list. Referrals it does
/// not name (sent after the narrowing, within it) stay as they are, and so does the
/// consent: more referrals may come under it, but none sealed before the narrowing.
async fn accept_narrowing(
    node: &Node,
    sender: &Member,
    message_id: MessageId,
    digest: &[u8; 32],
    plaintext: &[u8],
    sealed_at_ms: i64,
    now: i64,
) -> Result<pb::DeliverResponse, Failure> {
    let n = pb::ConsentNarrowing::decode(plaintext)
        .map_err(|_| Failure::invalid("narrowing payload is not a valid ConsentNarrowing"))?;
    check_purge_request_ids("narrowing", &n.consent_id, &n.case_ref)?;
    let terms = n
        .terms
        .clone()
        .map(convert::consent_terms_from_pb)
        .transpose()
        .map_err(|e| Failure::invalid(format!("narrowing: {e}")))?;
    // The answer confirms the terms as the narrowing stated them (they bind what is
    // kept), if the sender gave a key to confirm them with: only such a sender checks a
    // signature that covers a confirmation.
    // A key of another length is the sender's fault: the narrowing is carried out all the
    // same, for what it takes away protects the person, and answered without confirming.
    let terms_key: Option<[u8; 32]> = n.terms_key.as_slice().try_into().ok();
    if terms_key.is_none() && !n.terms_key.is_empty() {
        tracing::warn!(sender = %sender.id, envelope = %message_id, "a narrowing's key to confirm its terms with is not 32 bytes; its terms are not confirmed");
    }
    let id = |bytes: &[u8]| {
        MessageId::from_bytes(bytes)
            .map_err(|_| Failure::invalid("narrowing names a referral id that is not 16 bytes"))
    };
    let to_purge: BTreeSet<MessageId> = n
        .purged_referral_ids
        .iter()
        .map(|b| id(b))
        .collect::<Result<_, _>>()?;
    let mut to_keep: HashMap<MessageId, BTreeSet<Field>> = HashMap::new();
    for kept in &n.kept {
        let fields = kept
            .fields
            .iter()
            .map(|f| {
                convert::field_from_pb(*f)
                    .ok_or_else(|| Failure::invalid("narrowing keeps a field that is unknown"))
            })
            .collect::<Result<BTreeSet<Field>, _>>()?;
        to_keep.insert(id(&kept.referral_id)?, fields);
    }
    let mut purged = Vec::new();
    let mut redacted = Vec::new();
    let mut held = Vec::new();
    let rows = node
        .store
        .inbox_rows_under_consent(&sender.id, &n.consent_id)
        .await?;
    let case_key_ids: Vec<(MessageId, String)> = rows
        .iter()
        .map(|r| (r.message_id, r.case_key_id.clone()))
        .collect();
    // Each key the referrals are under, read once: what is cut, renewed or sealed here
    // is under these, and the store checks they are still the keys when it commits (a
    // concurrent narrowing may have renewed one).
    let mut keys_read: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    for (_, case_key_id) in &case_key_ids {
        if !keys_read.iter().any(|(id, _)| id == case_key_id) {
            let wrapped = node.store.case_key(case_key_id).await?;
            keys_read.push((case_key_id.clone(), wrapped));
        }
    }
    for row in &rows {
        if to_purge.contains(&row.message_id) || to_keep.contains_key(&row.message_id) {
            held.push(row.message_id);
        }
        if to_purge.contains(&row.message_id) {
            purged.push(row.message_id);
            continue;
        }
        let Some(keep) = to_keep.get(&row.message_id) else {
            continue;
        };
        let wrapped = keys_read
            .iter()
            .find(|(id, _)| *id == row.case_key_id)
            .and_then(|(_, wrapped)| wrapped.as_deref());
        match cut_to(node, row, wrapped, keep)? {
            Cut::Unchanged => {}
            Cut::Nothing => purged.push(row.message_id),
            Cut::Sealed(sealed) => {
                redacted.push((row.message_id, row.payload_sealed.clone(), sealed));
            }
            // What cannot be read cannot be cut: it goes whole, rather than keeping the
            // fields the person took back or holding up the rest of the narrowing.
            Cut::Unreadable(why) => {
                tracing::warn!(referral = %row.message_id, error = %why, "a referral to cut cannot be read; purged whole");
                purged.push(row.message_id);
            }
        }
    }
    let cut: Vec<MessageId> = redacted.iter().map(|(id, _, _)| *id).collect();
    let cut_count = cut.len();
    // The terms bind what is kept: stored under the key of its case, if anything is.
    // The consent's own key if a referral kept has one: terms under a key of the case
    // that referrals under other consents share would keep that key alive with them.
    let consent_key_suffix = format!(":{}", n.consent_id);
    let kept_case = case_key_ids
        .iter()
        .filter(|(id, _)| !purged.contains(id))
        .max_by_key(|(_, case_key_id)| case_key_id.ends_with(&consent_key_suffix))
        .map(|(_, case_key_id)| case_key_id.as_str());
    let confirmed = terms
        .as_ref()
        .zip(terms_key.as_ref())
        .map(|(terms, key)| terms.confirmation_digest(key));
    // What was cut from referrals under the consent's own key goes with that key: every
    // referral kept under it, and the terms, are sealed again under a new one, and the
    // old is destroyed, so that no copy of the payloads as they were left in the WAL or
    // on the disk can be read with a key this node keeps (a backup taken before keeps the
    // old key beside them, as it keeps everything else). Under a key their case shares with another
    // consent's referrals (kept from before keys per consent), fields are cut by
    // deleting them only. Only with terms: they are sealed again with the rest.
    let under_own = |id: &MessageId| {
        case_key_ids
            .iter()
            .any(|(row, key)| row == id && Some(key.as_str()) == kept_case)
    };
    let took_any = !cut.is_empty() || purged.iter().any(under_own);
    let renewed = match kept_case {
        Some(own) if own.ends_with(&consent_key_suffix) && took_any && terms.is_some() => {
            let read = keys_read
                .iter()
                .find(|(id, _)| id == own)
                .and_then(|(_, wrapped)| wrapped.clone());
            renew_key(node, own, read, &rows, &purged, &mut redacted)?
        }
        _ => None,
    };
    let terms = match (terms, kept_case) {
        (Some(terms), Some(case_key_id)) => {
            let seal_with = renewed.as_ref().map(|(key, _)| key);
            combined_terms(
                node,
                &sender.id,
                &n.consent_id,
                case_key_id,
                terms,
                seal_with,
            )
            .await?
        }
        _ => None,
    };
    let renewed = renewed.map(|(_, rekey)| rekey);
    let purge_receipt = PurgeReceipt::sign(
        message_id,
        n.consent_id.clone(),
        n.case_ref.clone(),
        sender.id.clone(),
        node.org.clone(),
        purged.clone(),
        Some(cut),
        confirmed,
        now,
        &node.signing_key,
    );
    let entry = audit::encode(
        &Event::NarrowingApplied {
            message_id,
            sender: sender.id.clone(),
            consent_id: n.consent_id.clone(),
            case: n.case_ref.clone(),
            purged: purged.len() as u64,
            redacted: cut_count as u64,
        },
        now,
    );
    let (purged_count, redacted_count) = (purged.len(), cut_count);
    let outcome = node
        .store
        .apply_narrowing(
            AcceptedNarrowing {
                request: purge_request(node, sender, message_id, digest, now, &purge_receipt),
                consent_id: n.consent_id.clone(),
                named: to_purge.iter().chain(to_keep.keys()).copied().collect(),
                held,
                purged,
                redacted,
                narrowed_at_ms: n.narrowed_at_ms.min(sealed_at_ms),
                terms,
                renewed,
                keys_read,
            },
            entry,
        )
        .await?;
    let changed_any = purged_count + redacted_count > 0;
    purge_answer(node, message_id, outcome, sender, digest, ("narrowing", changed_any), || {
        tracing::info!(sender = %sender.id, consent = %n.consent_id, purged = purged_count, redacted = redacted_count, "consent narrowed by sender; data cut to it");
    })
    .await
}

/// The record a consent's terms are sealed to, under the key of a received case.
fn terms_record(consent_id: &str) -> String {
    format!("terms {consent_id}")
}

/// The terms a narrowing restates combined with those stored before (every restriction
/// either names binds, so a narrowing that arrives late cannot loosen them), sealed under
/// the data key of `case_key_id`, with those stored as read; `None` if that key is gone
/// (the case is being purged).
async fn combined_terms(
    node: &Node,
    sender: &OrgId,
    consent_id: &str,
    case_key_id: &str,
    restated: ConsentTerms,
    seal_with: Option<&corridor::at_rest::DataKey>,
) -> Result<Option<(SealedTerms, Option<SealedTerms>)>, Failure> {
    let stored;
    let key = match seal_with {
        Some(key) => key,
        None => {
            let Some(wrapped) = node.store.case_key(case_key_id).await? else {
                return Ok(None);
            };
            stored = node
                .data_key
                .unwrap_data_key(case_key_id, &wrapped)
                .map_err(data_failure)?;
            &stored
        }
    };
    let as_read = node
        .store
        .narrowed_consent(sender.as_str(), consent_id)
        .await?
        .and_then(|n| n.terms);
    let before = match &as_read {
        Some(stored) => open_terms(node, consent_id, stored).await?,
        None => None,
    };
    let terms = match before {
        Some(before) => before.and(&restated),
        None => restated,
    };
    let sealed = key
        .encrypt(
            case_key_id,
            &terms_record(consent_id),
            &convert::consent_terms_to_pb(&terms).encode_to_vec(),
        )
        .map_err(data_failure)?;
    Ok(Some((
        SealedTerms {
            case_key_id: case_key_id.to_owned(),
            sealed,
        },
        as_read,
    )))
}

/// Stored terms, opened with the data key of the case they were sealed under; `None` if
/// that key is gone (its case purged). Terms that do not open are an error: treated as
/// absent, they would let a narrowing loosen them.
async fn open_terms(
    node: &Node,
    consent_id: &str,
    stored: &SealedTerms,
) -> Result<Option<ConsentTerms>, Failure> {
    let Some(wrapped) = node.store.case_key(&stored.case_key_id).await? else {
        return Ok(None);
    };
    let key = node
        .data_key
        .unwrap_data_key(&stored.case_key_id, &wrapped)
        .map_err(data_failure)?;
    let plaintext = key
        .decrypt(
            &stored.case_key_id,
            &terms_record(consent_id),
            &stored.sealed,
        )
        .map_err(data_failure)?;
    let terms = pb::ConsentTerms::decode(plaintext.as_slice())
        .map_err(|e| Failure::internal("stored consent terms are corrupt", e))?;
    convert::consent_terms_from_pb(terms)
        .map(Some)
        .map_err(|e| Failure::internal("stored consent terms are corrupt", e))
}

/// A new data key for `case_key_id`, the consent's own, with every referral in `rows`
/// held under it and not `purged` sealed again under it: as cut in `redacted`, or as it
/// is (added to `redacted`, unchanged but for its key). `None` if the key is gone (the
/// referrals are being purged) or a payload does not open (it is cut without renewal).
fn renew_key(
    node: &Node,
    case_key_id: &str,
    read: Option<Vec<u8>>,
    rows: &[InboxRow],
    purged: &[MessageId],
    redacted: &mut Vec<(MessageId, Vec<u8>, Vec<u8>)>,
) -> Result<Option<(corridor::at_rest::DataKey, crate::storage::RenewedKey)>, Failure> {
    let Some(read) = read else {
        return Ok(None);
    };
    let old = node
        .data_key
        .unwrap_data_key(case_key_id, &read)
        .map_err(data_failure)?;
    let (new, wrapped) = node
        .data_key
        .new_data_key(case_key_id)
        .map_err(data_failure)?;
    let mut resealed = Vec::new();
    for row in rows
        .iter()
        .filter(|r| r.case_key_id == case_key_id && !purged.contains(&r.message_id))
    {
        let record = row.message_id.to_hex();
        let current = redacted
            .iter()
            .find(|(id, _, _)| *id == row.message_id)
            .map_or(&row.payload_sealed, |(_, _, cut)| cut);
        let Ok(plaintext) = old.decrypt(case_key_id, &record, current) else {
            tracing::warn!(referral = %row.message_id, "a referral under a key to renew cannot be read; the key is kept");
            return Ok(None);
        };
        let sealed = new
            .encrypt(case_key_id, &record, &plaintext)
            .map_err(data_failure)?;
        resealed.push((row.message_id, row.payload_sealed.clone(), sealed));
    }
    redacted.retain(|(id, _, _)| !resealed.iter().any(|(r, _, _)| r == id));
    redacted.extend(resealed);
    Ok(Some((
        new,
        crate::storage::RenewedKey {
            case_key_id: case_key_id.to_owned(),
            read,
            wrapped,
        },
    )))
}

/// A received referral cut to some of its fields.
enum Cut {
    /// It carries no other field.
    Unchanged,
    /// It carries none of them.
    Nothing,
    /// Its payload without the other fields, sealed again under the case's key.
    Sealed(Vec<u8>),
    /// It cannot be read (its key is gone or does not open it, or it does not decode):
    /// why, without its content.
    Unreadable(String),
}

/// Cuts the received referral `row` to the fields in `keep`, with its case key as read
/// (`wrapped`).
fn cut_to(
    node: &Node,
    row: &InboxRow,
    wrapped: Option<&[u8]>,
    keep: &BTreeSet<Field>,
) -> Result<Cut, Failure> {
    let Some(wrapped) = wrapped else {
        return Ok(Cut::Unreadable("its case key is gone".into()));
    };
    let key = match node.data_key.unwrap_data_key(&row.case_key_id, wrapped) {
        Ok(key) => key,
        Err(e) => return Ok(Cut::Unreadable(e.to_string())),
    };
    let record = row.message_id.to_hex();
    let plaintext = match key.decrypt(&row.case_key_id, &record, &row.payload_sealed) {
        Ok(plaintext) => plaintext,
        Err(e) => return Ok(Cut::Unreadable(e.to_string())),
    };
    let Ok(mut payload) = pb::ReferralPayload::decode(plaintext.as_slice()) else {
        return Ok(Cut::Unreadable("it does not decode".into()));
    };
    let before = payload.fields.len();
    payload
        .fields
        .retain(|fv| convert::field_from_pb(fv.field).is_some_and(|f| keep.contains(&f)));
    Ok(if payload.fields.is_empty() {
        Cut::Nothing
    } else if payload.fields.len() == before {
        Cut::Unchanged
    } else {
        Cut::Sealed(
            key.encrypt(&row.case_key_id, &record, &payload.encode_to_vec())
                .map_err(data_failure)?,
        )
    })
}

fn decode_response(bytes: &[u8]) -> Result<pb::DeliverResponse, Failure> {
    pb::DeliverResponse::decode(bytes).map_err(|e| Failure::internal("stored answer is corrupt", e))
}

/// A message id seen before: the same envelope gets the same answer; anything else
/// reusing the id is refused.
///
/// The answer is signed again with this node's current key (Ed25519 signatures are
/// deterministic: the same bytes while the key is the same): one whose first answer was
/// lost could otherwise never verify it once this node's key was rotated.
fn replay_answer(
    node: &Node,
    message_id: MessageId,
    seen: crate::storage::SeenMessage,
    sender: &OrgId,
    digest: &[u8; 32],
) -> Result<pb::DeliverResponse, Failure> {
    if seen.sender != sender.as_str() || seen.envelope_digest != digest {
        return Err(Failure::new(
            Code::AlreadyExists,
            "message id was already used for a different envelope",
        ));
    }
    tracing::info!(sender = %sender, "duplicate envelope answered with its original answer");
    let mut answer = pb::DeliverResponse::decode(seen.response.as_slice())
        .map_err(|e| Failure::internal("stored answer is corrupt", e))?;
    // Signed again only what is this node's answer to this very envelope: a stored row
    // changed behind its back is not signed anew.
    let current = node.signing_key.verifying_key();
    let corrupt = || Failure::internal("stored answer is not this envelope's", message_id);
    if let Some(stored) = answer.receipt.take() {
        let mut receipt = convert::receipt_from_pb(stored)
            .map_err(|e| Failure::internal("stored receipt is corrupt", e))?;
        let ours = receipt.message_id == message_id
            && receipt.envelope_digest == *digest
            && receipt.sender == *sender
            && receipt.recipient == node.org;
        if !ours {
            return Err(corrupt());
        }
        if current
            .verify(&receipt.signed_bytes(), &receipt.signature)
            .is_err()
        {
            receipt.sign_again(&node.signing_key);
        }
        answer.receipt = Some(convert::receipt_to_pb(&receipt));
    }
    if let Some(stored) = answer.purge_receipt.take() {
        let mut receipt = convert::purge_receipt_from_pb(stored)
            .map_err(|e| Failure::internal("stored purge receipt is corrupt", e))?;
        let ours = receipt.withdrawal_id == message_id
            && receipt.requester == *sender
            && receipt.purger == node.org;
        if !ours {
            return Err(corrupt());
        }
        if current
            .verify(&receipt.signed_bytes(), &receipt.signature)
            .is_err()
        {
            receipt.sign_again(&node.signing_key);
        }
        answer.purge_receipt = Some(convert::purge_receipt_to_pb(&receipt));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::{Failure, MAX_MESSAGE_LEN, NarrowingOf, envelope_failure, peer_message};
    use crate::delivery::refusal_is_final;
    use corridor::envelope::EnvelopeError;
    use corridor::{Field, MessageId};

    /// A sender retries an envelope refused for its time only where time can mend it:
    /// one dated ahead of the recipient's clock is taken once that clock catches up.
    #[test]
    fn an_envelope_from_the_future_is_retried_and_an_expired_one_is_not() {
        let ahead = envelope_failure(EnvelopeError::FromTheFuture {
            created_at_ms: 2,
            now_ms: 1,
        });
        assert!(!refusal_is_final(ahead.code));
        let expired = envelope_failure(EnvelopeError::Expired {
            expires_at_ms: 1,
            now_ms: 2,
        });
        assert!(refusal_is_final(expired.code));
    }

    #[test]
    fn a_narrowing_request_is_stored_as_it_was_asked() {
        let n = NarrowingOf {
            kept: vec![
                (
                    MessageId([1; 16]),
                    [Field::PreferredName, Field::Needs].into(),
                ),
                (MessageId([2; 16]), [Field::AgeBand].into()),
            ],
            purged: vec![MessageId([3; 16])],
        };
        assert_eq!(NarrowingOf::from_stored(&n.to_stored()), Some(n));
        assert_eq!(NarrowingOf::from_stored(""), Some(NarrowingOf::default()));
        for bad in [
            "zz=",
            "0101=",
            &format!("{}=no_such_field", MessageId([1; 16]).to_hex()),
        ] {
            assert_eq!(NarrowingOf::from_stored(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_message_quoting_oversized_input_is_cut_short() {
        let long_id = "é".repeat(100_000);
        let failure = Failure::not_found(format!("consent {long_id} not found"));
        assert!(
            failure.message.len() <= MAX_MESSAGE_LEN,
            "{}",
            failure.message.len()
        );
        assert!(failure.message.starts_with("consent éé"));
        assert!(failure.message.ends_with('…'));
        let short = Failure::not_found("case case-1 not found");
        assert_eq!(short.message, "case case-1 not found");
    }

    #[test]
    fn a_peers_words_stay_on_one_line_and_short() {
        let status = tonic::Status::permission_denied(format!(
            "refused\nINFO forged log line\u{1b}[31m{}",
            "x".repeat(300_000)
        ));
        let shown = peer_message(&status);
        assert!(
            shown.starts_with("refused INFO forged log line [31mxxx"),
            "{shown}"
        );
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.len() <= MAX_MESSAGE_LEN + 32, "{}", shown.len());
        assert!(shown.ends_with("… (PermissionDenied)"), "{shown}");
        assert_eq!(
            peer_message(&tonic::Status::not_found("no such consent")),
            "no such consent (NotFound)"
        );
    }
}
