//! Consent receipts: the consent crate builds the TS 27560 / Kantara-shaped record; here it
//! gets the gateway's issuer and is signed as a JWS with the receipt key (the same key and
//! JWKS as pull-instruction receipts).

use phr_consent::{build_receipt, Consent, Notice, PiiController, ReceiptEvent, ReceiptInput};
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::config::ConsentConfig;
use crate::error::{Error, Result};
use crate::receipts::ReceiptSigner;

/// Where and how the patient acted: the notice they were shown, in which language.
#[derive(Debug, Clone)]
pub struct ReceiptContext {
    /// The privacy notice shown with the request (receipts link to it).
    pub notice_url: String,
    /// BCP 47 language of the screen, `ja` or `en`.
    pub language: String,
    /// `web-form` (the gateway's pages) or `api`.
    pub collection_method: String,
}

pub(super) fn sign(
    signer: &ReceiptSigner,
    config: &ConsentConfig,
    event: ReceiptEvent,
    consent: &Consent,
    recipient_display: &str,
    context: &ReceiptContext,
) -> Result<String> {
    let controller = &config.controller;
    let now = OffsetDateTime::now_utc();
    let input = ReceiptInput {
        receipt_id: uuid::Uuid::new_v4().to_string(),
        issued_at: now,
        language: context.language.clone(),
        collection_method: context.collection_method.clone(),
        controllers: vec![PiiController {
            name: controller.name.clone(),
            on_behalf: false,
            contact: controller.contact.clone(),
            address: controller.address.clone(),
            email: controller.email.clone(),
            phone: controller.phone.clone(),
            url: controller.url.clone(),
        }],
        policy_url: context.notice_url.clone(),
        notice: Notice {
            url: context.notice_url.clone(),
            version: config.notice_version.clone(),
        },
        recipient_names: consent
            .provision
            .actors
            .iter()
            .map(|recipient| (recipient.clone(), recipient_display.to_string()))
            .collect(),
    };
    let receipt =
        build_receipt(event, consent, &input).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut claims = serde_json::to_value(&receipt).map_err(|e| Error::Invalid(e.to_string()))?;
    if let Value::Object(map) = &mut claims {
        map.insert("iss".into(), json!(signer.issuer()));
        map.insert("iat".into(), json!(now.unix_timestamp()));
        map.insert("jti".into(), json!(input.receipt_id));
    }
    signer.sign(&claims)
}
