//! Caseworker commands: cases, consent, referrals and the inbox. Human-readable output by
//! default, one JSON document with `--output json`.

use std::collections::HashMap;

use clap::{Args, Subcommand, ValueEnum};
use corridor_proto::v1 as pb;
use serde_json::{Value, json};

use crate::client::{Client, explain};

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
}

#[derive(Debug, Clone, Args)]
pub struct RecordConsent {
    /// Case id.
    #[arg(long = "case")]
    pub case_id: String,
    /// Org that may receive the data (repeat for several).
    #[arg(long = "recipient", required = true)]
    pub recipients: Vec<String>,
    /// Purpose the data may be used for (repeat for several); see `corridor referral send --help`.
    #[arg(long = "purpose", required = true)]
    pub purposes: Vec<String>,
    /// Days until the consent expires.
    #[arg(long, default_value_t = 90)]
    pub expires_in_days: u32,
    /// Who gave consent: person or guardian.
    #[arg(long, default_value = "person")]
    pub given_by: String,
    /// How it was given: written, verbal or interpreter.
    #[arg(long, default_value = "written")]
    pub method: String,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ReferralCommand {
    /// Send a referral; it leaves the node only if the case's consent allows it.
    Send(SendReferral),
    /// Show a referral this node received, with its fields.
    Show {
        /// Referral id.
        id: String,
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
    /// A field to disclose, as name=value (repeat for several).
    #[arg(long = "field", value_parser = parse_field)]
    pub fields: Vec<(String, String)>,
}

fn parse_field(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| "a field must be written name=value".to_string())
}

fn print(output: Output, value: &Value, text: impl FnOnce() -> String) {
    match output {
        Output::Json => println!("{value}"),
        Output::Text => println!("{}", text()),
    }
}

pub fn now_ms() -> i64 {
    corridor_node::node::now_ms()
}

pub fn format_time(ms: i64) -> String {
    // Seconds since the epoch in UTC, without a date library: days and time of day.
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
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
                format!("case created: {}", r.case_id)
            });
        }
    }
    Ok(())
}

pub async fn consent(
    client: &mut Client,
    output: Output,
    cmd: ConsentCommand,
) -> Result<(), String> {
    match cmd {
        ConsentCommand::Record(c) => {
            let expires_at_ms = now_ms() + i64::from(c.expires_in_days) * 86_400_000;
            let r = client
                .record_consent(pb::RecordConsentRequest {
                    case_id: c.case_id,
                    recipients: c.recipients.clone(),
                    purposes: c.purposes.clone(),
                    expires_at_ms,
                    given_by: c.given_by,
                    method: c.method,
                })
                .await
                .map_err(|s| explain(&s))?
                .into_inner();
            print(
                output,
                &json!({ "consent_id": r.consent_id, "expires_at_ms": expires_at_ms }),
                || {
                    format!(
                        "consent recorded: {} (recipients: {}; purposes: {}; expires {})",
                        r.consent_id,
                        c.recipients.join(", "),
                        c.purposes.join(", "),
                        format_time(expires_at_ms)
                    )
                },
            );
        }
    }
    Ok(())
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

pub async fn referral(
    client: &mut Client,
    output: Output,
    cmd: ReferralCommand,
) -> Result<(), String> {
    match cmd {
        ReferralCommand::Send(s) => {
            let fields: HashMap<String, String> = s.fields.into_iter().collect();
            let r = client
                .send_referral(pb::SendReferralRequest {
                    case_id: s.case_id,
                    recipient: s.recipient.clone(),
                    purpose: s.purpose,
                    fields,
                })
                .await
                .map_err(|st| explain(&st))?
                .into_inner();
            print(
                output,
                &json!({ "referral_id": r.referral_id, "state": r.state }),
                || {
                    format!(
                        "referral {} {} for delivery to {}",
                        r.referral_id, r.state, s.recipient
                    )
                },
            );
        }
        ReferralCommand::Show { id } => {
            let r = client
                .get_referral(pb::GetReferralRequest { referral_id: id })
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
                }),
                || {
                    let mut text = format!(
                        "referral {}\n  from:     {}\n  purpose:  {}\n  case ref: {}\n  received: {}\n  consent:  {}\n  fields:",
                        r.referral_id,
                        r.sender,
                        r.purpose,
                        r.case_ref,
                        format_time(r.received_at_ms),
                        r.consent_id
                    );
                    for (k, v) in &fields {
                        text.push_str(&format!("\n    {k}: {v}"));
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
            let receipt = r.receipt.as_ref().map(receipt_json);
            print(
                output,
                &json!({
                    "referral_id": r.referral_id, "recipient": r.recipient, "purpose": r.purpose,
                    "state": r.state, "attempts": r.attempts, "last_error": r.last_error,
                    "created_at_ms": r.created_at_ms, "receipt": receipt,
                }),
                || {
                    let mut text = format!(
                        "referral {}\n  to:       {}\n  purpose:  {}\n  state:    {}\n  attempts: {}",
                        r.referral_id, r.recipient, r.purpose, r.state, r.attempts
                    );
                    if !r.last_error.is_empty() {
                        text.push_str(&format!("\n  last error: {}", r.last_error));
                    }
                    if let Some(rc) = &r.receipt {
                        text.push_str(&format!(
                            "\n  receipt:  signed by {} at {}, envelope digest {}",
                            rc.recipient,
                            format_time(rc.received_at_ms),
                            hex::encode(&rc.envelope_digest)
                        ));
                    }
                    text
                },
            );
        }
    }
    Ok(())
}

pub async fn inbox(client: &mut Client, output: Output) -> Result<(), String> {
    let r = client
        .list_inbox(pb::ListInboxRequest {})
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
    print(output, &json!({ "items": items }), || {
        if r.items.is_empty() {
            return "inbox is empty".into();
        }
        let mut text = format!("{} referral(s) received:", r.items.len());
        for i in &r.items {
            text.push_str(&format!(
                "\n  {}  from {:<16} {:<24} case ref {}  {}",
                i.referral_id,
                i.sender,
                i.purpose,
                i.case_ref,
                format_time(i.received_at_ms)
            ));
        }
        text
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_795_000_000_000), "2026-11-18 11:06:40 UTC");
    }

    #[test]
    fn fields_need_an_equals_sign() {
        assert_eq!(
            parse_field("age_band=25-29"),
            Ok(("age_band".into(), "25-29".into()))
        );
        assert!(parse_field("oops").is_err());
    }
}
