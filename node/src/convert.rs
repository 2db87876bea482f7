//! Conversions between the protobuf wire messages and the protocol core's types. Every
//! conversion from the wire validates and names the field it rejects.

use corridor::envelope::EnvelopeError;
use corridor::{Envelope, EnvelopeHeader, MessageId, MessageKind, OrgId, Receipt};
use corridor_proto::v1 as pb;

fn org(field: &'static str, value: &str) -> Result<OrgId, EnvelopeError> {
    OrgId::new(value).map_err(|source| EnvelopeError::BadOrgId { field, source })
}

pub fn envelope_from_pb(e: pb::Envelope) -> Result<Envelope, EnvelopeError> {
    let h = e.header.ok_or(EnvelopeError::MissingHeader)?;
    if h.route.len() > corridor::envelope::MAX_ROUTE_LEN {
        return Err(EnvelopeError::RelayNotSupported(h.route.len()));
    }
    let route = h
        .route
        .iter()
        .map(|r| org("route", r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Envelope {
        header: EnvelopeHeader {
            version: h.version,
            message_id: MessageId::from_bytes(&h.message_id)?,
            kind: MessageKind::from_i32(h.kind)?,
            sender: org("sender", &h.sender)?,
            recipient: org("recipient", &h.recipient)?,
            route,
            created_at_ms: h.created_at_ms,
            expires_at_ms: h.expires_at_ms,
        },
        encapsulated_key: e.encapsulated_key,
        ciphertext: e.ciphertext,
        signature: e.signature,
    })
}

pub fn envelope_to_pb(e: &Envelope) -> pb::Envelope {
    let h = &e.header;
    pb::Envelope {
        header: Some(pb::EnvelopeHeader {
            version: h.version,
            message_id: h.message_id.0.to_vec(),
            kind: h.kind.as_i32(),
            sender: h.sender.to_string(),
            recipient: h.recipient.to_string(),
            route: h.route.iter().map(OrgId::to_string).collect(),
            created_at_ms: h.created_at_ms,
            expires_at_ms: h.expires_at_ms,
        }),
        encapsulated_key: e.encapsulated_key.clone(),
        ciphertext: e.ciphertext.clone(),
        signature: e.signature.clone(),
    }
}

pub fn receipt_to_pb(r: &Receipt) -> pb::Receipt {
    pb::Receipt {
        version: r.version,
        message_id: r.message_id.0.to_vec(),
        envelope_digest: r.envelope_digest.to_vec(),
        sender: r.sender.to_string(),
        recipient: r.recipient.to_string(),
        received_at_ms: r.received_at_ms,
        log_index: r.log_index,
        leaf_hash: r.leaf_hash.to_vec(),
        signature: r.signature.clone(),
    }
}

pub fn receipt_from_pb(r: pb::Receipt) -> Result<Receipt, corridor::ReceiptError> {
    use corridor::ReceiptError::Malformed;
    Ok(Receipt {
        version: r.version,
        message_id: MessageId::from_bytes(&r.message_id).map_err(|_| Malformed("message_id"))?,
        envelope_digest: r
            .envelope_digest
            .as_slice()
            .try_into()
            .map_err(|_| Malformed("envelope_digest"))?,
        sender: OrgId::new(&r.sender).map_err(|_| Malformed("sender"))?,
        recipient: OrgId::new(&r.recipient).map_err(|_| Malformed("recipient"))?,
        received_at_ms: r.received_at_ms,
        log_index: r.log_index,
        leaf_hash: r
            .leaf_hash
            .as_slice()
            .try_into()
            .map_err(|_| Malformed("leaf_hash"))?,
        signature: r.signature,
    })
}

/// The wire enum value of a catalogue field (`FIELD_<NAME>`).
pub fn field_to_pb(field: corridor::Field) -> i32 {
    pb::Field::from_str_name(&format!("FIELD_{}", field.as_str().to_ascii_uppercase()))
        .map(|f| f as i32)
        .unwrap_or(0)
}

/// The catalogue field of a wire enum value.
pub fn field_from_pb(value: i32) -> Option<corridor::Field> {
    let name = pb::Field::try_from(value).ok()?.as_str_name();
    corridor::Field::parse(&name.strip_prefix("FIELD_")?.to_ascii_lowercase()).ok()
}

pub fn consent_receipt_to_pb(r: &corridor::ConsentReceipt) -> pb::ConsentReceipt {
    pb::ConsentReceipt {
        consent_id: r.consent_id.clone(),
        sender: r.sender.to_string(),
        recipient: r.recipient.to_string(),
        case_ref: r.case_ref.clone(),
        purposes: r.purposes.iter().map(|p| p.as_str().to_owned()).collect(),
        fields: r.fields.iter().map(|f| field_to_pb(*f)).collect(),
        excluded_countries: r.restrictions.excluded_countries.iter().cloned().collect(),
        no_family_contact: r.restrictions.no_family_contact,
        expires_at_ms: r.expires_at_ms,
        issued_at_ms: r.issued_at_ms,
        signature: r.signature.clone(),
    }
}

/// Why a wire consent receipt is malformed.
pub fn consent_receipt_from_pb(r: pb::ConsentReceipt) -> Result<corridor::ConsentReceipt, String> {
    let purposes = r
        .purposes
        .iter()
        .map(|p| corridor::Purpose::parse(p).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let fields = r
        .fields
        .iter()
        .map(|f| field_from_pb(*f).ok_or_else(|| format!("unknown field {f}")))
        .collect::<Result<_, _>>()?;
    Ok(corridor::ConsentReceipt {
        consent_id: r.consent_id,
        sender: OrgId::new(&r.sender).map_err(|e| format!("sender: {e}"))?,
        recipient: OrgId::new(&r.recipient).map_err(|e| format!("recipient: {e}"))?,
        case_ref: r.case_ref,
        purposes,
        fields,
        restrictions: corridor::consent::Restrictions {
            excluded_countries: r.excluded_countries.into_iter().collect(),
            no_family_contact: r.no_family_contact,
        },
        expires_at_ms: r.expires_at_ms,
        issued_at_ms: r.issued_at_ms,
        signature: r.signature,
    })
}

pub fn consent_terms_to_pb(t: &corridor::ConsentTerms) -> pb::ConsentTerms {
    pb::ConsentTerms {
        excluded_countries: t.restrictions.excluded_countries.iter().cloned().collect(),
        no_family_contact: t.restrictions.no_family_contact,
        expires_at_ms: t.expires_at_ms,
    }
}

/// Terms from the wire, checked for form ([`corridor::ConsentTerms::check_form`]).
pub fn consent_terms_from_pb(
    t: pb::ConsentTerms,
) -> Result<corridor::ConsentTerms, corridor::consent::ConsentTermsError> {
    let terms = corridor::ConsentTerms {
        restrictions: corridor::consent::Restrictions {
            excluded_countries: t.excluded_countries.into_iter().collect(),
            no_family_contact: t.no_family_contact,
        },
        expires_at_ms: t.expires_at_ms,
    };
    terms.check_form()?;
    Ok(terms)
}

pub fn purge_receipt_to_pb(r: &corridor::PurgeReceipt) -> pb::PurgeReceipt {
    pb::PurgeReceipt {
        withdrawal_id: r.withdrawal_id.0.to_vec(),
        consent_id: r.consent_id.clone(),
        case_ref: r.case_ref.clone(),
        requester: r.requester.to_string(),
        purger: r.purger.to_string(),
        purged_referrals: r.purged_referrals.iter().map(|m| m.0.to_vec()).collect(),
        purged_at_ms: r.purged_at_ms,
        signature: r.signature.clone(),
        narrowing: r.cut_referrals.is_some(),
        cut_referrals: r
            .cut_referrals
            .iter()
            .flatten()
            .map(|m| m.0.to_vec())
            .collect(),
        terms_confirmed: r.terms_confirmed.map(|d| d.to_vec()).unwrap_or_default(),
    }
}

pub fn purge_receipt_from_pb(r: pb::PurgeReceipt) -> Result<corridor::PurgeReceipt, String> {
    let ids = |list: &[Vec<u8>]| {
        list.iter()
            .map(|m| MessageId::from_bytes(m).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()
    };
    let cut_referrals = match r.narrowing {
        true => Some(ids(&r.cut_referrals)?),
        false if r.cut_referrals.is_empty() => None,
        false => return Err("a withdrawal's purge receipt names referrals cut".into()),
    };
    Ok(corridor::PurgeReceipt {
        withdrawal_id: MessageId::from_bytes(&r.withdrawal_id).map_err(|e| e.to_string())?,
        consent_id: r.consent_id,
        case_ref: r.case_ref,
        requester: OrgId::new(&r.requester).map_err(|e| format!("requester: {e}"))?,
        purger: OrgId::new(&r.purger).map_err(|e| format!("purger: {e}"))?,
        purged_referrals: ids(&r.purged_referrals)?,
        cut_referrals,
        terms_confirmed: match r.terms_confirmed.len() {
            0 => None,
            _ => Some(
                r.terms_confirmed
                    .try_into()
                    .map_err(|_| "its confirmation of the consent's terms is not 32 bytes")?,
            ),
        },
        purged_at_ms: r.purged_at_ms,
        signature: r.signature,
    })
}

/// A sent referral's stored status as the local API shows it; Err if its stored receipt
/// does not decode.
pub fn outbox_status_to_pb(
    status: crate::storage::OutboxStatus,
) -> Result<pb::GetReferralStatusResponse, prost::DecodeError> {
    use prost::Message as _;
    let receipt = status
        .receipt
        .map(|bytes| pb::Receipt::decode(bytes.as_slice()))
        .transpose()?;
    Ok(pb::GetReferralStatusResponse {
        referral_id: status.message_id.to_hex(),
        recipient: status.recipient,
        purpose: status.purpose,
        state: status.state,
        attempts: u32::try_from(status.attempts).unwrap_or(u32::MAX),
        last_error: status.last_error.unwrap_or_default(),
        created_at_ms: status.created_at_ms,
        receipt,
        since_delivered: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalogue_field_has_its_wire_value_and_back() {
        for field in corridor::Field::ALL {
            let wire = field_to_pb(*field);
            assert_ne!(wire, 0, "{field} missing from the proto Field enum");
            assert_eq!(field_from_pb(wire), Some(*field));
        }
        // And the proto enum has nothing the catalogue lacks.
        for value in 1..100 {
            if pb::Field::try_from(value).is_ok() {
                assert!(
                    field_from_pb(value).is_some(),
                    "proto field {value} not in catalogue"
                );
            }
        }
    }
}
