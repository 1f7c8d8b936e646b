//! Gateway API keys: each maps to a user, an organisation and a tier.
//!
//! The table is read from a TOML or JSON file (`--keys FILE`), or from JSON in the
//! `TOKENWISE_GATEWAY_KEYS` environment variable, or is the built-in demo table. Only
//! BLAKE3 hashes of the keys are kept in memory, and nothing here prints a key.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use serde::Deserialize;
use tokenwise::Tier;

/// The environment variable that may hold the key table as JSON.
pub const KEYS_ENV: &str = "TOKENWISE_GATEWAY_KEYS";

/// The built-in demo keys: (key, user, org, tier).
pub const DEMO_KEYS: &[(&str, &str, &str, Tier)] = &[
    ("sk-demo-alice", "alice", "acme", Tier::Standard),
    ("sk-demo-bob", "bob", "acme", Tier::Free),
    ("sk-demo-carol", "carol", "globex", Tier::Premium),
];

/// One row of a key file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// The key clients send as `Authorization: Bearer <key>`.
    pub key: String,
    /// The user it belongs to: per-user limits and caps apply to this name.
    pub user: String,
    /// The organisation, for per-org limits, caps and cache scope.
    #[serde(default)]
    pub org: Option<String>,
    /// `free`, `standard` (default) or `premium`: scales rate limits and load shedding.
    #[serde(default)]
    pub tier: Tier,
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("key", &"<redacted>")
            .field("user", &self.user)
            .field("org", &self.org)
            .field("tier", &self.tier)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyEntry>,
}

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user.
    pub user: String,
    /// The organisation, if any.
    pub org: Option<String>,
    /// The tier.
    pub tier: Tier,
}

/// The key table.
#[derive(Clone, Default)]
pub struct KeyTable {
    by_hash: HashMap<[u8; 32], Arc<Principal>, BuildHasherDefault<DigestHasher>>,
}

/// Hashes a key's digest by taking its first bytes: a BLAKE3 digest is already as even
/// as a hash gets, and the table is filled from the configuration only, so there is
/// nothing to flood. (A general-purpose hasher would hash the digest again on every
/// request.)
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        for (w, b) in word.iter_mut().zip(bytes) {
            *w = *b;
        }
        self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
    }
}

impl fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyTable({} keys)", self.by_hash.len())
    }
}

/// Shortest key accepted from a file: shorter ones are guessable.
const MIN_KEY_LEN: usize = 12;

impl KeyTable {
    /// The built-in demo table ([`DEMO_KEYS`]).
    pub fn demo() -> Self {
        let mut t = KeyTable::default();
        for (key, user, org, tier) in DEMO_KEYS {
            t.insert(
                key,
                Principal {
                    user: (*user).to_owned(),
                    org: Some((*org).to_owned()),
                    tier: *tier,
                },
            );
        }
        t
    }

    /// A table from entries, checked: keys at least 12 characters and unique, users
    /// not empty.
    pub fn from_entries(entries: impl IntoIterator<Item = KeyEntry>) -> Result<Self, String> {
        let mut t = KeyTable::default();
        for (i, e) in entries.into_iter().enumerate() {
            if e.key.trim().len() < MIN_KEY_LEN {
                return Err(format!(
                    "key #{}: keys must be at least {MIN_KEY_LEN} characters",
                    i + 1
                ));
            }
            if e.user.trim().is_empty() {
                return Err(format!("key #{}: the user is empty", i + 1));
            }
            let principal = Principal {
                user: e.user,
                org: e.org.filter(|o| !o.trim().is_empty()),
                tier: e.tier,
            };
            if !t.insert(e.key.trim(), principal) {
                return Err(format!("key #{}: the same key appears twice", i + 1));
            }
        }
        if t.by_hash.is_empty() {
            return Err("the key table is empty".into());
        }
        Ok(t)
    }

    /// A table from JSON text: `{"keys": [{"key": .., "user": .., "org": .., "tier": ..}]}`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let f: KeyFile = serde_json::from_str(text).map_err(|e| format!("key table JSON: {e}"))?;
        Self::from_entries(f.keys)
    }

    /// A table from TOML text: `[[keys]]` tables with `key`, `user`, `org`, `tier`.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        // The message only: the full error quotes the offending line, which may hold a key.
        let f: KeyFile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            match line {
                Some(n) => format!("key table TOML, line {n}: {}", e.message()),
                None => format!("key table TOML: {}", e.message()),
            }
        })?;
        Self::from_entries(f.keys)
    }

    /// A table from a file: TOML if its name ends in `.toml`, JSON otherwise.
    pub fn load(path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        if path.ends_with(".toml") {
            Self::from_toml(&text)
        } else {
            Self::from_json(&text)
        }
        .map_err(|e| format!("{path}: {e}"))
    }

    fn insert(&mut self, key: &str, p: Principal) -> bool {
        self.by_hash
            .insert(*blake3::hash(key.as_bytes()).as_bytes(), Arc::new(p))
            .is_none()
    }

    /// Who `key` belongs to, if anyone.
    pub fn lookup(&self, key: &str) -> Option<Arc<Principal>> {
        self.by_hash
            .get(blake3::hash(key.as_bytes()).as_bytes())
            .cloned()
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }
}
