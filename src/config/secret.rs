//! Secrets: inline, from a file or from an environment variable, never logged;
//! OAuth token sources.

use super::*;

use std::cell::Cell;

/// A secret value (password, token). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

thread_local! {
    /// Set while [`fingerprint`] formats: secrets show as a hash then.
    static FINGERPRINTING: Cell<bool> = const { Cell::new(false) };
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if FINGERPRINTING.with(Cell::get) {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.0.hash(&mut h);
            return write!(f, "Secret(#{:016x})", h.finish());
        }
        f.write_str("Secret(***)")
    }
}

/// `value`'s `Debug` text with every [`Secret`] in it shown as a hash of
/// its value instead of `***`: two fingerprints differ when a secret does,
/// so a reload sees a changed password. Only for comparing, never for
/// printing (a hash of a weak password can be guessed).
pub fn fingerprint(value: &dyn fmt::Debug) -> String {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            FINGERPRINTING.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(FINGERPRINTING.with(|c| c.replace(true)));
    format!("{value:?}")
}

/// Reads a secret given inline (`key`), from a file (`key_file`) or from an
/// environment variable (`key_env`); at most one of the three.
pub(super) fn secret(
    t: &mut Table<'_>,
    key: &'static str,
    file_key: &'static str,
    env_key: &'static str,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<Secret> {
    let inline = t.string(key, errs);
    let file = t.string(file_key, errs);
    let env = t.string(env_key, errs);
    let given = [inline.is_some(), file.is_some(), env.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if given > 1 {
        errs.push(
            t.key(key),
            format!("give only one of {key}, {file_key}, {env_key}"),
        );
        return None;
    }
    if let Some(s) = inline {
        return Some(Secret::new(s));
    }
    if let Some(f) = file {
        return match read_secret_file(&secret_path(&f, base_dir)) {
            Ok(s) => Some(s),
            Err(e) => {
                errs.push(t.key(file_key), e);
                None
            }
        };
    }
    if let Some(var) = env {
        return match std::env::var(&var) {
            Ok(s) if !s.is_empty() => Some(Secret::new(s)),
            _ => {
                errs.push(
                    t.key(env_key),
                    format!("environment variable {var} is not set or empty"),
                );
                None
            }
        };
    }
    None
}

/// Where a `password_file` value points: as given, else relative to the
/// config file's directory.
pub(super) fn secret_path(f: &str, base_dir: &Path) -> PathBuf {
    let p = PathBuf::from(f);
    if p.is_relative() && !p.exists() {
        base_dir.join(f)
    } else {
        p
    }
}

/// The resolved `password_file` of a table (already validated by [`secret`]).
pub(super) fn secret_file_of(
    t: &mut Table<'_>,
    file_key: &'static str,
    base_dir: &Path,
) -> Option<PathBuf> {
    match t.raw(file_key) {
        Some(Value::String(f)) => Some(secret_path(f, base_dir)),
        _ => None,
    }
}

/// Reads a secret file (`password_file`): the content without its trailing
/// line break. Also used to pick up a changed password without a restart.
pub fn read_secret_file(p: &Path) -> Result<Secret, String> {
    match std::fs::read_to_string(p) {
        Ok(s) if !s.trim().is_empty() => {
            Ok(Secret::new(s.trim_end_matches(['\r', '\n']).to_string()))
        }
        Ok(_) => Err(format!("{} is empty", p.display())),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

/// Reads `token_file` (an OAuth2 token re-read before every login; checked
/// here so a typo fails at startup) and `token_expires_at` (RFC 3339).
pub(super) fn token_source(
    t: &mut Table<'_>,
    has_secret: bool,
    base_dir: &Path,
    errs: &mut Errors,
) -> (Option<PathBuf>, Option<crate::model::UnixTime>) {
    let file = t.string("token_file", errs).map(|f| {
        let p = PathBuf::from(&f);
        if p.is_relative() && !p.exists() && base_dir.join(&f).exists() {
            base_dir.join(&f)
        } else {
            p
        }
    });
    if let Some(p) = &file {
        if has_secret {
            errs.push(
                t.key("token_file"),
                "give either token_file or password/password_file/password_env",
            );
        } else if let Err(e) = crate::connector::oauth::TokenFile::new(p, None).read() {
            errs.push(t.key("token_file"), e.detail);
        }
    }
    let expires =
        t.string("token_expires_at", errs).and_then(
            |s| match chrono::DateTime::parse_from_rfc3339(&s) {
                Ok(d) => Some(d.timestamp()),
                Err(_) => {
                    errs.push(
                        t.key("token_expires_at"),
                        format!("{s:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z"),
                    );
                    None
                }
            },
        );
    (file, expires)
}
