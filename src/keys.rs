//! Channel identity: the broadcaster's Ed25519 key, the channel id derived from it, and key files.
//!
//! A channel *is* its public key. The holder of the secret key signs every chunk header
//! ([`crate::stream::header`]); every node verifies with the [`ChannelId`] alone.
//!
//! # Textual channel id
//!
//! A channel id is written as 56 lower-case base32 characters (RFC 4648 alphabet): the 32-byte
//! public key followed by a 3-byte BLAKE3 checksum. Base32 has no `+`, `/` or `-`, so a
//! double-click selects the whole id and it survives URLs, shells and case-folding; the checksum
//! turns a mistyped or truncated id into an error instead of a silent search for a channel that
//! does not exist.
//!
//! # Key files
//!
//! A key file is a PKCS#8 document in PEM (`-----BEGIN PRIVATE KEY-----`), the format `openssl
//! genpkey -algorithm ed25519` writes, so operators can inspect it with standard tools. Files are
//! created with mode 0600; loading refuses a file that group or others can read or write (as ssh
//! does), and names the problem: missing, unreadable, permissions, not PEM, not an Ed25519 key.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// Length of an Ed25519 public key, which is also the binary channel id.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Bytes of BLAKE3 checksum appended to the public key in the textual form.
const CHECKSUM_LEN: usize = 3;
/// Length of the textual channel id: (32 + 3) bytes × 8 / 5 bits per character.
pub const CHANNEL_ID_TEXT_LEN: usize = (PUBLIC_KEY_LEN + CHECKSUM_LEN) * 8 / 5;
/// Upper bound on a key file we are willing to read; a real one is under 200 bytes.
const MAX_KEY_FILE_LEN: u64 = 16 * 1024;

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// The public identity of a channel: the broadcaster's Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId([u8; PUBLIC_KEY_LEN]);

impl ChannelId {
    /// Wraps raw public-key bytes. Whether they are a valid curve point is only learnt when a
    /// signature is checked against them; a bad point simply verifies nothing.
    pub const fn from_bytes(bytes: [u8; PUBLIC_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw 32 public-key bytes.
    pub const fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    /// Checks `signature` over `message` against this channel's key.
    pub fn verify(&self, message: &[u8], signature: &[u8; SIGNATURE_LEN]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }

    fn checksum(&self) -> [u8; CHECKSUM_LEN] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"gridcast channel id checksum");
        hasher.update(&self.0);
        let digest = hasher.finalize();
        let mut out = [0; CHECKSUM_LEN];
        out.copy_from_slice(&digest.as_bytes()[..CHECKSUM_LEN]);
        out
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = [0u8; PUBLIC_KEY_LEN + CHECKSUM_LEN];
        raw[..PUBLIC_KEY_LEN].copy_from_slice(&self.0);
        raw[PUBLIC_KEY_LEN..].copy_from_slice(&self.checksum());
        let text = data_encoding::BASE32_NOPAD
            .encode(&raw)
            .to_ascii_lowercase();
        f.write_str(&text)
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelId({self})")
    }
}

/// The public identity of a node (source, supernode or peer): its long-term Ed25519 public key.
/// TLS certificates carry it; the dialling side checks it against the id it expected.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; PUBLIC_KEY_LEN]);

impl NodeId {
    /// Wraps raw public-key bytes.
    pub const fn from_bytes(bytes: [u8; PUBLIC_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw 32 public-key bytes.
    pub const fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }
}

impl NodeId {
    /// Checks `signature` over `message` against this node's key (see [`NodeKey::sign`]).
    pub fn verify(&self, message: &[u8], signature: &[u8; SIGNATURE_LEN]) -> bool {
        ChannelId(self.0).verify(message, signature)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = data_encoding::BASE32_NOPAD
            .encode(&self.0)
            .to_ascii_lowercase();
        f.write_str(&text)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form for logs: the first 10 characters identify a node in practice.
        let text = self.to_string();
        write!(f, "NodeId({})", &text[..10])
    }
}

/// Characters in a textual node id (base32 of the 32-byte key, no checksum).
pub const NODE_ID_TEXT_LEN: usize = 52;

/// Why a textual node id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    /// The text has the wrong number of characters.
    #[error("a node id is {NODE_ID_TEXT_LEN} characters, this one has {0}")]
    Length(usize),
    /// The text contains a character outside the base32 alphabet.
    #[error("a node id uses only the letters a-z and digits 2-7")]
    Alphabet,
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.len() != NODE_ID_TEXT_LEN {
            return Err(NodeIdError::Length(text.chars().count()));
        }
        let raw = data_encoding::BASE32_NOPAD
            .decode(text.to_ascii_uppercase().as_bytes())
            .map_err(|_| NodeIdError::Alphabet)?;
        let key: [u8; PUBLIC_KEY_LEN] = raw.try_into().map_err(|_| NodeIdError::Alphabet)?;
        Ok(Self(key))
    }
}

/// Why a textual channel id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelIdError {
    /// The text has the wrong number of characters.
    #[error("a channel id is {CHANNEL_ID_TEXT_LEN} characters, this one has {0}")]
    Length(usize),
    /// The text contains a character outside the base32 alphabet.
    #[error("a channel id uses only the letters a-z and digits 2-7")]
    Alphabet,
    /// The checksum does not match: a typo or a truncated copy.
    #[error("channel id checksum does not match (mistyped or incomplete copy?)")]
    Checksum,
}

impl FromStr for ChannelId {
    type Err = ChannelIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.len() != CHANNEL_ID_TEXT_LEN {
            return Err(ChannelIdError::Length(text.chars().count()));
        }
        let upper = text.to_ascii_uppercase();
        let raw = data_encoding::BASE32_NOPAD
            .decode(upper.as_bytes())
            .map_err(|_| ChannelIdError::Alphabet)?;
        let mut key = [0u8; PUBLIC_KEY_LEN];
        key.copy_from_slice(raw.get(..PUBLIC_KEY_LEN).ok_or(ChannelIdError::Alphabet)?);
        let id = ChannelId(key);
        if raw.get(PUBLIC_KEY_LEN..) != Some(&id.checksum()[..]) {
            return Err(ChannelIdError::Checksum);
        }
        Ok(id)
    }
}

/// The broadcaster's secret signing key.
pub struct ChannelKey {
    pair: Ed25519KeyPair,
    /// The PKCS#8 document the pair was loaded from, kept so it can be written out again.
    pkcs8: Vec<u8>,
}

impl fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secret material.
        f.debug_struct("ChannelKey")
            .field("channel", &self.channel_id())
            .finish_non_exhaustive()
    }
}

/// Why a key could not be created, written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file exists and overwriting was not requested.
    #[error(
        "{0}: a key file already exists; refusing to overwrite it (pass --force to replace it)"
    )]
    Exists(PathBuf),
    /// Group or others may access the secret key.
    #[error(
        "{path}: key file is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is larger than any key file could be.
    #[error("{0}: too large to be a key file")]
    TooLarge(PathBuf),
    /// The file is not a PEM `PRIVATE KEY` document.
    #[error("{path}: not a gridcast key file ({reason})")]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The PEM body decoded, but it is not a valid Ed25519 PKCS#8 key.
    #[error(
        "{path}: not a valid Ed25519 private key ({reason}); the file may be truncated or corrupted"
    )]
    Rejected {
        /// The key file.
        path: PathBuf,
        /// ring's description of the rejection.
        reason: String,
    },
}

impl ChannelKey {
    /// Generates a fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Random)?;
        let pkcs8 = doc.as_ref().to_vec();
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyError::Random)?;
        Ok(Self { pair, pkcs8 })
    }

    /// Builds a key from a 32-byte seed. Deterministic: for tests, simulations and benchmarks.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .expect("ring accepts every 32-byte Ed25519 seed");
        // PKCS#8 v1 for Ed25519 is a fixed 16-byte prefix followed by the seed (RFC 8410).
        let mut pkcs8 = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        pkcs8.extend_from_slice(seed);
        Self { pair, pkcs8 }
    }

    /// The channel id (public key) for this key.
    pub fn channel_id(&self) -> ChannelId {
        let mut id = [0u8; PUBLIC_KEY_LEN];
        id.copy_from_slice(self.pair.public_key().as_ref());
        ChannelId(id)
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }

    /// The key as a PEM document.
    pub fn to_pem(&self) -> String {
        let body = data_encoding::BASE64.encode(&self.pkcs8);
        let mut pem = String::with_capacity(body.len() + 80);
        pem.push_str(PEM_BEGIN);
        pem.push('\n');
        for line in body.as_bytes().chunks(64) {
            // base64 output is ASCII, so every 64-byte slice is valid UTF-8.
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str(PEM_END);
        pem.push('\n');
        pem
    }

    /// Parses a PEM document; `path` is only used to name the file in errors.
    pub fn from_pem(pem: &str, path: &Path) -> Result<Self, KeyError> {
        let malformed = |reason| KeyError::Malformed {
            path: path.to_owned(),
            reason,
        };
        let start = pem
            .find(PEM_BEGIN)
            .ok_or_else(|| malformed("no BEGIN PRIVATE KEY line"))?;
        let rest = &pem[start + PEM_BEGIN.len()..];
        let end = rest
            .find(PEM_END)
            .ok_or_else(|| malformed("no END PRIVATE KEY line; the file looks truncated"))?;
        let body: String = rest[..end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        if body.is_empty() {
            return Err(malformed("empty key body"));
        }
        let der = data_encoding::BASE64
            .decode(body.as_bytes())
            .map_err(|_| malformed("key body is not valid base64"))?;
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| KeyError::Rejected {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self { pair, pkcs8: der })
    }

    /// Loads a key file, refusing one that group or others can access.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        check_private_mode(path, &meta)?;
        if meta.len() > MAX_KEY_FILE_LEN {
            return Err(KeyError::TooLarge(path.to_owned()));
        }
        let bytes = fs::read(path).map_err(io)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Malformed {
            path: path.to_owned(),
            reason: "not a text file",
        })?;
        Self::from_pem(text, path)
    }

    /// Writes the key to `path` with mode 0600. Without `overwrite`, an existing file is an
    /// error. The file is written beside its destination and renamed into place, so a crash
    /// never leaves a half-written key where a good one was.
    pub fn save(&self, path: &Path, overwrite: bool) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        if !overwrite && fs::symlink_metadata(path).is_ok() {
            return Err(KeyError::Exists(path.to_owned()));
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let file_name = path.file_name().ok_or_else(|| KeyError::Malformed {
            path: path.to_owned(),
            reason: "the path names a directory, not a file",
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options.open(&tmp).and_then(|mut file| {
            file.write_all(self.to_pem().as_bytes())?;
            file.sync_all()
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        if !overwrite {
            // Re-check right before the rename: never replace a file created meanwhile.
            if fs::symlink_metadata(path).is_ok() {
                let _ = fs::remove_file(&tmp);
                return Err(KeyError::Exists(path.to_owned()));
            }
        }
        fs::rename(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io(e)
        })
    }
}

impl ChannelKey {
    /// The PKCS#8 DER document of the key, for building TLS certificates.
    pub(crate) fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }
}

/// A node's long-term secret key. Its public half is the [`NodeId`] that TLS proves: a node's
/// certificate is self-signed with this key and the dialling side checks the handshake against
/// the node id it expected. Same file format and permission rules as a [`ChannelKey`].
#[derive(Debug)]
pub struct NodeKey(ChannelKey);

impl NodeKey {
    /// Generates a fresh key.
    pub fn generate() -> Result<Self, KeyError> {
        ChannelKey::generate().map(Self)
    }

    /// A deterministic key from a seed: for tests and simulations.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(ChannelKey::from_seed(seed))
    }

    /// Loads a key file (refusing group- or world-accessible files).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        ChannelKey::load(path).map(Self)
    }

    /// Writes the key file with mode 0600.
    pub fn save(&self, path: &Path, overwrite: bool) -> Result<(), KeyError> {
        self.0.save(path, overwrite)
    }

    /// This node's public identity.
    pub fn node_id(&self) -> NodeId {
        NodeId(*self.0.channel_id().as_bytes())
    }

    /// Signs `message` with this node's key: what it says about itself in gossip, so that
    /// no other node can speak for it.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(message)
    }

    pub(crate) fn pkcs8_der(&self) -> &[u8] {
        self.0.pkcs8_der()
    }
}

impl Clone for NodeKey {
    fn clone(&self) -> Self {
        // The document parsed once already; parsing it again cannot fail.
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&self.0.pkcs8)
            .expect("a key pair's own PKCS#8 document parses");
        Self(ChannelKey {
            pair,
            pkcs8: self.0.pkcs8.clone(),
        })
    }
}

#[cfg(unix)]
fn check_private_mode(path: &Path, meta: &fs::Metadata) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_mode(_path: &Path, _meta: &fs::Metadata) -> Result<(), KeyError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_id_round_trips_and_is_lower_case() {
        let key = ChannelKey::from_seed(&[7; 32]);
        let id = key.channel_id();
        let text = id.to_string();
        assert_eq!(text.len(), CHANNEL_ID_TEXT_LEN);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        );
        assert_eq!(text.parse::<ChannelId>(), Ok(id));
        assert_eq!(text.to_ascii_uppercase().parse::<ChannelId>(), Ok(id));
    }

    #[test]
    fn text_id_rejects_typos_and_truncation() {
        let text = ChannelKey::from_seed(&[9; 32]).channel_id().to_string();
        assert_eq!(
            text[..text.len() - 1].parse::<ChannelId>(),
            Err(ChannelIdError::Length(CHANNEL_ID_TEXT_LEN - 1))
        );
        // Change one character to another valid base32 character.
        let mut typo = text.clone().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        assert_eq!(typo.parse::<ChannelId>(), Err(ChannelIdError::Checksum));
        let mut bad = text.into_bytes();
        bad[3] = b'1';
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(bad.parse::<ChannelId>(), Err(ChannelIdError::Alphabet));
    }

    #[test]
    fn pem_round_trip_keeps_the_key() {
        let key = ChannelKey::generate().unwrap();
        let again = ChannelKey::from_pem(&key.to_pem(), Path::new("k")).unwrap();
        assert_eq!(key.channel_id(), again.channel_id());
        let sig = again.sign(b"hello");
        assert!(key.channel_id().verify(b"hello", &sig));
        assert!(!key.channel_id().verify(b"hellp", &sig));
    }

    #[test]
    fn seeded_key_pem_is_loadable() {
        let key = ChannelKey::from_seed(&[3; 32]);
        let again = ChannelKey::from_pem(&key.to_pem(), Path::new("k")).unwrap();
        assert_eq!(key.channel_id(), again.channel_id());
    }

    #[test]
    fn save_refuses_overwrite_and_load_checks_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("channel.key");
        let key = ChannelKey::generate().unwrap();
        key.save(&path, false).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(key.save(&path, false), Err(KeyError::Exists(_))));
        let other = ChannelKey::generate().unwrap();
        other.save(&path, true).unwrap();
        assert_eq!(
            ChannelKey::load(&path).unwrap().channel_id(),
            other.channel_id()
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = ChannelKey::load(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn truncated_and_corrupted_files_are_named_errors() {
        let pem = ChannelKey::generate().unwrap().to_pem();
        let p = Path::new("k");
        let truncated = &pem[..pem.len() / 2];
        assert!(matches!(
            ChannelKey::from_pem(truncated, p),
            Err(KeyError::Malformed { .. })
        ));
        // Cut the body short but keep the END line: base64 or PKCS#8 rejection.
        let lines: Vec<&str> = pem.lines().collect();
        let short = format!(
            "{}\n{}\n{}\n",
            lines[0],
            &lines[1][..20],
            lines[lines.len() - 1]
        );
        assert!(ChannelKey::from_pem(&short, p).is_err());
        assert!(matches!(
            ChannelKey::from_pem("hello", p),
            Err(KeyError::Malformed { .. })
        ));
        let garbage = format!("{PEM_BEGIN}\nAAAAAAAAAAAAAAAA\n{PEM_END}\n");
        assert!(matches!(
            ChannelKey::from_pem(&garbage, p),
            Err(KeyError::Rejected { .. })
        ));
    }
}
