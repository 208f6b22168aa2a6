//! The license tokens the server issued for this machine, one file each
//! (`<state_dir>/tokens/<license_id>.token`, world-readable: a token is useless without this
//! machine's secret), where POS applications pick them up. Rewritten after every fetch: new
//! and changed tokens written atomically, tokens of licenses no longer current removed.

use std::collections::BTreeSet;
use std::path::Path;

use license_protocol::agent_api::LicenseToken;

use crate::platform::files::{write_atomic, PUBLIC};

/// Brings `dir` in line with `tokens`; the error names the path that failed.
pub fn write_tokens(dir: &Path, tokens: &[LicenseToken]) -> Result<(), (String, std::io::Error)> {
    let failed = |path: &Path, e| (path.display().to_string(), e);
    std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
    let mut keep = BTreeSet::new();
    for t in tokens {
        let name = format!("{}.token", t.license_id);
        let path = dir.join(&name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(t.token.as_str()) {
            write_atomic(&path, t.token.as_bytes(), PUBLIC).map_err(|e| failed(&path, e))?;
        }
        keep.insert(name);
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".token") && !keep.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u128, text: &str) -> LicenseToken {
        LicenseToken {
            license_id: uuid::Uuid::from_u128(id),
            secret_version: 1,
            token: text.into(),
            expires_at: None,
        }
    }

    #[test]
    fn writes_replaces_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        write_tokens(&tokens, &[token(1, "a"), token(2, "b")]).unwrap();
        std::fs::write(tokens.join("notes.txt"), "kept").unwrap();
        write_tokens(&tokens, &[token(2, "c")]).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&tokens)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["00000000-0000-0000-0000-000000000002.token", "notes.txt"]
        );
        let two = tokens.join("00000000-0000-0000-0000-000000000002.token");
        assert_eq!(std::fs::read_to_string(two).unwrap(), "c");
    }
}
