//! C2SP tlog-checkpoint bodies carried in C2SP signed notes, signed with
//! Ed25519.
//!
//! Formats: <https://c2sp.org/signed-note> and <https://c2sp.org/tlog-checkpoint>.
//! Key names, key IDs and verifier keys use the same encoding as Go's
//! `golang.org/x/mod/sumdb/note`, so keys and notes interoperate with the Go
//! tooling (and with witnesses built on it).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use super::merkle::Hash;

/// Signature type identifier byte of Ed25519 in signed notes.
const ED25519_SIGNATURE_TYPE: u8 = 0x01;
/// Prefix of every signature line: U+2014 EM DASH, then a space.
const SIGNATURE_LINE_PREFIX: &str = "\u{2014} ";
/// Upper bound on signature lines in a note. The spec requires accepting at
/// least 16; Go's implementation allows 100. Bounding it caps the work an
/// untrusted note can make us do.
const MAX_SIGNATURES: usize = 100;
/// Bytes of the key ID that starts every encoded signature.
const KEY_ID_LEN: usize = 4;

/// Why a note, checkpoint body or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NoteError {
    /// The signed note (or text given to sign) breaks the signed-note format.
    #[error("malformed note: {0}")]
    MalformedNote(&'static str),
    /// The note text is not a valid tlog-checkpoint body.
    #[error("malformed checkpoint body: {0}")]
    MalformedBody(&'static str),
    /// No signature line is from this verifier's key (name and key ID).
    #[error("note has no signature from key {0}")]
    UnknownKey(String),
    /// A signature line from this verifier's key did not verify.
    #[error("invalid signature from key {0}")]
    BadSignature(String),
    /// The verifier key string could not be decoded or is inconsistent.
    #[error("bad verifier key: {0}")]
    BadVerifierKey(&'static str),
    /// The key name is empty or contains whitespace, '+' or control characters.
    #[error("invalid key name: {0:?}")]
    InvalidKeyName(String),
}

/// A tree head: the log's origin line, its size and its RFC 6962 root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Unique identifier of the log, e.g. `example.com/log42`.
    pub origin: String,
    /// Number of leaves in the tree.
    pub size: u64,
    /// RFC 6962 root hash of the tree at `size`.
    pub root: Hash,
}

impl Checkpoint {
    /// The checkpoint note text: `"<origin>\n<size>\n<base64 root>\n"`.
    ///
    /// The origin must be a non-empty single line for the result to parse
    /// back; [`NoteSigner::try_sign`] rejects control characters.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            BASE64.encode(self.root)
        )
    }

    /// Parses a checkpoint note text. Extension lines after the root hash are
    /// accepted and ignored, as the spec makes them opaque.
    pub fn parse_body(text: &str) -> Result<Self, NoteError> {
        if text.chars().any(|c| c < ' ' && c != '\n') {
            return Err(NoteError::MalformedBody("contains a control character"));
        }
        let without_final_newline = text
            .strip_suffix('\n')
            .ok_or(NoteError::MalformedBody("does not end with a newline"))?;
        let mut lines = without_final_newline.split('\n');
        let origin = lines.next().unwrap_or_default();
        if origin.is_empty() {
            return Err(NoteError::MalformedBody("empty origin line"));
        }
        let size_line = lines
            .next()
            .ok_or(NoteError::MalformedBody("missing tree size line"))?;
        let root_line = lines
            .next()
            .ok_or(NoteError::MalformedBody("missing root hash line"))?;
        if lines.any(str::is_empty) {
            return Err(NoteError::MalformedBody("empty extension line"));
        }
        Ok(Self {
            origin: origin.to_owned(),
            size: parse_tree_size(size_line)?,
            root: parse_root_hash(root_line)?,
        })
    }
}

/// Strict decimal: digits only (no sign or spaces, which `u64::from_str`
/// would partly allow) and no leading zeros, so each size has one encoding.
fn parse_tree_size(line: &str) -> Result<u64, NoteError> {
    if line.is_empty() || !line.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NoteError::MalformedBody(
            "tree size is not a decimal number",
        ));
    }
    if line.len() > 1 && line.starts_with('0') {
        return Err(NoteError::MalformedBody("tree size has leading zeros"));
    }
    line.parse()
        .map_err(|_| NoteError::MalformedBody("tree size does not fit in 64 bits"))
}

/// Standard padded base64 of exactly 32 bytes; the engine rejects
/// non-canonical padding and trailing bits, as tlog-checkpoint requires.
fn parse_root_hash(line: &str) -> Result<Hash, NoteError> {
    let bytes = BASE64
        .decode(line)
        .map_err(|_| NoteError::MalformedBody("root hash is not valid base64"))?;
    Hash::try_from(bytes.as_slice())
        .map_err(|_| NoteError::MalformedBody("root hash is not 32 bytes"))
}

/// Signed-note key ID: the first 4 bytes of
/// SHA-256(name || "\n" || 0x01 || Ed25519 public key).
pub fn key_hash(name: &str, pubkey: &[u8; 32]) -> [u8; 4] {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update(b"\n");
    hasher.update([ED25519_SIGNATURE_TYPE]);
    hasher.update(pubkey);
    let digest = hasher.finalize();
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&digest[..KEY_ID_LEN]);
    id
}

/// Key names must be non-empty with no Unicode whitespace and no '+'
/// (the verifier-key separator). Control characters are refused too, since
/// a note may not contain them.
fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '+')
}

fn lower_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `"<name>+<8 hex key ID>+<base64(0x01 || pubkey)>"`, Go's vkey format.
fn encode_verifier_key(name: &str, key_id: &[u8; 4], key: &VerifyingKey) -> String {
    let mut typed_key = Vec::with_capacity(33);
    typed_key.push(ED25519_SIGNATURE_TYPE);
    typed_key.extend_from_slice(key.as_bytes());
    format!("{name}+{}+{}", lower_hex(key_id), BASE64.encode(typed_key))
}

/// Signs note texts under a key name with an Ed25519 key.
#[derive(Clone)]
pub struct NoteSigner {
    name: String,
    key_id: [u8; 4],
    signing_key: SigningKey,
}

// Hand-written so the private key can never end up in logs.
impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner")
            .field("name", &self.name)
            .field("key_id", &lower_hex(&self.key_id))
            .finish_non_exhaustive()
    }
}

impl NoteSigner {
    /// A signer for `name`, which must be non-empty and free of whitespace,
    /// '+' and control characters.
    pub fn new(name: &str, key: SigningKey) -> Result<Self, NoteError> {
        if !is_valid_key_name(name) {
            return Err(NoteError::InvalidKeyName(name.to_owned()));
        }
        let key_id = key_hash(name, key.verifying_key().as_bytes());
        Ok(Self {
            name: name.to_owned(),
            key_id,
            signing_key: key,
        })
    }

    /// Returns the full signed note: `body`, a blank line and one signature
    /// line `"— <name> <base64(key ID || signature)>\n"`.
    ///
    /// `body` must be valid note text: ending in a newline, with no control
    /// characters other than newline. [`Checkpoint::body`] with a single-line
    /// origin always is. Other text is still signed, but the note will not
    /// verify anywhere; use [`NoteSigner::try_sign`] to have it checked.
    pub fn sign(&self, body: &str) -> String {
        let signature = self.signing_key.sign(body.as_bytes());
        let mut encoded = Vec::with_capacity(KEY_ID_LEN + Signature::BYTE_SIZE);
        encoded.extend_from_slice(&self.key_id);
        encoded.extend_from_slice(&signature.to_bytes());
        format!(
            "{body}\n{SIGNATURE_LINE_PREFIX}{} {}\n",
            self.name,
            BASE64.encode(encoded)
        )
    }

    /// Like [`NoteSigner::sign`], but refuses text that cannot form a valid
    /// note (empty, not ending in a newline, or containing control
    /// characters other than newline) instead of producing an unverifiable
    /// note.
    pub fn try_sign(&self, body: &str) -> Result<String, NoteError> {
        if !body.ends_with('\n') {
            return Err(NoteError::MalformedNote("text does not end with a newline"));
        }
        if body.chars().any(|c| c < ' ' && c != '\n') {
            return Err(NoteError::MalformedNote(
                "text contains a control character",
            ));
        }
        Ok(self.sign(body))
    }

    /// The public verifier key in Go's vkey format, for distribution to
    /// clients and witnesses.
    pub fn verifier_key(&self) -> String {
        encode_verifier_key(&self.name, &self.key_id, &self.signing_key.verifying_key())
    }

    /// The verifier matching this signer.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            key_id: self.key_id,
            verifying_key: self.signing_key.verifying_key(),
        }
    }
}

/// Verifies signed notes against one trusted Ed25519 key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key_id: [u8; 4],
    verifying_key: VerifyingKey,
}

/// One parsed signature line.
struct SignatureLine<'a> {
    name: &'a str,
    key_id: [u8; 4],
    signature: Vec<u8>,
}

impl NoteVerifier {
    /// Parses a verifier key `"<name>+<8 hex key ID>+<base64(0x01 || pubkey)>"`,
    /// checking that the key ID matches the name and key.
    pub fn from_verifier_key(vkey: &str) -> Result<Self, NoteError> {
        // The name cannot contain '+' and the key ID is hex, so the first two
        // '+' are the separators; base64 may contain further '+'.
        let (name, rest) = vkey
            .split_once('+')
            .ok_or(NoteError::BadVerifierKey("missing '+' separator"))?;
        let (key_id_hex, key_base64) = rest
            .split_once('+')
            .ok_or(NoteError::BadVerifierKey("missing '+' separator"))?;
        if !is_valid_key_name(name) {
            return Err(NoteError::BadVerifierKey("invalid key name"));
        }
        let key_id = parse_key_id_hex(key_id_hex)?;
        let typed_key = BASE64
            .decode(key_base64)
            .map_err(|_| NoteError::BadVerifierKey("key is not valid base64"))?;
        let (signature_type, public_key) = typed_key
            .split_first()
            .ok_or(NoteError::BadVerifierKey("empty key"))?;
        if *signature_type != ED25519_SIGNATURE_TYPE {
            return Err(NoteError::BadVerifierKey("unsupported signature type"));
        }
        let public_key: &[u8; 32] = public_key
            .try_into()
            .map_err(|_| NoteError::BadVerifierKey("Ed25519 key is not 32 bytes"))?;
        if key_hash(name, public_key) != key_id {
            return Err(NoteError::BadVerifierKey(
                "key ID does not match the name and key",
            ));
        }
        let verifying_key = VerifyingKey::from_bytes(public_key)
            .map_err(|_| NoteError::BadVerifierKey("not a valid Ed25519 public key"))?;
        // Small-order keys admit signatures that verify for many messages.
        if verifying_key.is_weak() {
            return Err(NoteError::BadVerifierKey("weak Ed25519 public key"));
        }
        Ok(Self {
            name: name.to_owned(),
            key_id,
            verifying_key,
        })
    }

    /// The key name this verifier trusts.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This verifier's key in Go's vkey format.
    pub fn verifier_key(&self) -> String {
        encode_verifier_key(&self.name, &self.key_id, &self.verifying_key)
    }

    /// Verifies a signed note and returns its text (the body, with its final
    /// newline).
    ///
    /// Succeeds only if some signature line carries this key's name and key
    /// ID and verifies. Lines from other keys are ignored, as the spec
    /// requires (they may be witnesses or rotated keys), but a line claiming
    /// this key that fails to verify rejects the whole note.
    pub fn verify(&self, note: &str) -> Result<String, NoteError> {
        let (text, signature_lines) = split_note(note)?;
        let mut verified = false;
        for line in signature_lines {
            if line.name != self.name || line.key_id != self.key_id {
                continue;
            }
            let signature = Signature::from_slice(&line.signature)
                .map_err(|_| NoteError::BadSignature(self.key_label()))?;
            // Strict verification rejects malleable (non-canonical) signatures.
            self.verifying_key
                .verify_strict(text.as_bytes(), &signature)
                .map_err(|_| NoteError::BadSignature(self.key_label()))?;
            verified = true;
        }
        if verified {
            Ok(text.to_owned())
        } else {
            Err(NoteError::UnknownKey(self.key_label()))
        }
    }

    /// Like [`NoteVerifier::verify`] for raw bytes (e.g. an HTTP body):
    /// notes must be valid UTF-8.
    pub fn verify_bytes(&self, note: &[u8]) -> Result<String, NoteError> {
        let note =
            std::str::from_utf8(note).map_err(|_| NoteError::MalformedNote("not valid UTF-8"))?;
        self.verify(note)
    }

    /// `name+keyid`, as Go prints key identities in errors.
    fn key_label(&self) -> String {
        format!("{}+{}", self.name, lower_hex(&self.key_id))
    }
}

fn parse_key_id_hex(hex: &str) -> Result<[u8; 4], NoteError> {
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(NoteError::BadVerifierKey("key ID is not 8 hex digits"));
    }
    u32::from_str_radix(hex, 16)
        .map(u32::to_be_bytes)
        .map_err(|_| NoteError::BadVerifierKey("key ID is not 8 hex digits"))
}

/// Splits a signed note into its text and parsed signature lines, enforcing
/// the signed-note syntax. Any malformed signature line rejects the note.
fn split_note(note: &str) -> Result<(&str, Vec<SignatureLine<'_>>), NoteError> {
    if note.chars().any(|c| c < ' ' && c != '\n') {
        return Err(NoteError::MalformedNote("contains a control character"));
    }
    // The text may itself contain blank lines; the last one is the separator.
    let separator = note.rfind("\n\n").ok_or(NoteError::MalformedNote(
        "no blank line before the signatures",
    ))?;
    let text = &note[..=separator];
    let signature_block = &note[separator + 2..];
    let signature_block = signature_block
        .strip_suffix('\n')
        .ok_or(NoteError::MalformedNote(
            "signatures do not end with a newline",
        ))?;
    let lines: Vec<&str> = signature_block.split('\n').collect();
    if lines.len() > MAX_SIGNATURES {
        return Err(NoteError::MalformedNote("too many signatures"));
    }
    let signature_lines = lines
        .into_iter()
        .map(parse_signature_line)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((text, signature_lines))
}

/// Parses `"— <name> <base64(key ID || signature)>"`.
fn parse_signature_line(line: &str) -> Result<SignatureLine<'_>, NoteError> {
    let rest = line
        .strip_prefix(SIGNATURE_LINE_PREFIX)
        .ok_or(NoteError::MalformedNote(
            "signature line does not start with an em dash",
        ))?;
    let (name, signature_base64) = rest
        .split_once(' ')
        .ok_or(NoteError::MalformedNote("signature line has no signature"))?;
    if !is_valid_key_name(name) {
        return Err(NoteError::MalformedNote(
            "signature line has an invalid key name",
        ));
    }
    let decoded = BASE64
        .decode(signature_base64)
        .map_err(|_| NoteError::MalformedNote("signature is not valid base64"))?;
    // At least one signature byte must follow the key ID.
    if decoded.len() <= KEY_ID_LEN {
        return Err(NoteError::MalformedNote("signature is too short"));
    }
    let (key_id, signature) = decoded.split_at(KEY_ID_LEN);
    let mut key_id_bytes = [0u8; KEY_ID_LEN];
    key_id_bytes.copy_from_slice(key_id);
    Ok(SignatureLine {
        name,
        key_id: key_id_bytes,
        signature: signature.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Key pair, note text and signed note from golang.org/x/mod
    // sumdb/note/note_test.go (TestNewVerifier, TestNewSigner, TestSign, TestOpen).
    const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const PETER_SKEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const PETER_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                              then you don't know what your problem is.\n";
    const PETER_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
    // Second key and its signature over PETER_TEXT, same file (TestOpen).
    const ENOCH_VKEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
    const ENOCH_SIG: &str = "\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

    // Key pairs from transparency-dev/formats log/note_test.go.
    const FORMATS_KEY_PAIRS: [(&str, &str); 4] = [
        (
            "Log+2271c621+AemuH5ooBpEPcr+W8onrjA1NfuzBVHdezakU81Ekarvs",
            "PRIVATE+KEY+Log+2271c621+AdEIq9FLRQni54Wg68T96VJO+iayOaulswav2DUMKgvQ",
        ),
        (
            "Known+451c786d+AXAQ0T7lbwuY4ABJ9/MYY9bWV3hmSyOGVt2x42NkmdUH",
            "PRIVATE+KEY+Known+451c786d+AQPRoE2+Z+Ed1HaHBA9F/FfracvcZ2rDU39kCecMEoci",
        ),
        (
            "KnownAgain+4893b26c+AQ+LR7BFF/F/dkpIBjBpSvT0crkteizuUkavAoGeaYMj",
            "PRIVATE+KEY+KnownAgain+4893b26c+ARhZda/l25zjGZswYLDZsLNRzNpmv5wYTN9IoTr1OJ2+",
        ),
        (
            "Unknown+fdbb2e08+AWgRIYZ+8x1Vl+1Q+sR8zciNHiYI1SdlBjNw+RV0rots",
            "PRIVATE+KEY+Unknown+fdbb2e08+Aav2knTC6orbhXX8pMWuNiWgO+Wwk2DB+h1eU2Q1W1nU",
        ),
    ];

    // A real sum.golang.org checkpoint and its verifier key, from
    // transparency-dev/formats log/note_test.go (TestSumDBNoteParsing).
    const SUMDB_VKEY: &str = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8";
    const SUMDB_CHECKPOINT: &str = "go.sum database tree\n6476701\nmb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=\n\n\u{2014} sum.golang.org Az3grsLX85Gz+s1SiTbgkuqxgItqFq7gsMUEyVnrsa9LM7Us9S+1xbFIGu95949rj4nPRYfvimWEPWL+o3GeoWwOoAw=\n";

    // The example checkpoint of C2SP/C2SP tlog-checkpoint.md (its signing key
    // is not published, so only its body and syntax are checked).
    const C2SP_EXAMPLE: &str = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n\u{2014} example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n";

    /// Decodes Go's test-only "PRIVATE+KEY+<name>+<hash>+<base64(0x01||seed)>".
    fn signer_from_go_skey(skey: &str) -> NoteSigner {
        let parts: Vec<&str> = skey.splitn(5, '+').collect();
        assert_eq!(&parts[..2], &["PRIVATE", "KEY"]);
        let typed_seed = BASE64.decode(parts[4]).unwrap();
        assert_eq!(typed_seed[0], 0x01);
        let seed: [u8; 32] = typed_seed[1..].try_into().unwrap();
        let signer = NoteSigner::new(parts[2], SigningKey::from_bytes(&seed)).unwrap();
        assert_eq!(lower_hex(&signer.key_id), parts[3]);
        signer
    }

    fn peter_note() -> String {
        format!("{PETER_TEXT}\n{PETER_SIG}")
    }

    fn peter() -> NoteVerifier {
        NoteVerifier::from_verifier_key(PETER_VKEY).unwrap()
    }

    #[test]
    fn key_hash_matches_published_key_ids() {
        for (vkey, expected_id) in [
            (PETER_VKEY, [0xc7, 0x4f, 0x20, 0xa3]),
            (ENOCH_VKEY, [0xaf, 0x0c, 0xfe, 0x78]),
            (SUMDB_VKEY, [0x03, 0x3d, 0xe0, 0xae]),
        ] {
            let (name, rest) = vkey.split_once('+').unwrap();
            let typed_key = BASE64.decode(rest.split_once('+').unwrap().1).unwrap();
            let pubkey: [u8; 32] = typed_key[1..].try_into().unwrap();
            assert_eq!(key_hash(name, &pubkey), expected_id, "{vkey}");
        }
    }

    #[test]
    fn published_verifier_keys_parse_and_re_encode() {
        let mut all = vec![PETER_VKEY, ENOCH_VKEY, SUMDB_VKEY];
        all.extend(FORMATS_KEY_PAIRS.iter().map(|(vkey, _)| *vkey));
        for vkey in all {
            let verifier = NoteVerifier::from_verifier_key(vkey).unwrap();
            assert_eq!(verifier.verifier_key(), vkey);
            assert_eq!(verifier.name(), vkey.split_once('+').unwrap().0);
        }
    }

    #[test]
    fn signers_from_published_private_keys_give_published_verifier_keys() {
        let mut pairs = vec![(PETER_VKEY, PETER_SKEY)];
        pairs.extend(FORMATS_KEY_PAIRS);
        for (vkey, skey) in pairs {
            let signer = signer_from_go_skey(skey);
            assert_eq!(signer.verifier_key(), vkey);
            assert_eq!(
                signer.verifier(),
                NoteVerifier::from_verifier_key(vkey).unwrap()
            );
        }
    }

    #[test]
    fn signing_reproduces_published_signed_note() {
        let signer = signer_from_go_skey(PETER_SKEY);
        assert_eq!(signer.sign(PETER_TEXT), peter_note());
        assert_eq!(signer.try_sign(PETER_TEXT).unwrap(), peter_note());
    }

    #[test]
    fn verifies_published_signed_note() {
        assert_eq!(peter().verify(&peter_note()).unwrap(), PETER_TEXT);
        assert_eq!(
            peter().verify_bytes(peter_note().as_bytes()).unwrap(),
            PETER_TEXT
        );
    }

    #[test]
    fn verifies_own_key_among_unknown_signatures() {
        // Doubly signed note from golang.org/x/mod sumdb/note/note_test.go TestOpen.
        let both = format!("{PETER_TEXT}\n{PETER_SIG}{ENOCH_SIG}");
        assert_eq!(peter().verify(&both).unwrap(), PETER_TEXT);
        let enoch = NoteVerifier::from_verifier_key(ENOCH_VKEY).unwrap();
        assert_eq!(enoch.verify(&both).unwrap(), PETER_TEXT);
        let enoch_first = format!("{PETER_TEXT}\n{ENOCH_SIG}{PETER_SIG}");
        assert_eq!(peter().verify(&enoch_first).unwrap(), PETER_TEXT);
    }

    #[test]
    fn wrong_key_is_unknown() {
        let enoch = NoteVerifier::from_verifier_key(ENOCH_VKEY).unwrap();
        assert!(matches!(
            enoch.verify(&peter_note()),
            Err(NoteError::UnknownKey(_))
        ));
        // Same name, different key ID: ignored (TestOpen's "x08g" -> "xxxx").
        let wrong_id = peter_note().replace("x08g", "xxxx");
        assert!(matches!(
            peter().verify(&wrong_id),
            Err(NoteError::UnknownKey(_))
        ));
        // Same key ID, different name: ignored.
        let wrong_name = peter_note().replace("PeterNeumann", "CarmenSandiego");
        assert!(matches!(
            peter().verify(&wrong_name),
            Err(NoteError::UnknownKey(_))
        ));
        // A fresh key with the same name.
        let other = NoteSigner::new("PeterNeumann", SigningKey::from_bytes(&[7u8; 32])).unwrap();
        assert!(matches!(
            other.verifier().verify(&peter_note()),
            Err(NoteError::UnknownKey(_))
        ));
    }

    #[test]
    fn flipped_signature_byte_fails() {
        let encoded = PETER_SIG.trim_end().rsplit_once(' ').unwrap().1;
        let decoded = BASE64.decode(encoded).unwrap();
        for i in KEY_ID_LEN..decoded.len() {
            let mut flipped = decoded.clone();
            flipped[i] ^= 0x01;
            let note = format!(
                "{PETER_TEXT}\n\u{2014} PeterNeumann {}\n",
                BASE64.encode(&flipped)
            );
            assert!(
                matches!(peter().verify(&note), Err(NoteError::BadSignature(_))),
                "byte {i}"
            );
        }
        // Extra bytes in the signature (TestOpen's "ABCD" insertion).
        let sig = PETER_SIG;
        let inserted = format!("{PETER_TEXT}\n{}ABCD{}", &sig[..60], &sig[60..]);
        assert!(matches!(
            peter().verify(&inserted),
            Err(NoteError::BadSignature(_))
        ));
    }

    #[test]
    fn bad_signature_from_known_key_rejects_note_even_with_a_good_one() {
        let bad = PETER_SIG.replace("x08go/ZJ", "x08go/ZK");
        let note = format!("{PETER_TEXT}\n{PETER_SIG}{bad}");
        assert!(matches!(
            peter().verify(&note),
            Err(NoteError::BadSignature(_))
        ));
    }

    #[test]
    fn modified_body_fails() {
        let note = peter_note().replace("cryptography", "cryptographY");
        assert!(matches!(
            peter().verify(&note),
            Err(NoteError::BadSignature(_))
        ));
        let extra_line = format!("{PETER_TEXT}P.S.\n\n{PETER_SIG}");
        assert!(matches!(
            peter().verify(&extra_line),
            Err(NoteError::BadSignature(_))
        ));
    }

    #[test]
    fn malformed_notes_are_rejected() {
        // The first seven are TestOpen's badMsgs in golang.org/x/mod
        // sumdb/note/note_test.go.
        let bad_notes = [
            PETER_TEXT.to_owned(),
            format!("{PETER_TEXT}\n"),
            format!("{PETER_TEXT}\n{}", &PETER_SIG[..PETER_SIG.len() - 1]),
            format!("\u{1}{PETER_TEXT}\n{PETER_SIG}"),
            format!("{PETER_TEXT}\n\u{2014} Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="),
            format!("{PETER_TEXT}\n{PETER_SIG}Unexpected line.\n"),
            // Missing blank line between text and signatures.
            format!("{PETER_TEXT}{PETER_SIG}"),
            // Hyphen instead of em dash.
            format!("{PETER_TEXT}\n{}", PETER_SIG.replace('\u{2014}', "-")),
            // Carriage returns are control characters.
            format!("{PETER_TEXT}\n{}", PETER_SIG.replace('\n', "\r\n")),
            // Key ID only, no signature bytes.
            format!("{PETER_TEXT}\n\u{2014} PeterNeumann x08gow==\n"),
            // Signature line without a signature.
            format!("{PETER_TEXT}\n\u{2014} PeterNeumann\n"),
            // Empty signature line.
            format!("{PETER_TEXT}\n{PETER_SIG}\n"),
            // Unpadded base64.
            format!("{PETER_TEXT}\n{}", PETER_SIG.replace("AM=", "AM")),
            // Too many signatures (TestOpen uses 101).
            format!("{PETER_TEXT}\n{}", PETER_SIG.repeat(101)),
            String::new(),
        ];
        for note in &bad_notes {
            assert!(
                matches!(peter().verify(note), Err(NoteError::MalformedNote(_))),
                "{note:?}"
            );
        }
        // Not UTF-8 (TestOpen's "\xff" prefix).
        let mut not_utf8 = vec![0xff];
        not_utf8.extend_from_slice(peter_note().as_bytes());
        assert!(matches!(
            peter().verify_bytes(&not_utf8),
            Err(NoteError::MalformedNote(_))
        ));
    }

    #[test]
    fn accepts_sixteen_signatures() {
        // signed-note requires accepting at least 16 signatures.
        let note = format!("{PETER_TEXT}\n{}{}", ENOCH_SIG.repeat(15), PETER_SIG);
        assert_eq!(peter().verify(&note).unwrap(), PETER_TEXT);
    }

    #[test]
    fn text_with_blank_lines_uses_last_blank_line_as_separator() {
        // The signed-note.md example text contains an empty line.
        let signer = signer_from_go_skey(PETER_SKEY);
        let text = "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned \u{e8} subito sera.\n";
        let note = signer.try_sign(text).unwrap();
        assert_eq!(signer.verifier().verify(&note).unwrap(), text);
    }

    #[test]
    fn mangled_verifier_keys_are_rejected() {
        // Mirrors TestNewVerifier in golang.org/x/mod sumdb/note/note_test.go:
        // every proper substring and every single-byte increment must fail.
        let bytes = PETER_VKEY.as_bytes();
        for start in 0..=bytes.len() {
            for end in start..=bytes.len() {
                if start == 0 && end == bytes.len() {
                    continue;
                }
                let sub = &PETER_VKEY[start..end];
                assert!(
                    matches!(
                        NoteVerifier::from_verifier_key(sub),
                        Err(NoteError::BadVerifierKey(_))
                    ),
                    "{sub:?}"
                );
            }
        }
        for i in 0..bytes.len() {
            let mut mangled = bytes.to_vec();
            mangled[i] += 1;
            let mangled = String::from_utf8(mangled).unwrap();
            assert!(
                NoteVerifier::from_verifier_key(&mangled).is_err(),
                "{mangled:?}"
            );
        }
        // Wrong key length and unknown algorithm, each with an adjusted key
        // hash (same test).
        for vkey in [
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
            "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        ] {
            assert!(matches!(
                NoteVerifier::from_verifier_key(vkey),
                Err(NoteError::BadVerifierKey(_))
            ));
        }
    }

    #[test]
    fn signer_rejects_invalid_names() {
        for name in ["", "a+b", "a b", "a\tb", "a\u{a0}b", "a\u{1}b", "a\nb"] {
            assert!(
                matches!(
                    NoteSigner::new(name, SigningKey::from_bytes(&[1u8; 32])),
                    Err(NoteError::InvalidKeyName(_))
                ),
                "{name:?}"
            );
        }
    }

    #[test]
    fn try_sign_rejects_text_that_cannot_form_a_note() {
        let signer = signer_from_go_skey(PETER_SKEY);
        // TestSign's "abc" (no final newline), plus empty and control chars.
        for text in ["abc", "", "a\rb\n", "tab\there\n"] {
            assert!(
                matches!(signer.try_sign(text), Err(NoteError::MalformedNote(_))),
                "{text:?}"
            );
        }
    }

    #[test]
    fn signer_debug_does_not_show_the_private_key() {
        let signer = signer_from_go_skey(PETER_SKEY);
        let debug = format!("{signer:?}");
        assert!(debug.contains("PeterNeumann") && debug.contains("c74f20a3"));
        assert!(!debug.contains("SigningKey"));
    }

    #[test]
    fn verifies_published_sumdb_checkpoint() {
        let sumdb = NoteVerifier::from_verifier_key(SUMDB_VKEY).unwrap();
        let body = sumdb.verify(SUMDB_CHECKPOINT).unwrap();
        let checkpoint = Checkpoint::parse_body(&body).unwrap();
        assert_eq!(checkpoint.origin, "go.sum database tree");
        assert_eq!(checkpoint.size, 6476701);
        assert_eq!(
            BASE64.encode(checkpoint.root),
            "mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk="
        );
        assert_eq!(checkpoint.body(), body);
        let tampered = SUMDB_CHECKPOINT.replace("6476701", "6476702");
        assert!(matches!(
            sumdb.verify(&tampered),
            Err(NoteError::BadSignature(_))
        ));
    }

    #[test]
    fn parses_c2sp_example_checkpoint() {
        let (text, lines) = split_note(C2SP_EXAMPLE).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].name, "example.com/behind-the-sofa");
        let checkpoint = Checkpoint::parse_body(text).unwrap();
        assert_eq!(checkpoint.origin, "example.com/behind-the-sofa");
        assert_eq!(checkpoint.size, 20852163);
        assert_eq!(
            BASE64.encode(checkpoint.root),
            "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
        );
        assert_eq!(checkpoint.body(), text);
        // Its key ID equals sum.golang.org's, but the name differs: ignored.
        let sumdb = NoteVerifier::from_verifier_key(SUMDB_VKEY).unwrap();
        assert!(matches!(
            sumdb.verify(C2SP_EXAMPLE),
            Err(NoteError::UnknownKey(_))
        ));
    }

    #[test]
    fn checkpoint_sign_verify_round_trip() {
        let signer = NoteSigner::new(
            "example.com/audit",
            SigningKey::generate(&mut rand::rngs::OsRng),
        )
        .unwrap();
        let checkpoint = Checkpoint {
            origin: "example.com/audit".to_owned(),
            size: 0,
            root: super::super::merkle::empty_root(),
        };
        let note = signer.sign(&checkpoint.body());
        assert_eq!(signer.try_sign(&checkpoint.body()).unwrap(), note);
        let verifier = NoteVerifier::from_verifier_key(&signer.verifier_key()).unwrap();
        let body = verifier.verify(&note).unwrap();
        assert_eq!(Checkpoint::parse_body(&body).unwrap(), checkpoint);
        assert!(body
            .starts_with("example.com/audit\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"));
    }

    #[test]
    fn checkpoint_body_accepts_extension_lines() {
        let root = "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=";
        let text =
            format!("example.com/behind-the-sofa\n20852163\n{root}\n6086d1a9\nWaxing gibbous\n");
        let checkpoint = Checkpoint::parse_body(&text).unwrap();
        assert_eq!(checkpoint.size, 20852163);
    }

    #[test]
    fn malformed_checkpoint_bodies_are_rejected() {
        let root = "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=";
        // The first seven are invalid cases of TestUnmarshalLogState in
        // transparency-dev/formats log/checkpoint_test.go; the next two are
        // its valid cases, invalid here because the hash is not 32 bytes.
        let bad_bodies = [
            "Head\n9944\n".to_owned(),
            "\n9944\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n".to_owned(),
            "Log\n123\nYmFuYW5hcw==".to_owned(),
            "Log\nbananas\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n".to_owned(),
            "Log\n-34\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n".to_owned(),
            "Log\n3438945738945739845734895735\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n".to_owned(),
            "Log\n123\nThisIsn'tBase64\n".to_owned(),
            "Log\n123\nYmFuYW5hcw==\n".to_owned(),
            "Banana\n9944\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n".to_owned(),
            // Leading zero, sign, spaces, overflow by one.
            format!("Log\n0123\n{root}\n"),
            format!("Log\n+123\n{root}\n"),
            format!("Log\n 123\n{root}\n"),
            format!("Log\n18446744073709551616\n{root}\n"),
            // Unpadded and non-canonical base64.
            format!("Log\n1\n{}\n", root.trim_end_matches('=')),
            format!("Log\n1\n{}\n", root.replace("2I=", "2J=")),
            // Empty extension line, control character, no final newline.
            format!("Log\n1\n{root}\n\n"),
            format!("Log\n1\n{root}\next\r\n"),
            format!("Log\n1\n{root}"),
            String::new(),
        ];
        for body in &bad_bodies {
            assert!(
                matches!(
                    Checkpoint::parse_body(body),
                    Err(NoteError::MalformedBody(_))
                ),
                "{body:?}"
            );
        }
        assert_eq!(
            Checkpoint::parse_body(&format!("Log\n18446744073709551615\n{root}\n"))
                .unwrap()
                .size,
            u64::MAX
        );
        assert_eq!(
            Checkpoint::parse_body(&format!("Log\n0\n{root}\n"))
                .unwrap()
                .size,
            0
        );
    }
}
