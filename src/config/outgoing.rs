//! `[outgoing]`: what the daemon lets the CRM send (attachment policy,
//! threading headers). Per-profile SMTP settings: `SmtpSettings`.

/// Dynamics' default blocked attachment extensions (System Settings →
/// General → "Set blocked file extensions for attachments").
pub const DEFAULT_BLOCKED_EXTENSIONS: &[&str] = &[
    "ade", "adp", "app", "asa", "ashx", "asmx", "asp", "bas", "bat", "cdx", "cer", "chm", "class",
    "cmd", "com", "config", "cpl", "crt", "csh", "dll", "exe", "fxp", "hlp", "hta", "htr", "htw",
    "ida", "idc", "idq", "inf", "ins", "isp", "its", "jar", "js", "jse", "ksh", "lnk", "mad",
    "maf", "mag", "mam", "maq", "mar", "mas", "mat", "mau", "mav", "maw", "mda", "mdb", "mde",
    "mdt", "mdw", "mdz", "msc", "msh", "msh1", "msh1xml", "msh2", "msh2xml", "mshxml", "msi",
    "msp", "mst", "ops", "pcd", "pif", "prf", "prg", "printer", "pst", "reg", "rem", "scf", "scr",
    "sct", "shb", "shs", "shtm", "shtml", "soap", "stm", "tmp", "url", "vb", "vbe", "vbs",
    "vsmacro", "vss", "vst", "vsw", "ws", "wsc", "wsf", "wsh",
];

/// `[outgoing]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingSettings {
    /// Largest single attachment, in bytes (Dynamics: 5 MB by default,
    /// configurable up to 128 MB; we default to 25 MB like most providers).
    pub max_attachment_bytes: u64,
    /// Largest composed message, in bytes (attachments base64-encoded).
    pub max_message_bytes: u64,
    /// Attachment file name extensions refused (lower case, no dot).
    pub blocked_extensions: Vec<String>,
}

impl Default for OutgoingSettings {
    fn default() -> Self {
        OutgoingSettings {
            max_attachment_bytes: 25 << 20,
            max_message_bytes: 35 << 20,
            blocked_extensions: DEFAULT_BLOCKED_EXTENSIONS
                .iter()
                .map(|e| (*e).to_owned())
                .collect(),
        }
    }
}

/// Parses `[outgoing]`.
pub(super) fn outgoing_settings(
    mut t: super::Table<'_>,
    errs: &mut super::Errors,
) -> OutgoingSettings {
    let d = OutgoingSettings::default();
    let max_attachment_bytes = t.size(
        "max_attachment_size",
        d.max_attachment_bytes,
        1,
        128 << 20,
        errs,
    );
    let max_message_bytes = t.size("max_message_size", d.max_message_bytes, 1024, 1 << 30, errs);
    let blocked_extensions = if t.raw("blocked_extensions").is_some() {
        t.string_list("blocked_extensions", errs)
            .into_iter()
            .map(|e| e.trim().trim_start_matches('.').to_ascii_lowercase())
            .filter(|e| !e.is_empty())
            .collect()
    } else {
        d.blocked_extensions
    };
    t.finish(errs);
    OutgoingSettings {
        max_attachment_bytes,
        max_message_bytes,
        blocked_extensions,
    }
}
