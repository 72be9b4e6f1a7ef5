//! Rewrites `system` strings in raw JSON text without re-serialising the rest, so a changed
//! body differs from what was received only in those strings.
//!
//! Only ever run on bytes that serde_json has already parsed, so this scanner can be
//! small: it finds token boundaries and does not re-validate. Anything it does not
//! expect makes it give up (`None`) and the caller falls back to re-serialising.

use std::borrow::Cow;
use std::ops::Range;

use super::{url_for_oid, SYSTEM_MEMBER};

/// Deeper than serde_json's own parse limit (128), so valid input never hits it; it only
/// bounds recursion if this is ever called on unparsed bytes.
const MAX_NESTING: usize = 256;

/// The rewritten text and how many `system` strings were replaced in it.
pub(super) struct SplicedBody {
    pub(super) bytes: Vec<u8>,
    pub(super) replacements: usize,
}

/// Replaces every `system` member whose string value is a known OID with the quoted URL.
pub(super) fn rewrite_system_strings(body: &[u8]) -> Option<SplicedBody> {
    let mut scanner = Scanner {
        bytes: body,
        position: 0,
        replacements: Vec::new(),
    };
    scanner.value(0)?;
    scanner.skip_whitespace();
    if scanner.position != body.len() {
        return None;
    }

    let mut bytes = Vec::with_capacity(body.len() + 64 * scanner.replacements.len());
    let mut copied_up_to = 0;
    for (token, url) in &scanner.replacements {
        bytes.extend_from_slice(body.get(copied_up_to..token.start)?);
        // serde_json does the quoting so the output is valid JSON whatever the URL holds.
        bytes.extend_from_slice(serde_json::to_string(url).ok()?.as_bytes());
        copied_up_to = token.end;
    }
    bytes.extend_from_slice(body.get(copied_up_to..)?);
    Some(SplicedBody {
        bytes,
        replacements: scanner.replacements.len(),
    })
}

struct Scanner<'a> {
    bytes: &'a [u8],
    position: usize,
    /// Byte range of each string token to replace (quotes included) and its new text.
    replacements: Vec<(Range<usize>, &'static str)>,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.position += 1;
        }
    }

    fn consume(&mut self, byte: u8) -> Option<()> {
        if self.peek()? != byte {
            return None;
        }
        self.position += 1;
        Some(())
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_NESTING {
            return None;
        }
        self.skip_whitespace();
        match self.peek()? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string_token().map(drop),
            _ => self.scalar(),
        }
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        self.consume(b'{')?;
        self.skip_whitespace();
        if self.peek()? == b'}' {
            self.position += 1;
            return Some(());
        }
        loop {
            self.skip_whitespace();
            let key = self.string_token()?;
            self.skip_whitespace();
            self.consume(b':')?;
            self.skip_whitespace();
            if self.peek()? == b'"' && decode_string(self.bytes.get(key)?)? == SYSTEM_MEMBER {
                let token = self.string_token()?;
                if let Some(url) = url_for_oid(&decode_string(self.bytes.get(token.clone())?)?) {
                    self.replacements.push((token, url));
                }
            } else {
                self.value(depth + 1)?;
            }
            self.skip_whitespace();
            match self.peek()? {
                b',' => self.position += 1,
                b'}' => {
                    self.position += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        self.consume(b'[')?;
        self.skip_whitespace();
        if self.peek()? == b']' {
            self.position += 1;
            return Some(());
        }
        loop {
            self.value(depth + 1)?;
            self.skip_whitespace();
            match self.peek()? {
                b',' => self.position += 1,
                b']' => {
                    self.position += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Skips a string token and returns its byte range, quotes included.
    fn string_token(&mut self) -> Option<Range<usize>> {
        let start = self.position;
        self.consume(b'"')?;
        loop {
            match self.peek()? {
                b'"' => {
                    self.position += 1;
                    return Some(start..self.position);
                }
                // Every JSON escape is a backslash plus one ASCII byte (`\uXXXX` continues
                // with plain hex digits), so skipping two bytes never lands inside it.
                b'\\' => self.position += 2,
                _ => self.position += 1,
            }
        }
    }

    /// Skips a number, `true`, `false` or `null`.
    fn scalar(&mut self) -> Option<()> {
        let start = self.position;
        while let Some(byte) = self.peek() {
            if matches!(byte, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                break;
            }
            self.position += 1;
        }
        (self.position > start).then_some(())
    }
}

/// The text of a string token (quotes included), borrowed when it has no escapes.
fn decode_string(token: &[u8]) -> Option<Cow<'_, str>> {
    let inner = token.get(1..token.len().checked_sub(1)?)?;
    if inner.contains(&b'\\') {
        serde_json::from_slice::<String>(token).ok().map(Cow::Owned)
    } else {
        std::str::from_utf8(inner).ok().map(Cow::Borrowed)
    }
}
