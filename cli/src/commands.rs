//! Caseworker commands: cases, consent, referrals and the inbox. Human-readable output by
//! default, one JSON document with `--output json`.

use std::collections::HashMap;

use clap::{Args, Subcommand, ValueEnum};
use corridor_node::server::MAX_LOCAL_MESSAGE_BYTES;
use corridor_proto::v1 as pb;
use serde_json::{Value, json};

use crate::client::{Client, explain};
use crate::files::{read_at_most, size_text};
use crate::terminal::escape_controls;
use crate::{out, outln};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CaseCommand {
    /// Open a new case and print its id.
    Create {
        /// A label for your own use. Do not put personal data in it.
        #[arg(long, default_value = "")]
        label: String,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ConsentCommand {
    /// Record the person's consent to share their case.
    Record(RecordConsent),
    /// Show a consent.
    Show {
        /// Consent id.
        id: String,
    },
    /// Narrow a consent: remove purposes, recipients or fields, shorten it, add
    /// restrictions. Widening is refused; record a new consent instead. Organisations
    /// that received data the narrowed consent no longer covers are asked to purge it;
    /// those holding data under it are told of new restrictions and an earlier expiry.
    Narrow(NarrowConsent),
    /// Withdraw a consent: nothing more is sent under it, and every organisation that
    /// received data under it is asked to purge it and answer with a signed purge receipt.
    Withdraw {
        /// Consent id.
        id: String,
    },
    /// Show which organisations have purged data under a withdrawn or narrowed consent,
    /// and which are still outstanding.
    Status {
        /// Consent id.
        id: String,
    },
    /// Ask the organisations holding data under a narrowed consent that have not
    /// confirmed its restrictions and expiry as they stand to confirm them (for those
    /// that answered before they could, once they run a version that does), and those
    /// the narrowing has not been sent to (queueing it failed) to carry it out.
    Restate {
        /// Consent id.
        id: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct RecordConsent {
    /// Case id.
    #[arg(long = "case")]
    pub case_id: String,
    /// Org that may receive the data, by org id (repeat for several).
    #[arg(long = "recipient")]
    pub recipients: Vec<String>,
    /// Recipients by role and country, as role@CC or *@CC (repeat). State authorities
    /// (embassy, government) are covered only when named with --recipient.
    #[arg(long = "recipient-role")]
    pub recipient_roles: Vec<String>,
    /// Purpose the data may be used for (repeat); see `corridor profiles`.
    #[arg(long = "purpose", required = true)]
    pub purposes: Vec<String>,
    /// Field the person agrees to share (repeat); see `corridor profiles --fields`.
    #[arg(long = "field", required = true)]
    pub fields: Vec<String>,
    /// Never to organisations in this country (ISO code; repeat).
    #[arg(long = "exclude-country", value_parser = country_code)]
    pub excluded_countries: Vec<String>,
    /// No contact with the person's family (refuses family tracing).
    #[arg(long)]
    pub no_family_contact: bool,
    /// Days until the consent expires (kept to the start of that UTC day).
    #[arg(long, default_value_t = 90)]
    pub expires_in_days: u32,
    /// Who gave consent: person or guardian.
    #[arg(long, default_value = "person")]
    pub given_by: String,
    /// For a guardian: on what basis (e.g. "mother of a minor"). Values given here are
    /// visible to other users of this machine (process list, shell history): prefer
    /// --details-file.
    #[arg(long, default_value = "")]
    pub guardian_basis: String,
    /// How it was given: written, verbal or interpreter.
    #[arg(long, default_value = "written")]
    pub method: String,
    /// Language the consent was explained in (or in --details-file).
    #[arg(long, default_value = "")]
    pub language: String,
    /// The consent's details from a TOML file of `guardian_basis = "..."` and `language =
    /// "..."` lines, or `-` for standard input: kept off the command line.
    #[arg(long = "details-file", value_name = "PATH")]
    pub details_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct NarrowConsent {
    /// Consent id.
    pub id: String,
    /// Purpose to remove (repeat).
    #[arg(long = "remove-purpose")]
    pub remove_purposes: Vec<String>,
    /// Recipient org to remove (repeat).
    #[arg(long = "remove-recipient")]
    pub remove_recipients: Vec<String>,
    /// Recipient role@CC to remove (repeat).
    #[arg(long = "remove-recipient-role")]
    pub remove_recipient_roles: Vec<String>,
    /// Field to remove (repeat).
    #[arg(long = "remove-field")]
    pub remove_fields: Vec<String>,
    /// Country to exclude from now on (repeat).
    #[arg(long = "exclude-country", value_parser = country_code)]
    pub excluded_countries: Vec<String>,
    /// Forbid contact with family from now on.
    #[arg(long)]
    pub no_family_contact: bool,
    /// New expiry, in days from now, kept to the start of that UTC day (must not extend
    /// the consent).
    #[arg(long)]
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ReferralCommand {
    /// Send a referral; it leaves the node only if the case's consent allows it.
    Send(SendReferral),
    /// Show a referral this node received, with its fields.
    Show {
        /// Referral id.
        id: String,
        /// The org that sent it, needed only if two members used the same id.
        #[arg(long = "from")]
        sender: Option<String>,
    },
    /// Show the delivery status of a referral this node sent, with its receipt.
    Status {
        /// Referral id.
        id: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct SendReferral {
    /// Case id.
    #[arg(long = "case")]
    pub case_id: String,
    /// Recipient org id.
    #[arg(long = "to")]
    pub recipient: String,
    /// Purpose: shelter-placement, medical-care, legal-aid, psychosocial-support,
    /// return-assistance, reintegration, family-tracing or nationality-verification.
    #[arg(long)]
    pub purpose: String,
    /// A field to disclose, as name=value (repeat); names from `corridor profiles --fields`.
    /// Values given here are visible to other users of this machine (process list, shell
    /// history): for personal data prefer --fields-file.
    // Split here, not by a value parser: clap would quote the value in its error.
    #[arg(long = "field", value_name = "NAME=VALUE")]
    pub fields: Vec<String>,
    /// Fields to disclose from a TOML file of `name = "value"` lines, or `-` for standard
    /// input; combines with --field.
    #[arg(long = "fields-file", value_name = "PATH")]
    pub fields_file: Option<std::path::PathBuf>,
    /// Consent to send under (default: the newest consent of the case that allows it).
    #[arg(long)]
    pub consent: Option<String>,
    /// Wait (up to 30 s) until the referral is delivered with a verified receipt, or
    /// refused, expired or withdrawn; exit non-zero unless it was delivered.
    #[arg(long)]
    pub wait: bool,
    /// An id you choose for this referral (up to 64 characters): running the command
    /// again with the same id, after a timeout say, answers with the referral already
    /// queued instead of sending it twice. The node keeps only a keyed digest of it; still,
    /// do not make it of the person's name or dates.
    #[arg(long = "request-id", value_parser = non_empty_request_id)]
    pub request_id: Option<String>,
}

/// The `name = "value"` lines of a TOML file (`-`: standard input) holding `what` (say,
/// "fields"), bounded by what the node's local API accepts. Errors never quote a value:
/// it may be personal data.
fn string_table(path: &std::path::Path, what: &str) -> Result<Vec<(String, String)>, String> {
    // No request larger than the local API accepts is worth reading, and `/dev/zero`
    // would otherwise be read until memory runs out.
    let limit = MAX_LOCAL_MESSAGE_BYTES as u64;
    let (source, bytes) = if path.as_os_str() == "-" {
        (
            "standard input".to_string(),
            read_at_most(std::io::stdin().lock(), limit)
                .map_err(|e| format!("cannot read the {what} from standard input: {e}"))?,
        )
    } else {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot read {what} file {}: {e}", path.display()))?;
        (
            path.display().to_string(),
            read_at_most(file, limit)
                .map_err(|e| format!("cannot read {what} file {}: {e}", path.display()))?,
        )
    };
    let bytes = bytes.ok_or_else(|| {
        format!(
            "the {what} in {source} are larger than {}, the largest request the node's local API accepts",
            size_text(limit)
        )
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("the {what} in {source} are not UTF-8 text"))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        format!(
            "{what} file is not TOML (name = \"value\" lines): {}",
            e.message()
        )
    })?;
    table
        .into_iter()
        .map(|(name, value)| match value {
            toml::Value::String(value) => Ok((name, value)),
            _ => Err(format!("{name} in the {what} file is not a string")),
        })
        .collect()
}

/// The fields of a referral: from `--fields-file` (a TOML table of strings; `-` is
/// standard input), then `--field`. A name given twice is an error, not a silent choice.
/// Errors never quote a value: it may be personal data.
fn referral_fields(
    file: Option<&std::path::Path>,
    flags: Vec<String>,
) -> Result<HashMap<String, String>, String> {
    let mut fields = HashMap::new();
    if let Some(path) = file {
        fields.extend(string_table(path, "fields")?);
    }
    for (n, flag) in flags.iter().enumerate() {
        let (name, value) = parse_field(flag)
            .ok_or_else(|| format!("--field number {} must be written name=value", n + 1))?;
        if fields.insert(name.clone(), value).is_some() {
            return Err(format!("field {name} is given twice"));
        }
    }
    Ok(fields)
}

/// A consent's details (guardian basis, language): from `--details-file`, else from their
/// flags. Errors never quote a value.
fn consent_details(
    file: Option<&std::path::Path>,
    (mut guardian_basis, mut language): (String, String),
) -> Result<(String, String), String> {
    let Some(path) = file else {
        return Ok((guardian_basis, language));
    };
    for (name, value) in string_table(path, "consent details")? {
        let slot = match name.as_str() {
            "guardian_basis" => &mut guardian_basis,
            "language" => &mut language,
            other => {
                return Err(format!(
                    "{other} in the consent details file is not a detail: guardian_basis and language are"
                ));
            }
        };
        if !slot.is_empty() {
            return Err(format!("{name} is given twice"));
        }
        *slot = value;
    }
    Ok((guardian_basis, language))
}

fn parse_field(s: &str) -> Option<(String, String)> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
}

fn print(output: Output, value: &Value, text: impl FnOnce() -> String) {
    match output {
        Output::Json => outln!("{value}"),
        Output::Text => outln!("{}", text()),
    }
}

pub fn now_ms() -> i64 {
    corridor_node::node::now_ms()
}

pub fn format_time(ms: i64) -> String {
    corridor::utc::format(ms)
}

pub async fn case(client: &mut Client, output: Output, cmd: CaseCommand) -> Result<(), String> {
    match cmd {
        CaseCommand::Create { label } => {
            let r = client
                .create_case(pb::CreateCaseRequest { label })
                .await
                .map_err(|s| explain(&s))?
                .into_inner();
            print(output, &json!({ "case_id": r.case_id }), || {
                format!("case created: {}", escape_controls(&r.case_id))
            });
        }
    }
    Ok(())
}

pub fn scope_json(scope: &pb::ConsentScope) -> Value {
    json!({
        "purposes": scope.purposes, "recipient_orgs": scope.recipient_orgs,
        "recipient_roles": scope.recipient_roles, "fields": scope.fields,
        "excluded_countries": scope.excluded_countries,
        "no_family_contact": scope.no_family_contact, "expires_at_ms": scope.expires_at_ms,
    })
}

/// A consent for JSON output; its sealed details (guardian basis, language) only
/// `with_details`, as `consent show` reads them: other answers carry none.
fn consent_json(c: &pb::ConsentView, with_details: bool) -> Value {
    let mut value = json!({
        "consent_id": c.consent_id, "case_id": c.case_id,
        "scope": c.scope.as_ref().map(scope_json),
        "given_by": c.given_by, "method": c.method, "recorded_by": c.recorded_by,
        "recorded_at_ms": c.recorded_at_ms,
        "withdrawn_at_ms": (c.withdrawn_at_ms != 0).then_some(c.withdrawn_at_ms),
        "narrowed_at_ms": (c.narrowed_at_ms != 0).then_some(c.narrowed_at_ms),
    });
    if let (true, Some(fields)) = (with_details, value.as_object_mut()) {
        fields.insert("guardian_basis".into(), c.guardian_basis.clone().into());
        fields.insert("language".into(), c.language.clone().into());
    }
    value
}

fn or_none(list: &[String]) -> String {
    if list.is_empty() {
        "none".into()
    } else {
        escape_controls(&list.join(", ")).into_owned()
    }
}

/// Every value in the text is the node's, shown with [`escape_controls`].
fn consent_text(c: &pb::ConsentView) -> String {
    let scope = c.scope.clone().unwrap_or_default();
    let mut text = format!(
        "consent {}\n  case:        {}\n  given by:    {}{}\n  method:      {}{}\n  recorded:    {} by {}\n  purposes:    {}\n  recipients:  {}\n  by role:     {}\n  fields:      {}\n  excluded:    {}\n  family contact: {}\n  expires:     {}",
        escape_controls(&c.consent_id),
        escape_controls(&c.case_id),
        escape_controls(&c.given_by),
        if c.guardian_basis.is_empty() {
            String::new()
        } else {
            format!(" ({})", escape_controls(&c.guardian_basis))
        },
        escape_controls(&c.method),
        if c.language.is_empty() {
            String::new()
        } else {
            format!(", in {}", escape_controls(&c.language))
        },
        format_time(c.recorded_at_ms),
        escape_controls(&c.recorded_by),
        or_none(&scope.purposes),
        or_none(&scope.recipient_orgs),
        or_none(&scope.recipient_roles),
        or_none(&scope.fields),
        or_none(&scope.excluded_countries),
        if scope.no_family_contact {
            "forbidden"
        } else {
            "allowed"
        },
        format_time(scope.expires_at_ms),
    );
    if c.narrowed_at_ms != 0 {
        text.push_str(&format!(
            "\n  narrowed:    {}",
            format_time(c.narrowed_at_ms)
        ));
    }
    if c.withdrawn_at_ms != 0 {
        text.push_str(&format!(
            "\n  WITHDRAWN:   {}",
            format_time(c.withdrawn_at_ms)
        ));
    }
    text
}

/// What a caseworker must know of referrals a narrowing could only keep whole.
fn kept_whole_text(count: usize) -> String {
    format!(
        "{count} referral(s) kept whole: sent before their fields were recorded, they may carry fields the narrowed consent no longer covers; withdraw the consent to have them purged"
    )
}

fn purge_receipt_json(pr: &pb::PurgeReceipt) -> Value {
    json!({
        "purged_at_ms": pr.purged_at_ms,
        "purged_referrals": pr.purged_referrals.iter().map(hex::encode).collect::<Vec<_>>(),
        "narrowing": pr.narrowing,
        "cut_referrals": pr.cut_referrals.iter().map(hex::encode).collect::<Vec<_>>(),
        "terms_confirmed": (!pr.terms_confirmed.is_empty()).then(|| hex::encode(&pr.terms_confirmed)),
        "signature": hex::encode(&pr.signature),
    })
}

/// What a recipient's answer to its latest narrowing says of the consent's terms, from
/// the status's `terms_confirmation`.
fn terms_confirmation_text(confirmation: &str) -> Option<&'static str> {
    match confirmation {
        "as-they-stand" => {
            Some("confirmed it applies the consent's restrictions and expiry as they stand")
        }
        "earlier" => Some(
            "confirmed the consent's restrictions and expiry only as they were before a later change, which has yet to reach it",
        ),
        "unconfirmed" => Some(
            "did not confirm the consent's restrictions and expiry (it, or the request it answered, predates confirmations): make sure it knows them by other means, or ask again with `corridor consent restate` once it runs a version that confirms them",
        ),
        _ => None,
    }
}

/// When, and what a purge receipt says was destroyed or cut.
fn purge_receipt_text(pr: &pb::PurgeReceipt) -> String {
    if pr.narrowing && pr.purged_referrals.is_empty() && pr.cut_referrals.is_empty() {
        // A narrowing it had nothing to cut for: it was told the terms as they then stood.
        return format!(
            "{}: nothing to destroy or cut{}, signed receipt held",
            format_time(pr.purged_at_ms),
            if !pr.terms_confirmed.is_empty() {
                ", the consent's terms confirmed"
            } else {
                ""
            }
        );
    }
    let cut = if pr.narrowing {
        format!(
            ", {} cut to the fields the consent still covers",
            pr.cut_referrals.len()
        )
    } else {
        String::new()
    };
    format!(
        "{}: {} referral(s) destroyed{cut}, signed purge receipt held",
        format_time(pr.purged_at_ms),
        pr.purged_referrals.len()
    )
}

/// A consent's status as JSON and as text.
fn status_views(r: &pb::ConsentStatusResponse) -> (Value, String) {
    let recipients: Vec<Value> = r
        .recipients
        .iter()
        .map(|p| {
            json!({
                "recipient": p.recipient, "state": p.state, "referrals": p.referral_ids,
                "referral_states": p.referrals.iter().map(|r| json!({"referral_id": r.referral_id, "state": r.state})).collect::<Vec<_>>(),
                "request": (!p.request.is_empty()).then(|| json!({"kind": p.request, "state": p.request_state})),
                "attempts": p.attempts, "last_error": p.last_error,
                "kept_whole_referrals": p.kept_whole_referral_ids,
                "purge_receipt": p.purge_receipt.as_ref().map(purge_receipt_json),
                "earlier_purge_receipts": p.earlier_receipts.iter().map(purge_receipt_json).collect::<Vec<_>>(),
                "terms_confirmation": (!p.terms_confirmation.is_empty()).then_some(&p.terms_confirmation),
            })
        })
        .collect();
    let outstanding = r
        .recipients
        .iter()
        .filter(|p| p.state.starts_with("pending"))
        .count();
    let value = json!({
        "consent": r.consent.as_ref().map(|c| consent_json(c, false)),
        "recipients": recipients,
        "outstanding": outstanding,
    });
    let text = {
        let mut text = r.consent.as_ref().map(consent_text).unwrap_or_default();
        if r.recipients.is_empty() {
            text.push_str("\n  no data was sent under this consent");
        }
        for p in &r.recipients {
            text.push_str(&format!(
                "\n  {:<16} {}",
                escape_controls(&p.recipient),
                escape_controls(&p.state)
            ));
            if let Some(pr) = &p.purge_receipt {
                text.push_str(&format!(" at {}", purge_receipt_text(pr)));
            } else if !p.last_error.is_empty() {
                text.push_str(&format!(
                    " (attempts {}, last error: {})",
                    p.attempts,
                    escape_controls(&p.last_error)
                ));
            }
            if let Some(confirmation) = terms_confirmation_text(&p.terms_confirmation) {
                text.push_str(&format!("\n  {:<16} {confirmation}", ""));
            }
            for pr in &p.earlier_receipts {
                let what = if pr.narrowing { "narrowed" } else { "purged" };
                text.push_str(&format!(
                    "\n  {:<16} earlier: {what} at {}",
                    "",
                    purge_receipt_text(pr)
                ));
            }
            if !p.kept_whole_referral_ids.is_empty() {
                text.push_str(&format!(
                    "\n  {:<16} {}",
                    "",
                    kept_whole_text(p.kept_whole_referral_ids.len())
                ));
            }
        }
        if r.consent.as_ref().is_some_and(|c| c.withdrawn_at_ms != 0) || outstanding > 0 {
            text.push_str(&format!("\n  {outstanding} purge receipt(s) outstanding"));
        }
        text
    };
    (value, text)
}

fn status_output(output: Output, r: &pb::ConsentStatusResponse) {
    let (value, text) = status_views(r);
    print(output, &value, || text);
}

pub async fn consent(
    client: &mut Client,
    output: Output,
    cmd: ConsentCommand,
) -> Result<(), String> {
    match cmd {
        ConsentCommand::Record(c) => {
            let (guardian_basis, language) = consent_details(
                c.details_file.as_deref(),
                (c.guardian_basis.clone(), c.language.clone()),
            )?;
            // As the node records it, so that what is printed is what the person agreed.
            let expires_at_ms = corridor::consent::recorded_expiry(
                now_ms() + i64::from(c.expires_in_days) * 86_400_000,
            );
            let r = client
                .record_consent(pb::RecordConsentRequest {
                    case_id: c.case_id,
                    scope: Some(pb::ConsentScope {
                        purposes: c.purposes.clone(),
                        recipient_orgs: c.recipients.clone(),
                        recipient_roles: c.recipient_roles.clone(),
                        fields: c.fields.clone(),
                        excluded_countries: c.excluded_countries,
                        no_family_contact: c.no_family_contact,
                        expires_at_ms,
                    }),
                    given_by: c.given_by,
                    guardian_basis,
                    method: c.method,
                    language,
                })
                .await
                .map_err(|s| explain(&s))?
                .into_inner();
            print(
                output,
                &json!({ "consent_id": r.consent_id, "expires_at_ms": expires_at_ms }),
                || {
                    // As the node keeps them: sets, each name once.
                    let set = |names: &[String]| {
                        let names: std::collections::BTreeSet<&str> =
                            names.iter().map(String::as_str).collect();
                        let joined = names.into_iter().collect::<Vec<_>>().join(", ");
                        escape_controls(&joined).into_owned()
                    };
                    format!(
                        "consent recorded: {} (purposes: {}; fields: {}; expires {})",
                        escape_controls(&r.consent_id),
                        set(&c.purposes),
                        set(&c.fields),
                        format_time(expires_at_ms)
                    )
                },
            );
        }
        ConsentCommand::Show { id } => {
            let c = client
                .get_consent(pb::ConsentRequest { consent_id: id })
                .await
                .map_err(|s| explain(&s))?
                .into_inner();
            print(output, &consent_json(&c, true), || consent_text(&c));
        }
        ConsentCommand::Narrow(n) => {
            // Each attempt narrows the consent as it read it; another narrowing landing
            // in between makes the node refuse it (ABORTED), and the next attempt reads
            // the consent again.
            let mut attempts = 0;
            let c = loop {
                attempts += 1;
                // The consent as its status gives it: without its sealed details, whose
                // read `consent show` alone makes (and the node audits).
                let current = client
                    .get_consent_status(pb::ConsentRequest {
                        consent_id: n.id.clone(),
                    })
                    .await
                    .map_err(|s| explain(&s))?
                    .into_inner()
                    .consent
                    .ok_or("the node answered without the consent")?;
                let scope = narrowed_scope(current.scope.unwrap_or_default(), &n)?;
                let narrowed = client
                    .narrow_consent(pb::NarrowConsentRequest {
                        consent_id: n.id.clone(),
                        scope: Some(scope),
                        if_narrowed_at_ms: Some(current.narrowed_at_ms),
                    })
                    .await;
                match narrowed {
                    Ok(c) => break c.into_inner(),
                    Err(s) if s.code() == tonic::Code::Aborted && attempts < 5 => continue,
                    Err(s) => return Err(explain(&s)),
                }
            };
            // Referrals the narrowing could only keep whole are the caseworker's to act on.
            // The narrowing stands whether or not this can be read.
            let kept_whole: Result<usize, String> = client
                .get_consent_status(pb::ConsentRequest {
                    consent_id: c.consent_id.clone(),
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .recipients
                        .iter()
                        .map(|p| p.kept_whole_referral_ids.len())
                        .sum()
                })
                .map_err(|s| explain(&s));
            let mut json = consent_json(&c, false);
            if let (Some(fields), Ok(count)) = (json.as_object_mut(), &kept_whole) {
                fields.insert("kept_whole_referral_count".into(), (*count).into());
            }
            print(output, &json, || {
                let warning = match &kept_whole {
                    Ok(0) => String::new(),
                    Ok(count) => format!("\nWarning: {}.", kept_whole_text(*count)),
                    Err(e) => format!(
                        "\nCould not check for referrals kept whole ({e}): `corridor consent status` lists them."
                    ),
                };
                format!(
                    "narrowed. Referrals still queued under it were cancelled (send them again if the narrowed consent covers them); recipients holding what it no longer covers are asked to purge it, and those holding data under it are told of new restrictions or an earlier expiry: `corridor consent status {}` shows them.{warning}\n{}",
                    escape_controls(&c.consent_id),
                    consent_text(&c)
                )
            });
        }
        ConsentCommand::Withdraw { id } => {
            let r = client
                .withdraw_consent(pb::ConsentRequest { consent_id: id })
                .await
                .map_err(|s| explain(&s))?
                .into_inner();
            status_output(output, &r);
        }
        ConsentCommand::Status { id } => {
            let r = client
                .get_consent_status(pb::ConsentRequest { consent_id: id })
                .await
                .map_err(|s| explain(&s))?
                .into_inner();
            status_output(output, &r);
        }
        ConsentCommand::Restate { id } => {
            let r = client
                .restate_consent_terms(pb::ConsentRequest { consent_id: id })
                .await
                .map_err(|s| explain(&s))?
                .into_inner();
            let (status, text) = r.status.as_ref().map(status_views).unwrap_or_default();
            let asked = if r.asked.is_empty() {
                "nothing to ask: every organisation holding data under the consent confirmed its terms as they stand, or has a request on its way".to_owned()
            } else {
                format!(
                    "asked {} to confirm the consent's restrictions and expiry",
                    r.asked
                        .iter()
                        .map(|o| escape_controls(o))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            print(output, &json!({"asked": r.asked, "status": status}), || {
                format!("{asked}\n{text}")
            });
        }
    }
    Ok(())
}

/// `corridor profiles`: the purpose table, or the field catalogue.
pub fn profiles(output: ProfilesOutput, fields: bool) {
    use corridor::profile;
    if fields {
        match output {
            ProfilesOutput::Json => {
                let list: Vec<Value> = corridor::Field::ALL
                    .iter()
                    .map(|f| json!({"name": f.as_str(), "class": f.sensitivity().as_str(), "description": f.description()}))
                    .collect();
                outln!("{}", json!({ "fields": list }));
            }
            _ => {
                for f in corridor::Field::ALL {
                    outln!(
                        "{:<28} {:<12} {}",
                        f.as_str(),
                        f.sensitivity().as_str(),
                        f.description()
                    );
                }
            }
        }
        return;
    }
    match output {
        ProfilesOutput::Markdown => out!("{}", profile::markdown_table()),
        ProfilesOutput::Json => {
            let list: Vec<Value> = profile::all()
                .iter()
                .map(|p| {
                    json!({
                        "purpose": p.purpose.as_str(),
                        "recipient_roles": p.recipient_roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                        "required": p.required.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
                        "optional": p.optional.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            outln!("{}", json!({ "profiles": list }));
        }
        ProfilesOutput::Text => {
            for p in profile::all() {
                let names = |fs: &[corridor::Field]| {
                    fs.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", ")
                };
                outln!("{}", p.purpose);
                outln!(
                    "  to:       {}",
                    p.recipient_roles
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                outln!("  required: {}", names(p.required));
                outln!("  optional: {}\n", names(p.optional));
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProfilesOutput {
    Text,
    Json,
    Markdown,
}

pub fn receipt_json(r: &pb::Receipt) -> Value {
    json!({
        "message_id": hex::encode(&r.message_id),
        "envelope_digest": hex::encode(&r.envelope_digest),
        "sender": r.sender,
        "recipient": r.recipient,
        "received_at_ms": r.received_at_ms,
        "log_index": r.log_index,
        "signature": hex::encode(&r.signature),
    })
}

/// The scope `n` asks for: `current` with its removals and additions. A removal of
/// something the consent does not have (a misspelt field, say) would be taken for done:
/// the whole narrowing is refused instead.
fn narrowed_scope(
    mut scope: pb::ConsentScope,
    n: &NarrowConsent,
) -> Result<pb::ConsentScope, String> {
    let absent: Vec<String> = [
        ("purpose", &scope.purposes, &n.remove_purposes),
        ("recipient", &scope.recipient_orgs, &n.remove_recipients),
        (
            "recipient role",
            &scope.recipient_roles,
            &n.remove_recipient_roles,
        ),
        ("field", &scope.fields, &n.remove_fields),
    ]
    .into_iter()
    .flat_map(|(what, present, gone)| {
        gone.iter()
            .filter(|x| !present.contains(x))
            .map(move |x| match (what, x.as_str()) {
                (_, "") => format!("{what} named by an empty value"),
                ("field", name) if corridor::Field::parse(name).is_err() => {
                    format!(
                        "field {} (no such field: see `corridor profiles --fields`)",
                        escape_controls(name)
                    )
                }
                ("purpose", name) if corridor::Purpose::parse(name).is_err() => {
                    format!(
                        "purpose {} (no such purpose: see `corridor profiles`)",
                        escape_controls(name)
                    )
                }
                _ => format!("{what} {}", escape_controls(x)),
            })
    })
    .collect();
    if !absent.is_empty() {
        return Err(format!(
            "consent {} has no {}: nothing was narrowed",
            n.id,
            absent.join(", ")
        ));
    }
    let remove = |list: &mut Vec<String>, gone: &[String]| list.retain(|x| !gone.contains(x));
    remove(&mut scope.purposes, &n.remove_purposes);
    remove(&mut scope.recipient_orgs, &n.remove_recipients);
    remove(&mut scope.recipient_roles, &n.remove_recipient_roles);
    remove(&mut scope.fields, &n.remove_fields);
    for c in &n.excluded_countries {
        if !scope.excluded_countries.contains(c) {
            scope.excluded_countries.push(c.clone());
        }
    }
    scope.no_family_contact |= n.no_family_contact;
    if let Some(days) = n.expires_in_days {
        scope.expires_at_ms = now_ms() + i64::from(days) * 86_400_000;
    }
    Ok(scope)
}

/// A country as the node expects it: an ISO 3166-1 alpha-2 code, in capitals.
fn country_code(value: &str) -> Result<String, String> {
    let code = value.to_ascii_uppercase();
    if corridor::country::is_country_code(&code) {
        Ok(code)
    } else {
        Err("not an ISO 3166-1 alpha-2 country code (such as KH)".into())
    }
}

/// An empty `--request-id` (an unset shell variable, say) would quietly turn off the
/// protection against sending twice that the caller asked for.
fn non_empty_request_id(value: &str) -> Result<String, String> {
    if value.is_empty() {
        Err("a request id cannot be empty".into())
    } else {
        Ok(value.to_owned())
    }
}

pub async fn referral(
    client: &mut Client,
    output: Output,
    cmd: ReferralCommand,
) -> Result<(), String> {
    match cmd {
        ReferralCommand::Send(s) => {
            let fields = referral_fields(s.fields_file.as_deref(), s.fields)?;
            let r = client
                .send_referral(pb::SendReferralRequest {
                    case_id: s.case_id,
                    recipient: s.recipient.clone(),
                    purpose: s.purpose,
                    fields,
                    consent_id: s.consent.unwrap_or_default(),
                    wait: s.wait,
                    request_id: s.request_id.unwrap_or_default(),
                })
                .await
                .map_err(|st| explain(&st))?
                .into_inner();
            match &r.status {
                Some(status) => {
                    print_status(output, status);
                    if status.state != "delivered" {
                        return Err(match status.state.as_str() {
                            "queued" => format!(
                                "referral {} is not delivered yet; it stays queued (see `corridor referral status {}`)",
                                r.referral_id, r.referral_id
                            ),
                            state => {
                                format!("referral {} was not delivered: {state}", r.referral_id)
                            }
                        });
                    }
                }
                None => {
                    // A request id sent again answers with the referral it made first,
                    // which may have ended without reaching the recipient since.
                    let id = escape_controls(&r.referral_id);
                    // With --wait, no status means the node could not read it.
                    if s.wait && r.state == "queued" {
                        return Err(format!(
                            "referral {id} is queued, but the node could not tell whether it was delivered (see `corridor referral status {id}`)"
                        ));
                    }
                    if let "cancelled" | "withdrawn" | "refused" | "expired" = r.state.as_str() {
                        return Err(format!(
                            "referral {id}, made by this request before, was {}: it will not be delivered (see `corridor referral status {id}`)",
                            r.state
                        ));
                    }
                    print(
                        output,
                        &json!({ "referral_id": r.referral_id, "state": r.state }),
                        || match r.state.as_str() {
                            "queued" => {
                                format!("referral {id} queued for delivery to {}", s.recipient)
                            }
                            state => format!(
                                "referral {id} to {}, made by this request before, is {}",
                                s.recipient,
                                escape_controls(state)
                            ),
                        },
                    )
                }
            }
        }
        ReferralCommand::Show { id, sender } => {
            let r = client
                .get_referral(pb::GetReferralRequest {
                    referral_id: id,
                    sender: sender.unwrap_or_default(),
                })
                .await
                .map_err(|s| explain(&s))?
                .into_inner();
            let mut fields: Vec<_> = r.fields.iter().collect();
            fields.sort();
            print(
                output,
                &json!({
                    "referral_id": r.referral_id, "sender": r.sender, "recipient": r.recipient,
                    "purpose": r.purpose, "case_ref": r.case_ref, "fields": r.fields,
                    "received_at_ms": r.received_at_ms, "consent_id": r.consent_id,
                    "consent_expires_at_ms": r.consent_expires_at_ms,
                    "consent_excluded_countries": r.consent_excluded_countries,
                    "consent_no_family_contact": r.consent_no_family_contact,
                    "consent_narrowed_at_ms": r.consent_narrowed_at_ms,
                    "consent_terms_restated": r.consent_terms_restated,
                }),
                || {
                    // What the person set binds this organisation too.
                    let mut restrictions: Vec<String> = r
                        .consent_excluded_countries
                        .iter()
                        .map(|c| format!("never to {}", escape_controls(c)))
                        .collect();
                    if r.consent_no_family_contact {
                        restrictions.push("no contact with family".into());
                    }
                    if restrictions.is_empty() {
                        restrictions.push("none".into());
                    }
                    let as_of = match (r.consent_narrowed_at_ms, r.consent_terms_restated) {
                        (0, _) => "as sent".to_owned(),
                        (at, true) => format!("as narrowed {}", format_time(at)),
                        // A sender on an older version narrows without restating them.
                        (at, false) => format!(
                            "as sent; the sender narrowed the consent {} without restating them: ask it",
                            format_time(at)
                        ),
                    };
                    let mut text = format!(
                        "referral {}\n  from:     {}\n  purpose:  {}\n  case ref: {}\n  received: {}\n  consent:  {}, until {}\n  restrictions: {} ({as_of})\n  fields:",
                        escape_controls(&r.referral_id),
                        escape_controls(&r.sender),
                        escape_controls(&r.purpose),
                        escape_controls(&r.case_ref),
                        format_time(r.received_at_ms),
                        escape_controls(&r.consent_id),
                        format_time(r.consent_expires_at_ms),
                        restrictions.join("; ")
                    );
                    // Names and values are the sender's, another organisation's.
                    for (k, v) in &fields {
                        text.push_str(&format!(
                            "\n    {}: {}",
                            escape_controls(k),
                            escape_controls(v)
                        ));
                    }
                    text
                },
            );
        }
        ReferralCommand::Status { id } => {
            let r = client
                .get_referral_status(pb::GetReferralStatusRequest { referral_id: id })
                .await
                .map_err(|s| explain(&s))?
                .into_inner();
            print_status(output, &r);
        }
    }
    Ok(())
}

fn print_status(output: Output, r: &pb::GetReferralStatusResponse) {
    let receipt = r.receipt.as_ref().map(receipt_json);
    print(
        output,
        &json!({
            "referral_id": r.referral_id, "recipient": r.recipient, "purpose": r.purpose,
            "state": r.state, "attempts": r.attempts, "last_error": r.last_error,
            "created_at_ms": r.created_at_ms, "receipt": receipt,
            "since_delivered": r.since_delivered,
        }),
        || {
            let mut text = format!(
                "referral {}\n  to:       {}\n  purpose:  {}\n  state:    {}\n  attempts: {}",
                escape_controls(&r.referral_id),
                escape_controls(&r.recipient),
                escape_controls(&r.purpose),
                escape_controls(&r.state),
                r.attempts
            );
            if !r.last_error.is_empty() {
                text.push_str(&format!(
                    "\n  last error: {}",
                    escape_controls(&r.last_error)
                ));
            }
            if let Some(rc) = &r.receipt {
                text.push_str(&format!(
                    "\n  receipt:  signed by {} at {}, envelope digest {}",
                    escape_controls(&rc.recipient),
                    format_time(rc.received_at_ms),
                    hex::encode(&rc.envelope_digest)
                ));
            }
            match r.since_delivered.as_str() {
                "purged" => text.push_str(
                    "\n  since:    purged by the recipient (signed purge receipt held, see `corridor consent status`)",
                ),
                "cut" => text.push_str(
                    "\n  since:    cut by the recipient to the fields the narrowed consent covers (signed receipt held)",
                ),
                _ => {}
            }
            text
        },
    );
}

pub async fn inbox(
    client: &mut Client,
    output: Output,
    page_size: u32,
    page_token: String,
) -> Result<(), String> {
    let r = client
        .list_inbox(pb::ListInboxRequest {
            page_size,
            page_token,
        })
        .await
        .map_err(|s| explain(&s))?
        .into_inner();
    let items: Vec<Value> = r
        .items
        .iter()
        .map(|i| {
            json!({
                "referral_id": i.referral_id, "sender": i.sender, "purpose": i.purpose,
                "case_ref": i.case_ref, "received_at_ms": i.received_at_ms,
            })
        })
        .collect();
    print(
        output,
        &json!({ "items": items, "next_page_token": r.next_page_token }),
        || {
            if r.items.is_empty() {
                return "inbox is empty".into();
            }
            let mut text = format!("{} referral(s) received:", r.items.len());
            for i in &r.items {
                text.push_str(&format!(
                    "\n  {}  from {:<16} {:<24} case ref {}  {}",
                    escape_controls(&i.referral_id),
                    escape_controls(&i.sender),
                    escape_controls(&i.purpose),
                    escape_controls(&i.case_ref),
                    format_time(i.received_at_ms)
                ));
            }
            if !r.next_page_token.is_empty() {
                text.push_str(&format!(
                    "\nolder referrals follow: corridor inbox --page-token {}",
                    escape_controls(&r.next_page_token)
                ));
            }
            text
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_terms_confirmation_the_node_names_has_a_sentence() {
        use corridor::TermsConfirmation as C;
        for c in [C::AsTheyStand, C::Earlier, C::Unconfirmed] {
            assert!(terms_confirmation_text(c.as_str()).is_some(), "{c:?}");
        }
        assert_eq!(terms_confirmation_text(""), None);
        assert!(
            terms_confirmation_text("unconfirmed").is_some_and(|t| t.contains("by other means"))
        );
    }

    #[test]
    fn country_codes_are_taken_in_either_case_and_checked() {
        assert_eq!(country_code("kh"), Ok("KH".into()));
        assert_eq!(country_code("TH"), Ok("TH".into()));
        for bad in ["", "K", "KHM", "k1", "é", "cb", "QQ"] {
            assert!(country_code(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_narrowing_names_what_the_consent_does_not_have_and_why() {
        let scope = pb::ConsentScope {
            purposes: vec!["reintegration".into()],
            fields: vec!["needs".into()],
            ..Default::default()
        };
        let narrowing = |fields: &[&str], purposes: &[&str]| NarrowConsent {
            id: "consent-1".into(),
            remove_purposes: purposes.iter().map(|p| p.to_string()).collect(),
            remove_recipients: Vec::new(),
            remove_recipient_roles: Vec::new(),
            remove_fields: fields.iter().map(|f| f.to_string()).collect(),
            excluded_countries: Vec::new(),
            no_family_contact: false,
            expires_in_days: None,
        };
        let err = narrowed_scope(
            scope.clone(),
            &narrowing(&["bogus_field", "sex", ""], &["legal"]),
        )
        .unwrap_err();
        assert!(err.contains("field bogus_field (no such field"), "{err}");
        assert!(err.contains("field sex,"), "{err}");
        assert!(err.contains("field named by an empty value"), "{err}");
        assert!(err.contains("purpose legal (no such purpose"), "{err}");
        let narrowed = narrowed_scope(scope, &narrowing(&["needs"], &[])).expect("narrowed");
        assert!(narrowed.fields.is_empty());
    }

    #[test]
    fn fields_need_an_equals_sign() {
        assert_eq!(
            parse_field("age_band=25-29"),
            Some(("age_band".into(), "25-29".into()))
        );
        assert!(parse_field("oops").is_none());
    }

    #[test]
    fn fields_come_from_a_file_and_flags_and_no_value_is_quoted_in_errors() {
        let dir = std::env::temp_dir().join(format!("corridor-fields-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("fields.toml");
        std::fs::write(
            &file,
            "preferred_name = \"Srey Mom\"\nage_band = \"25-29\"\n",
        )
        .expect("write");
        let flag = vec!["languages=Khmer".to_string()];
        let fields = referral_fields(Some(&file), flag).expect("fields");
        assert_eq!(fields.len(), 3);
        assert_eq!(fields["preferred_name"], "Srey Mom");
        assert_eq!(fields["languages"], "Khmer");

        let twice = vec!["age_band=30-34".to_string()];
        let err = referral_fields(Some(&file), twice).expect_err("twice");
        assert!(err.contains("age_band") && !err.contains("30-34"), "{err}");
        let no_name = vec!["languages=Khmer".to_string(), "+60123456789".to_string()];
        let err = referral_fields(None, no_name).expect_err("no name");
        assert_eq!(err, "--field number 2 must be written name=value");

        std::fs::write(&file, "preferred_name = Srey Mom\n").expect("write");
        let err = referral_fields(Some(&file), vec![]).expect_err("not TOML");
        assert!(err.contains("not TOML") && !err.contains("Srey"), "{err}");
        std::fs::write(&file, "age_band = 25\n").expect("write");
        let err = referral_fields(Some(&file), vec![]).expect_err("not a string");
        assert!(err.contains("age_band"), "{err}");
        let err = referral_fields(Some(&dir.join("missing.toml")), vec![]).expect_err("missing");
        assert!(err.contains("cannot read"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn consent_details_come_from_a_file_or_flags_and_no_value_is_quoted_in_errors() {
        let dir = std::env::temp_dir().join(format!("corridor-details-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("details.toml");
        std::fs::write(&file, "guardian_basis = \"aunt\"\nlanguage = \"Khmer\"\n").expect("write");
        let none = (String::new(), String::new());
        assert_eq!(
            consent_details(Some(&file), none.clone()),
            Ok(("aunt".into(), "Khmer".into()))
        );
        assert_eq!(
            consent_details(None, ("aunt".into(), String::new())),
            Ok(("aunt".into(), String::new()))
        );
        let err = consent_details(Some(&file), (String::new(), "Thai".into())).expect_err("twice");
        assert_eq!(err, "language is given twice");
        std::fs::write(&file, "name = \"Srey Mom\"\n").expect("write");
        let err = consent_details(Some(&file), none.clone()).expect_err("not a detail");
        assert!(
            err.starts_with("name in the consent details file is not a detail"),
            "{err}"
        );
        assert!(!err.contains("Srey"), "{err}");
        std::fs::write(&file, "language = Khmer\n").expect("write");
        let err = consent_details(Some(&file), none).expect_err("not TOML");
        assert!(err.contains("not TOML") && !err.contains("Khmer"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fields_file_larger_than_the_local_api_accepts_is_refused_unread() {
        let err =
            referral_fields(Some(std::path::Path::new("/dev/zero")), vec![]).expect_err("endless");
        assert_eq!(
            err,
            "the fields in /dev/zero are larger than 1 MiB, the largest request the node's local API accepts"
        );
    }
}
