//! `[correlation]`: method order, smart matching, tracking tokens.

use super::*;

pub(super) fn correlation_settings(
    mut c: Table<'_>,
    base_dir: &Path,
    errs: &mut Errors,
) -> CorrelationSettings {
    let mut s = CorrelationSettings::default();
    let names: Vec<(&str, CorrelationMethod)> = [
        CorrelationMethod::Folder,
        CorrelationMethod::InReplyTo,
        CorrelationMethod::TrackingToken,
        CorrelationMethod::ConversationIndex,
        CorrelationMethod::SmartMatching,
    ]
    .iter()
    .map(|m| (m.as_str(), *m))
    .collect();
    let path = c.key("order");
    let order = c.string_list("order", errs);
    if !order.is_empty() {
        let mut seen = HashSet::new();
        let mut parsed = Vec::new();
        for (i, name) in order.iter().enumerate() {
            match names.iter().find(|(n, _)| n == name) {
                Some((_, m)) if seen.insert(*m) => parsed.push(*m),
                Some(_) => errs.push(format!("{path}[{i}]"), format!("{name:?} is listed twice")),
                None => {
                    let all: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
                    errs.push(
                        format!("{path}[{i}]"),
                        format!(
                            "unknown method {name:?}; expected one of {}",
                            all.join(", ")
                        ),
                    );
                }
            }
        }
        s.order = parsed;
    }
    // `smart_matching = true` (short form) or a `[correlation.smart_matching]` table.
    let short_form = match c.map.and_then(|m| m.get("smart_matching")) {
        Some(Value::Bool(_)) => true,
        // An environment override is a string.
        Some(Value::String(s)) => s == "true" || s == "false",
        _ => false,
    };
    if short_form {
        s.smart_matching = c.bool("smart_matching", s.smart_matching, errs);
    } else {
        let mut sm = c.sub("smart_matching", errs);
        s.smart_matching = sm.bool("enabled", s.smart_matching, errs);
        s.smart = smart_settings(&mut sm, errs);
        sm.finish(errs);
    }
    s.max_tracked_folders = c.int(
        "max_tracked_folders",
        s.max_tracked_folders as i64,
        1,
        1000,
        errs,
    ) as usize;
    let mut tt = c.sub("tracking_token", errs);
    tracking_token_settings(&mut tt, base_dir, &mut s, errs);
    tt.finish(errs);
    c.finish(errs);
    s
}

pub(super) fn smart_settings(t: &mut Table<'_>, errs: &mut Errors) -> SmartSettings {
    let d = SmartSettings::default();
    let mode = t.choice(
        "mode",
        d.mode,
        &[
            ("dynamics", SmartMode::Dynamics),
            ("scored", SmartMode::Scored),
        ],
        errs,
    );
    let threshold = match t.raw("threshold") {
        None => d.threshold,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => x as f32,
            _ => {
                errs.push(t.key("threshold"), format!("{n} is out of range 0..=1"));
                d.threshold
            }
        },
        // An environment override is a string.
        Some(Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(x) if (0.0..=1.0).contains(&x) => x as f32,
            _ => {
                errs.push(
                    t.key("threshold"),
                    format!("{s:?} is not a number between 0 and 1"),
                );
                d.threshold
            }
        },
        Some(other) => {
            errs.push(
                t.key("threshold"),
                format!(
                    "expected a number between 0 and 1, found {}",
                    kind_of(other)
                ),
            );
            d.threshold
        }
    };
    SmartSettings {
        mode,
        threshold,
        window_days: t.int("window_days", i64::from(d.window_days), 1, 3650, errs) as u32,
        hash_max_count: t.int("hash_max_count", d.hash_max_count as i64, 1, 100, errs) as usize,
        hash_delta_subject_count: t.int(
            "hash_delta_subject_count",
            d.hash_delta_subject_count as i64,
            0,
            100,
            errs,
        ) as usize,
        hash_min_address_count: t.int(
            "hash_min_address_count",
            d.hash_min_address_count as i64,
            0,
            100,
            errs,
        ) as usize,
    }
}

pub(super) fn tracking_token_settings(
    t: &mut Table<'_>,
    base_dir: &Path,
    s: &mut CorrelationSettings,
    errs: &mut Errors,
) {
    let d = TokenSettings::default();
    let prefix = t.string("prefix", errs).unwrap_or(d.prefix);
    let base_number = t.int(
        "base_number",
        i64::from(d.base_number),
        0,
        i64::from(token::MAX_BASE_NUMBER),
        errs,
    ) as u32;
    let user_digits = t.int("user_digits", i64::from(d.user_digits), 1, 10, errs) as u8;
    let counter_digits = t.int("counter_digits", i64::from(d.counter_digits), 1, 9, errs) as u8;
    let previous_prefixes = t.string_list("previous_prefixes", errs);
    let signing = t.string("signing_key_file", errs).and_then(|f| {
        let mut p = PathBuf::from(&f);
        if p.is_relative() && !p.exists() {
            p = base_dir.join(&f);
        }
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                // First line: the current key; further lines: retired keys still accepted.
                let mut keys = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| l.as_bytes().to_vec());
                let current = keys.next().unwrap_or_default();
                if current.len() < token::MIN_KEY_LEN {
                    errs.push(
                        t.key("signing_key_file"),
                        format!(
                            "{}: the key must be at least {} bytes",
                            p.display(),
                            token::MIN_KEY_LEN
                        ),
                    );
                    return None;
                }
                Some(token::SigningKey {
                    current,
                    previous: keys.collect(),
                })
            }
            Err(e) => {
                errs.push(
                    t.key("signing_key_file"),
                    format!("cannot read {}: {e}", p.display()),
                );
                None
            }
        }
    });
    s.require_signature = t.bool("require_signature", false, errs);
    if s.require_signature && signing.is_none() {
        errs.push(t.key("require_signature"), "needs signing_key_file");
    }
    s.token = TokenSettings {
        prefix,
        base_number,
        user_digits,
        counter_digits,
        previous_prefixes,
        signing,
    };
    // The token module names the field in each problem ("prefix: …").
    for problem in s.token.validate() {
        let (field, msg) = problem.split_once(": ").unwrap_or(("", problem.as_str()));
        let path = if field.is_empty() {
            t.path.clone()
        } else if field.starts_with("signing") {
            t.key("signing_key_file")
        } else {
            t.key(field)
        };
        errs.push(path, msg.to_string());
    }
}
