//! Batch records: QC results judged against a recipe's release criteria, and the
//! device's signature over the record.
//!
//! A device signs the encoded `BatchRecord` in a DSSE envelope (payload type
//! [`BATCH_RECORD_PAYLOAD_TYPE`]) with the ECDSA P-256 key of its certificate, and
//! sends the certificate with it. Anyone holding the fleet's device intermediates can
//! check, long after, that this device made this record and that not a byte changed.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    BatchRecord, Envelope, EnvelopeSignature, QcResult, QualityAttribute, ReleaseCriteria, RunOutcome,
    SignedBatchRecord,
};

use crate::dsse::{BATCH_RECORD_PAYLOAD_TYPE, pae};
use crate::sign::digest_hex;

/// Largest signed record accepted (a record of a long run with many alarms stays far
/// below).
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

/// Unit of a quality attribute as records print it.
pub fn unit(attribute: QualityAttribute) -> &'static str {
    match attribute {
        QualityAttribute::SizeNm => "nm",
        QualityAttribute::EncapsulationPct | QualityAttribute::YieldPct => "%",
        QualityAttribute::Pdi | QualityAttribute::Ph | QualityAttribute::Unspecified => "",
    }
}

/// Each measurement with the bounds the release criteria set for it, and whether it
/// is within them. An attribute the criteria do not bound passes (it is recorded for
/// trending). A required attribute that was not measured fails.
pub fn evaluate(criteria: &ReleaseCriteria, measured: &[(QualityAttribute, f64)]) -> Vec<QcResult> {
    let range =
        |r: &Option<nanofleet_proto::device::v1::Range>| r.as_ref().map(|r| (Some(r.min), Some(r.max)));
    let bounds = |a: QualityAttribute| -> (Option<f64>, Option<f64>) {
        match a {
            QualityAttribute::SizeNm => range(&criteria.size_nm).unwrap_or((None, None)),
            QualityAttribute::Pdi => (None, (criteria.pdi_max > 0.0).then_some(criteria.pdi_max)),
            QualityAttribute::EncapsulationPct => {
                ((criteria.encapsulation_min_pct > 0.0).then_some(criteria.encapsulation_min_pct), None)
            }
            QualityAttribute::Ph => range(&criteria.ph).unwrap_or((None, None)),
            QualityAttribute::YieldPct | QualityAttribute::Unspecified => (None, None),
        }
    };
    let mut out: Vec<QcResult> = measured
        .iter()
        .map(|&(attribute, value)| {
            let (min, max) = bounds(attribute);
            let passed =
                value.is_finite() && min.is_none_or(|m| value >= m) && max.is_none_or(|m| value <= m);
            QcResult { attribute: attribute as i32, value, unit: unit(attribute).into(), min, max, passed }
        })
        .collect();
    for required in [
        QualityAttribute::SizeNm,
        QualityAttribute::Pdi,
        QualityAttribute::EncapsulationPct,
        QualityAttribute::Ph,
    ] {
        let (min, max) = bounds(required);
        if (min.is_some() || max.is_some()) && !measured.iter().any(|(a, _)| *a == required) {
            out.push(QcResult {
                attribute: required as i32,
                value: f64::NAN,
                unit: unit(required).into(),
                min,
                max,
                passed: false,
            });
        }
    }
    out
}

/// Whether a batch may be released: complete, with QC results, all within criteria.
pub fn passed(record: &BatchRecord) -> bool {
    record.outcome == RunOutcome::Complete as i32
        && !record.qc.is_empty()
        && record.qc.iter().all(|q| q.passed)
}

/// Hex SHA-256 of the public key a device signs with.
fn key_id(public_key: &[u8]) -> String {
    digest_hex(public_key)
}

/// Signs `record` with the device key `key` (PKCS#8 ECDSA P-256) whose certificate is
/// `certificate` (DER).
pub fn sign(
    record: &BatchRecord,
    key: &EcdsaKeyPair,
    certificate: &[u8],
) -> Result<SignedBatchRecord, String> {
    use aws_lc_rs::signature::KeyPair as _;
    let payload = record.encode_to_vec();
    let sig = key
        .sign(&SystemRandom::new(), &pae(BATCH_RECORD_PAYLOAD_TYPE, &payload))
        .map_err(|_| "the device key cannot sign".to_owned())?;
    Ok(SignedBatchRecord {
        envelope: Some(Envelope {
            payload,
            payload_type: BATCH_RECORD_PAYLOAD_TYPE.into(),
            signatures: vec![EnvelopeSignature {
                sig: sig.as_ref().to_vec(),
                keyid: key_id(key.public_key().as_ref()),
            }],
        }),
        certificate: certificate.to_vec(),
    })
}

/// The device key of a PKCS#8 document.
pub fn device_key(pkcs8: &[u8]) -> Result<EcdsaKeyPair, String> {
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
        .map_err(|e| format!("the device key is not an ECDSA P-256 key: {e}"))
}

/// A record whose device signature verified.
#[derive(Debug, Clone)]
pub struct VerifiedRecord {
    pub record: BatchRecord,
    /// Hex SHA-256 of the signed payload (the encoded record).
    pub digest: String,
    /// The certificate that signed (DER): its chain is for the caller to check.
    pub certificate: Vec<u8>,
}

/// Decodes a signed record published by `device_id` and checks its signature with
/// the key of the certificate it carries, that the certificate names `device_id`,
/// and that the record is that device's. The certificate's chain to the fleet is not
/// checked here (see `FleetCa::verify_device_cert`).
pub fn verify(bytes: &[u8], device_id: &str) -> Result<VerifiedRecord, String> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(format!(
            "signed batch record of {} bytes, at most {MAX_RECORD_BYTES} allowed",
            bytes.len()
        ));
    }
    let signed = SignedBatchRecord::decode(bytes).map_err(|e| format!("signed batch record: {e}"))?;
    let env = signed.envelope.ok_or("signed batch record: no envelope")?;
    if env.payload_type != BATCH_RECORD_PAYLOAD_TYPE {
        return Err(format!("payload type {:?}, expected {BATCH_RECORD_PAYLOAD_TYPE:?}", env.payload_type));
    }
    let [sig] = env.signatures.as_slice() else {
        return Err(format!("{} signatures, expected exactly 1 (the device's)", env.signatures.len()));
    };
    let (_, cert) = x509_parser::parse_x509_certificate(&signed.certificate)
        .map_err(|e| format!("device certificate: {e}"))?;
    let named = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default();
    if named != device_id {
        return Err(format!("the certificate names device {named:?}, the record came from {device_id:?}"));
    }
    let public_key = cert.public_key().subject_public_key.data.as_ref();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public_key)
        .verify(&pae(&env.payload_type, &env.payload), &sig.sig)
        .map_err(|_| "the device signature does not verify".to_owned())?;
    let record = BatchRecord::decode(env.payload.as_slice()).map_err(|e| format!("batch record: {e}"))?;
    if record.device_id != device_id {
        return Err(format!("the record names device {:?}, it came from {device_id:?}", record.device_id));
    }
    if record.batch_id.is_empty() || record.batch_id.len() > 128 {
        return Err(format!("batch id {:?}: 1 to 128 characters allowed", record.batch_id));
    }
    Ok(VerifiedRecord { record, digest: digest_hex(&env.payload), certificate: signed.certificate })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanofleet_proto::device::v1::Range;

    fn criteria() -> ReleaseCriteria {
        ReleaseCriteria {
            size_nm: Some(Range { min: 60.0, max: 100.0 }),
            pdi_max: 0.2,
            encapsulation_min_pct: 85.0,
            ph: Some(Range { min: 6.9, max: 7.9 }),
        }
    }

    #[test]
    fn results_are_judged_against_the_release_criteria() {
        let q = evaluate(
            &criteria(),
            &[
                (QualityAttribute::SizeNm, 101.0),
                (QualityAttribute::Pdi, 0.2),
                (QualityAttribute::EncapsulationPct, 84.9),
                (QualityAttribute::Ph, 7.4),
                (QualityAttribute::YieldPct, 20.0),
            ],
        );
        let passed: Vec<bool> = q.iter().map(|r| r.passed).collect();
        assert_eq!(passed, vec![false, true, false, true, true]);
        assert_eq!((q[0].min, q[0].max), (Some(60.0), Some(100.0)));
        assert_eq!((q[1].min, q[1].max), (None, Some(0.2)));
        assert_eq!((q[2].min, q[2].max), (Some(85.0), None));
    }

    #[test]
    fn a_required_attribute_not_measured_fails() {
        let q = evaluate(&criteria(), &[(QualityAttribute::SizeNm, 80.0)]);
        assert_eq!(q.len(), 4);
        assert!(q.iter().skip(1).all(|r| !r.passed && r.value.is_nan()));
        let q = evaluate(&criteria(), &[(QualityAttribute::SizeNm, f64::NAN)]);
        assert!(!q[0].passed, "NaN is never within limits");
    }
}
