//! TOTP (RFC 6238): SHA-1, six digits, 30-second steps, one step of skew either way. A code
//! is accepted once: the caller stores the last accepted step and a code for that step or
//! an earlier one is refused (RFC 6238 §5.2), so a code seen over a shoulder is spent.

use totp_rs::{Algorithm, Secret, Totp};

use crate::error::{Error, Result};

pub const STEP_SECS: u64 = 30;
pub const SECRET_LEN: usize = 20;
const ISSUER: &str = "phr-gateway";

/// Why a code was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotpRejection {
    /// Not six digits, or not the code of any step in the window.
    Wrong,
    /// The code of a step already used (or older than one used).
    Reused,
}

impl TotpRejection {
    pub fn reason(self) -> &'static str {
        match self {
            TotpRejection::Wrong => "wrong TOTP code",
            TotpRejection::Reused => "TOTP code already used",
        }
    }
}

fn totp(secret: &[u8], account_name: &str) -> Result<Totp> {
    totp_rs::Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(STEP_SECS)
        .with_secret(Secret::new(secret.to_vec().into_boxed_slice()))
        .with_issuer(Some(ISSUER))
        .with_account_name(account_name.replace(':', "_"))
        .build()
        .map_err(|_| Error::Crypto("invalid TOTP secret"))
}

/// The step a code belongs to, if it is right for `now_secs` ± one step and newer than
/// `last_step` (the last step accepted for this account; 0 when none).
pub fn check(
    secret: &[u8],
    code: &str,
    now_secs: u64,
    last_step: u64,
) -> Result<std::result::Result<u64, TotpRejection>> {
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Err(TotpRejection::Wrong));
    }
    let Some(step) = totp(secret, "account")?.check(&code, now_secs) else {
        return Ok(Err(TotpRejection::Wrong));
    };
    if step <= last_step {
        return Ok(Err(TotpRejection::Reused));
    }
    Ok(Ok(step))
}

/// The code for a time (for tests and the demo's instructions).
pub fn code_at(secret: &[u8], now_secs: u64) -> Result<String> {
    Ok(totp(secret, "account")?.generate(now_secs).to_string())
}

/// The code for a time from a base32 secret (what an authenticator app computes).
pub fn code_at_base32(secret: &str, now_secs: u64) -> Result<String> {
    let secret = Secret::try_from_base32(secret)
        .map_err(|_| Error::Invalid("not a base32 TOTP secret".into()))?;
    code_at(secret.as_bytes(), now_secs)
}

/// The `otpauth://` URI an authenticator app reads (as a QR code or typed in).
pub fn otpauth_uri(secret: &[u8], account_name: &str) -> Result<String> {
    totp(secret, account_name)?
        .to_url()
        .map_err(|_| Error::Crypto("cannot encode the TOTP secret"))
}

/// The secret in base32, for typing into an authenticator app by hand.
pub fn base32(secret: &[u8]) -> String {
    Secret::new(secret.to_vec().into_boxed_slice()).to_base32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // RFC 6238 Appendix B, SHA-1 seed, truncated to six digits.
    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_vectors() {
        let cases = [
            (59, "287082"),
            (1_111_111_109, "081804"),
            (1_111_111_111, "050471"),
            (1_234_567_890, "005924"),
            (2_000_000_000, "279037"),
        ];
        for (time, expected) in cases {
            assert_eq!(code_at(RFC_SECRET, time).unwrap(), expected, "time {time}");
        }
    }

    #[test]
    fn window_reuse_and_format() {
        let now = 1_234_567_890;
        let step = now / STEP_SECS;
        let current = code_at(RFC_SECRET, now).unwrap();
        let previous = code_at(RFC_SECRET, now - STEP_SECS).unwrap();
        let next = code_at(RFC_SECRET, now + STEP_SECS).unwrap();
        let stale = code_at(RFC_SECRET, now - 2 * STEP_SECS).unwrap();
        let cases: [(&str, u64, std::result::Result<u64, TotpRejection>); 9] = [
            (&current, 0, Ok(step)),
            (&previous, 0, Ok(step - 1)),
            (&next, 0, Ok(step + 1)),
            (&stale, 0, Err(TotpRejection::Wrong)),
            (&current, step, Err(TotpRejection::Reused)),
            (&previous, step, Err(TotpRejection::Reused)),
            (&next, step, Ok(step + 1)),
            ("12345", 0, Err(TotpRejection::Wrong)),
            ("abcdef", 0, Err(TotpRejection::Wrong)),
        ];
        for (code, last, expected) in cases {
            assert_eq!(
                check(RFC_SECRET, code, now, last).unwrap(),
                expected,
                "code {code} last {last}"
            );
        }
        let spaced = format!("{} {}", &current[..3], &current[3..]);
        assert_eq!(check(RFC_SECRET, &spaced, now, 0).unwrap(), Ok(step));
    }

    #[test]
    fn uri_names_the_issuer_and_carries_the_secret() {
        let uri = otpauth_uri(RFC_SECRET, "op:1").unwrap();
        assert!(uri.starts_with("otpauth://totp/phr-gateway:op_1?"), "{uri}");
        assert!(
            uri.contains(&format!("secret={}", base32(RFC_SECRET))),
            "{uri}"
        );
    }

    proptest! {
        // A code is accepted at most once: after acceptance at its step, it never passes again.
        #[test]
        fn a_code_is_accepted_once(secret in proptest::collection::vec(any::<u8>(), SECRET_LEN),
                                   now in 1_000_000u64..4_000_000_000u64, offset in 0u64..90) {
            let code = code_at(&secret, now).unwrap();
            let first = check(&secret, &code, now + offset.min(29), 0).unwrap();
            prop_assert!(first.is_ok());
            let step = first.unwrap();
            prop_assert_eq!(check(&secret, &code, now + offset, step).unwrap().is_ok(), false);
        }
    }
}
