//! The raw tree: TOML (and environment overrides) to JSON values, and the
//! typed readers that collect every problem with its key path.

use super::*;

pub(super) fn toml_to_json(text: &str) -> Result<Value, ConfigErrors> {
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<Value>());
    built.map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("TOML syntax error: {e}"),
        }])
    })
}

/// Applies `CRM_MAILSYNC__SECTION__KEY=value` overrides. Array entries are addressed
/// by index (`CRM_MAILSYNC__MAILBOXES__0__PASSWORD_FILE`). Values stay strings: a
/// password `007` must not become the number 7; the typed readers (bool, int,
/// duration, threshold) parse strings themselves.
pub(super) fn apply_env_overrides(
    root: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
) {
    let prefix = format!("{ENV_PREFIX}__");
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .collect();
    vars.sort();
    for (key, raw) in vars {
        let parts: Vec<String> = key[prefix.len()..]
            .split("__")
            .map(|p| p.to_ascii_lowercase())
            .collect();
        if parts.iter().any(|p| p.is_empty()) {
            continue;
        }
        set_path(root, &parts, Value::String(raw));
    }
}

pub(super) fn set_path(node: &mut Value, parts: &[String], value: Value) {
    let Some((first, rest)) = parts.split_first() else {
        *node = value;
        return;
    };
    if let Value::Array(items) = node {
        if let Ok(i) = first.parse::<usize>() {
            if let Some(item) = items.get_mut(i) {
                set_path(item, rest, value);
            }
        }
        return;
    }
    if !node.is_object() {
        *node = Value::Object(Map::new());
    }
    if let Value::Object(map) = node {
        let child = map.entry(first.clone()).or_insert(Value::Null);
        set_path(child, rest, value);
    }
}

/// Collects errors while reading one table; reports unknown keys at `finish`.
pub(super) struct Table<'a> {
    pub(super) path: String,
    pub(super) map: Option<&'a Map<String, Value>>,
    used: HashSet<&'static str>,
}

/// Errors collected across the whole validation.
#[derive(Default)]
pub(super) struct Errors(pub(super) Vec<ConfigError>);

impl Errors {
    pub(super) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'a> Table<'a> {
    pub(super) fn new(path: String, value: Option<&'a Value>, errs: &mut Errors) -> Self {
        let map = match value {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => {
                errs.push(path.clone(), "expected a table");
                None
            }
        };
        Table {
            path,
            map,
            used: HashSet::new(),
        }
    }

    pub(super) fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.insert(key);
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    pub(super) fn key(&self, key: &str) -> String {
        join(&self.path, key)
    }

    pub(super) fn string(&mut self, key: &'static str, errs: &mut Errors) -> Option<String> {
        match self.raw(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            other => {
                errs.push(
                    self.key(key),
                    format!("expected a string, found {}", kind_of(other)),
                );
                None
            }
        }
    }

    pub(super) fn nonempty_string(
        &mut self,
        key: &'static str,
        errs: &mut Errors,
    ) -> Option<String> {
        let s = self.string(key, errs)?;
        if s.trim().is_empty() {
            errs.push(self.key(key), "must not be empty");
            return None;
        }
        Some(s)
    }

    pub(super) fn required_string(
        &mut self,
        key: &'static str,
        errs: &mut Errors,
    ) -> Option<String> {
        if self.raw(key).is_none() {
            errs.push(self.key(key), "is required");
            return None;
        }
        self.nonempty_string(key, errs)
    }

    pub(super) fn bool(&mut self, key: &'static str, default: bool, errs: &mut Errors) -> bool {
        match self.raw(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
            Some(other) => {
                errs.push(
                    self.key(key),
                    format!("expected true or false, found {}", kind_of(other)),
                );
                default
            }
        }
    }

    pub(super) fn int(
        &mut self,
        key: &'static str,
        default: i64,
        min: i64,
        max: i64,
        errs: &mut Errors,
    ) -> i64 {
        let v = match self.raw(key) {
            None => return default,
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
            Some(_) => None,
        };
        match v {
            Some(i) if (min..=max).contains(&i) => i,
            Some(i) => {
                errs.push(self.key(key), format!("{i} is out of range {min}..={max}"));
                default
            }
            None => {
                errs.push(self.key(key), "expected a whole number");
                default
            }
        }
    }

    pub(super) fn duration(
        &mut self,
        key: &'static str,
        default: Duration,
        min: Duration,
        max: Duration,
        errs: &mut Errors,
    ) -> Duration {
        let parsed = match self.raw(key) {
            None => return default,
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Duration::from_secs)
                .ok_or_else(|| "expected a positive number of seconds".to_string()),
            Some(Value::String(s)) => humantime::parse_duration(s.trim())
                .map_err(|e| format!("invalid duration {s:?} ({e}); use e.g. \"30s\", \"5m\"")),
            Some(other) => Err(format!(
                "expected a duration like \"5m\", found {}",
                kind_of(other)
            )),
        };
        match parsed {
            Ok(d) if d >= min && d <= max => d,
            Ok(d) => {
                errs.push(
                    self.key(key),
                    format!(
                        "{} is out of range {}..={}",
                        humantime::format_duration(d),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                default
            }
            Err(m) => {
                errs.push(self.key(key), m);
                default
            }
        }
    }

    /// A size in bytes: a whole number, or a string like `"25MB"`, `"512 KiB"`
    /// (KB/MB/GB are 1024-based, as mail servers count them).
    pub(super) fn size(
        &mut self,
        key: &'static str,
        default: u64,
        min: u64,
        max: u64,
        errs: &mut Errors,
    ) -> u64 {
        let parsed = match self.raw(key) {
            None => return default,
            Some(Value::Number(n)) => n
                .as_u64()
                .ok_or_else(|| "expected a positive number of bytes".to_string()),
            Some(Value::String(s)) => parse_size(s),
            Some(other) => Err(format!(
                "expected a size like \"25MB\", found {}",
                kind_of(other)
            )),
        };
        match parsed {
            Ok(n) if n >= min && n <= max => n,
            Ok(n) => {
                errs.push(
                    self.key(key),
                    format!("{n} bytes is out of range {min}..={max}"),
                );
                default
            }
            Err(m) => {
                errs.push(self.key(key), m);
                default
            }
        }
    }

    pub(super) fn choice<T: Copy>(
        &mut self,
        key: &'static str,
        default: T,
        options: &[(&str, T)],
        errs: &mut Errors,
    ) -> T {
        let Some(s) = self.string(key, errs) else {
            return default;
        };
        match options.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                errs.push(
                    self.key(key),
                    format!("unknown value {s:?}; expected one of {}", names.join(", ")),
                );
                default
            }
        }
    }

    pub(super) fn array(&mut self, key: &'static str, errs: &mut Errors) -> Vec<&'a Value> {
        match self.raw(key) {
            None => Vec::new(),
            Some(Value::Array(a)) => a.iter().collect(),
            Some(other) => {
                errs.push(
                    self.key(key),
                    format!("expected an array, found {}", kind_of(other)),
                );
                Vec::new()
            }
        }
    }

    pub(super) fn string_list(&mut self, key: &'static str, errs: &mut Errors) -> Vec<String> {
        let path = self.key(key);
        let mut out = Vec::new();
        for (i, v) in self.array(key, errs).into_iter().enumerate() {
            match v {
                Value::String(s) => out.push(s.clone()),
                other => errs.push(
                    format!("{path}[{i}]"),
                    format!("expected a string, found {}", kind_of(other)),
                ),
            }
        }
        out
    }

    pub(super) fn sub(&mut self, key: &'static str, errs: &mut Errors) -> Table<'a> {
        let v = self.raw(key);
        Table::new(self.key(key), v, errs)
    }

    /// Reports keys nobody asked for: typos must not pass silently.
    pub(super) fn finish(self, errs: &mut Errors) {
        if let Some(map) = self.map {
            let mut unknown: Vec<&String> = map
                .keys()
                .filter(|k| !self.used.contains(k.as_str()))
                .collect();
            unknown.sort();
            for k in unknown {
                errs.push(join(&self.path, k), "unknown key");
            }
        }
    }
}

pub(super) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

/// `"25MB"` → 26214400; units B, KB/KiB, MB/MiB, GB/GiB (1024-based).
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("invalid size {s:?}; use e.g. \"25MB\" or a number of bytes");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}
