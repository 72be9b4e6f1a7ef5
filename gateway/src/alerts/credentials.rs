//! Dates of the gateway's credentials, for the expiry rule: the TLS certificate's notAfter
//! (read from its DER without an X.509 library: the field sits at a fixed place in
//! `TBSCertificate`) and when each signing key file was written.

use std::path::Path;

use crate::alerts::rules::SigningKeyAge;

/// The notAfter of the first certificate in a PEM file, as Unix milliseconds.
pub fn certificate_not_after(pem_path: &Path) -> Option<i64> {
    let pem = std::fs::read(pem_path).ok()?;
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next()?.ok()?;
    not_after_of_der(der.as_ref())
}

/// A DER element: its tag, its contents, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 || rest.len() < octets {
            return None;
        }
        let length = rest[..octets]
            .iter()
            .fold(0usize, |n, &b| (n << 8) | usize::from(b));
        (length, &rest[octets..])
    };
    if rest.len() < length {
        return None;
    }
    Some((tag, &rest[..length], &rest[length..]))
}

const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// Certificate → TBSCertificate → [version], serialNumber, signature, issuer, validity.
pub fn not_after_of_der(der: &[u8]) -> Option<i64> {
    let (tag, certificate, _) = element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut fields = tbs;
    let (tag, _, rest) = element(fields)?;
    if tag == VERSION {
        fields = rest;
    }
    // serialNumber, signature, issuer
    for _ in 0..3 {
        fields = element(fields)?.2;
    }
    let (tag, validity, _) = element(fields)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, after_not_before) = element(validity)?;
    let (tag, not_after, _) = element(after_not_before)?;
    let text = std::str::from_utf8(not_after).ok()?;
    match tag {
        UTC_TIME => {
            // RFC 5280: YY of 50 or more is 19YY, else 20YY.
            let year: i32 = text.get(0..2)?.parse().ok()?;
            let year = if year >= 50 { 1900 + year } else { 2000 + year };
            time_of(year, text.get(2..)?)
        }
        GENERALIZED_TIME => time_of(text.get(0..4)?.parse().ok()?, text.get(4..)?),
        _ => None,
    }
}

/// `MMDDHHMMSSZ` of `year`, as Unix milliseconds.
fn time_of(year: i32, rest: &str) -> Option<i64> {
    if rest.len() != 11 || !rest.ends_with('Z') {
        return None;
    }
    let part = |range: std::ops::Range<usize>| rest.get(range)?.parse::<u8>().ok();
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(part(0..2)?).ok()?, part(2..4)?)
            .ok()?;
    let at = date
        .with_hms(part(4..6)?, part(6..8)?, part(8..10)?)
        .ok()?
        .assume_utc();
    Some(at.unix_timestamp() * 1000)
}

/// When each named key file was written (its modification time).
pub fn signing_key_ages<'a>(
    keys: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> Vec<SigningKeyAge> {
    keys.into_iter()
        .filter_map(|(name, path)| {
            let modified = std::fs::metadata(path).ok()?.modified().ok()?;
            let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
            Some(SigningKeyAge {
                name: name.to_string(),
                created_millis: since_epoch.as_millis() as i64,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate_until(year: i32) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 3, 4);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_not_after_in_both_time_forms() {
        // Before 2050 X.509 uses UTCTime, from 2050 GeneralizedTime.
        for (year, expected) in [
            (2027, "2027-03-04T00:00:00Z"),
            (2051, "2051-03-04T00:00:00Z"),
        ] {
            let millis = not_after_of_der(&certificate_until(year)).unwrap();
            assert_eq!(crate::store::millis_to_rfc3339(millis), expected);
        }
    }

    #[test]
    fn refuses_what_is_not_a_certificate() {
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x84\xff\xff\xff\xff",
            b"\x02\x01\x00",
        ] {
            assert_eq!(not_after_of_der(bad), None, "{bad:?}");
        }
        let mut truncated = certificate_until(2027);
        truncated.truncate(40);
        assert_eq!(not_after_of_der(&truncated), None);
    }
}
