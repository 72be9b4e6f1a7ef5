//! KEK escrow for disaster recovery: the key-encryption key, encrypted with age to one or
//! more X25519 recipients whose identities are kept offline (the institution, the operator),
//! under a header signed by the audit key saying which KEK (its id) and when.
//!
//! An escrow file is a signed note followed by the base64 age ciphertext:
//!
//! ```text
//! phr-gateway KEK escrow v1
//! kek-id file:0123456789abcdef
//! created 2026-11-26T05:40:00Z
//! recipient age1…
//! ciphertext-sha256 <hex>
//!
//! — phr-gateway.localhost/audit <signature>
//! <base64 age ciphertext, 76 columns>
//! ```
//!
//! Recovery decrypts with one identity, checks the ciphertext digest and that the recovered
//! key has the id the header names, and checks the header's signature when the audit
//! verifier keys are at hand (after losing the whole data directory they may not be).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::envelope::KEY_LEN;
use super::kek_provider::file_key_id;
use super::key_file;
use crate::error::{Error, Result};

const MAGIC: &str = "phr-gateway KEK escrow v1";
const SIGNATURE_PREFIX: &str = "\u{2014} ";

/// The annotated header of an escrow file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EscrowHeader {
    pub kek_id: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub recipients: Vec<String>,
    pub ciphertext_sha256: String,
}

/// A parsed escrow file.
#[derive(Debug, Clone)]
pub struct EscrowFile {
    pub header: EscrowHeader,
    /// The header as a signed note (body and signature lines).
    pub note: String,
    ciphertext: Vec<u8>,
}

/// Parses the configured recipients, naming the setting on error.
pub fn parse_recipients(recipients: &[String]) -> Result<Vec<age::x25519::Recipient>> {
    if recipients.is_empty() {
        return Err(Error::config(
            "keys.escrow_recipients",
            "set at least one age X25519 recipient (age1…) whose identity is kept offline",
        ));
    }
    recipients
        .iter()
        .map(|r| {
            age::x25519::Recipient::from_str(r.trim()).map_err(|e| {
                Error::config(
                    "keys.escrow_recipients",
                    format!("{r:?} is not an age X25519 recipient ({e})"),
                )
            })
        })
        .collect()
}

/// Encrypts `kek` to every recipient and returns the escrow file's text; `sign` turns the
/// header into a signed note (the audit key).
pub fn seal(
    kek: &[u8],
    recipients: &[age::x25519::Recipient],
    created: &str,
    sign: impl Fn(&str) -> String,
) -> Result<String> {
    if kek.len() != KEY_LEN {
        return Err(Error::Crypto("key-encryption key must be 32 bytes"));
    }
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|_| Error::Escrow("cannot encrypt to the recipients".into()))?;
    let mut ciphertext = Vec::new();
    let mut writer = encryptor
        .wrap_output(&mut ciphertext)
        .map_err(|e| Error::Escrow(format!("age: {e}")))?;
    let payload = Zeroizing::new(hex::encode(kek));
    writer
        .write_all(payload.as_bytes())
        .and_then(|_| writer.finish().map(|_| ()))
        .map_err(|e| Error::Escrow(format!("age: {e}")))?;
    let header = EscrowHeader {
        kek_id: file_key_id(kek),
        created: created.to_string(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        ciphertext_sha256: hex::encode(Sha256::digest(&ciphertext)),
    };
    let mut text = sign(&header_body(&header));
    let encoded = BASE64.encode(&ciphertext);
    for chunk in encoded.as_bytes().chunks(76) {
        text.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        text.push('\n');
    }
    Ok(text)
}

fn header_body(header: &EscrowHeader) -> String {
    let mut body = format!(
        "{MAGIC}\nkek-id {}\ncreated {}\n",
        header.kek_id, header.created
    );
    for recipient in &header.recipients {
        body.push_str(&format!("recipient {recipient}\n"));
    }
    body.push_str(&format!("ciphertext-sha256 {}\n", header.ciphertext_sha256));
    body
}

impl EscrowFile {
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| Error::Escrow(format!("not a KEK escrow file: {why}"));
        if !text.starts_with(MAGIC) {
            return Err(bad("it does not start with the escrow header"));
        }
        let separator = text.find("\n\n").ok_or_else(|| bad("no signed header"))?;
        let body = &text[..=separator];
        let mut rest = &text[separator + 2..];
        let mut signatures = String::new();
        while let Some(line_end) = rest.find('\n') {
            let line = &rest[..=line_end];
            if !line.starts_with(SIGNATURE_PREFIX) {
                break;
            }
            signatures.push_str(line);
            rest = &rest[line_end + 1..];
        }
        if signatures.is_empty() {
            return Err(bad("the header is not signed"));
        }
        let mut header = EscrowHeader {
            kek_id: String::new(),
            created: String::new(),
            recipients: Vec::new(),
            ciphertext_sha256: String::new(),
        };
        for line in body.lines().skip(1) {
            match line.split_once(' ') {
                Some(("kek-id", v)) => header.kek_id = v.to_string(),
                Some(("created", v)) => header.created = v.to_string(),
                Some(("recipient", v)) => header.recipients.push(v.to_string()),
                Some(("ciphertext-sha256", v)) => header.ciphertext_sha256 = v.to_string(),
                _ => return Err(bad("unknown header line")),
            }
        }
        if header.kek_id.is_empty() || header.ciphertext_sha256.is_empty() {
            return Err(bad("the header lacks the KEK id or the digest"));
        }
        let compact: String = rest.split_whitespace().collect();
        let ciphertext = BASE64
            .decode(compact)
            .map_err(|_| bad("the ciphertext is not base64"))?;
        if hex::encode(Sha256::digest(&ciphertext)) != header.ciphertext_sha256 {
            return Err(Error::Escrow(
                "the ciphertext does not match the digest in the signed header: the file was changed or truncated".into(),
            ));
        }
        Ok(EscrowFile {
            header,
            note: format!("{body}\n{signatures}"),
            ciphertext,
        })
    }

    /// Decrypts the KEK with `identity` (the text of an age identity file) and checks it is
    /// the key the header names.
    pub fn open(&self, identity: &str) -> Result<Zeroizing<Vec<u8>>> {
        let identity = identity
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .ok_or_else(|| {
                Error::Escrow(
                    "the identity file holds no age X25519 identity (AGE-SECRET-KEY-…)".into(),
                )
            })?;
        let identity = age::x25519::Identity::from_str(identity).map_err(|e| {
            Error::Escrow(format!("the identity is not a valid age identity ({e})"))
        })?;
        let wrong = || {
            Error::Escrow(format!(
                "this identity ({}) is not one of the escrow's recipients ({})",
                identity.to_public(),
                self.header.recipients.join(", ")
            ))
        };
        let decryptor = age::Decryptor::new(&self.ciphertext[..]).map_err(|_| wrong())?;
        let mut reader = decryptor
            .decrypt(std::iter::once(&identity as &dyn age::Identity))
            .map_err(|_| wrong())?;
        let mut payload = Zeroizing::new(String::new());
        reader
            .read_to_string(&mut payload)
            .map_err(|_| Error::Escrow("the escrowed key does not decrypt cleanly".into()))?;
        let kek = Zeroizing::new(
            hex::decode(payload.trim())
                .map_err(|_| Error::Escrow("the escrowed key is not hex".into()))?,
        );
        if kek.len() != KEY_LEN || file_key_id(&kek) != self.header.kek_id {
            return Err(Error::Escrow(format!(
                "the escrowed key is not KEK {} that the header names",
                self.header.kek_id
            )));
        }
        Ok(kek)
    }
}

/// What `recover` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// The KEK file was absent and now holds the recovered key.
    Written,
    /// The KEK file already held this very key.
    AlreadyInPlace,
    /// A different KEK was moved aside (`--force`) and the recovered key put in its place.
    Replaced { moved_to: PathBuf },
}

/// Writes the recovered `kek` to `kek_path` (0600). A different key already there is kept
/// unless `force`, and even then moved aside rather than destroyed.
pub fn install(kek_path: &Path, kek: &[u8], force: bool, now_secs: u64) -> Result<Recovered> {
    let mut encoded = Zeroizing::new(hex::encode(kek));
    encoded.push('\n');
    if kek_path.exists() {
        if let Ok(existing) = key_file::load(kek_path, KEY_LEN) {
            if existing.as_slice() == kek {
                return Ok(Recovered::AlreadyInPlace);
            }
        }
        if !force {
            return Err(Error::Escrow(format!(
                "{} already holds a different key-encryption key; recovering over it would make the data it wraps unreadable. Move it away or pass --force (it is then kept as {}.replaced-<time>)",
                kek_path.display(),
                kek_path.display()
            )));
        }
        let mut aside = kek_path.as_os_str().to_os_string();
        aside.push(format!(".replaced-{now_secs}"));
        let aside = PathBuf::from(aside);
        std::fs::rename(kek_path, &aside).map_err(|e| Error::io(kek_path, e))?;
        key_file::write_private(kek_path, encoded.as_bytes())?;
        return Ok(Recovered::Replaced { moved_to: aside });
    }
    key_file::write_private(kek_path, encoded.as_bytes())?;
    Ok(Recovered::Written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;

    fn unsigned(body: &str) -> String {
        format!("{body}\n\u{2014} test AAAA\n")
    }

    #[test]
    fn seals_to_every_recipient_and_opens_with_each_only() {
        let (a, b, c) = (
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
        );
        let kek = [9u8; 32];
        let text = seal(
            &kek,
            &[a.to_public(), b.to_public()],
            "2026-11-26T00:00:00Z",
            unsigned,
        )
        .unwrap();
        let file = EscrowFile::parse(&text).unwrap();
        assert_eq!(file.header.kek_id, file_key_id(&kek));
        assert_eq!(file.header.recipients.len(), 2);
        for id in [&a, &b] {
            let secret = id.to_string();
            assert_eq!(file.open(secret.expose_secret()).unwrap().as_slice(), kek);
        }
        let err = file
            .open(c.to_string().expose_secret())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not one of the escrow's recipients"), "{err}");
        assert!(file.open("no identity here").is_err());
    }

    #[test]
    fn a_changed_ciphertext_or_header_is_refused() {
        let a = age::x25519::Identity::generate();
        let text = seal(&[9u8; 32], &[a.to_public()], "t", unsigned).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let first_data = lines
            .iter()
            .position(|l| l.starts_with(SIGNATURE_PREFIX))
            .unwrap()
            + 1;
        let flipped = if lines[first_data].starts_with('A') {
            "B"
        } else {
            "A"
        };
        lines[first_data].replace_range(0..1, flipped);
        let changed = lines.join("\n") + "\n";
        assert!(EscrowFile::parse(&changed)
            .unwrap_err()
            .to_string()
            .contains("digest"));
        let relabelled = text.replacen("kek-id file:", "kek-id file:00", 1);
        let file = EscrowFile::parse(&relabelled).unwrap();
        assert!(file
            .open(a.to_string().expose_secret())
            .unwrap_err()
            .to_string()
            .contains("not KEK"));
    }

    #[test]
    fn install_never_overwrites_a_different_key_silently() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/kek.key");
        assert_eq!(
            install(&path, &[1u8; 32], false, 1).unwrap(),
            Recovered::Written
        );
        assert_eq!(
            install(&path, &[1u8; 32], false, 2).unwrap(),
            Recovered::AlreadyInPlace
        );
        let err = install(&path, &[2u8; 32], false, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--force"), "{err}");
        let Recovered::Replaced { moved_to } = install(&path, &[2u8; 32], true, 4).unwrap() else {
            panic!("replaced")
        };
        assert_eq!(key_file::load(&moved_to, 32).unwrap().as_slice(), [1u8; 32]);
        assert_eq!(key_file::load(&path, 32).unwrap().as_slice(), [2u8; 32]);
    }
}

/// A KEK on a PKCS#11 token never leaves it: file escrow, recovery and file rotation do not
/// apply (the token's own backup or a second token does that job).
pub fn refuse_token_kek(config: &crate::config::Config) -> Result<()> {
    if config.keys.pkcs11.is_some() {
        return Err(Error::config(
            "keys.pkcs11",
            "the KEK is on a PKCS#11 token and never leaves it: escrow, recovery and rotation of a KEK file do not apply; use the token's own backup",
        ));
    }
    Ok(())
}

/// Where `keys escrow` writes by default: `<data_dir>/escrow/` (copy it off-site; it is
/// useless without an offline identity).
pub fn default_path(config: &crate::config::Config, kek_id: &str, now_secs: u64) -> PathBuf {
    let id = kek_id.replace(':', "-");
    config
        .data_dir
        .join("escrow")
        .join(format!("kek-{id}-{now_secs}.escrow"))
}

/// A written escrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escrowed {
    pub path: PathBuf,
    pub kek_id: String,
    pub recipients: usize,
}

/// Escrows the KEK in force to `keys.escrow_recipients`, header signed by the audit key, and
/// audits it. `out` defaults to [`default_path`].
pub async fn escrow_kek(
    config: &crate::config::Config,
    audit: &crate::audit::AuditLog,
    db: &crate::store::Database,
    out: Option<PathBuf>,
) -> Result<Escrowed> {
    refuse_token_kek(config)?;
    let recipients = parse_recipients(&config.keys.escrow_recipients)?;
    let kek = key_file::load(&config.kek_path(), KEY_LEN)?;
    let kek_id = file_key_id(&kek);
    let now = time::OffsetDateTime::now_utc();
    let created = now
        .replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let text = seal(&kek, &recipients, &created, |body| audit.sign_note(body))?;
    let path = out.unwrap_or_else(|| default_path(config, &kek_id, now.unix_timestamp() as u64));
    key_file::write_private(&path, text.as_bytes())?;
    let event = crate::audit::AuditEvent::new(
        crate::audit::EventKind::SecurityConfiguration,
        crate::audit::Agent::system(),
    )
    .detail(format!(
        "key-encryption key {kek_id} escrowed to {} offline recipient(s): {}",
        recipients.len(),
        config.keys.escrow_recipients.join(", ")
    ));
    let mut tx = db.begin().await?;
    crate::audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(Escrowed {
        path,
        kek_id,
        recipients: recipients.len(),
    })
}

/// Checks the header's signature against the audit keys, when they are at hand. `Ok(false)`:
/// no audit key to check with (the data directory was lost with the KEK).
pub fn check_signature(
    file: &EscrowFile,
    verifiers: Option<&crate::audit::keyring::VerifierRing>,
) -> Result<bool> {
    let Some(verifiers) = verifiers else {
        return Ok(false);
    };
    verifiers.verify_any(&file.note).map_err(|e| {
        Error::Escrow(format!(
            "the escrow header's signature does not verify with this gateway's audit keys ({e}); it was not made by this gateway or was changed"
        ))
    })?;
    Ok(true)
}
