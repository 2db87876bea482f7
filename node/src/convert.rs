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
        signature: r.signature,
    })
}
